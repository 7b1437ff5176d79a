"""Cached decode (prefill + one token at a time) gives the logits of a full forward."""

import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax.kv_cache import init_cache, rollback
from realm_jax.model import forward_cached_jit, forward_jit

from hf_reference import random_batch


@pytest.mark.parametrize("arch_kw", [dict(arch="llama"), dict(arch="mistral", sliding_window=4),
                                     dict(arch="qwen3", qk_norm=True), dict(arch="qwen2", qkv_bias=True)])
def test_cached_decode_matches_full_forward(arch_kw):
    cfg = realm_jax.ModelConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2,
                                num_heads=6, num_kv_heads=2, head_dim=8, **arch_kw)
    import jax
    params = realm_jax.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompt_lens = np.array([5, 2, 7], np.int32)
    total = 12
    full, _ = random_batch(rng, cfg.vocab_size, [total] * 3)
    ref = np.asarray(forward_jit(params, cfg, full, np.full(3, total, np.int32)))
    cache = init_cache(cfg, 3, 16, jnp.float32)
    prompt = np.where(np.arange(7)[None] < prompt_lens[:, None], full[:, :7], 0).astype(np.int32)
    logits, cache = forward_cached_jit(params, cfg, prompt, prompt_lens, cache)
    logits = np.asarray(logits)
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(logits[b, :n], ref[b, :n], atol=1e-5)
    pos = prompt_lens.copy()
    while (pos < total).any():
        adv = (pos < total).astype(np.int32)
        step = full[np.arange(3), np.minimum(pos, total - 1)][:, None].astype(np.int32)
        logits, cache = forward_cached_jit(params, cfg, step, adv, cache)
        logits = np.asarray(logits)
        for b in range(3):
            if adv[b]:
                np.testing.assert_allclose(logits[b, 0], ref[b, pos[b]], atol=1e-5)
        pos += adv
    np.testing.assert_array_equal(np.asarray(cache.lengths), [total] * 3)


def test_rollback_then_rewrite_matches():
    cfg = realm_jax.ModelConfig(arch="llama", vocab_size=53, hidden_size=16, intermediate_size=24,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
    import jax
    params = realm_jax.init_params(cfg, jax.random.PRNGKey(1))
    rng = np.random.default_rng(1)
    seq, _ = random_batch(rng, cfg.vocab_size, [9, 9])
    ref = np.asarray(forward_jit(params, cfg, seq, np.array([9, 9], np.int32)))
    cache = init_cache(cfg, 2, 12, jnp.float32)
    junk = rng.integers(3, cfg.vocab_size, (2, 9)).astype(np.int32)
    _, cache = forward_cached_jit(params, cfg, junk, np.array([9, 9], np.int32), cache)
    cache = rollback(cache, np.array([0, 0], np.int32))
    logits, cache = forward_cached_jit(params, cfg, seq, np.array([9, 9], np.int32), cache)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5)


@pytest.mark.parametrize("per_layer,transposed", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("quantized", [None, "before", "after"])
def test_decode_layout_matches_stacked(per_layer, transposed, quantized):
    """The fused/unstacked decode layout (projections stored transposed or not; int8 quantized
    before or after the layout change) gives the stacked layout's logits, cached and not."""
    import jax
    from realm_jax.model import decode_layout
    from realm_jax.quantization import dequantize

    cfg = realm_jax.ModelConfig(arch="qwen2", vocab_size=61, hidden_size=24, intermediate_size=40,
                                num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, qkv_bias=True)
    params = realm_jax.init_params(cfg, jax.random.PRNGKey(3))
    if quantized:
        params = realm_jax.quantize(params)
    fast = decode_layout(params if quantized != "after" else dequantize(params), transposed=transposed)
    if quantized == "after":
        fast = realm_jax.quantize(fast)
    assert isinstance(fast["layers"], tuple) and "wqkv" in fast["layers"][0]
    want = {None: "t", "before": "qt", "after": "qt"}[quantized] if transposed else ("q" if quantized else None)
    w = fast["layers"][0]["w_down"]
    assert (want in w) if want else not isinstance(w, dict)
    rng = np.random.default_rng(3)
    tokens, lengths = random_batch(rng, cfg.vocab_size, [6, 3])
    np.testing.assert_allclose(np.asarray(forward_jit(fast, cfg, tokens, lengths)),
                               np.asarray(forward_jit(params, cfg, tokens, lengths)), atol=1e-5)
    caches = [init_cache(cfg, 2, 16, jnp.float32), init_cache(cfg, 2, 16, jnp.float32, per_layer=per_layer)]
    for step in [tokens, tokens[:, :1]]:
        n = np.full(2, step.shape[1], np.int32)
        a, caches[0] = forward_cached_jit(params, cfg, step, n, caches[0])
        b, caches[1] = forward_cached_jit(fast, cfg, step, n, caches[1])
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
