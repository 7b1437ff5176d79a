"""Grouped-query attention with masks derived from positions and valid lengths.

One helper builds every mask: a query at absolute position p sees cache/key slot s iff
``s <= p`` (causal) and ``s < kv_len`` (padding / cache-valid) and, with a sliding window W,
``p - s < W``. Key slot index == absolute position, because every row's cache starts at 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully-masked (padding) query rows give a uniform softmax, not NaN


def attention_mask(q_pos: jax.Array, kv_len: jax.Array, num_keys: int, window: int | None) -> jax.Array:
    """q_pos [B, T] int, kv_len [B] int -> bool [B, T, S] (True = may attend)."""
    s = jnp.arange(num_keys, dtype=jnp.int32)[None, None, :]
    p = q_pos[:, :, None]
    mask = (s <= p) & (s < kv_len[:, None, None])
    if window is not None:
        mask &= (p - s) < window
    return mask


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float | None = None,
                  softcap: float | None = None) -> jax.Array:
    """Reference einsum attention.

    q [B, T, N, H]; k, v [B, S, K, H]; mask [B, T, S] -> [B, T, N, H] in q.dtype.
    Scores (times ``scale``, default H ** -0.5; then ``softcap * tanh(scores / softcap)`` when
    given) and softmax in float32; probabilities cast to v.dtype for the value product.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


# --- fused attention (cuDNN flash attention on GPU) -------------------------------------------
#
# ``jax.nn.dot_product_attention`` covers two of our mask shapes exactly:
# - "prefill": the cache was empty before this call, so query t sits at position t and the mask is
#   causal (top-left aligned) ∧ s < kv_len;
# - "decode": one query per row at position kv_len - 1 (or a row that does not advance), so the
#   mask is s < kv_len alone.
# Anything else (a multi-token append to a non-empty cache: speculative verify), sliding-window
# decode and attention-logit soft-capping (Gemma 2: the kernel has no soft-cap) keep the einsum
# reference, which is also what every test compares the fused path with.

# The implementation is the runtime form's static choice (``runtime.resolve_attention``).


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array, *, causal: bool,
                    window: int | None, implementation: str, scale: float | None = None) -> jax.Array:
    """q [B, T, N, H]; k, v [B, S, K, H]; kv_len [B] -> [B, T, N, H] in q.dtype.

    causal=True: query t is at position t (empty cache before this call) and sees keys
    s <= t, s < kv_len (and t - s < window). causal=False: T == 1 and every query sees s < kv_len
    (no window support: the caller keeps the reference there). Rows with kv_len 0 (padding) see
    key 0 instead of nothing; their outputs are never used. ``scale``: as ``gqa_attention``'s.
    """
    if not causal and (q.shape[1] != 1 or window is not None):
        raise ValueError("non-causal fused attention is for single-token decode without a sliding window")
    kv_len = jnp.maximum(kv_len.astype(jnp.int32), 1)
    local = (window - 1, 0) if (causal and window is not None) else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=kv_len,
                                        local_window_size=local, implementation=implementation, scale=scale)
