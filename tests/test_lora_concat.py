"""The concatenated serving layouts (``lora.decode_layout``, ``lora.concat_layout``): per-row LoRA
with no gather, equal to the gather path (``lora_delta``), the merged weights and plain math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import lora
from realm_jax.errors import RealmError
from realm_jax.model import decode_layout as params_decode_layout
from realm_jax.model import forward, forward_cached, forward_jit
from realm_jax.kv_cache import init_cache

from test_lora import CFG, naive_delta, random_params, three_adapters


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


def padded_stack_leaf(rng, A, din, dout, ranks, per_rank_scale):
    """One layer's stacked leaf with ranks zero-padded to the largest (as stack_adapters pads)."""
    R = max(ranks)
    a = rng.normal(size=(A, din, R)).astype(np.float32)
    b = rng.normal(size=(A, R, dout)).astype(np.float32)
    for i, r in enumerate(ranks):
        a[i, :, r:] = 0
        b[i, r:] = 0
    scale = rng.uniform(0.5, 2, size=(A, R) if per_rank_scale else (A,)).astype(np.float32)
    return {"a": a, "b": b, "scale": scale}


@pytest.mark.parametrize("per_rank_scale", [False, True], ids=["scale_per_adapter", "scale_per_rank"])
def test_concat_delta_equals_gather_path_and_plain_math(per_rank_scale):
    rng = np.random.default_rng(0)
    A, B, T, din, dout = 3, 6, 2, 7, 11
    leaf = padded_stack_leaf(rng, A, din, dout, ranks=[3, 1, 2], per_rank_scale=per_rank_scale)
    x = jnp.asarray(rng.normal(size=(B, T, din)), jnp.float32)
    ids = jnp.array([2, -1, 0, 1, 7, 0], jnp.int32)  # -1 and out-of-range 7: the base model
    stacked = jax.tree.map(jnp.asarray, leaf)
    cat = lora._to_concat(stacked, 0)
    assert cat["a_t"].shape == (A * 3, din) and cat["b"].shape == (A * 3, dout) and cat["scale"].shape == (A, 3)

    ref = np.asarray(lora.lora_delta(x, stacked, ids, method="gather"))
    scale = leaf["scale"] if per_rank_scale else leaf["scale"][:, None]
    want = np.zeros((B, T, dout))
    for r, i in enumerate(np.asarray(ids)):
        if 0 <= i < A:
            want[r] = (np.asarray(x, np.float64)[r] @ leaf["a"][i] * scale[i]) @ leaf["b"][i]
    for method in ("dense", "gather"):
        got = np.asarray(lora.concat_delta(x, cat, ids, method=method))
        d_ref, d_math = np.abs(got - ref).max(), np.abs(got - want).max()
        print(method, f"max |concat - gather path| {d_ref:.1e}, max |concat - float64 math| {d_math:.1e}")
        assert d_ref <= 1e-5 and d_math <= 1e-5
        assert not got[[1, 4]].any()  # id -1 and 7: exactly zero


def test_single_adapter_concat_leaf_is_a_stack_of_one():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32)
    leaf = {"a": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32), "scale": jnp.float32(0.7)}
    cat = lora._to_concat(leaf, 0)
    assert cat["a_t"].shape == (2, 5) and cat["scale"].shape == (2,)
    ids = jnp.array([0, -1, 0])
    every_row = naive_delta(x, leaf["a"][None], leaf["b"][None], [0.7], [0, 0, 0])
    np.testing.assert_allclose(np.asarray(lora.concat_delta(x, cat)), every_row, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(lora.concat_delta(x, cat, ids)),
                               np.asarray(lora.lora_delta(x, leaf, ids)), atol=1e-5, rtol=0)


