"""Building blocks: RMSNorm, rotary embedding (default / linear / llama3 scaling), linear.

Numerics (documented choice, matching HF transformers):
- RMSNorm computes in float32 and casts back to the input dtype before the weight multiply.
- Rotary angles are computed in float32; the rotation is done in float32 and cast back.
- Matmuls take operands in the params dtype and accumulate in float32
  (``preferred_element_type``), then cast to the params dtype; logits are float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import RealmError


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., D], weight [D] -> [..., D] in x.dtype."""
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return weight.astype(x.dtype) * y


def has_lora_rows(w) -> bool:
    """Whether ``w`` is a weight with LoRA A factors folded in (``lora.fold_layout``):
    ``{"t_lora": [Dout + A*R, Din]}``, usable only together with its folded adapters."""
    return isinstance(w, dict) and "t_lora" in w


def linear(x: jax.Array, w) -> jax.Array:
    """x [..., Din] @ w -> [..., Dout] in x.dtype, accumulated in float32.

    ``w`` is one of: a plain array [Din, Dout]; a quantized weight ``{"q": int8 [Din, Dout],
    "scale": [Dout]}`` (dequantized by scaling the output columns); or, in the decode layout
    (``model.decode_layout``), a transposed weight ``{"t": [Dout, Din]}`` or
    ``{"qt": int8 [Dout, Din], "scale": [Dout]}``. The transposed forms keep the contracted axis
    contiguous in memory, which makes XLA's GPU matrix-vector kernels (batch-1 decode) read
    at close to full bandwidth.
    """
    if isinstance(w, dict):
        if has_lora_rows(w):
            raise RealmError("linear: this weight has LoRA A factors folded in ({'t_lora'}, lora.fold_layout) and "
                             "needs its adapters: apply it with lora.folded_proj(x, w, folded_leaf, adapter_ids) "
                             "(forward does, given fold_layout's adapters)")
        if "t" in w:
            return jnp.einsum("...i,oi->...o", x, w["t"], preferred_element_type=jnp.float32).astype(x.dtype)
        if "qt" in w:
            y = jnp.einsum("...i,oi->...o", x, w["qt"].astype(x.dtype), preferred_element_type=jnp.float32)
        else:
            y = jnp.matmul(x, w["q"].astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * w["scale"].astype(jnp.float32)).astype(x.dtype)
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def weight_shape(w) -> tuple[int, ...]:
    """The logical shape [.., Din, Dout] of any weight form ``linear`` takes."""
    if isinstance(w, dict):
        if has_lora_rows(w):  # [Dout + A*R, Din]: Dout depends on the adapters, not known here
            raise RealmError("weight_shape: this weight has LoRA A factors folded in ({'t_lora'}, "
                             "lora.fold_layout); its base shape depends on the adapters. Use the original "
                             "(unfolded) params")
        if "t" in w or "qt" in w:
            s = tuple(w["t" if "t" in w else "qt"].shape)
            return s[:-2] + (s[-1], s[-2])
        return tuple(w["q"].shape)
    return tuple(w.shape)


def transpose_weight(w):
    """A weight [.., Din, Dout] (plain or ``{"q", "scale"}``) -> its transposed form for ``linear``."""
    if isinstance(w, dict):
        if "t" in w or "qt" in w:
            return w
        return {"qt": jnp.swapaxes(w["q"], -1, -2), "scale": w["scale"]}
    return {"t": jnp.swapaxes(w, -1, -2)}


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] float32, with the config's scaling applied (as HF computes them)."""
    h = cfg.head_dim
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)))
    inv = inv.astype(np.float32)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_positions
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> cos, sin [B, T, H] float32 (halves repeated, HF layout)."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B, T, H/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H]; cos/sin [B, T, H]. Rotate-half convention (HF / non-interleaved)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * c + rot * s).astype(x.dtype)

