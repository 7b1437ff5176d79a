"""LoRA against plain math and the reference forward: the per-row delta, merge/unmerge, mixed-adapter
batches through the runtime forms (stacked / per-layer, transposed or not, folded, int8), cached
decode, generate, no retracing, and every bad input refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import lora, runtime
from realm_jax.config import ModelConfig
from realm_jax.errors import RealmError
from realm_jax.generation import new_cache
from realm_jax.model import forward, forward_cached, forward_jit
from realm_jax.params import LEAVES, param_shapes
from realm_jax.quantization import dequantize_columns, quantize_columns
from realm_jax.reference import forward_reference_jit

from compile_counter import CompileCounter

CFG = ModelConfig(arch="llama", vocab_size=97, hidden_size=30, intermediate_size=56, num_layers=3,
                  num_heads=6, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, eos_token_ids=(2,))
QWEN = CFG.replace(arch="qwen2", qkv_bias=True, tie_word_embeddings=True)  # q|k|v biases after the LoRA term


def random_params(cfg, seed=0):
    """Like ``params.init_params`` but with larger weights (so adapters and layers matter)."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        x = 1.0 + 0.1 * rng.standard_normal(shape) if "norm" in name else 0.08 * rng.standard_normal(shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def three_adapters():
    """Different ranks, targets and touched layers (so padding and absent targets are exercised)."""
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    return [
        lora.init_adapter(CFG, k[0], rank=4, b_std=0.2),
        lora.init_adapter(CFG, k[1], rank=2, targets=("wq", "wv", "w_down"), alpha=5.0, b_std=0.3),
        lora.init_adapter(CFG, k[2], rank=6, targets=("wo", "w_gate", "w_up"), use_rslora=True,
                          layers=(0, 2), b_std=0.3),
    ]


# The runtime forms the three-adapter stack is served in (prepare's choices).
FORMS = {
    "stacked": dict(layout="stacked"),
    "per_layer_untransposed": dict(layout="per_layer", transposed=False),
    "folded": dict(layout="per_layer", fold=True),
    "folded_stacked": dict(layout="stacked", fold=True),
}


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@pytest.fixture(scope="module")
def ads():
    return three_adapters()


@pytest.fixture(scope="module")
def stack(ads):
    return lora.stack_adapters(ads)


@pytest.fixture(scope="module")
def served(params, stack):
    """served(form) -> ``runtime.prepare(params, CFG, adapters=stack, **FORMS[form])``, built once."""
    built = {}

    def get(form):
        if form not in built:
            built[form] = runtime.prepare(params, CFG, adapters=stack, **FORMS[form])
        return built[form]

    return get


def max_diff(a, b, lengths):
    """Max |a - b| over each row's first ``lengths[r]`` positions (padding slots are anything)."""
    a, b = np.asarray(a), np.asarray(b)
    return max(float(np.abs(a[r, :n] - b[r, :n]).max()) for r, n in enumerate(lengths))


def naive_delta(x, a, b, scale, ids):
    """float64 numpy: row b gets scale[id] * x @ a[id] @ b[id], or 0 for ids outside [0, A)."""
    x, a, b, scale = (np.asarray(v, np.float64) for v in (x, a, b, scale))
    out = np.zeros(x.shape[:2] + (b.shape[-1],))
    for r, i in enumerate(np.asarray(ids)):
        if 0 <= i < a.shape[0]:
            out[r] = scale[i] * x[r] @ a[i] @ b[i]
    return out


# ----------------------------------------------------------------------------------- the per-row delta
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


def test_per_rank_scale_matches_plain_math():
    """A scale per rank column ([A, R]) is applied column by column."""
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


