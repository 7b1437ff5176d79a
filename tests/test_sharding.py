"""Sharded (data x model mesh on 8 simulated CPU devices) equals single device; every leaf is
laid out as its rule says; bad meshes are refused; multi-process evaluation gathers in order.

The single-device run is the reference: the same canonical params prepared without a mesh
(``runtime.prepare(params, cfg, layout=...)``), same inputs, plain ``jit`` on device 0. The
sharded run is ``runtime.prepare(params, cfg, mesh=mesh, layout=...)`` (or ``load(..., mesh=)``).
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # a worker of the two-process test (no conftest): 4 CPU devices each
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import realm_jax
from realm_jax import lora, runtime
from realm_jax import sharding as sh
from realm_jax.generation import generate, new_cache
from realm_jax.kv_cache import init_cache
from realm_jax.loading import Model
from realm_jax.model import forward_cached_jit, forward_jit
from realm_jax.params import LEAVES, init_params, param_shapes
from realm_jax.runtime import Weight
from realm_jax.scoring import score

LAYOUTS = ("per_layer", "stacked")


def random_params(cfg, seed):
    """Params of ``param_shapes(cfg)`` from numpy, weights of std 0.3 (larger than ``init_params``'
    0.02, so that logits spread and a misplaced column shows)."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        x = 1.0 + 0.1 * rng.standard_normal(shape) if "norm" in name else 0.3 * rng.standard_normal(shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def random_batch(rng, vocab, lengths):
    """Right-padded int32 tokens [B, max(lengths)] and lengths [B]."""
    lengths = np.asarray(lengths, np.int32)
    tokens = np.where(np.arange(lengths.max())[None] < lengths[:, None],
                      rng.integers(3, vocab, (len(lengths), lengths.max())), 0)
    return tokens.astype(np.int32), lengths


def with_runtime(model: Model, **choices) -> Model:
    """A Model sharing ``model``'s params and tokenizer, its runtime prepared with ``choices``
    (session fixtures keep their own runtime)."""
    m = Model(model.config, model.params, model.tokenizer, model.source)
    m.prepare(**choices)
    return m


MESHES = [(8, 1), (1, 8), (2, 4), (4, 2)]

# N=8 and F=48 divide every model axis; K=8 is sharded everywhere, K=2 is replicated on model
# axes 4 and 8 (and sharded on 2); V=104 divides 8, V=97 never does (embed/lm_head replicated).
CFGS = {
    "llama_k8": realm_jax.ModelConfig(arch="llama", vocab_size=104, hidden_size=24, intermediate_size=48,
                                      num_layers=2, num_heads=8, num_kv_heads=8, head_dim=4),
    "qwen_k2_tied_bias": realm_jax.ModelConfig(arch="qwen3", vocab_size=97, hidden_size=20, intermediate_size=48,
                                               num_layers=2, num_heads=8, num_kv_heads=2, head_dim=4,
                                               qkv_bias=True, o_bias=True, qk_norm=True, tie_word_embeddings=True),
}

# The rules, written out independently of sharding.py: leaf -> {dim split over "model": the count
# that must divide}. N and F always divide here; K and V dims are replicated when they do not.
EXPECTED = {
    "embed": {0: "V"}, "lm_head": {1: "V"}, "final_norm": {},
    "attn_norm": {}, "mlp_norm": {}, "q_norm": {}, "k_norm": {}, "bo": {},
    "wq": {2: "N"}, "bq": {1: "N"}, "wo": {1: "N"},
    "wk": {2: "K"}, "wv": {2: "K"}, "bk": {1: "K"}, "bv": {1: "K"},
    "w_gate": {2: "F"}, "w_up": {2: "F"}, "w_down": {1: "F"},
}


def _sharded(what, cfg, model_axis) -> bool:
    counts = {"N": cfg.num_heads, "K": cfg.num_kv_heads, "F": cfg.intermediate_size, "V": cfg.vocab_size}
    return model_axis > 1 and counts[what] % model_axis == 0


def expected_spec(name, ndim, cfg, model_axis):
    spec = [None] * ndim
    for dim, what in EXPECTED[name].items():
        if _sharded(what, cfg, model_axis):
            spec[dim] = "model"
    return tuple(spec)


def norm_spec(spec, ndim):
    s = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    return tuple(x[0] if isinstance(x, tuple) and len(x) == 1 else x for x in s)


def assert_laid_out(arr, full, spec, mesh):
    """arr's sharding is ``spec`` on ``mesh`` and each device holds exactly its block of full."""
    assert isinstance(arr.sharding, NamedSharding) and arr.sharding.mesh == mesh
    assert norm_spec(arr.sharding.spec, arr.ndim) == spec, (arr.sharding.spec, spec)
    full = np.asarray(full)
    assert arr.shape == full.shape, (arr.shape, full.shape)
    block = [s // (mesh.shape[a] if a else 1) for s, a in zip(full.shape, spec)]
    for shard in arr.addressable_shards:
        assert shard.data.shape == tuple(block)
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


def assert_logits_close(got, ref, lengths):
    """float32 logits of the valid positions agree to 1e-5 of the largest logit: different float32
    summation orders (fused and grouped matmuls, per-device partial sums all-reduced over
    ``model``, cache vs no cache) give ~1e-6 relative; a misplaced weight or row gives O(1)."""
    got, ref = np.asarray(got), np.asarray(ref)
    atol = 1e-5 * max(1.0, float(np.abs(ref).max()))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], ref[b, :n], atol=atol, rtol=0)
    return max(float(np.abs(got[b, :n] - ref[b, :n]).max()) for b, n in enumerate(lengths) if n)