def test_concat_layout_column_order(params):
    """Rank column a*R + r of the concatenated factors is rank r of adapter a (stacked params)."""
    stack = lora.stack_adapters(three_adapters())
    cat = lora.concat_layout(stack, CFG)
    for name, leaf in stack["layers"].items():
        c = cat["layers"][name]
        L, A, din, R = leaf["a"].shape
        np.testing.assert_array_equal(np.asarray(c["a_t"]).reshape(L, A, R, din),
                                      np.asarray(leaf["a"]).transpose(0, 1, 3, 2))
        np.testing.assert_array_equal(np.asarray(c["b"]).reshape(L, A, R, -1), np.asarray(leaf["b"]))
        np.testing.assert_array_equal(np.asarray(c["scale"]),
                                      np.broadcast_to(np.asarray(leaf["scale"])[..., None], (L, A, R)))


@pytest.mark.parametrize("param_layout", ["stacked", "decode"])
def test_serving_layout_equals_gather_path_and_merged(params, param_layout, monkeypatch):
    """A batch mixing three adapters (ranks 4, 2, 6 zero-padded; different targets and layers) and
    the base model: the concatenated layout gives the logits of the gather path (lora_delta on
    the stack, forced to gather) and of each row alone with its adapter merged."""
    ads = three_adapters()
    stack = lora.stack_adapters(ads)
    if param_layout == "decode":
        p, served = params_decode_layout(params), lora.decode_layout(stack, CFG)
        assert "wqkv" in served["layers"][0] and "a_t" in served["layers"][0]["wqkv"]
    else:
        p, served = params, lora.concat_layout(stack, CFG)
    rng = np.random.default_rng(3)
    lengths = np.array([7, 4, 9, 5, 6], np.int32)
    tokens = rng.integers(3, 97, (5, 9)).astype(np.int32)
    ids = jnp.array([2, -1, 0, 1, 0], jnp.int32)  # A=3 <= B=5: the dense (no-gather) path
    got = np.asarray(forward_jit(p, CFG, tokens, lengths, adapters=served, adapter_ids=ids))

    plain = lora.lora_delta
    monkeypatch.setattr(lora, "lora_delta", lambda x, leaf, i=None: plain(x, leaf, i, method="gather"))
    gather_fwd = jax.jit(forward, static_argnums=1)  # a fresh cache: traced with the gather path
    ref = np.asarray(gather_fwd(p, CFG, tokens, lengths, adapters=stack, adapter_ids=ids))
    monkeypatch.undo()

    d_gather = max(np.abs(got[r, :n] - ref[r, :n]).max() for r, n in enumerate(lengths))
    d_merged = 0.0
    for r, (i, n) in enumerate(zip(np.asarray(ids), lengths)):
        m = params if i < 0 else lora.merge(params, ads[i])
        alone = np.asarray(forward_jit(m, CFG, tokens[r:r + 1], lengths[r:r + 1]))
        d_merged = max(d_merged, np.abs(got[r, :n] - alone[0, :n]).max())
    print(param_layout, f"max |concat - gather path| {d_gather:.1e}, max |concat - merged| {d_merged:.1e}")
    assert d_gather <= 2e-5 and d_merged <= 2e-5


def lowered_counts(p, adapters, batch):
    """(dot_general, gather) ops in one lowered decode step (forward_cached with T=1)."""
    cache = init_cache(CFG, batch, 16, jnp.float32, per_layer=realm_jax.model.is_unstacked(p["layers"]))
    ids = None if adapters is None else jnp.zeros((batch,), jnp.int32)

    def step(p, adapters, tokens, lengths, cache, ids):
        return forward_cached(p, CFG, tokens, lengths, cache, adapters=adapters, adapter_ids=ids)[0]

    text = jax.jit(step).lower(p, adapters, jnp.ones((batch, 1), jnp.int32), jnp.ones((batch,), jnp.int32),
                               cache, ids).as_text()
    return text.count("stablehlo.dot_general"), text.count("stablehlo.gather")