# ----------------------------------------------------------------------------------- mixed batches
@pytest.mark.parametrize("form", list(FORMS))
def test_mixed_batch_rows_equal_reference_and_each_alone_merged(params, ads, stack, served, form):
    """Rows with three different adapters, the base model (-1) and an id out of range (7: the
    base too), in one batch of a prepared runtime, give the reference forward's logits on the
    stack (each row's factors gathered) and what each row gets alone with its adapter merged."""
    assert stack["layers"]["wq"]["a"].shape == (3, 3, 30, 4)  # [L, A, D_in, R=max rank]
    rt = served(form)
    assert rt.num_adapters == 3 and rt.folded == FORMS[form].get("fold", False)
    assert rt.stacked == (FORMS[form]["layout"] == "stacked")
    rng = np.random.default_rng(3)
    lengths = np.array([7, 4, 9, 5, 6, 8], np.int32)
    tokens = rng.integers(3, 97, (6, 9)).astype(np.int32)
    ids = np.array([2, -1, 0, 1, 0, 7], np.int32)
    got = np.asarray(forward_jit(rt, CFG, tokens, lengths, adapter_ids=jnp.asarray(ids)))
    ref = forward_reference_jit(params, CFG, tokens, lengths, adapters=stack, adapter_ids=jnp.asarray(ids))
    base = np.asarray(forward_reference_jit(params, CFG, tokens, lengths))
    d_ref = max_diff(got, ref, lengths)
    d_merged = 0.0
    for r, (i, n) in enumerate(zip(ids, lengths)):
        on = 0 <= i < 3
        p = lora.merge(params, ads[i]) if on else params
        alone = forward_reference_jit(p, CFG, tokens[r:r + 1], lengths[r:r + 1])  # same shapes: one compile
        d_merged = max(d_merged, max_diff(got[r:r + 1], alone, [n]))
        if on:  # the adapter really changes this row
            assert np.abs(got[r, :n] - base[r, :n]).max() > 1e-2
    print(form, f"max |runtime - reference| {d_ref:.1e}, max |runtime - merged alone| {d_merged:.1e}")
    assert d_ref <= 2e-5 and d_merged <= 2e-5


def test_more_adapters_than_rows(params, ads, served):
    """A batch of 2 rows serving adapters 2 and 1 of 3: each row equals its adapter merged."""
    tokens = np.random.default_rng(4).integers(3, 97, (2, 6)).astype(np.int32)
    lengths = np.array([6, 3], np.int32)
    ids = np.array([2, 1], np.int32)
    got = np.asarray(forward_jit(served("stacked"), CFG, tokens, lengths, adapter_ids=jnp.asarray(ids)))
    for r, i in enumerate(ids):
        want = forward_reference_jit(lora.merge(params, ads[i]), CFG, tokens[r:r + 1], lengths[r:r + 1])
        assert max_diff(got[r:r + 1], want, lengths[r:r + 1]) <= 2e-5


def make_adapters(cfg, spec, seed=0):
    return [lora.init_adapter(cfg, seed + 10 * i, rank=r, targets=t, layers=ls, b_std=0.3, alpha=2.0 * r + i)
            for i, (r, t, ls) in enumerate(spec)]


# (config, [(rank, targets, layers)] per adapter): the union of targets decides what is folded
FOLD_CASES = {
    "qwen2_bias": (QWEN, [(3, lora.PROJECTIONS, None), (5, ("wq", "wk", "wo"), None),
                          (2, ("w_gate", "w_down"), (1, 2))]),
    "partial": (CFG, [(4, ("wq", "wv"), None), (2, ("wk", "w_down"), None), (3, ("w_down",), (0,))]),
}