def canonical_leaves(params):
    return {**{k: v for k, v in params.items() if k != "layers"}, **params["layers"]}


@pytest.fixture(scope="module")
def models():
    return {name: random_params(cfg, i) for i, (name, cfg) in enumerate(CFGS.items())}


# ---------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("shape", MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
@pytest.mark.parametrize("name", sorted(CFGS))
def test_every_param_sharded_as_its_rule_says(models, name, shape):
    """Canonical params (what ``load(mesh=)`` reads into, before ``prepare``)."""
    cfg, params = CFGS[name], models[name]
    mesh = sh.make_mesh(*shape)
    sp = sh.shard_params(params, cfg, mesh)
    leaves, full = canonical_leaves(sp), canonical_leaves(params)
    assert set(leaves) == set(full)
    for k, arr in leaves.items():
        assert_laid_out(arr, full[k], expected_spec(k, arr.ndim, cfg, shape[1]), mesh)


# The runtime's matmul weights, written out independently of runtime.py: which logical count
# splits the output (out) or the input (in) axis of each projection over "model".
RT_SPLIT = {"wq": ("out", "N"), "wk": ("out", "K"), "wv": ("out", "K"), "wo": ("in", "N"),
            "w_gate": ("out", "F"), "w_up": ("out", "F"), "w_down": ("in", "F"), "lm_head": ("out", "V")}


def expected_weight(parts, groups):
    """The fused weight [.., D_in, G*P] that device group g reads as one contiguous block: group g
    holds the g-th G-th of every part's columns, parts in order."""
    return np.concatenate([np.concatenate([np.split(np.asarray(p), groups, axis=-1)[g] for p in parts], -1)
                           for g in range(groups)], -1)


def check_runtime_layout(rt, params, cfg, mesh):
    """Every leaf of a (float, adapter-free) runtime on ``mesh``: spec per RT_SPLIT / EXPECTED and
    each device's block holds exactly its group of the canonical columns."""
    m = mesh.shape["model"]
    lead = (None,) if rt.stacked else ()
    layer_dicts = [(rt.layers, slice(None))] if rt.stacked else [(lp, i) for i, lp in enumerate(rt.layers)]
    fused_names = set()
    for lp, i in layer_dicts:
        for key, leaf in lp.items():
            if not isinstance(leaf, Weight):  # norms and biases: their table rule, one layer or all
                spec = expected_spec(key, len(LEAVES[key].axes), cfg, m)[1:]
                assert_laid_out(leaf, np.asarray(params["layers"][key])[i], lead + spec, mesh)
                continue
            names = key.split("+")
            assert tuple(names) == leaf.names and leaf.scale is None and leaf.rank == 0
            fused_names.update(names)
            splits = {(RT_SPLIT[n][0], _sharded(RT_SPLIT[n][1], cfg, m)) for n in names}
            assert len(splits) == 1, f"{key}: parts that shard differently are fused"
            (side, sharded), = splits
            split = "model" if sharded else None
            groups = m if (split and side == "out") else 1
            full = expected_weight([np.asarray(params["layers"][n])[i] for n in names], groups)
            spec = (None, split) if side == "out" else (split, None)  # [D_in, D_out]
            if leaf.transposed:
                full, spec = np.swapaxes(full, -1, -2), spec[::-1]
            assert_laid_out(leaf.w, full, lead + spec, mesh)
            if split and side == "out":  # each device: 1/m of the output axis, its whole group
                out_axis = -2 if leaf.transposed else -1
                for shard in leaf.w.addressable_shards:
                    assert shard.data.shape[out_axis] == leaf.w.shape[out_axis] // m
    assert fused_names == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    # the head: lm_head [D, V] (vocab on model when it divides), or the tied embedding [V, D] itself
    v_split = "model" if _sharded("V", cfg, m) else None
    if cfg.tie_word_embeddings:
        assert_laid_out(rt.head.w, params["embed"], (v_split, None), mesh)
    else:
        full, spec = np.asarray(params["lm_head"]), (None, v_split)
        if rt.head.transposed:
            full, spec = full.T, spec[::-1]
        assert_laid_out(rt.head.w, full, spec, mesh)
    assert_laid_out(rt.embed, params["embed"], (v_split, None), mesh)
    assert_laid_out(rt.final_norm, params["final_norm"], (None,), mesh)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 4), (1, 4)], ids=["2x4", "1x4"])
@pytest.mark.parametrize("name", sorted(CFGS))
def test_runtime_leaves_sharded_fused_groups_contiguous(models, name, shape, layout):
    """``prepare(mesh=)``: fused q|k|v and gate|up are arranged per device group, so each
    device's slice of the output axis is one contiguous block holding its heads of every part."""
    cfg, params = CFGS[name], models[name]
    mesh = sh.make_mesh(*shape)
    rt = runtime.prepare(params, cfg, mesh=mesh, layout=layout)
    assert rt.mesh is mesh and rt.stacked == (layout == "stacked")
    check_runtime_layout(rt, params, cfg, mesh)
    # K=2 on a model axis of 4: k/v are replicated, so q and k|v are separate weights
    keys = set(rt.layers if rt.stacked else rt.layers[0])
    qkv_fused = _sharded("K", cfg, shape[1]) or shape[1] == 1
    assert ("wq+wk+wv" in keys) == qkv_fused and ({"wq", "wk+wv"} <= keys) == (not qkv_fused)
    assert "w_gate+w_up" in keys


