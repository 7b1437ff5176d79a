"""Weight-only int8 quantization: the array math. ``runtime.prepare(..., quantize="int8")`` applies it.

A weight ``W [.., Din, Dout]`` becomes ``q = round(W / scale)`` int8 with symmetric
per-output-column scales ``scale = max_i |W[i, :]| / 127`` (float32 ``[.., Dout]``); the runtime
computes ``(x @ q) * scale`` (the int8 operand is widened to the activation dtype inside the
matmul fusion, so only int8 bytes are read from memory). Norms, biases and the embedding table
stay in their dtype (the embedding is a gather; with tied embeddings it also serves as the head).
Folded LoRA rows are extra output columns, so each gets its own scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCHEMES = ("int8",)


def quantize_columns(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [.., Din, Dout] float -> (q int8 [.., Din, Dout], scale float32 [.., Dout])."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=-2)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(wf / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize_columns(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The inverse of ``quantize_columns`` up to rounding: [.., Din, Dout] in ``dtype``."""
    return (q.astype(jnp.float32) * scale[..., None, :]).astype(dtype)
