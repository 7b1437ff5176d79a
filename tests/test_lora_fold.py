"""The folded serving layout (``lora.fold_layout``): the A factors appended to the base weights,
so one matmul gives the base output and every adapter's rank activations. Equal to the
concatenated layout (``lora.decode_layout``) and the stacked reference path (``lora_delta``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import lora
from realm_jax.errors import RealmError, UnsupportedModelError
from realm_jax.kv_cache import init_cache
from realm_jax.layers import linear, weight_shape
from realm_jax.model import decode_layout as params_decode_layout
from realm_jax.model import forward, forward_cached

from test_lora import CFG, random_params
from test_lora_concat import lowered_counts

QWEN = CFG.replace(arch="qwen2", qkv_bias=True, tie_word_embeddings=True)  # q|k|v biases after the fold

# (name, config, [(rank, targets, layers)] per adapter): the union of targets decides what is folded
CASES = {
    "llama_all": (CFG, [(4, lora.PROJECTIONS, None), (2, ("wq", "wv", "w_down"), None),
                        (6, ("wo", "w_gate", "w_up"), (0, 2)), (3, ("wk", "w_up"), (1,))]),
    "qwen2_bias": (QWEN, [(3, lora.PROJECTIONS, None), (5, ("wq", "wk", "wo"), None),
                          (2, ("w_gate", "w_down"), (1, 2))]),
    "partial": (CFG, [(4, ("wq", "wv"), None), (2, ("wk", "w_down"), None), (3, ("w_down",), (0,))]),
}
FOLDED = {"llama_all": ("wqkv", "wo", "w_gate_up", "w_down"), "qwen2_bias": ("wqkv", "wo", "w_gate_up", "w_down"),
          "partial": ("wqkv", "w_down")}


def make_adapters(cfg, spec, seed=0):
    return [lora.init_adapter(cfg, seed + 10 * i, rank=r, targets=t, layers=ls, b_std=0.3, alpha=2.0 * r + i)
            for i, (r, t, ls) in enumerate(spec)]


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(name, cfg, decode-layout params, stack, concatenated adapters, folded params, folded adapters)."""
    cfg, spec = CASES[request.param]
    p = params_decode_layout(random_params(cfg, seed=1))
    stack = lora.stack_adapters(make_adapters(cfg, spec))
    fp, fa = lora.fold_layout(p, stack, cfg)
    return request.param, cfg, p, stack, lora.decode_layout(stack, cfg), fp, fa


def max_diff(a, b, lengths):
    return max(np.abs(np.asarray(a)[r, :n] - np.asarray(b)[r, :n]).max() for r, n in enumerate(lengths))