def test_per_layer_fused_qkv_is_sharded_a_quarter_per_device(models):
    """The fast decode layout on a (1, 4) mesh: the fused wq+wk+wv weight has ``model`` on its
    output axis and each device holds a quarter of it (2 query heads, 2 KV heads)."""
    cfg, params = CFGS["llama_k8"], models["llama_k8"]
    mesh = sh.make_mesh(1, 4)
    rt = runtime.prepare(params, cfg, mesh=mesh, layout="per_layer")
    for lp in rt.layers:
        w = lp["wq+wk+wv"]
        out_axis = 0 if w.transposed else 1
        total = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        assert w.w.shape[out_axis] == total
        assert norm_spec(w.w.sharding.spec, 2)[out_axis] == "model"
        assert norm_spec(w.w.sharding.spec, 2)[1 - out_axis] is None
        shards = w.w.addressable_shards
        assert len(shards) == 4 and {s.data.shape[out_axis] for s in shards} == {total // 4}
        assert {s.data.shape[1 - out_axis] for s in shards} == {cfg.hidden_size}


# ---------------------------------------------------------------------------------- equal results
@pytest.mark.parametrize("shape", MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
def test_sharded_forward_generate_score_equal_single_device(models, shape):
    mesh = sh.make_mesh(*shape)
    rng = np.random.default_rng(0)
    tokens, lengths = random_batch(rng, 97, [6, 3, 5, 1, 6, 2, 4, 6])
    worst = 0.0
    for name, cfg in CFGS.items():  # the default layout (stacked on CPU); per-layer: the tests below
        params = models[name]
        ref = forward_jit(runtime.prepare(params, cfg), cfg, tokens, lengths)
        rt = runtime.prepare(params, cfg, mesh=mesh)
        out = forward_jit(rt, cfg, sh.shard_batch(tokens, mesh), sh.shard_batch(lengths, mesh))
        assert norm_spec(out.sharding.spec, 3)[0] == ("data" if shape[0] > 1 else None)
        worst = max(worst, assert_logits_close(out, ref, lengths))
    print(f"mesh {shape}: max |dlogit| sharded vs single = {worst:.1e}")

    # generate and score run unchanged on a Model whose runtime is sharded
    cfg, params = CFGS["qwen_k2_tied_bias"], models["qwen_k2_tied_bias"]
    one = Model(cfg, params)
    many = with_runtime(one, mesh=mesh)
    assert many.runtime.mesh is mesh
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 3, 7, 2, 6, 4, 1, 8)]
    ref_gen = generate(one, prompts, 6)
    got_gen = generate(many, prompts, 6)
    assert got_gen.tokens == ref_gen.tokens
    requests = [(p[:3], rng.integers(3, cfg.vocab_size, 1 + len(p) % 3).tolist()) for p in prompts]
    ref_sc = score(one, requests, batch_size=8)
    got_sc = score(many, requests, batch_size=8)
    for a, b in zip(got_sc, ref_sc):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5, rtol=0)
        assert a.is_greedy == b.is_greedy


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 2), (1, 4)], ids=["2x2", "1x4"])
def test_gqa_greedy_decode_on_mesh_equals_single_device(shape, layout):
    """A tiny GQA model (N=8, K=2; ``init_params``): greedy ``generate`` tokens on the mesh,
    float32, equal the single-device tokens. On (2, 2) the KV heads and the cache's K axis are
    split over model and the batch over data; on (1, 4) K=2 does not divide 4: k/v replicated."""
    cfg = CFGS["qwen_k2_tied_bias"]
    params = init_params(cfg, 10)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (4, 7, 1, 5)]
    ref = generate(with_runtime(Model(cfg, params), layout=layout), prompts, 8)
    many = with_runtime(Model(cfg, params), mesh=sh.make_mesh(*shape), layout=layout)
    got = generate(many, prompts, 8)
    assert got.tokens == ref.tokens
    assert [len(t) for t in got.tokens] == [8] * 4


@pytest.fixture(scope="module")
def smollm2_single_tokens(smollm2):
    """Greedy tokens of SmolLM2 on one device (stacked: the cheap compile; test_runtime checks the
    per-layer and stacked layouts against the same reference)."""
    prompts = [smollm2.tokenizer.encode(p) for p in ("The capital of France is", "One, two, three,")]
    return prompts, generate(with_runtime(smollm2, layout="stacked"), prompts, 6).tokens


@pytest.mark.parametrize("layout,shape", [("per_layer", (2, 3)), ("stacked", (1, 3))], ids=["per_layer-2x3", "stacked-1x3"])
def test_real_model_greedy_decode_on_mesh_equals_single_device(smollm2, smollm2_single_tokens, layout, shape):
    """SmolLM2-135M (N=9, K=3: model axis 3), float32: greedy tokens on the mesh equal one device's."""
    prompts, ref = smollm2_single_tokens
    mesh = sh.make_mesh(*shape)
    model = with_runtime(smollm2, mesh=mesh, layout=layout)
    rt = model.runtime
    assert rt.mesh is mesh and rt.stacked == (layout == "stacked")
    qkv = (rt.layers if rt.stacked else rt.layers[0])["wq+wk+wv"].w
    assert "model" in norm_spec(qkv.sharding.spec, qkv.ndim)
    assert generate(model, prompts, 6).tokens == ref


