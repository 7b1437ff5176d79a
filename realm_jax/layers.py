"""Building blocks: RMSNorm, rotary embedding (default / linear / llama3 scaling), the MLP gate,
scaled embeddings and tanh soft-capping; each takes the config's feature fields.

Numerics (documented choice, matching HF transformers):
- RMSNorm computes in float32 and casts back to the input dtype before the weight multiply;
  a ``norm_plus_one`` (Gemma) norm multiplies by (1 + w) in float32 and then casts.
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


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """x [..., D], weight [D] -> [..., D] in x.dtype; ``plus_one``: scaled by (1 + weight) in float32."""
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(var + eps)
    if plus_one:
        return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def norm(cfg: ModelConfig, x: jax.Array, weight: jax.Array) -> jax.Array:
    """The config's RMSNorm (eps, (1 + w) or w): x [..., D], weight [D] -> [..., D]."""
    return rms_norm(x, weight, cfg.rms_norm_eps, cfg.norm_plus_one)


def gate(cfg: ModelConfig, g: jax.Array) -> jax.Array:
    """The MLP gate activation: silu (SwiGLU) or tanh-approximated gelu (GeGLU)."""
    return jax.nn.silu(g) if cfg.hidden_act == "silu" else jax.nn.gelu(g, approximate=True)


def embed_tokens(cfg: ModelConfig, embed: jax.Array, tokens: jax.Array) -> jax.Array:
    """embed [V, D], tokens [B, T] -> [B, T, D]; times sqrt(D) rounded to embed.dtype with ``embed_scale``."""
    x = jnp.take(embed, tokens, axis=0)
    return x * jnp.asarray(np.float32(math.sqrt(cfg.hidden_size)), embed.dtype) if cfg.embed_scale else x


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (identity for cap None), in x.dtype."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies [H/2] float32, with the config's scaling applied (as HF computes them).
    ``local``: for a local layer, plain rope with base ``rope_local_theta`` when the config has one."""
    h = cfg.head_dim
    local = local and cfg.rope_local_theta is not None
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = 1.0 / (np.float32(theta) ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)))
    inv = inv.astype(np.float32)
    if local:
        return inv
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


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> cos, sin [B, T, H] float32 (halves repeated, HF layout); ``local``
    as in ``rope_inv_freq``."""
    inv = jnp.asarray(rope_inv_freq(cfg, local))
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