@pytest.mark.parametrize("name", list(FOLD_CASES))
def test_folded_forward_equals_reference(name):
    """Biases after the folded q|k|v (tied embeddings), and a stack touching only some fused
    weights (wo and gate|up untouched): a batch mixing every adapter and base rows gives the
    reference's logits; the base rows equal the base model, the others differ."""
    cfg, spec = FOLD_CASES[name]
    params = random_params(cfg, seed=1)
    stack = lora.stack_adapters(make_adapters(cfg, spec))
    rt = runtime.prepare(params, cfg, adapters=stack, fold=True, layout="per_layer")
    if name == "partial":
        assert set(rt.lora[0]) == {"wq+wk+wv", "w_down"} and rt.layers[0]["wo"].rank == 0
    ids = np.array([0, 1, 2, -1, 0, -1], np.int32)
    rng = np.random.default_rng(3)
    lengths = np.array([7, 4, 9, 5, 6, 8], np.int32)
    tokens = rng.integers(3, cfg.vocab_size, (6, 9)).astype(np.int32)
    got = np.asarray(forward_jit(rt, cfg, tokens, lengths, adapter_ids=jnp.asarray(ids)))
    ref = forward_reference_jit(params, cfg, tokens, lengths, adapters=stack, adapter_ids=jnp.asarray(ids))
    base = np.asarray(forward_reference_jit(params, cfg, tokens, lengths))
    d = max_diff(got, ref, lengths)
    print(name, f"max |folded - reference| {d:.1e}")
    assert d <= 1e-5
    assert max_diff(got[ids < 0], base[ids < 0], lengths[ids < 0]) <= 1e-5
    assert min(max_diff(got[r:r + 1], base[r:r + 1], lengths[r:r + 1]) for r in np.flatnonzero(ids >= 0)) > 1e-2


def test_folded_weights_hold_the_a_rows(served):
    """Folding appends the A factors (transposed) to each fused weight: the folded weight is the
    base weight and then the unfolded runtime's ``a_t`` rows, with the same ``b`` and scales."""
    folded, plain = served("folded"), served("per_layer_untransposed")
    for fl, pl, flo, plo in zip(folded.layers, plain.layers, folded.lora, plain.lora):
        assert set(flo) == set(plo) == {"wq+wk+wv", "wo", "w_gate+w_up", "w_down"}
        for key, lo in plo.items():
            w, base = np.asarray(fl[key].w), np.asarray(pl[key].w)  # [P + A*R, D_in] and [D_in, P]
            P = base.shape[1]
            assert fl[key].rank == lo.a_t.shape[0] == w.shape[0] - P and flo[key].a_t is None
            np.testing.assert_array_equal(w[:P], base.T)
            np.testing.assert_array_equal(w[P:], np.asarray(lo.a_t))
            np.testing.assert_array_equal(np.asarray(flo[key].b), np.asarray(lo.b))
            np.testing.assert_array_equal(np.asarray(flo[key].scale), np.asarray(lo.scale))
    leaf = plain.lora[0]["wq+wk+wv"]  # adapter-major rank columns: A * (Rq + Rk + Rv)
    assert leaf.a_t.shape == (3 * 12, 30) and leaf.b.shape == (1, 3 * 12, 80) and leaf.scale.shape == (3, 12)


def test_cached_decode_equals_reference(params, stack, served):
    """Prefill then decode steps through the cache (per-layer for the folded per-layer runtime,
    stacked for the stacked one): both give the same logits, and the prefill the reference's."""
    step = jax.jit(forward_cached, static_argnums=1)
    ids = jnp.array([2, -1, 0, 1], jnp.int32)
    rng = np.random.default_rng(4)
    tokens = rng.integers(3, 97, (4, 6)).astype(np.int32)
    lengths = np.array([6, 3, 5, 6], np.int32)
    rts = [served("folded"), served("stacked")]
    caches = [new_cache(CFG, rt, 4, 16) for rt in rts]
    assert caches[0].per_layer and not caches[1].per_layer
    ref = forward_reference_jit(params, CFG, tokens, lengths, adapters=stack, adapter_ids=ids)
    for s in range(3):
        out_f, caches[0] = step(rts[0], CFG, tokens, lengths, caches[0], adapter_ids=ids)
        out_s, caches[1] = step(rts[1], CFG, tokens, lengths, caches[1], adapter_ids=ids)
        if s == 0:
            assert max_diff(out_f, ref, lengths) <= 1e-5
        d = max_diff(out_f, out_s, lengths)
        assert d <= 1e-5, (s, d)
        last = np.asarray(out_s)[np.arange(4), lengths - 1]
        tokens, lengths = last.argmax(-1).astype(np.int32)[:, None], np.ones((4,), np.int32)
    np.testing.assert_array_equal(np.asarray(caches[0].lengths), np.asarray(caches[1].lengths))
    np.testing.assert_array_equal(np.asarray(caches[0].lengths), [8, 5, 7, 8])