@pytest.mark.parametrize("shape,layout", [((2, 4), "per_layer"), ((4, 2), "stacked")],
                         ids=["2x4-per_layer", "4x2-stacked"])
def test_sharded_cache_decode_loop_equals_single_device(models, shape, layout):
    """prefill + one token at a time through ``init_cache_like`` caches (sharded per
    ``cache_specs``: B on data, K on model) gives the single-device logits, and the donated cache
    keeps its layout."""
    cfg, params = CFGS["llama_k8"], models["llama_k8"]
    mesh = sh.make_mesh(*shape)
    rt = runtime.prepare(params, cfg, mesh=mesh, layout=layout)
    rng = np.random.default_rng(3)
    full, _ = random_batch(rng, cfg.vocab_size, [9] * 4)
    prompt_lens = np.array([4, 2, 5, 3], np.int32)
    ref = np.asarray(forward_jit(runtime.prepare(params, cfg, layout=layout), cfg, full, np.full(4, 9, np.int32)))
    atol = 1e-5 * np.abs(ref).max()  # as assert_logits_close
    cache = sh.init_cache_like(rt, cfg, 4, 16, jnp.float32)
    assert cache.per_layer == (layout == "per_layer")
    b_axis = "data" if shape[0] > 1 else None
    kv_axis = "model" if cfg.num_kv_heads % shape[1] == 0 else None

    def check_layout(cache):
        for k in (cache.k if cache.per_layer else [cache.k]) + (cache.v if cache.per_layer else [cache.v]):
            want = (b_axis, None, kv_axis, None) if cache.per_layer else (None, b_axis, None, kv_axis, None)
            assert norm_spec(k.sharding.spec, k.ndim) == want
        assert norm_spec(cache.lengths.sharding.spec, 1) == (b_axis,)

    check_layout(cache)
    prompt = np.where(np.arange(5)[None] < prompt_lens[:, None], full[:, :5], 0).astype(np.int32)
    logits, cache = forward_cached_jit(rt, cfg, *sh.shard_batch((prompt, prompt_lens), mesh), cache)
    assert_logits_close(logits, ref, prompt_lens)
    pos = prompt_lens.copy()
    while (pos < 9).any():
        adv = (pos < 9).astype(np.int32)
        step = full[np.arange(4), np.minimum(pos, 8)][:, None].astype(np.int32)
        logits, cache = forward_cached_jit(rt, cfg, *sh.shard_batch((step, adv), mesh), cache)
        for b in np.flatnonzero(adv):
            np.testing.assert_allclose(np.asarray(logits)[b, 0], ref[b, pos[b]], atol=atol, rtol=0)
        pos += adv
    check_layout(cache)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [9] * 4)
    # generation.new_cache is the same cache
    check_layout(new_cache(cfg, rt, 4, 16))


def test_place_batch_makes_scoring_data_parallel(models):
    """Score inputs placed with ``place_batch`` are split over ``data``; results unchanged."""
    from realm_jax.scoring import continuation_logprobs

    cfg, params = CFGS["llama_k8"], models["llama_k8"]
    mesh = sh.make_mesh(4, 2)
    rt = runtime.prepare(params, cfg, mesh=mesh)
    rt1 = runtime.prepare(params, cfg)
    rng = np.random.default_rng(5)
    tokens, lengths = random_batch(rng, cfg.vocab_size, [7, 5, 6, 3, 7, 2, 4, 7])
    starts = np.maximum(lengths - 2, 0).astype(np.int32)
    targets = rng.integers(3, cfg.vocab_size, (8, 2)).astype(np.int32)
    ref = continuation_logprobs(rt1, cfg, tokens, lengths, starts, targets, chunk=2)
    placed = sh.place_batch((tokens, lengths, starts, targets), rt)
    for a in placed:
        assert norm_spec(a.sharding.spec, a.ndim)[0] == "data"
    got = continuation_logprobs(rt, cfg, *placed, chunk=2)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
    assert norm_spec(got[0].sharding.spec, 2)[0] == "data"
    assert sh.place_batch(tokens, rt1) is tokens  # a runtime not on a mesh: untouched
    with pytest.raises(sh.ShardingError, match=r"batch size 6 .* 'data' axis \(4\)"):
        sh.place_batch(tokens[:6], rt)
    loose = sh.place_batch(tokens[:6], rt, strict=False)
    assert norm_spec(loose.sharding.spec, 2) == (None, None)


def lora_stack(cfg):
    """A stack of A=2 adapters (``lora.stack_adapters``), rank R=3 after padding: adapter 0 on every
    projection, adapter 1 (rank 2) on wk, wo, w_up of layer 0 only (layer 1: zeros, scale 0)."""
    return lora.stack_adapters([lora.init_adapter(cfg, 1, rank=3, b_std=0.3),
                                lora.init_adapter(cfg, 2, rank=2, targets=("wk", "wo", "w_up"), layers=[0],
                                                  b_std=0.3)])


