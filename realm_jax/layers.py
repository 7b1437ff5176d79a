"""Building blocks: RMSNorm, rotary embedding (default / linear / llama3 / longrope scaling,
partial rotary), the MLP gate, scaled embeddings and tanh soft-capping; each takes the config's
feature fields.

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


def rope_inv_freq(cfg: ModelConfig, local: bool = False, long: bool = False) -> np.ndarray:
    """Inverse frequencies [R/2] float32 (R = ``cfg.rope_dims``), with the config's scaling applied
    (as HF computes them). ``local``: for a local layer, plain rope with base ``rope_local_theta``
    when the config has one. ``long``: longrope's long factors (else its short ones)."""
    h = cfg.rope_dims
    local = local and cfg.rope_local_theta is not None
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    base = np.float32(theta) ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h))
    if cfg.rope_type == "longrope" and not local:  # each frequency divided by its factor
        ext = np.asarray(cfg.rope_long_factor if long else cfg.rope_short_factor, np.float32)
        return (1.0 / (ext * base)).astype(np.float32)
    inv = (1.0 / base).astype(np.float32)
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


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array, local: bool = False,
                 seq_lens: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> cos, sin [B, T, R] float32 (halves repeated, HF layout); ``local``
    as in ``rope_inv_freq``.

    longrope picks its factors per row, as HF does per forward call: the long ones for a row
    whose sequence (``seq_lens`` [B]: the keys valid after this call, i.e. its last position + 1)
    is longer than ``rope_original_max_positions``, else the short ones; cos and sin are then
    scaled by ``rope_attention_factor``. A cached decode that crosses that length thus rotates the
    new keys with the long factors while the cached ones keep the short ones, as HF's cache does."""
    if cfg.rope_type == "longrope" and not (local and cfg.rope_local_theta is not None):
        if seq_lens is None:
            raise ValueError("rope_cos_sin: longrope needs seq_lens (each row's sequence length)")
        long = (jnp.asarray(seq_lens) > cfg.rope_original_max_positions)[:, None, None]
        inv = jnp.where(long, jnp.asarray(rope_inv_freq(cfg, long=True)), jnp.asarray(rope_inv_freq(cfg)))
        scale = np.float32(cfg.rope_attention_factor)
    else:
        inv, scale = jnp.asarray(rope_inv_freq(cfg, local)), None
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B, T, R/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    return (cos, sin) if scale is None else (cos * scale, sin * scale)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H]; cos/sin [B, T, R] (R <= H: partial rotary leaves dims R.. as they are).
    Rotate-half convention (HF / non-interleaved) over the first R dims."""
    xf = x.astype(jnp.float32)
    r = cos.shape[-1]
    xr, rest = xf[..., :r], xf[..., r:]
    half = r // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = xr * c + rot * s
    return (out if r == x.shape[-1] else jnp.concatenate([out, rest], axis=-1)).astype(x.dtype)