def test_single_adapter_folded_equals_merged():
    params = random_params(CFG, seed=2)
    ad = lora.init_adapter(CFG, 7, rank=3, targets=("wq", "wo", "w_up"), b_std=0.3)
    rt = runtime.prepare(params, CFG, adapters=ad, fold=True, layout="per_layer")
    assert rt.num_adapters == 1 and rt.folded
    leaf = rt.lora[0]["wq+wk+wv"]
    assert leaf.scale.shape == (1, 3) and leaf.b.shape == (1, 3, 80)  # only q targeted: Rq columns
    assert rt.layers[0]["wq+wk+wv"].w.shape == (80 + 3, 30)
    tokens = np.random.default_rng(8).integers(3, 97, (3, 6)).astype(np.int32)
    lengths = np.array([6, 4, 5], np.int32)
    every = forward_jit(rt, CFG, tokens, lengths)  # no ids: every row
    merged = forward_jit(runtime.prepare(lora.merge(params, ad), CFG, layout="per_layer"), CFG, tokens, lengths)
    assert max_diff(every, merged, lengths) <= 1e-5
    ids = jnp.array([0, -1, 0], jnp.int32)
    some = np.asarray(forward_jit(rt, CFG, tokens, lengths, adapter_ids=ids))
    assert max_diff(some, forward_reference_jit(params, CFG, tokens, lengths, adapters=ad, adapter_ids=ids),
                    lengths) <= 1e-5
    base = np.asarray(forward_jit(runtime.without_adapters(rt), CFG, tokens, lengths))  # the A rows ignored
    assert max_diff(some[1:2], base[1:2], lengths[1:2]) <= 1e-5
    assert max_diff(base, forward_reference_jit(params, CFG, tokens, lengths), lengths) <= 1e-5


def _dequantized(tree):
    return dequantize_columns(*quantize_columns(tree))


@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "folded"])
def test_int8_base_refuses_merge_and_serves_unmerged(params, ads, stack, fold):
    """merge takes canonical params only (an int8 runtime is refused); the int8 runtime serving
    the stack equals the reference on the dequantized weights (the same numbers, computed as
    (x @ q) * scale), with the A factors dequantized too when they are folded into the int8 weights."""
    q = runtime.prepare(params, CFG, quantize="int8", adapters=stack, fold=fold)
    with pytest.raises(RealmError, match=r"merge: expected canonical params .* got Runtime"):
        lora.merge(q, ads[0])
    deq = {**params, "lm_head": _dequantized(params["lm_head"]),
           "layers": {k: _dequantized(v) if LEAVES[k].quantizable else v for k, v in params["layers"].items()}}
    ref_stack = stack if not fold else {
        "layers": {n: {**leaf, "a": _dequantized(leaf["a"])} for n, leaf in stack["layers"].items()}}
    tokens = np.random.default_rng(7).integers(3, 97, (3, 6)).astype(np.int32)
    lengths = np.array([6, 4, 5], np.int32)
    ids = jnp.array([1, 0, 2])
    got = forward_jit(q, CFG, tokens, lengths, adapter_ids=ids)
    want = forward_reference_jit(deq, CFG, tokens, lengths, adapters=ref_stack, adapter_ids=ids)
    assert max_diff(got, want, lengths) <= 1e-4
    assert max_diff(got, forward_reference_jit(deq, CFG, tokens, lengths), lengths) > 1e-2