def test_canonical_lora_stacks_follow_their_weights(models):
    """``shard_adapters``: a canonical stack's factors split like the rows / columns of their weight."""
    cfg, params = CFGS["qwen_k2_tied_bias"], models["qwen_k2_tied_bias"]
    mesh = sh.make_mesh(2, 4)
    stack = lora_stack(cfg)
    ss = sh.shard_adapters(stack, cfg, mesh)
    for proj, leaf in ss["layers"].items():
        w = np.asarray(params["layers"][proj])
        w_spec = expected_spec(proj, 3, cfg, 4)
        assert_laid_out(leaf["a"], stack["layers"][proj]["a"], (None, None, w_spec[1], None), mesh)
        assert_laid_out(leaf["b"], stack["layers"][proj]["b"], (None, None, None, w_spec[2]), mesh)
        assert_laid_out(leaf["scale"], stack["layers"][proj]["scale"], (None, None), mesh)
        assert w.shape[1:] == (leaf["a"].shape[2], leaf["b"].shape[3])


# int8 and LoRA stacks compose with the mesh: (quantize, adapters: a stack of 2, folded or not),
# each case in one layout and on one of two meshes (alternating): one where K is split (llama_k8
# on 1x4, untied int8 head) and one where it is replicated and the batch split (qwen_k2 on 2x4,
# tied head: never quantized). test_runtime.py runs the full product against the reference.
# Tolerance: assert_logits_close (1e-5 of the largest logit, float32 rounding). Both runtimes
# quantize the same float columns (per-column max |w| / 127, the max exact however the column is
# split; folded A rows are columns too), so they hold the same int8 values; only the float32
# summation order differs (grouped fused matmuls, wo / w_down partial sums all-reduced).
INT8_LORA = [("int8", None, "llama_k8", (1, 4), "stacked"),
             (None, "stack", "qwen_k2_tied_bias", (2, 4), "stacked"),
             (None, "folded", "llama_k8", (1, 4), "per_layer"),
             ("int8", "stack", "llama_k8", (1, 4), "per_layer"),
             ("int8", "folded", "qwen_k2_tied_bias", (2, 4), "per_layer")]


@pytest.mark.parametrize("quantize,adapters,name,shape,layout", INT8_LORA,
                         ids=[f"{q or 'float'}-{a or 'base'}-{n.split('_')[0]}-{d}x{m}-{lay}"
                              for q, a, n, (d, m), lay in INT8_LORA])
def test_int8_and_lora_stack_on_mesh_equal_single_device(models, quantize, adapters, name, shape, layout):
    cfg, params = CFGS[name], models[name]
    mesh = sh.make_mesh(*shape)
    kw = dict(quantize=quantize, layout=layout)
    if adapters:
        kw.update(adapters=lora_stack(cfg), fold=adapters == "folded")
    rt1 = runtime.prepare(params, cfg, **kw)
    rt = runtime.prepare(params, cfg, mesh=mesh, **kw)
    assert rt.num_adapters == (2 if adapters else 0) and rt.folded == (adapters == "folded")

    # the int8 weights, their scales and the adapters' factors are sharded like the float weights
    lead = (None,) if rt.stacked else ()
    layers = [rt.layers] if rt.stacked else list(rt.layers)
    loras = [None] * len(layers) if rt.lora is None else ([rt.lora] if rt.stacked else list(rt.lora))
    for lp, ll in zip(layers, loras):
        for key, w in lp.items():
            if not isinstance(w, Weight):
                continue
            side, what = RT_SPLIT[w.names[0]]
            sharded = _sharded(what, cfg, shape[1])
            out, inp = ("model" if sharded else None, None) if side == "out" else (None, "model" if sharded else None)
            assert w.w.dtype == (jnp.int8 if quantize else jnp.float32)
            assert norm_spec(w.w.sharding.spec, w.w.ndim) == lead + ((out, inp) if w.transposed else (inp, out))
            if quantize:
                assert w.scale.dtype == jnp.float32 and norm_spec(w.scale.sharding.spec, w.scale.ndim) == lead + (out,)
            # folded: every part's A rows in each group (A=2 adapters x R=3 per fused part)
            assert w.rank == (2 * 3 * len(w.names) if adapters == "folded" else 0)
            if ll is not None:
                lo = ll[key]
                assert (lo.a_t is None) == (adapters == "folded")
                assert norm_spec(lo.b.sharding.spec, lo.b.ndim) == lead + (out, None, None)
                if lo.a_t is not None:
                    assert norm_spec(lo.a_t.sharding.spec, lo.a_t.ndim) == lead + (None, inp)

    rng = np.random.default_rng(6)
    tokens, lengths = random_batch(rng, cfg.vocab_size, [5, 2, 4, 5])
    ids = None if adapters is None else np.array([0, -1, 1, 0], np.int32)
    ref = forward_jit(rt1, cfg, tokens, lengths, adapter_ids=ids)
    got = forward_jit(rt, cfg, *sh.shard_batch((tokens, lengths), mesh),
                      adapter_ids=None if ids is None else sh.shard_batch(ids, mesh))
    err = assert_logits_close(got, ref, lengths)
    print(f"{name} {shape} {layout} {quantize} {adapters}: max |dlogit| {err:.1e}")
    if adapters:  # the adapters matter: every row on the base model (ids -1) differs where ids >= 0
        base = np.asarray(forward_jit(rt, cfg, *sh.shard_batch((tokens, lengths), mesh),
                                      adapter_ids=sh.shard_batch(np.full(4, -1, np.int32), mesh)))
        assert np.abs(base[0, :5] - np.asarray(got)[0, :5]).max() > 1e-2
        assert np.abs(base[2, :4] - np.asarray(got)[2, :4]).max() > 1e-2
        np.testing.assert_allclose(base[1, :2], np.asarray(got)[1, :2], atol=1e-6, rtol=0)


