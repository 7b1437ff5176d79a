"""Per-row sampling: greedy, temperature, top-k, top-p in one batch, with per-request PRNG keys.

Settings are arrays (one value per row), so a new mix of settings never retraces.
Order of operations (as HF): temperature, then top-k, then top-p.
Randomness: row b at its t-th generated token uses ``fold_in(key(seed_b), t)``, so a request's
tokens depend only on its seed and its own logits — not on the batch or its padding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import RealmError


class SamplingParams(NamedTuple):
    """Per-row settings. temperature [B] f32 (0 = greedy); top_k [B] int32 (0 = off);
    top_p [B] f32 in (0, 1] (1 = off); seed [B] uint32."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array

    @classmethod
    def make(cls, batch: int, temperature=0.0, top_k=None, top_p=None, seed=0) -> "SamplingParams":
        """Validate on the host (clear errors before device work) and broadcast to [batch]."""
        def arr(x, default, dtype, name):
            a = np.asarray(default if x is None else x, dtype=np.float64)
            if a.ndim == 0:
                a = np.full((batch,), a)
            if a.shape != (batch,):
                raise RealmError(f"{name}: expected a scalar or {batch} values, got shape {a.shape}")
            return a

        t = arr(temperature, 0.0, np.float32, "temperature")
        k = arr(top_k, 0, np.int32, "top_k")
        p = arr(top_p, 1.0, np.float32, "top_p")
        s = arr(seed, 0, np.int64, "seed")
        if not np.all(np.isfinite(t)) or (t < 0).any():
            raise RealmError(f"temperature must be >= 0 and finite, got {t[(t < 0) | ~np.isfinite(t)][0]}")
        if (k < 0).any() or (k != np.round(k)).any():
            raise RealmError(f"top_k must be a non-negative integer (0 or None = off), got {k[k < 0][0] if (k < 0).any() else k}")
        if not np.all(np.isfinite(p)) or ((p <= 0) | (p > 1)).any():
            raise RealmError(f"top_p must be in (0, 1], got {p[(p <= 0) | (p > 1) | ~np.isfinite(p)][0]}")
        if (s < 0).any() or (s >= 2**32).any():
            raise RealmError("seed must be in [0, 2**32)")
        return cls(jnp.asarray(t, jnp.float32), jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32),
                   jnp.asarray(s.astype(np.uint32)))


def row_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """seed [B] uint32, step [B] int32 (index of the token being generated) -> keys [B]."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, step)


def _filter_row(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [V] f32 (already temperature-scaled) -> logits with the excluded entries at -inf."""
    v = logits.shape[-1]
    srt = jnp.sort(logits)[::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = srt[k - 1]
    srt = jnp.where(jnp.arange(v) < k, srt, -jnp.inf)
    probs = jax.nn.softmax(srt)
    before = jnp.cumsum(probs) - probs  # mass of strictly better tokens
    keep = before < top_p
    thresh = jnp.min(jnp.where(keep, srt, jnp.inf))
    thresh = jnp.maximum(thresh, kth)
    return jnp.where(logits >= thresh, logits, -jnp.inf)


def processed_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """logits [B, V] -> float32 logits of the distribution actually sampled from.

    Greedy rows (temperature 0) become one-hot (0 at the argmax, -inf elsewhere); other rows are
    divided by the temperature and top-k / top-p filtered. ``softmax`` of the result is the
    per-row sampling distribution (used by speculative decoding for p and q alike).
    """
    logits = logits.astype(jnp.float32)
    greedy = sp.temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, sp.temperature)[:, None]
    need_filter = jnp.any((sp.top_k > 0) | (sp.top_p < 1.0))
    scaled = jax.lax.cond(need_filter, lambda x: jax.vmap(_filter_row)(x, sp.top_k, sp.top_p),
                          lambda x: x, scaled)
    v = logits.shape[-1]
    onehot = jnp.where(jnp.arange(v)[None, :] == jnp.argmax(logits, axis=-1)[:, None], 0.0, -jnp.inf)
    return jnp.where(greedy[:, None], onehot, scaled)


def sample(logits: jax.Array, sp: SamplingParams, step: jax.Array) -> jax.Array:
    """logits [B, V], step [B] int32 -> tokens [B] int32 (greedy rows: argmax, no randomness)."""
    proc = processed_logits(logits, sp)
    keys = row_keys(sp.seed, step)
    drawn = jax.vmap(jax.random.categorical)(keys, proc)
    return jnp.where(sp.temperature <= 0, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