# ----------------------------------------------------------------------------------- generate
def test_generate_serves_each_row_its_adapter(params, ads, stack):
    """generate with a stack per call (``adapters=``), and with the stack folded into the model's
    runtime (only ``adapter_ids``): each row's greedy tokens equal that row generated alone with
    its adapter merged."""
    model = realm_jax.Model(CFG, params)
    prompts = [[5, 9, 14, 3, 60], [7, 8], [40, 41, 42], [11, 12, 13, 14], [20, 21]]
    ids = [1, 0, -1, 2, 0]
    kw = dict(stop_ids=[], max_len=64)
    out = realm_jax.generate(model, prompts, 6, adapters=stack, adapter_ids=ids, **kw)
    folded = realm_jax.Model(CFG, params)
    folded.prepare(adapters=stack, fold=True, layout="per_layer")
    assert folded.runtime.folded and folded.runtime.num_adapters == 3
    assert realm_jax.generate(folded, prompts, 6, adapter_ids=ids, **kw).tokens == out.tokens
    for p, i, toks in zip(prompts, ids, out.tokens):
        m = model if i < 0 else realm_jax.Model(CFG, lora.merge(params, ads[i]))
        alone = realm_jax.generate(m, [p], 6, **kw)
        assert toks == alone.tokens[0]
    assert len({tuple(t) for t in out.tokens[:4]}) == 4


# ----------------------------------------------------------------------------------- merge / unmerge
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


# ----------------------------------------------------------------------------------- no retracing
def _two_sets():
    return [lora.stack_adapters([lora.init_adapter(CFG, s, rank=3, b_std=0.3) for s in seeds])
            for seeds in ((20, 21), (22, 23))]


@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "folded"])
def test_forward_does_not_retrace_for_new_adapters_or_ids(params, fold):
    """A runtime with new adapters of the same shapes (prepared anew, or ``with_adapters``) and new
    ids reuse the forward's trace, and their values are used."""
    traces = []

    def fwd(rt, tokens, lengths, ids):
        traces.append(1)
        return forward(rt, CFG, tokens, lengths, adapter_ids=ids)

    f = jax.jit(fwd)
    tokens = jnp.asarray(np.random.default_rng(5).integers(3, 97, (4, 5)), jnp.int32)
    lengths = jnp.array([5, 3, 4, 5], jnp.int32)
    ids = jnp.array([0, 1, -1, 1], jnp.int32)
    sets = _two_sets()
    out1 = np.asarray(f(runtime.prepare(params, CFG, adapters=sets[0], fold=fold), tokens, lengths, ids))
    out2 = np.asarray(f(runtime.prepare(params, CFG, adapters=sets[1], fold=fold), tokens, lengths, ids))
    f(runtime.prepare(params, CFG, adapters=sets[1], fold=fold), tokens, lengths, jnp.array([-1, 0, 1, 1]))
    if not fold:
        f(runtime.with_adapters(runtime.prepare(params, CFG), CFG, sets[0]), tokens, lengths, ids)
    assert len(traces) == 1
    assert np.abs(out1 - out2)[[0, 1, 3]].max() > 1e-2  # the new values are used
    np.testing.assert_array_equal(out1[2], out2[2])  # the base row


def test_new_adapters_of_the_same_shapes_compile_nothing(params):
    """Serving a new adapter set of the same shapes compiles nothing: not the forward, and not the
    runtime's build (prepare, with_adapters: what generate(adapters=...) runs on every call)."""
    sets = _two_sets()
    tokens, lengths, ids = jnp.ones((2, 3), jnp.int32), jnp.array([3, 2], jnp.int32), jnp.array([0, 1], jnp.int32)
    base = runtime.prepare(params, CFG)
    for fold in (False, True):
        forward_jit(runtime.prepare(params, CFG, adapters=sets[0], fold=fold), CFG, tokens, lengths, adapter_ids=ids)
        with CompileCounter() as c:
            jax.block_until_ready(forward_jit(runtime.prepare(params, CFG, adapters=sets[1], fold=fold), CFG,
                                              tokens, lengths, adapter_ids=ids))
        assert c.count == 0, f"prepare(adapters=, fold={fold}) with a new set of the same shapes: {c.count} compiles"
    jax.block_until_ready(runtime.with_adapters(base, CFG, sets[0]))
    with CompileCounter() as c:
        jax.block_until_ready(runtime.with_adapters(base, CFG, sets[1]))
    assert c.count == 0, f"with_adapters with a new set of the same shapes: {c.count} compiles"