def test_with_adapters_on_a_sharded_runtime_equals_single_device(models):
    """``with_adapters`` (what generate / score do with per-call adapters) keeps the mesh."""
    cfg, params = CFGS["llama_k8"], models["llama_k8"]
    mesh = sh.make_mesh(2, 4)
    stack = lora_stack(cfg)
    rt = runtime.with_adapters(runtime.prepare(params, cfg, mesh=mesh, layout="per_layer"), cfg, stack)
    rt1 = runtime.with_adapters(runtime.prepare(params, cfg, layout="per_layer"), cfg, stack)
    assert rt.mesh is mesh and rt.num_adapters == 2
    for ll in rt.lora:
        for lo in ll.values():
            assert isinstance(lo.b.sharding, NamedSharding) and lo.b.sharding.mesh == mesh
    rng = np.random.default_rng(7)
    tokens, lengths = random_batch(rng, cfg.vocab_size, [5, 2, 4, 5])
    ids = np.array([1, 0, -1, 1], np.int32)
    ref = forward_jit(rt1, cfg, tokens, lengths, adapter_ids=ids)
    got = forward_jit(rt, cfg, *sh.shard_batch((tokens, lengths), mesh), adapter_ids=sh.shard_batch(ids, mesh))
    assert_logits_close(got, ref, lengths)


# ---------------------------------------------------------------------------------- no reshards
COLLECTIVES = ("all-gather", "collective-permute", "all-reduce", "all-to-all", "reduce-scatter")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(%s)(?:-start)?\(" % "|".join(COLLECTIVES))


def collectives(hlo: str) -> dict[str, list[str]]:
    """{collective: [its HLO instruction lines]} of a compiled module's text."""
    out = {c: [] for c in COLLECTIVES}
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            out[m.group(2)].append(line.strip())
    return out


def _describe(lines):
    """HLO collective lines -> 'shape over <devices> from <jax op>' (for failure messages)."""
    out = []
    for line in lines:
        shape = _COLLECTIVE.search(line).group(1)
        op = re.search(r'op_name="([^"]*)"', line)
        groups = re.search(r"(replica_groups=(?:mesh\[[^\]]*\] \{[^}]*\}|\S+?)|source_target_pairs=\S+?)(?:,\s|$)", line)
        out.append(f"{shape} over {groups.group(1) if groups else '?'} from {op.group(1) if op else '?'}")
    return out


HLO_CASES = [("llama_k8", (1, 4), {}), ("llama_k8", (1, 4), {"quantize": "int8", "adapters": "stack"}),
             ("llama_k8", (1, 4), {"adapters": "stack", "fold": True}), ("llama_k8", (2, 2), {}),
             ("qwen_k2_tied_bias", (2, 2), {}),
             pytest.param("qwen_k2_tied_bias", (1, 4), {}, marks=pytest.mark.xfail(strict=True, reason=(
                 "K=2 KV heads on a model axis of 4: k/v are replicated, but gqa_attention's [K, G] head "
                 "reshape splits K 2 ways and propagation reshards the replicated k/v (2 collective-permutes "
                 "and 2 all-gathers of activations per layer, no weights); open, see docs/sharding.md")))]


@pytest.mark.parametrize("name,shape,choices", HLO_CASES,
                         ids=["k8-1x4", "k8-1x4-int8-lora", "k8-1x4-lora-folded", "k8-2x2", "k2-2x2",
                              "k2-replicated-1x4"])
def test_per_layer_decode_step_moves_no_weights(models, name, shape, choices):
    """The compiled decode step of a per-layer runtime (tokens [B, 1] into a sharded cache) has no
    all-gather and no collective-permute: every device multiplies its own contiguous slice of each
    fused weight and writes its own cache rows and KV heads. The only collectives are the
    Megatron all-reduces: one after wo and one after w_down per layer, plus one for the
    embedding lookup when the vocab is split over ``model`` (each device holds V/m rows; the
    head's logits stay split, so it needs none). K=2 on model=4: k/v replicated (wq and wk|wv
    are separate weights), which must not cost a reshard either. int8 and a LoRA stack (its rank
    activations of wo / w_down are partial sums too: XLA reduces them in the same all-reduce)
    add no collective."""
    cfg, params = CFGS[name], models[name]
    mesh = sh.make_mesh(*shape)
    B = 4
    if choices.get("adapters"):
        choices = {**choices, "adapters": lora_stack(cfg)}
    rt = runtime.prepare(params, cfg, mesh=mesh, layout="per_layer", **choices)
    ids = {"adapter_ids": sh.shard_batch(np.array([0, 1, -1, 0], np.int32), mesh)} if rt.num_adapters else {}
    cache = new_cache(cfg, rt, B, 16)
    tokens, lengths = sh.shard_batch((np.full((B, 1), 5, np.int32), np.ones((B,), np.int32)), mesh)
    hlo = forward_cached_jit.lower(rt, cfg, tokens, lengths, cache, **ids).compile().as_text()
    found = collectives(hlo)
    moves = {c: _describe(found[c]) for c in ("all-gather", "collective-permute", "all-to-all", "reduce-scatter")}
    assert not any(moves.values()), f"reshards in the decode step on mesh {shape}: {moves}"
    embed_split = _sharded("V", cfg, shape[1])
    n_reduce = len(found["all-reduce"])
    assert 0 < n_reduce <= 2 * cfg.num_layers + int(embed_split), _describe(found["all-reduce"])


# ---------------------------------------------------------------------------------- loading
def test_load_with_mesh_places_each_tensor_sharded(tmp_path):
    from hf_reference import make_hf_model

    directory, _ = make_hf_model("llama_gqa_llama3_untied", tmp_path / "m")  # N=6 K=2 F=56 V=97
    plain = realm_jax.load(directory, dtype="float32")
    mesh = sh.make_mesh(4, 2)
    placed = []
    real_put = sh._put
    sh_put = lambda x, s: placed.append(s) or real_put(x, s)  # noqa: E731
    try:
        sh._put = sh_put
        model = realm_jax.load(directory, dtype="float32", mesh=mesh, layout="per_layer")
    finally:
        sh._put = real_put
    cfg = model.config
    n_leaves = len(jax.tree_util.tree_leaves(model.params))
    assert len(placed) == n_leaves  # each leaf placed once, as it was read
    full = canonical_leaves(plain.params)
    for k, arr in canonical_leaves(model.params).items():
        assert_laid_out(arr, full[k], expected_spec(k, arr.ndim, cfg, 2), mesh)
    # the runtime was prepared on the mesh, in the layout asked for
    rt = model._runtime
    assert rt is not None and rt.mesh is mesh and not rt.stacked
    check_runtime_layout(rt, plain.params, cfg, mesh)
    rng = np.random.default_rng(1)
    tokens, lengths = random_batch(rng, cfg.vocab_size, [7, 4, 2, 7])
    ref = np.asarray(forward_jit(runtime.prepare(plain.params, cfg, layout="per_layer"), cfg, tokens, lengths))
    got = forward_jit(model.runtime, cfg, *sh.shard_batch((tokens, lengths), mesh))
    assert_logits_close(got, ref, lengths)
    # a mesh that cannot hold the model is refused before any tensor is read
    sh._put = lambda x, s: pytest.fail("a tensor was placed")
    try:
        with pytest.raises(sh.ShardingError, match=r"num_heads=6 is not divisible by the mesh 'model' axis \(4\)"):
            realm_jax.load(directory, dtype="float32", mesh=sh.make_mesh(2, 4))
    finally:
        sh._put = real_put


def test_real_model_gguf_loaded_onto_a_mesh(smollm2, smollm2_gguf):
    """SmolLM2-135M (N=9, K=3, F=1536, V=49152) from its GGUF onto a 2 x 3 mesh: every leaf as
    its rule says (the GGUF reader places leaves before the config is known to the placer; KV
    projections are then moved into place), the runtime is prepared on the mesh, logits equal the
    single-device model's."""
    mesh = sh.make_mesh(2, 3)
    model = realm_jax.load(smollm2_gguf, dtype="float32", mesh=mesh)
    cfg = model.config
    full = canonical_leaves(smollm2.params)
    for k, arr in canonical_leaves(model.params).items():
        assert_laid_out(arr, full[k], expected_spec(k, arr.ndim, cfg, 3), mesh)
    assert model._runtime is not None and model.runtime.mesh is mesh
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    tokens = np.array([ids, ids[::-1]], np.int32)
    lengths = np.array([len(ids), len(ids) - 3], np.int32)
    rt1 = runtime.prepare(smollm2.params, cfg, layout="stacked" if model.runtime.stacked else "per_layer")
    ref = np.asarray(forward_jit(rt1, cfg, tokens, lengths))
    got = np.asarray(forward_jit(model.runtime, cfg, *sh.shard_batch((tokens, lengths), mesh)))
    scale = np.abs(ref).max()
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], ref[b, :n], atol=1e-5 * scale, rtol=0)
    print(f"SmolLM2 2x3 mesh: max |dlogit| = {max(np.abs(got[b, :n] - ref[b, :n]).max() for b, n in enumerate(lengths)):.1e}"
          f" (logits up to {scale:.0f})")