def test_decode_step_has_no_gather_and_two_matmuls_per_fused_projection(params):
    """What the layout is for: in one decode step the concatenated decode layout adds exactly two
    matmuls per (fused) projection and layer and no gather, whatever the adapter count."""
    p = params_decode_layout(params)
    stack = lora.stack_adapters(three_adapters())
    base_dots, base_gathers = lowered_counts(p, None, 4)
    dots, gathers = lowered_counts(p, lora.decode_layout(stack, CFG), 4)
    fused = 4  # wqkv, wo, w_gate_up, w_down: the three adapters target all seven projections
    assert (dots - base_dots, gathers - base_gathers) == (2 * fused * CFG.num_layers, 0)
    # the per-projection stack on the same params: two matmuls per unfused projection (seven)
    dots_stack, _ = lowered_counts(p, stack, 4)
    assert dots_stack - base_dots == 2 * 7 * CFG.num_layers


def test_no_retrace_for_a_new_adapter_stack(params):
    traces = []

    def fwd(p, tokens, lengths, adapters, ids):
        traces.append(1)
        return forward(p, CFG, tokens, lengths, adapters=adapters, adapter_ids=ids)

    f = jax.jit(fwd)
    p = params_decode_layout(params)
    tokens = jnp.asarray(np.random.default_rng(5).integers(3, 97, (4, 5)), jnp.int32)
    lengths = jnp.array([5, 3, 4, 5], jnp.int32)
    ids = jnp.array([0, 1, -1, 1], jnp.int32)
    first = lora.stack_adapters([lora.init_adapter(CFG, s, rank=3, b_std=0.3) for s in (20, 21)])
    second = lora.stack_adapters([lora.init_adapter(CFG, s, rank=3, b_std=0.3) for s in (22, 23)])
    out1 = f(p, tokens, lengths, lora.decode_layout(first, CFG), ids)
    sizes = lora._concat_jit._cache_size(), lora._fused_layers_jit._cache_size()
    out2 = f(p, tokens, lengths, lora.decode_layout(second, CFG), ids)
    assert len(traces) == 1
    assert (lora._concat_jit._cache_size(), lora._fused_layers_jit._cache_size()) == sizes
    assert np.abs(np.asarray(out1) - np.asarray(out2))[[0, 1, 3]].max() > 1e-2  # new values are used
    np.testing.assert_array_equal(np.asarray(out1)[2], np.asarray(out2)[2])  # the base row


def test_serving_layout_errors(params):
    ad = lora.init_adapter(CFG, 0, rank=2, targets=("wq", "w_down"))
    cat = lora.concat_layout(ad, CFG)
    assert lora.check_adapter(cat, lora.projection_dims(CFG), CFG.num_layers) is None  # a single adapter
    with pytest.raises(RealmError, match="merge: the adapter is in concat_layout's serving form"):
        lora.merge(params, cat)
    with pytest.raises(RealmError, match="decode_layout: the adapters are in concat_layout's form"):
        lora.decode_layout(cat, CFG)
    dec = lora.decode_layout(ad, CFG)
    assert lora.decode_layout(dec, CFG) is dec
    with pytest.raises(RealmError, match=r"decode_layout\(concat=False\): the adapters are already concatenated"):
        lora.decode_layout(dec, CFG, concat=False)
    with pytest.raises(RealmError, match="concat_layout: the adapters are in the decode layout"):
        lora.concat_layout(dec, CFG)
    bad = {"layers": {**cat["layers"], "wq": {**cat["layers"]["wq"], "a_t": jnp.zeros((3, 2, 31))}}}
    with pytest.raises(RealmError, match=r"\['wq'\]\['a_t'\]: expected shape \(3, 2, 30\).*got \(3, 2, 31\)"):
        lora.check_adapter(bad, lora.projection_dims(CFG), CFG.num_layers)
    stack = lora.concat_layout(lora.stack_adapters([ad, ad]), CFG)
    x = jnp.ones((2, 1, 30))
    with pytest.raises(RealmError, match="adapter_ids: required"):
        lora.concat_delta(x, jax.tree.map(lambda v: v[0], stack["layers"]["wq"]))
    with pytest.raises(RealmError, match="adapter_ids: expected values in"):
        realm_jax.generate(realm_jax.Model(CFG, params), [[5, 6]], 2, adapters=stack, adapter_ids=[2])