def _lowered_counts(rt, batch=4):
    """(dot_general, gather) ops in one lowered decode step (forward_cached with T=1)."""
    cache = new_cache(CFG, rt, batch, 16)
    ids = None if rt.num_adapters == 0 else jnp.zeros((batch,), jnp.int32)

    def step(rt, tokens, lengths, cache, ids):
        return forward_cached(rt, CFG, tokens, lengths, cache, adapter_ids=ids)[0]

    text = jax.jit(step).lower(rt, jnp.ones((batch, 1), jnp.int32), jnp.ones((batch,), jnp.int32), cache,
                               ids).as_text()
    return text.count("stablehlo.dot_general"), text.count("stablehlo.gather")


def test_decode_step_matmuls_per_fused_projection(params, served):
    """What the layouts are for: in one per-layer decode step the unfolded adapters add exactly two
    matmuls per fused projection (q|k|v, o, gate|up, down) and layer, the folded ones one (@ b),
    and neither a gather, whatever the adapter count."""
    base_dots, base_gathers = _lowered_counts(runtime.prepare(params, CFG, layout="per_layer"))
    fused = 4  # the three adapters target all seven projections
    dots, gathers = _lowered_counts(served("per_layer_untransposed"))
    assert (dots - base_dots, gathers - base_gathers) == (2 * fused * CFG.num_layers, 0)
    dots, gathers = _lowered_counts(served("folded"))
    assert (dots - base_dots, gathers - base_gathers) == (fused * CFG.num_layers, 0)


def test_init_adapter_untouched_layers_are_zero():
    ad = lora.init_adapter(CFG, jax.random.PRNGKey(0), rank=3, targets=("wk",), layers=(1,))
    leaf = ad["layers"]["wk"]
    assert leaf["a"].shape == (3, 30, 3) and leaf["b"].shape == (3, 3, 16)
    np.testing.assert_array_equal(np.asarray(leaf["scale"]), [0.0, 1.0, 0.0])
    assert not np.asarray(leaf["a"])[[0, 2]].any() and np.asarray(leaf["a"])[1].any()


# ----------------------------------------------------------------------------------- bad input
def test_merge_refuses_another_models_adapter(params):
    other = CFG.replace(hidden_size=32)
    ad = lora.init_adapter(other, jax.random.PRNGKey(0), rank=2, targets=("wv",))
    with pytest.raises(RealmError, match=r"\['wv'\]\['a'\]: expected shape \(3, 30, 2\).*got \(3, 32, 2\)"):
        lora.merge(params, ad)
    deeper = lora.init_adapter(CFG.replace(num_layers=4), jax.random.PRNGKey(0), rank=2)
    with pytest.raises(RealmError, match=r"expected shape \(3, 30, 2\).*got \(4, 30, 2\)"):
        lora.merge(params, deeper)


def test_prepare_refuses_another_models_adapter(params):
    """prepare (folded or not) and with_adapters check the adapters against the model first."""
    other = lora.init_adapter(CFG.replace(hidden_size=32), 0, rank=2, targets=("wv",))
    deeper = lora.init_adapter(CFG.replace(num_layers=4), 0, rank=2, targets=("wq",))
    for fold in (False, True):
        with pytest.raises(RealmError, match=r"adapters\['layers'\]\['wv'\]\['a'\]: expected shape \(3, 30, 2\) "
                                             r".*got \(3, 32, 2\)"):
            runtime.prepare(params, CFG, adapters=other, fold=fold)
        with pytest.raises(RealmError, match=r"\['wq'\]\['a'\]: expected shape \(3, 30, 2\).*got \(4, 30, 2\)"):
            runtime.prepare(params, CFG, adapters=deeper, fold=fold)
    with pytest.raises(RealmError, match=r"adapters\['layers'\]\['wv'\]\['a'\]: expected shape \(3, 30, 2\)"):
        runtime.with_adapters(runtime.prepare(params, CFG), CFG, other)
    ad = lora.init_adapter(CFG, 0, rank=2, targets=("wq", "w_down"))
    bad = {"layers": {**ad["layers"], "wq": {**ad["layers"]["wq"], "b": jnp.zeros((3, 2, 81))}}}
    with pytest.raises(RealmError, match=r"\['wq'\]\['b'\]: expected shape \(3, 2, 48\).*got \(3, 2, 81\)"):
        runtime.prepare(params, CFG, adapters=bad, fold=True)
    with pytest.raises(RealmError, match=r"params\['layers'\]\['w[qo]'\]: expected shape .* from the config"):
        runtime.prepare(params, CFG.replace(num_heads=4), adapters=ad)  # params of another config