# ---------------------------------------------------------------------------------- refusals
def test_bad_meshes_are_refused_naming_the_dimension():
    cfg = CFGS["llama_k8"]
    with pytest.raises(sh.ShardingError, match=r"num_heads=6 is not divisible by the mesh 'model' axis \(4\)"):
        sh.param_specs(cfg.replace(num_heads=6, num_kv_heads=2), sh.make_mesh(2, 4))
    with pytest.raises(sh.ShardingError, match=r"intermediate_size=50 is not divisible by the mesh 'model' axis \(4\)"):
        sh.param_placer(sh.make_mesh(2, 4), cfg.replace(intermediate_size=50))
    # prepare checks the mesh against the model before building anything
    bad = cfg.replace(num_heads=6, num_kv_heads=2)
    with pytest.raises(sh.ShardingError, match=r"num_heads=6 is not divisible by the mesh 'model' axis \(4\)"):
        runtime.prepare(init_params(bad, 0), bad, mesh=sh.make_mesh(2, 4))
    bad = cfg.replace(intermediate_size=50)
    with pytest.raises(sh.ShardingError, match=r"intermediate_size=50 is not divisible"):
        runtime.prepare(init_params(bad, 0), bad, mesh=sh.make_mesh(1, 4), layout="per_layer")
    with pytest.raises(sh.ShardingError, match=r"mesh: expected a jax.sharding.Mesh"):
        runtime.prepare(init_params(cfg, 0), cfg, mesh="2x4")
    # K and V that do not divide are replicated, not refused
    specs = sh.param_specs(cfg.replace(num_kv_heads=2, vocab_size=97), sh.make_mesh(1, 8))
    assert norm_spec(specs["layers"]["wk"], 3) == (None, None, None)
    assert norm_spec(specs["embed"], 2) == (None, None)
    mesh = sh.make_mesh(2, 4)
    with pytest.raises(sh.ShardingError, match=r"batch size 3 is not divisible by the mesh 'data' axis \(2\)"):
        sh.shard_batch(np.zeros((3, 5), np.int32), mesh)
    with pytest.raises(sh.ShardingError, match=r"batch size 3 is not divisible by the mesh 'data' axis \(2\)"):
        sh.shard_cache(init_cache(cfg, 3, 8, jnp.float32), mesh)
    with pytest.raises(sh.ShardingError, match=r"batch size 3 is not divisible by the mesh 'data' axis \(2\)"):
        sh.shard_cache(init_cache(cfg, 3, 8, jnp.float32, per_layer=True), mesh)
    with pytest.raises(sh.ShardingError, match=r"data=3 x model=3 needs 9 devices, available: 8"):
        sh.make_mesh(3, 3)
    with pytest.raises(sh.ShardingError, match=r"model=3 does not divide the number of devices \(8\)"):
        sh.make_mesh(model=3)
    with pytest.raises(sh.ShardingError, match=r"data=2 x model=1 needs 2 devices, given: 4"):
        sh.make_mesh(2, 1, devices=jax.devices()[:4])
    with pytest.raises(sh.ShardingError, match=r"model: expected a positive integer, got 0"):
        sh.make_mesh(1, 0)
    m = sh.make_mesh(1, 3)  # a subset of the devices is fine in one process
    assert m.shape == {"data": 1, "model": 3} and m.axis_names == ("data", "model")


