"""LoRA transforms against plain math: per-row delta, merge/unmerge, mixed-adapter batches, jit."""

from functools import partial
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import lora
from realm_jax.config import ModelConfig
from realm_jax.errors import RealmError
from realm_jax.model import forward_jit, param_shapes

CFG = ModelConfig(arch="llama", vocab_size=97, hidden_size=30, intermediate_size=56, num_layers=3,
                  num_heads=6, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, eos_token_ids=(2,))


def random_params(cfg, seed=0):
    """Like ``init_params`` but drawn with numpy on the host (no compile of a random program)."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        x = 1.0 + 0.1 * rng.standard_normal(shape) if "norm" in name else 0.08 * rng.standard_normal(shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


def three_adapters():
    """Different ranks, targets and touched layers (so padding and absent targets are exercised)."""
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    return [
        lora.init_adapter(CFG, k[0], rank=4, b_std=0.2),
        lora.init_adapter(CFG, k[1], rank=2, targets=("wq", "wv", "w_down"), alpha=5.0, b_std=0.3),
        lora.init_adapter(CFG, k[2], rank=6, targets=("wo", "w_gate", "w_up"), use_rslora=True,
                          layers=(0, 2), b_std=0.3),
    ]


def naive_delta(x, a, b, scale, ids):
    """float64 numpy: row b gets scale[id] * x @ a[id] @ b[id], or 0 for ids outside [0, A)."""
    x, a, b, scale = (np.asarray(v, np.float64) for v in (x, a, b, scale))
    out = np.zeros(x.shape[:2] + (b.shape[-1],))
    for r, i in enumerate(np.asarray(ids)):
        if 0 <= i < a.shape[0]:
            out[r] = scale[i] * x[r] @ a[i] @ b[i]
    return out


@pytest.mark.parametrize("method", ["dense", "gather"])
def test_lora_delta_matches_plain_math(method):
    rng = np.random.default_rng(0)
    A, B, T, din, R, dout = 3, 5, 4, 7, 3, 11
    x = rng.normal(size=(B, T, din)).astype(np.float32)
    leaf = {"a": rng.normal(size=(A, din, R)).astype(np.float32),
            "b": rng.normal(size=(A, R, dout)).astype(np.float32),
            "scale": np.array([0.5, 2.0, 1.25], np.float32)}
    ids = np.array([2, -1, 0, 1, 7], np.int32)  # 7 is out of range: base
    got = lora.lora_delta(jnp.asarray(x), jax.tree.map(jnp.asarray, leaf), jnp.asarray(ids), method=method)
    want = naive_delta(x, leaf["a"], leaf["b"], leaf["scale"], ids)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    assert not np.asarray(got)[1].any()


def test_single_adapter_delta_is_a_stack_of_one():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32)
    leaf = {"a": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32), "scale": jnp.float32(0.7)}
    ids = jnp.array([0, -1, 0])
    all_rows = naive_delta(x, leaf["a"][None], leaf["b"][None], [0.7], [0, 0, 0])
    np.testing.assert_allclose(np.asarray(lora.lora_delta(x, leaf)), all_rows, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lora.lora_delta(x, leaf, ids)),
                               naive_delta(x, leaf["a"][None], leaf["b"][None], [0.7], ids), atol=1e-5)


def test_mixed_batch_rows_equal_each_alone_merged(params):
    """Rows with three different adapters and the base model, unmerged in one batch, give what
    each row gets alone with its adapter merged into the weights (the plain path)."""
    ads = three_adapters()
    stack = lora.stack_adapters(ads)
    assert stack["layers"]["wq"]["a"].shape == (3, 3, 30, 4)  # [L, A, D_in, R=max rank]
    rng = np.random.default_rng(3)
    lengths = np.array([7, 4, 9, 5, 6], np.int32)
    tokens = rng.integers(3, 97, (5, 9)).astype(np.int32)
    ids = np.array([2, -1, 0, 1, 0], np.int32)
    batch = np.asarray(forward_jit(params, CFG, tokens, lengths, adapters=stack, adapter_ids=jnp.asarray(ids)))
    base = np.asarray(forward_jit(params, CFG, tokens, lengths))
    for r, (i, n) in enumerate(zip(ids, lengths)):
        p = params if i < 0 else lora.merge(params, ads[i])
        alone = np.asarray(forward_jit(p, CFG, tokens[r:r + 1], lengths[r:r + 1]))  # same shapes: one compile
        np.testing.assert_allclose(batch[r, :n], alone[0, :n], atol=2e-5, rtol=0)
        if i >= 0:  # the adapter really changes this row
            assert np.abs(batch[r, :n] - base[r, :n]).max() > 1e-2


def test_gather_path_in_model_equals_dense_path(params):
    """More adapters than rows picks the gather path; it gives the same logits as merged."""
    ads = three_adapters()
    stack = lora.stack_adapters(ads)
    tokens = np.random.default_rng(4).integers(3, 97, (2, 6)).astype(np.int32)
    lengths = np.array([6, 3], np.int32)
    ids = np.array([2, 1], np.int32)
    got = np.asarray(forward_jit(params, CFG, tokens, lengths, adapters=stack, adapter_ids=jnp.asarray(ids)))
    for r, i in enumerate(ids):
        want = np.asarray(forward_jit(lora.merge(params, ads[i]), CFG, tokens[r:r + 1], lengths[r:r + 1]))
        np.testing.assert_allclose(got[r, :lengths[r]], want[0, :lengths[r]], atol=2e-5, rtol=0)


def test_generate_serves_each_row_its_adapter(params):
    """generation.generate with a stack: each row's greedy tokens equal that row generated alone
    with its adapter merged."""
    ads = three_adapters()
    stack = lora.stack_adapters(ads)
    model = realm_jax.Model(CFG, params)
    prompts = [[5, 9, 14, 3, 60], [7, 8], [40, 41, 42], [11, 12, 13, 14]]
    ids = [1, 0, -1, 2]
    out = realm_jax.generate(model, prompts, 6, stop_ids=[], max_len=64, adapters=stack, adapter_ids=ids)
    for p, i, toks in zip(prompts, ids, out.tokens):
        m = model if i < 0 else realm_jax.Model(CFG, lora.merge(params, ads[i]))
        alone = realm_jax.generate(m, [p], 6, stop_ids=[], max_len=64)
        assert toks == alone.tokens[0]
    assert len({tuple(t) for t in out.tokens}) == 4


def test_per_rank_scale_matches_plain_math():
    """Fused (decode-layout) leaves carry a scale per rank column: [A, R]."""
    rng = np.random.default_rng(5)
    A, B, din, R, dout = 2, 3, 6, 4, 5
    x = rng.normal(size=(B, 2, din)).astype(np.float32)
    a, b = rng.normal(size=(A, din, R)), rng.normal(size=(A, R, dout))
    scale = rng.uniform(0.5, 2, size=(A, R))
    ids = np.array([1, -1, 0])
    want = np.zeros((B, 2, dout))
    for r, i in enumerate(ids):
        if i >= 0:
            want[r] = (x[r] @ a[i] * scale[i]) @ b[i]
    leaf = {k: jnp.asarray(v, jnp.float32) for k, v in dict(a=a, b=b, scale=scale).items()}
    for method in ("dense", "gather"):
        got = lora.lora_delta(jnp.asarray(x), leaf, jnp.asarray(ids), method=method)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("form", ["sliced", "fused", "concat"])
def test_decode_layout_params_serve_mixed_batch(params, form):
    """Params in model.decode_layout with stacked adapters (sliced per layer), with
    lora.decode_layout(concat=False) adapters (q|k|v and gate|up fused, per adapter) or with
    lora.decode_layout adapters (fused and concatenated over adapters): each row equals its
    merged model."""
    from realm_jax.model import decode_layout

    ads = three_adapters()
    stack = lora.stack_adapters(ads)
    fast = decode_layout(params)
    adapters = stack if form == "sliced" else lora.decode_layout(stack, CFG, concat=form == "concat")
    if form == "fused":
        assert isinstance(adapters["layers"], tuple) and "wqkv" in adapters["layers"][0]
        assert adapters["layers"][0]["wqkv"]["b"].shape == (3, 4 + 4 + 4, 48 + 16 + 16)  # [A, Rq+Rk+Rv, (N+2K)*H]
    if form == "concat":
        leaf = adapters["layers"][0]["wqkv"]
        assert leaf["a_t"].shape == (3 * 12, 30) and leaf["b"].shape == (3 * 12, 80)  # [A*(Rq+Rk+Rv), ..]
        assert leaf["scale"].shape == (3, 12)
    rng = np.random.default_rng(6)
    tokens = rng.integers(3, 97, (4, 7)).astype(np.int32)
    lengths = np.array([7, 5, 6, 3], np.int32)
    ids = np.array([0, 2, -1, 1], np.int32)
    got = np.asarray(forward_jit(fast, CFG, tokens, lengths, adapters=adapters, adapter_ids=jnp.asarray(ids)))
    for r, i in enumerate(ids):
        p = params if i < 0 else lora.merge(params, ads[i])
        want = np.asarray(forward_jit(p, CFG, tokens[r:r + 1], lengths[r:r + 1]))
        np.testing.assert_allclose(got[r, :lengths[r]], want[0, :lengths[r]], atol=2e-5, rtol=0)


def test_merge_into_decode_layout_equals_decode_layout_of_merge(params):
    from realm_jax.model import decode_layout

    ad = three_adapters()[1]  # wq, wv, w_down only: the fused weights are partly touched
    a = lora.merge(decode_layout(params), ad)
    b = decode_layout(lora.merge(params, ad))
    close = partial(np.testing.assert_allclose, atol=1e-6, rtol=0)
    jax.tree_util.tree_map(close, a["layers"], b["layers"])  # weights in their transposed form
    back = lora.unmerge(a, ad)
    jax.tree_util.tree_map(close, back["layers"][1]["wqkv"], decode_layout(params)["layers"][1]["wqkv"])
    # the untransposed decode layout merges the same way
    c = lora.merge(decode_layout(params, transposed=False), ad)
    jax.tree_util.tree_map(close, c["layers"], decode_layout(lora.merge(params, ad), transposed=False)["layers"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unmerge_of_merge_is_identity_to_rounding(params, dtype):
    p = jax.tree.map(lambda w: w.astype(dtype), params)
    ad = three_adapters()[0]
    merged = lora.merge(p, ad)
    back = lora.unmerge(merged, ad)
    eps = float(jnp.finfo(dtype).eps)
    for name in lora.PROJECTIONS:
        w = np.asarray(p["layers"][name], np.float32)
        m = np.asarray(merged["layers"][name], np.float32)
        delta = np.einsum("ldr,lro->ldo", np.asarray(ad["layers"][name]["a"], np.float64),
                          np.asarray(ad["layers"][name]["b"], np.float64)) * np.asarray(
            ad["layers"][name]["scale"])[:, None, None]
        assert merged["layers"][name].dtype == dtype
        # merge is W + scale * A @ B (rounded once to the weight dtype)
        np.testing.assert_array_less(np.abs(m - (w + delta)), eps * (np.abs(w) + np.abs(delta)) + 1e-7)
        # the round trip is off by at most one rounding of each of the two steps
        np.testing.assert_array_less(np.abs(np.asarray(back["layers"][name], np.float32) - w),
                                     eps * (2 * np.abs(w) + np.abs(delta)) + 1e-7)
    for k in ("embed", "final_norm", "lm_head"):
        assert merged[k] is p[k]


def test_merge_in_jit_does_not_retrace_for_a_new_adapter(params):
    traces = []

    def f(p, a):
        traces.append(1)
        return lora.merge(p, a)

    merge_jit = jax.jit(f)
    a1, a2 = (lora.init_adapter(CFG, jax.random.PRNGKey(s), rank=4) for s in (10, 11))
    out1 = merge_jit(params, a1)
    out2 = merge_jit(params, a2)
    assert len(traces) == 1 and merge_jit._cache_size() == 1
    for out, a in ((out1, a1), (out2, a2)):
        np.testing.assert_allclose(np.asarray(out["layers"]["wq"]),
                                   np.asarray(lora.merge(params, a)["layers"]["wq"]), atol=1e-6)
    merge_jit(params, lora.init_adapter(CFG, jax.random.PRNGKey(12), rank=5))  # new rank: new shapes
    assert len(traces) == 2


def test_forward_does_not_retrace_for_new_adapters_or_ids(params):
    traces = []

    def fwd(p, tokens, lengths, adapters, adapter_ids):
        traces.append(1)
        return realm_jax.forward(p, CFG, tokens, lengths, adapters=adapters, adapter_ids=adapter_ids)

    f = jax.jit(fwd)
    ads = three_adapters()
    tokens = jnp.ones((2, 4), jnp.int32)
    lengths = jnp.array([4, 2], jnp.int32)
    f(params, tokens, lengths, lora.stack_adapters(ads), jnp.array([0, 1]))
    f(params, tokens, lengths, lora.stack_adapters(ads[::-1]), jnp.array([-1, 2]))
    assert len(traces) == 1


def test_init_adapter_untouched_layers_are_zero():
    ad = lora.init_adapter(CFG, jax.random.PRNGKey(0), rank=3, targets=("wk",), layers=(1,))
    leaf = ad["layers"]["wk"]
    assert leaf["a"].shape == (3, 30, 3) and leaf["b"].shape == (3, 3, 16)
    np.testing.assert_array_equal(np.asarray(leaf["scale"]), [0.0, 1.0, 0.0])
    assert not np.asarray(leaf["a"])[[0, 2]].any() and np.asarray(leaf["a"])[1].any()


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("layout,form", [("stacked", "stack"), ("stacked", "concat"), ("decode", "concat")])
def test_quantized_base_refuses_merge_and_serves_unmerged(params, layout, form):
    """merge refuses an int8 base; the unmerged path on it equals the unmerged path on the
    dequantized weights (the same numbers, computed as (x @ q) * scale)."""
    from realm_jax.model import decode_layout
    from realm_jax.quantization import dequantize, quantize

    p = decode_layout(params) if layout == "decode" else params
    q = quantize(p)
    ads = three_adapters()
    with pytest.raises(RealmError, match=r"merge: params\['layers'\]\['(wq|wqkv)'\] is quantized"):
        lora.merge(q, ads[0])
    stack = lora.stack_adapters(ads)
    if layout == "decode":
        stack = lora.decode_layout(stack, CFG)
    elif form == "concat":
        stack = lora.concat_layout(stack, CFG)
    tokens = np.random.default_rng(7).integers(3, 97, (3, 6)).astype(np.int32)
    lengths = np.array([6, 4, 5], np.int32)
    ids = jnp.array([1, 0, 2])
    got = np.asarray(forward_jit(q, CFG, tokens, lengths, adapters=stack, adapter_ids=ids))
    want = np.asarray(forward_jit(dequantize(q), CFG, tokens, lengths, adapters=stack, adapter_ids=ids))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    base = np.asarray(forward_jit(q, CFG, tokens, lengths))
    assert np.abs(got - base).max() > 1e-2


def test_merge_refuses_another_models_adapter(params):
    other = CFG.replace(hidden_size=32)
    ad = lora.init_adapter(other, jax.random.PRNGKey(0), rank=2, targets=("wv",))
    with pytest.raises(RealmError, match=r"\['wv'\]\['a'\]: expected shape \(3, 30, 2\).*got \(3, 32, 2\)"):
        lora.merge(params, ad)
    deeper = lora.init_adapter(CFG.replace(num_layers=4), jax.random.PRNGKey(0), rank=2)
    with pytest.raises(RealmError, match=r"expected shape \(3, 30, 2\).*got \(4, 30, 2\)"):
        lora.merge(params, deeper)


def test_bad_adapter_structures(params):
    ad = lora.init_adapter(CFG, jax.random.PRNGKey(0), rank=2, targets=("wq",))
    with pytest.raises(RealmError, match="expected a single adapter, got a stack of 1"):
        lora.merge(params, lora.stack_adapters([ad]))
    with pytest.raises(RealmError, match="unknown projection"):
        lora.merge(params, {"layers": {"lm_head": ad["layers"]["wq"]}})
    with pytest.raises(RealmError, match=r"expected keys \{'a', 'b', 'scale'\}, got \['a', 'b'\]"):
        lora.merge(params, {"layers": {"wq": {"a": 0, "b": 0}}})
    with pytest.raises(RealmError, match="targets: expected a non-empty subset"):
        lora.init_adapter(CFG, jax.random.PRNGKey(0), targets=("q_proj",))
    with pytest.raises(RealmError, match=r"layers: index 3 out of range \[0, 3\)"):
        lora.init_adapter(CFG, jax.random.PRNGKey(0), layers=(3,))


def test_stack_adapters_refuses_mismatched_models():
    a = lora.init_adapter(CFG, jax.random.PRNGKey(0), rank=2, targets=("wq",))
    b = lora.init_adapter(CFG.replace(num_layers=4), jax.random.PRNGKey(0), rank=2, targets=("wq",))
    with pytest.raises(RealmError, match=r"adapters\[1\]\['layers'\]\['wq'\]\['a'\]: expected shape \(3, 30, 2\)"):
        lora.stack_adapters([a, b])
    with pytest.raises(RealmError, match="non-empty list"):
        lora.stack_adapters([])
    with pytest.raises(RealmError, match="a single adapter"):
        lora.stack_adapters([lora.stack_adapters([a])])


def test_adapter_ids_checks():
    x = jnp.ones((2, 1, 30))
    stack = jax.tree.map(lambda v: v[0], lora.stack_adapters([lora.init_adapter(CFG, jax.random.PRNGKey(0))]))
    with pytest.raises(RealmError, match="adapter_ids: required"):
        lora.lora_delta(x, stack["layers"]["wq"])
    with pytest.raises(RealmError, match=r"adapter_ids: expected shape \(2,\)"):
        lora.lora_delta(x, stack["layers"]["wq"], jnp.zeros((3,), jnp.int32))
    with pytest.raises(RealmError, match=r"expected values in \[-1, 2\).*\[2, -3\]"):
        lora.check_adapter_ids([0, 2, -3], 2, 3)
    with pytest.raises(RealmError, match=r"expected int \[3\]"):
        lora.check_adapter_ids([0, 1], 2, 3)


def test_decode_layout_adapters_need_decode_layout_params(params):
    ad = lora.init_adapter(CFG, 0, rank=2)
    fused = lora.decode_layout(ad, CFG)
    with pytest.raises(ValueError, match="decode layout"):
        forward_jit(params, CFG, jnp.ones((1, 3), jnp.int32), jnp.array([3]), adapters=fused)
    with pytest.raises(RealmError, match="merge: the adapter is in the decode layout"):
        lora.merge(params, fused)