def test_runtime_lora_misuse_is_refused(params):
    ad = lora.init_adapter(CFG, 0, rank=2, targets=("wq", "w_down"))
    with pytest.raises(RealmError, match="fold=True needs adapters"):
        runtime.prepare(params, CFG, fold=True)
    rt = runtime.prepare(params, CFG, adapters=ad, fold=True)
    with pytest.raises(RealmError, match="with_adapters: this runtime has LoRA factors folded into its weights"):
        runtime.with_adapters(rt, CFG, ad)
    with pytest.raises(RealmError, match=r"merge: expected canonical params .* got Runtime"):
        lora.merge(rt, ad)
    with pytest.raises(RealmError, match=r"unmerge: expected canonical params .* got Runtime"):
        lora.unmerge(rt, ad)
    with pytest.raises(RealmError, match="expected canonical params \\(a dict\\), got a Runtime"):
        runtime.prepare(rt, CFG, adapters=ad)
    with pytest.raises(RealmError, match="forward: expected the runtime form"):  # canonical params
        forward(params, CFG, jnp.ones((1, 3), jnp.int32), jnp.array([3], jnp.int32))


def test_bad_adapter_structures(params):
    ad = lora.init_adapter(CFG, jax.random.PRNGKey(0), rank=2, targets=("wq",))
    with pytest.raises(RealmError, match="expected a single adapter, got a stack of 1"):
        lora.merge(params, lora.stack_adapters([ad]))
    with pytest.raises(RealmError, match="unknown projection"):
        lora.merge(params, {"layers": {"lm_head": ad["layers"]["wq"]}})
    with pytest.raises(RealmError, match="unknown projection"):
        runtime.prepare(params, CFG, adapters={"layers": {"lm_head": ad["layers"]["wq"]}})
    with pytest.raises(RealmError, match=r"expected keys \{'a', 'b', 'scale'\}, got \['a', 'b'\]"):
        lora.merge(params, {"layers": {"wq": {"a": 0, "b": 0}}})
    with pytest.raises(RealmError, match=r"adapters: expected \{'layers'"):
        runtime.prepare(params, CFG, adapters={"wq": ad["layers"]["wq"]})
    with pytest.raises(RealmError, match="targets: expected a non-empty subset"):
        lora.init_adapter(CFG, jax.random.PRNGKey(0), targets=("q_proj",))
    with pytest.raises(RealmError, match=r"layers: index 3 out of range \[0, 3\)"):
        lora.init_adapter(CFG, jax.random.PRNGKey(0), layers=(3,))