def test_folded_weights_have_the_a_rows_and_share_the_rest(case):
    name, cfg, p, stack, cat, fp, fa = case
    A = len(CASES[name][1])
    for i, (lp, flp, cl, fl) in enumerate(zip(p["layers"], fp["layers"], cat["layers"], fa["layers"])):
        assert set(fl) == set(FOLDED[name]) == set(cl)
        for n, w in flp.items():
            if n not in FOLDED[name]:
                assert w is lp[n]  # untargeted projections, norms, biases: the very same arrays
                continue
            t, a_t = np.asarray(w["t_lora"]), np.asarray(cl[n]["a_t"])
            dout = lp[n]["t"].shape[0]
            assert set(w) == {"t_lora"} and a_t.shape[0] % A == 0 and a_t.shape[0] > 0
            assert t.shape == (dout + a_t.shape[0], lp[n]["t"].shape[1])
            np.testing.assert_array_equal(t[:dout], np.asarray(lp[n]["t"]))
            np.testing.assert_array_equal(t[dout:], a_t)
            assert set(fl[n]) == {"b", "scale"} and fl[n]["scale"].shape == (A, a_t.shape[0] // A)
            np.testing.assert_array_equal(np.asarray(fl[n]["b"]), np.asarray(cl[n]["b"]))
            np.testing.assert_array_equal(np.asarray(fl[n]["scale"]), np.asarray(cl[n]["scale"]))
    for k in fp:
        if k != "layers":
            assert fp[k] is p[k]
    assert lora.check_adapter(fa, lora.projection_dims(cfg), cfg.num_layers) == A


def test_folded_forward_equals_concat_and_stacked_reference(case):
    """A batch mixing every adapter and base rows: the folded logits equal the concatenated
    layout's and the stacked reference's (``lora_delta`` per unfused projection)."""
    name, cfg, p, stack, cat, fp, fa = case
    A = len(CASES[name][1])
    rng = np.random.default_rng(3)
    ids = jnp.asarray(((list(range(A)) + [-1]) * 2)[:6], jnp.int32)  # every adapter and the base
    assert -1 in ids.tolist() and set(range(A)) <= set(ids.tolist())
    lengths = np.array([7, 4, 9, 5, 6, 8], np.int32)
    tokens = rng.integers(3, cfg.vocab_size, (6, 9)).astype(np.int32)
    fwd = jax.jit(forward, static_argnums=1)
    got = fwd(fp, cfg, tokens, lengths, adapters=fa, adapter_ids=ids)
    via_cat = fwd(p, cfg, tokens, lengths, adapters=cat, adapter_ids=ids)
    via_stack = fwd(p, cfg, tokens, lengths, adapters=stack, adapter_ids=ids)
    base = fwd(p, cfg, tokens, lengths)
    d_cat, d_stack = max_diff(got, via_cat, lengths), max_diff(got, via_stack, lengths)
    print(name, f"max |folded - concat| {d_cat:.1e}, max |folded - stack| {d_stack:.1e}")
    assert d_cat <= 1e-5 and d_stack <= 1e-5
    rows = np.asarray(ids)
    assert max_diff(np.asarray(got)[rows < 0], np.asarray(base)[rows < 0], lengths[rows < 0]) <= 1e-5
    assert max_diff(np.asarray(got)[rows >= 0], np.asarray(base)[rows >= 0], lengths[rows >= 0]) > 1e-2


def test_folded_forward_cached_equals_concat(case):
    """Prefill then decode steps through the per-layer cache: the same logits as the concat path."""
    name, cfg, p, stack, cat, fp, fa = case
    step = jax.jit(forward_cached, static_argnums=1)
    ids = jnp.array([2, -1, 0, 1], jnp.int32)
    rng = np.random.default_rng(4)
    tokens = rng.integers(3, cfg.vocab_size, (4, 6)).astype(np.int32)
    lengths = np.array([6, 3, 5, 6], np.int32)
    caches = [init_cache(cfg, 4, 16, jnp.float32, per_layer=True) for _ in range(2)]
    for _ in range(3):
        out_f, caches[0] = step(fp, cfg, tokens, lengths, caches[0], adapters=fa, adapter_ids=ids)
        out_c, caches[1] = step(p, cfg, tokens, lengths, caches[1], adapters=cat, adapter_ids=ids)
        d = max_diff(out_f, out_c, lengths)
        assert d <= 1e-5, d
        last = np.asarray(out_c)[np.arange(4), lengths - 1]
        tokens, lengths = last.argmax(-1).astype(np.int32)[:, None], np.ones((4,), np.int32)
    np.testing.assert_array_equal(np.asarray(caches[0].lengths), np.asarray(caches[1].lengths))


def test_folded_generate_equals_concat_and_stack(case):
    name, cfg, p, stack, cat, fp, fa = case
    prompts = [[5, 9, 14, 3, 60], [7, 8], [40, 41, 42], [11, 12, 13, 14], [20, 21]]
    ids = [1, 0, -1, 2, 0]
    kw = dict(stop_ids=[], max_len=64, adapter_ids=ids)
    got = realm_jax.generate(realm_jax.Model(cfg, fp), prompts, 6, adapters=fa, **kw).tokens
    assert got == realm_jax.generate(realm_jax.Model(cfg, p), prompts, 6, adapters=cat, **kw).tokens
    assert got == realm_jax.generate(realm_jax.Model(cfg, p), prompts, 6, adapters=stack, **kw).tokens
    base = realm_jax.generate(realm_jax.Model(cfg, p), prompts, 6, stop_ids=[], max_len=64).tokens
    assert got[2] == base[2] and got != base


def test_single_adapter_folded_equals_merged():
    params = random_params(CFG, seed=2)
    p = params_decode_layout(params)
    ad = lora.init_adapter(CFG, 7, rank=3, targets=("wq", "wo", "w_up"), b_std=0.3)
    fp, fa = lora.fold_layout(p, ad, CFG)
    leaf = fa["layers"][0]["wqkv"]
    assert leaf["scale"].shape == (3,) and leaf["b"].shape == (3, 80)  # only q targeted: Rq columns
    assert fp["layers"][0]["wqkv"]["t_lora"].shape == (80 + 3, 30)
    assert lora.check_adapter(fa, lora.projection_dims(CFG), CFG.num_layers) is None
    tokens = np.random.default_rng(8).integers(3, 97, (3, 6)).astype(np.int32)
    lengths = np.array([6, 4, 5], np.int32)
    fwd = jax.jit(forward, static_argnums=1)
    every = fwd(fp, CFG, tokens, lengths, adapters=fa)  # no ids: every row
    merged = fwd(params_decode_layout(lora.merge(params, ad)), CFG, tokens, lengths)
    assert max_diff(every, merged, lengths) <= 1e-5
    some = fwd(fp, CFG, tokens, lengths, adapters=fa, adapter_ids=jnp.array([0, -1, 0]))
    cat = fwd(p, CFG, tokens, lengths, adapters=lora.decode_layout(ad, CFG), adapter_ids=jnp.array([0, -1, 0]))
    assert max_diff(some, cat, lengths) <= 1e-5
    assert max_diff(np.asarray(some)[1:2], np.asarray(fwd(p, CFG, tokens, lengths))[1:2], lengths[1:2]) <= 1e-5


def test_fold_accepts_decode_layout_adapters():
    """Adapters already in decode_layout's form (concatenated, or concat=False) fold the same;
    a concatenated input keeps its very b / scale arrays."""
    p = params_decode_layout(random_params(CFG))
    stack = lora.stack_adapters(make_adapters(CFG, CASES["partial"][1]))
    fp, fa = lora.fold_layout(p, stack, CFG)
    cat = lora.decode_layout(stack, CFG)
    for form in (cat, lora.decode_layout(stack, CFG, concat=False)):
        fp2, fa2 = lora.fold_layout(p, form, CFG)
        for l1, l2 in zip(fp["layers"], fp2["layers"]):
            np.testing.assert_array_equal(np.asarray(l1["wqkv"]["t_lora"]), np.asarray(l2["wqkv"]["t_lora"]))
        for l1, l2 in zip(fa["layers"], fa2["layers"]):
            np.testing.assert_array_equal(np.asarray(l1["w_down"]["b"]), np.asarray(l2["w_down"]["b"]))
    _, fa3 = lora.fold_layout(p, cat, CFG)
    assert fa3["layers"][1]["wqkv"]["b"] is cat["layers"][1]["wqkv"]["b"]


def test_decode_step_has_one_matmul_more_per_folded_projection():
    """What the layout is for: the folded decode step has one extra matmul (@ b) per folded
    projection and layer, against two for the concatenated layout, and no gather."""
    p = params_decode_layout(random_params(CFG))
    stack = lora.stack_adapters(make_adapters(CFG, CASES["llama_all"][1]))
    fp, fa = lora.fold_layout(p, stack, CFG)
    base_dots, base_gathers = lowered_counts(p, None, 4)
    dots, gathers = lowered_counts(fp, fa, 4)
    cat_dots, _ = lowered_counts(p, lora.decode_layout(stack, CFG), 4)
    assert (dots - base_dots, gathers - base_gathers) == (4 * CFG.num_layers, 0)
    assert cat_dots - base_dots == 2 * 4 * CFG.num_layers


def test_no_retrace_for_a_new_adapter_set():
    traces = []

    def fwd(p, tokens, lengths, adapters, ids):
        traces.append(1)
        return forward(p, CFG, tokens, lengths, adapters=adapters, adapter_ids=ids)

    f = jax.jit(fwd)
    p = params_decode_layout(random_params(CFG))
    tokens = jnp.asarray(np.random.default_rng(5).integers(3, 97, (4, 5)), jnp.int32)
    lengths = jnp.array([5, 3, 4, 5], jnp.int32)
    ids = jnp.array([0, 1, -1, 1], jnp.int32)
    sets = [lora.stack_adapters([lora.init_adapter(CFG, s, rank=3, b_std=0.3) for s in seeds])
            for seeds in ((20, 21), (22, 23))]
    fp1, fa1 = lora.fold_layout(p, sets[0], CFG)
    out1 = f(fp1, tokens, lengths, fa1, ids)
    size = lora._fold_layout_jit._cache_size()
    fp2, fa2 = lora.fold_layout(p, sets[1], CFG)
    out2 = f(fp2, tokens, lengths, fa2, ids)
    assert len(traces) == 1 and lora._fold_layout_jit._cache_size() == size
    assert np.abs(np.asarray(out1) - np.asarray(out2))[[0, 1, 3]].max() > 1e-2  # the new values are used
    np.testing.assert_array_equal(np.asarray(out1)[2], np.asarray(out2)[2])  # the base row


# ----------------------------------------------------------------------------------- bad input
def test_fold_layout_errors():
    from realm_jax.quantization import quantize

    params = random_params(CFG)
    p = params_decode_layout(params)
    ad = lora.init_adapter(CFG, 0, rank=2, targets=("wq", "w_down"))
    with pytest.raises(RealmError, match=r"fold_layout: params must be in model\.decode_layout"):
        lora.fold_layout(params, ad, CFG)
    with pytest.raises(RealmError, match=r"expected a transposed float weight"):
        lora.fold_layout(params_decode_layout(params, transposed=False), ad, CFG)
    with pytest.raises(UnsupportedModelError, match=r"\['wqkv'\] is int8-quantized.*lora\.decode_layout"):
        lora.fold_layout(quantize(p), ad, CFG)
    q_down = {**p, "layers": tuple({**lp, "w_gate_up": quantize(p)["layers"][0]["w_gate_up"]} for lp in p["layers"])}
    lora.fold_layout(q_down, ad, CFG)  # an untargeted int8 projection is left as it is
    other = lora.init_adapter(CFG.replace(hidden_size=32), 0, rank=2, targets=("wv",))
    with pytest.raises(RealmError, match=r"fold_layout: adapters\['layers'\]\['wv'\]\['a'\]: "
                                         r"expected shape \(3, 30, 2\)"):
        lora.fold_layout(p, other, CFG)
    with pytest.raises(RealmError, match="fold_layout: params do not match the config"):
        lora.fold_layout(p, lora.init_adapter(CFG.replace(num_heads=4), 0, rank=2, targets=("wq",)),
                         CFG.replace(num_heads=4))
    with pytest.raises(RealmError, match="concat_layout's form"):
        lora.fold_layout(p, lora.concat_layout(ad, CFG), CFG)
    fp, fa = lora.fold_layout(p, ad, CFG)
    with pytest.raises(RealmError, match=r"fold_layout: params\['layers'\]\[0\]\['wqkv'\] is already folded"):
        lora.fold_layout(fp, ad, CFG)
    with pytest.raises(RealmError, match="fold_layout: the adapters are already folded"):
        lora.fold_layout(p, fa, CFG)
    with pytest.raises(RealmError, match="decode_layout: the adapters are folded"):
        lora.decode_layout(fa, CFG)
    with pytest.raises(RealmError, match=r"merge: the params have LoRA factors folded in"):
        lora.merge(fp, ad)
    with pytest.raises(RealmError, match=r"quantize: \['w_down', 'wqkv'\] have LoRA factors folded in"):
        quantize(fp)
    with pytest.raises(RealmError, match=r"need params in the decode layout"):  # folded adapters, stacked params
        forward(params, CFG, jnp.ones((1, 2), jnp.int32), jnp.array([2], jnp.int32), adapters=fa,
                adapter_ids=jnp.zeros((1,), jnp.int32))


def test_folded_params_and_adapters_only_serve_together():
    p = params_decode_layout(random_params(CFG))
    ad = lora.init_adapter(CFG, 0, rank=2, targets=("wq", "w_down"))
    fp, fa = lora.fold_layout(p, ad, CFG)
    tokens, lengths = jnp.ones((2, 3), jnp.int32), jnp.array([3, 2], jnp.int32)
    with pytest.raises(RealmError, match=r"'wqkv' weight has LoRA factors folded in .* needs its adapters"):
        forward(fp, CFG, tokens, lengths)
    with pytest.raises(RealmError, match=r"needs its adapters"):
        realm_jax.generate(realm_jax.Model(CFG, fp), [[5, 6]], 2)
    with pytest.raises(RealmError, match=r"needs its adapters"):  # stacked adapters name wq, not wqkv
        forward(fp, CFG, tokens, lengths, adapters=ad)
    with pytest.raises(RealmError, match=r"needs the folded adapters .*got keys \['a_t', 'b', 'scale'\]"):
        forward(fp, CFG, tokens, lengths, adapters=lora.decode_layout(ad, CFG))
    with pytest.raises(RealmError, match=r"folded adapters .* need the params fold_layout returned"):
        forward(p, CFG, tokens, lengths, adapters=fa)
    bigger = lora.fold_layout(p, lora.init_adapter(CFG, 1, rank=3, targets=("wq", "w_down")), CFG)[1]
    with pytest.raises(RealmError, match=r"the folded weight \(82, 30\) does not fit the adapter's b \(3, 80\)"):
        forward(fp, CFG, tokens, lengths, adapters=bigger)
    w = fp["layers"][0]["wqkv"]
    with pytest.raises(RealmError, match=r"linear: this weight has LoRA A factors folded in .*lora\.folded_proj"):
        linear(jnp.ones((1, 1, 30)), w)
    with pytest.raises(RealmError, match=r"weight_shape: this weight has LoRA A factors folded in"):
        weight_shape(w)
    bad = {"layers": tuple({**layer, "wqkv": {**layer["wqkv"], "b": jnp.zeros((2, 81))}} for layer in fa["layers"])}
    with pytest.raises(RealmError, match=r"\['wqkv'\]\['b'\]: expected shape \(2, 80\)"):
        lora.check_adapter(bad, lora.projection_dims(CFG), CFG.num_layers)
