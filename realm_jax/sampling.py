"""Per-row sampling: greedy, temperature, top-k, top-p in one batch, with per-request PRNG keys.

Settings are arrays (one value per row), so a new mix of settings never retraces.
Order of operations (as HF): temperature, then top-k, then top-p (top-p sees the distribution
renormalised over the top-k survivors).
Randomness: row b at its t-th generated token uses ``fold_in(key(seed_b), t)``, so a request's
tokens depend only on its seed and its own logits, not on the batch or its padding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import RealmError

MAX_TEMPERATURE = 1e6  # beyond it every distribution is uniform in float32 anyway


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _per_row(x, default, batch: int, name: str) -> np.ndarray:
    """A scalar or a list of ``batch`` values (None entries = default) -> float64 [batch].

    Only real numbers are taken: a string ('0.7'), a bool or anything else is a ``RealmError``
    naming the setting (no silent conversion)."""
    if x is None:
        x = default
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        vals = [default if v is None else v for v in list(x)]
        if len(vals) != batch:
            raise RealmError(f"{name}: expected a scalar or {batch} values (one per prompt), got {len(vals)} values")
    else:
        vals = [x] * batch
    for i, v in enumerate(vals):
        if not _is_number(v):
            row = f" (row {i})" if isinstance(x, (list, tuple)) else ""
            raise RealmError(f"{name}: expected numbers, got {v!r} ({type(v).__name__}){row}")
    try:
        return np.asarray([float(v) for v in vals], dtype=np.float64).reshape(batch)
    except OverflowError:  # an int beyond float64
        raise RealmError(f"{name}: expected a number in range, got {x!r:.60}") from None


def _first_bad(a: np.ndarray, bad: np.ndarray, name: str, expected: str):
    if bad.any():
        i = int(np.argmax(bad))
        raise RealmError(f"{name} must be {expected}, got {a[i]:g} (row {i})")


class SamplingParams(NamedTuple):
    """Per-row settings. temperature [B] f32 (0 = greedy); top_k [B] int32 (0 = off);
    top_p [B] f32 in (0, 1] (1 = off); seed [B] uint32."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array

    @classmethod
    def make_host(cls, batch: int, temperature=0.0, top_k=None, top_p=None, seed=0,
                  *, pad_to: int | None = None) -> "SamplingParams":
        """Validate on the host and broadcast to numpy arrays [batch].

        Each setting is a scalar or one value per row (``None`` entries = the default).
        ``pad_to`` appends greedy rows (padding of a bucketed batch) up to that many rows.
        """
        t = _per_row(temperature, 0.0, batch, "temperature")
        k = _per_row(top_k, 0, batch, "top_k")
        p = _per_row(top_p, 1.0, batch, "top_p")
        s = _per_row(seed, 0, batch, "seed")
        _first_bad(t, ~np.isfinite(t) | (t < 0) | (t > MAX_TEMPERATURE), "temperature",
                   f"finite and >= 0 (0 = greedy), at most {MAX_TEMPERATURE:g},")
        _first_bad(k, ~np.isfinite(k) | (k < 0) | (k != np.round(k)) | (k >= 2**31), "top_k",
                   "a non-negative integer below 2**31 (0 or None = off)")
        _first_bad(p, ~np.isfinite(p) | (p <= 0) | (p > 1), "top_p", "in (0, 1] (1 or None = off)")
        _first_bad(s, ~np.isfinite(s) | (s < 0) | (s >= 2**32) | (s != np.round(s)), "seed",
                   "an integer in [0, 2**32)")
        n = batch if pad_to is None else max(pad_to, batch)
        pad = n - batch
        return cls(np.pad(t, (0, pad)).astype(np.float32),
                   np.pad(k, (0, pad)).astype(np.int32),
                   np.pad(p, (0, pad), constant_values=1.0).astype(np.float32),
                   np.pad(s, (0, pad)).astype(np.uint32))

    @classmethod
    def make(cls, batch: int, temperature=0.0, top_k=None, top_p=None, seed=0,
             *, pad_to: int | None = None) -> "SamplingParams":
        """``make_host`` (all checks before any device work), then to device arrays."""
        host = cls.make_host(batch, temperature, top_k, top_p, seed, pad_to=pad_to)
        return cls(*(jnp.asarray(a) for a in host))


def row_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """seed [B] uint32, step [B] int32 (index of the token being generated) -> keys [B]."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, step)


def _filter_row(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [V] f32 (already temperature-scaled) -> logits with the excluded entries at -inf.

    Top-k keeps the k largest; top-p then keeps token i iff the mass (renormalised over the
    top-k survivors) of the tokens ranked strictly above it is < p: the smallest set whose mass
    reaches p. Ties at a threshold are all kept.
    """
    v = logits.shape[-1]
    srt = jnp.sort(logits)[::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = srt[k - 1]
    srt = jnp.where(jnp.arange(v) < k, srt, -jnp.inf)
    probs = jax.nn.softmax(srt)
    before = jnp.cumsum(probs) - probs  # mass of strictly better tokens
    keep = (before < top_p) | (top_p >= 1.0)  # p = 1 is "off" exactly, despite cumsum rounding
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
    need_filter = jnp.any(~greedy & ((sp.top_k > 0) | (sp.top_p < 1.0)))
    scaled = jax.lax.cond(need_filter, lambda x: jax.vmap(_filter_row)(x, sp.top_k, sp.top_p),
                          lambda x: x, scaled)
    v = logits.shape[-1]
    onehot = jnp.where(jnp.arange(v)[None, :] == jnp.argmax(logits, axis=-1)[:, None], 0.0, -jnp.inf)
    return jnp.where(greedy[:, None], onehot, scaled)


def sample(logits: jax.Array, sp: SamplingParams, step: jax.Array) -> jax.Array:
    """logits [B, V], step [B] int32 -> tokens [B] int32 (greedy rows: argmax, no randomness).

    When every row is greedy the filtering and the random draw are skipped (one ``cond``).
    """
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        proc = processed_logits(logits, sp)
        keys = row_keys(sp.seed, step)
        drawn = jax.vmap(jax.random.categorical)(keys, proc).astype(jnp.int32)
        return jnp.where(sp.temperature <= 0, greedy_tok, drawn)

    return jax.lax.cond(jnp.all(sp.temperature <= 0), lambda _: greedy_tok, draw, None)
