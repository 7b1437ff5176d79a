"""Cached decode (prefill + one token at a time) gives the logits of a full forward, in both
runtime layouts; the per-layer and stacked runtimes (transposed or not, int8 or not) agree with
each other and with the plain reference, cached and not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax.generation import new_cache
from realm_jax.kv_cache import init_cache, rollback
from realm_jax.model import forward_cached_jit, forward_jit
from realm_jax.reference import forward_reference_jit
from realm_jax.runtime import Weight, prepare

from hf_reference import dequantized, random_batch

LAYOUTS = ["per_layer", "stacked"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch_kw", [dict(arch="llama"), dict(arch="mistral", sliding_window=4),
                                     dict(arch="qwen3", qk_norm=True), dict(arch="qwen2", qkv_bias=True)])
def test_cached_decode_matches_full_forward(arch_kw, layout):
    cfg = realm_jax.ModelConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2,
                                num_heads=6, num_kv_heads=2, head_dim=8, **arch_kw)
    params = realm_jax.init_params(cfg, jax.random.PRNGKey(0))
    rt = prepare(params, cfg, layout=layout)
    rng = np.random.default_rng(0)
    prompt_lens = np.array([5, 2, 7], np.int32)
    total = 12
    full, _ = random_batch(rng, cfg.vocab_size, [total] * 3)
    ref = np.asarray(forward_reference_jit(params, cfg, full, np.full(3, total, np.int32)))
    np.testing.assert_allclose(np.asarray(forward_jit(rt, cfg, full, np.full(3, total, np.int32))), ref, atol=1e-5)
    cache = new_cache(cfg, rt, 3, 16)
    assert cache.per_layer == (layout == "per_layer") and cache.k[0].dtype == jnp.float32
    prompt = np.where(np.arange(7)[None] < prompt_lens[:, None], full[:, :7], 0).astype(np.int32)
    logits, cache = forward_cached_jit(rt, cfg, prompt, prompt_lens, cache)
    logits = np.asarray(logits)
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(logits[b, :n], ref[b, :n], atol=1e-5)
    pos = prompt_lens.copy()
    while (pos < total).any():
        adv = (pos < total).astype(np.int32)
        step = full[np.arange(3), np.minimum(pos, total - 1)][:, None].astype(np.int32)
        logits, cache = forward_cached_jit(rt, cfg, step, adv, cache)
        logits = np.asarray(logits)
        for b in range(3):
            if adv[b]:
                np.testing.assert_allclose(logits[b, 0], ref[b, pos[b]], atol=1e-5)
        pos += adv
    np.testing.assert_array_equal(np.asarray(cache.lengths), [total] * 3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rollback_then_rewrite_matches(layout):
    cfg = realm_jax.ModelConfig(arch="llama", vocab_size=53, hidden_size=16, intermediate_size=24,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
    params = realm_jax.init_params(cfg, jax.random.PRNGKey(1))
    rt = prepare(params, cfg, layout=layout)
    rng = np.random.default_rng(1)
    seq, _ = random_batch(rng, cfg.vocab_size, [9, 9])
    ref = np.asarray(forward_reference_jit(params, cfg, seq, np.array([9, 9], np.int32)))
    cache = new_cache(cfg, rt, 2, 12)
    junk = rng.integers(3, cfg.vocab_size, (2, 9)).astype(np.int32)
    _, cache = forward_cached_jit(rt, cfg, junk, np.array([9, 9], np.int32), cache)
    cache = rollback(cache, np.array([0, 0], np.int32))
    logits, cache = forward_cached_jit(rt, cfg, seq, np.array([9, 9], np.int32), cache)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5)


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_per_layer_runtime_matches_stacked_and_reference(transposed, quantize):
    """The per-layer runtime (fused projections, stored transposed or not, int8 or not) gives the
    stacked runtime's logits, cached and not, and both give the reference's (on the int8 round
    trip of the weights when quantized: the exact twin of the int8 computation)."""
    cfg = realm_jax.ModelConfig(arch="qwen2", vocab_size=61, hidden_size=24, intermediate_size=40,
                                num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, qkv_bias=True)
    params = realm_jax.init_params(cfg, jax.random.PRNGKey(3))
    fast = prepare(params, cfg, layout="per_layer", transposed=transposed, quantize=quantize)
    stacked = prepare(params, cfg, layout="stacked", transposed=transposed, quantize=quantize)
    assert isinstance(fast.layers, tuple) and len(fast.layers) == 3 and not fast.stacked and stacked.stacked
    w = fast.layers[0]["w_down"]
    assert "wq+wk+wv" in fast.layers[0] and "w_gate+w_up" in fast.layers[0] and isinstance(w, Weight)
    assert w.transposed == transposed and w.w.shape == ((24, 40) if transposed else (40, 24))
    assert (w.w.dtype == jnp.int8 and w.scale.shape == (24,)) if quantize else (w.scale is None)
    assert stacked.layers["w_down"].w.shape == (3,) + w.w.shape
    rng = np.random.default_rng(3)
    tokens, lengths = random_batch(rng, cfg.vocab_size, [6, 3])
    want = np.asarray(forward_reference_jit(dequantized(params) if quantize else params, cfg, tokens, lengths))
    a = np.asarray(forward_jit(stacked, cfg, tokens, lengths))
    b = np.asarray(forward_jit(fast, cfg, tokens, lengths))
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(b[row, :n], a[row, :n], atol=1e-5)
        np.testing.assert_allclose(a[row, :n], want[row, :n], atol=1e-5)
    caches = [new_cache(cfg, stacked, 2, 16), new_cache(cfg, fast, 2, 16)]
    assert not caches[0].per_layer and caches[1].per_layer
    for step in [tokens, tokens[:, :1]]:
        n = np.full(2, step.shape[1], np.int32)
        a, caches[0] = forward_cached_jit(stacked, cfg, step, n, caches[0])
        b, caches[1] = forward_cached_jit(fast, cfg, step, n, caches[1])
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_init_cache_layout_option_matches_new_cache():
    cfg = realm_jax.ModelConfig(arch="llama", vocab_size=53, hidden_size=16, intermediate_size=24,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
    params = realm_jax.init_params(cfg, jax.random.PRNGKey(1))
    for layout in LAYOUTS:
        rt = prepare(params, cfg, layout=layout)
        a, b = new_cache(cfg, rt, 2, 8), init_cache(cfg, 2, 8, rt.dtype, per_layer=not rt.stacked)
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(a)] == \
            [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(b)]