# ---------------------------------------------------------------------------------- multi-host
def test_initialize_distributed_checks_its_arguments():
    assert sh.initialize_distributed() is False  # single process: nothing to do
    with pytest.raises(sh.ShardingError, match="together"):
        sh.initialize_distributed("localhost:1234", None, 0)
    with pytest.raises(sh.ShardingError, match=r"coordinator_address: expected 'host:port', got 'localhost'"):
        sh.initialize_distributed("localhost", 2, 0)
    with pytest.raises(sh.ShardingError, match=r"process_id: expected an integer in \[0, 2\), got 2"):
        sh.initialize_distributed("localhost:1234", 2, 2)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8])
def test_process_shares_cover_items_once_in_order(n, count):
    items = [f"item{i}" for i in range(n)]
    shares = [sh.process_shard(items, p, count) for p in range(count)]
    assert len({len(s) for s in shares}) == 1  # every process runs the same number of steps
    assert [x for s in shares for x in s][:n] == items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_share_evaluation_and_gather_in_order(models, tmp_path):
    """Two real processes (jax.distributed on CPU, 4 devices each): per-process meshes score
    their shares, gather_in_order returns every score in input order; a mesh spanning both
    processes runs forward on the global batch. Both equal the single-process results."""
    cfg, params = CFGS["llama_k8"], models["llama_k8"]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(i), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    requests, tokens, lengths = _worker_inputs(cfg)
    ref = np.array([s.logprob for s in score(Model(cfg, params), requests, batch_size=2)])
    ref_logits = np.asarray(forward_jit(runtime.prepare(params, cfg), cfg, tokens, lengths))
    for i in range(2):
        got = np.load(tmp_path / f"result{i}.npz")
        np.testing.assert_allclose(got["scores"], ref, atol=1e-5, rtol=0)
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(got["logits"][b, :n], ref_logits[b, :n], atol=1e-5, rtol=0)


def _worker_inputs(cfg):
    rng = np.random.default_rng(11)
    requests = [(rng.integers(3, cfg.vocab_size, 2 + i % 3).tolist(), rng.integers(3, cfg.vocab_size, 1 + i % 2).tolist())
                for i in range(7)]
    tokens, lengths = random_batch(rng, cfg.vocab_size, [5, 2, 4, 5])
    return requests, tokens, lengths


def _worker(pid: int, port: int, out_dir: str) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    sh.initialize_distributed(f"localhost:{port}", 2, pid)
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    cfg = CFGS["llama_k8"]
    params = random_params(cfg, 0)  # as the `models` fixture
    requests, tokens, lengths = _worker_inputs(cfg)
    # evaluation: each process scores its share on a mesh of its own devices
    local = sh.make_mesh(2, 2, devices=jax.local_devices())
    mine = sh.process_shard(requests)
    model = Model(cfg, params)
    model.prepare(mesh=local)
    scores = score(model, mine, batch_size=2)
    gathered = sh.gather_in_order(np.array([s.logprob for s in scores]), len(requests))  # arrays
    objects = sh.gather_in_order(scores, len(requests))  # any picklable results
    assert [s.token_ids for s in objects] == [tuple(c) for _, c in requests]
    np.testing.assert_array_equal([s.logprob for s in objects], gathered)
    # one program over all 8 devices: each process feeds its half of the batch
    glob = sh.make_mesh(2, 4)
    half = slice(2 * pid, 2 * pid + 2)
    rt = runtime.prepare(sh.shard_params(params, cfg, glob), cfg, mesh=glob)
    out = forward_jit(rt, cfg, sh.shard_batch(tokens[half], glob), sh.shard_batch(lengths[half], glob))
    from jax.experimental import multihost_utils

    logits = multihost_utils.process_allgather(out, tiled=True)
    np.savez(Path(out_dir) / f"result{pid}.npz", scores=gathered, logits=np.asarray(logits))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