def test_non_finite_scales_are_refused(params, tmp_path):
    """A NaN alpha (or an inf scale in one layer of one adapter of a stack) would give NaN logits:
    every entry point that takes adapters refuses it, naming the leaf."""
    ok = lora.init_adapter(CFG, 0, rank=2, targets=("wq", "wv"))
    nan = lora.init_adapter(CFG, 1, rank=2, targets=("wq", "wv"), alpha=float("nan"))
    assert np.isnan(np.asarray(nan["layers"]["wq"]["scale"])).all()
    finite = r"\['layers'\]\['wq'\]\['scale'\]: expected finite values"
    model = realm_jax.Model(CFG, params)
    for call in (lambda: lora.merge(params, nan), lambda: lora.unmerge(params, nan),
                 lambda: runtime.prepare(params, CFG, adapters=nan),
                 lambda: runtime.prepare(params, CFG, adapters=nan, fold=True),
                 lambda: runtime.prepare(params, CFG, quantize="int8", adapters=nan, fold=True),
                 lambda: realm_jax.generate(model, [[5, 6]], 2, adapters=nan),
                 lambda: lora.save_peft(tmp_path / "nan", nan, CFG)):
        with pytest.raises(RealmError, match=finite):
            call()
    with pytest.raises(RealmError, match=r"adapters\[1\]\['layers'\]\['wq'\]\['scale'\]: expected finite"):
        lora.stack_adapters([ok, nan])
    stack = lora.stack_adapters([ok, ok])
    scale = np.asarray(stack["layers"]["wv"]["scale"]).copy()
    scale[1, 0] = np.inf  # layer 1, adapter 0
    bad = {"layers": {**stack["layers"], "wv": {**stack["layers"]["wv"], "scale": jnp.asarray(scale)}}}
    wv = r"\['layers'\]\['wv'\]\['scale'\]: expected finite values"
    for call in (lambda: runtime.prepare(params, CFG, adapters=bad, fold=True),
                 lambda: runtime.with_adapters(runtime.prepare(params, CFG), CFG, bad),
                 lambda: realm_jax.generate(model, [[5, 6], [7]], 2, adapters=bad, adapter_ids=[0, 1])):
        with pytest.raises(RealmError, match=wv):
            call()


def test_stack_adapters_refuses_mismatched_models():
    a = lora.init_adapter(CFG, jax.random.PRNGKey(0), rank=2, targets=("wq",))
    b = lora.init_adapter(CFG.replace(num_layers=4), jax.random.PRNGKey(0), rank=2, targets=("wq",))
    with pytest.raises(RealmError, match=r"adapters\[1\]\['layers'\]\['wq'\]\['a'\]: expected shape \(3, 30, 2\)"):
        lora.stack_adapters([a, b])
    with pytest.raises(RealmError, match="non-empty list"):
        lora.stack_adapters([])
    with pytest.raises(RealmError, match="a single adapter"):
        lora.stack_adapters([lora.stack_adapters([a])])


def test_adapter_ids_checks(params):
    x = jnp.ones((2, 1, 30))
    one = lora.init_adapter(CFG, jax.random.PRNGKey(0), rank=2, targets=("wq", "w_down"))
    leaf = jax.tree.map(lambda v: v[0], lora.stack_adapters([one]))["layers"]["wq"]
    with pytest.raises(RealmError, match="adapter_ids: required"):
        lora.lora_delta(x, leaf)
    with pytest.raises(RealmError, match=r"adapter_ids: expected shape \(2,\)"):
        lora.lora_delta(x, leaf, jnp.zeros((3,), jnp.int32))
    with pytest.raises(RealmError, match=r"expected values in \[-1, 2\).*\[2, -3\]"):
        lora.check_adapter_ids([0, 2, -3], 2, 3)
    with pytest.raises(RealmError, match=r"expected int \[3\]"):
        lora.check_adapter_ids([0, 1], 2, 3)
    # generate checks the ids on the host: against the call's adapters, or those in the model's runtime
    stack = lora.stack_adapters([one, one])
    model = realm_jax.Model(CFG, params)
    with pytest.raises(RealmError, match=r"adapter_ids: expected values in \[-1, 2\).*\[2\]"):
        realm_jax.generate(model, [[5, 6]], 2, adapters=stack, adapter_ids=[2])
    with pytest.raises(RealmError, match="adapter_ids given without adapters"):
        realm_jax.generate(model, [[5, 6]], 2, adapter_ids=[0])
    model.prepare(adapters=stack, fold=True)
    with pytest.raises(RealmError, match=r"adapter_ids: expected values in \[-1, 2\).*\[-2\]"):
        realm_jax.generate(model, [[5, 6], [7]], 2, adapter_ids=[0, -2])
    with pytest.raises(RealmError, match="adapter_ids: required with a stack of 2 adapters"):
        realm_jax.generate(model, [[5, 6]], 2)
    with pytest.raises(RealmError, match=r"adapter_ids: expected int \[2\]"):
        realm_jax.generate(model, [[5, 6], [7]], 2, adapter_ids=[0])
