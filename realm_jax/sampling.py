"""Per-row sampling: logit processors, then greedy or a seeded draw, many settings in one batch.

Settings are arrays (one value per row), so a new mix of values never retraces. The optional
processors (``min_p``, ``penalties``, ``bias``, ``min_tokens``) are None when no row uses them:
a call without them runs the plain program, and a call with them compiles its variant once.

Order of operations (HF's order where HF has the processor):

1. ``adjust`` (the "processors"): logit bias (HF ``sequence_bias`` for single tokens, OpenAI
   ``logit_bias``); repetition penalty (HF: a seen token's logit is divided by the penalty when
   positive, multiplied when negative; seen = in the prompt or generated so far); frequency and
   presence penalties (OpenAI: ``- frequency * count - presence * (count > 0)`` over the tokens
   generated so far); ``min_tokens`` (the row's stop ids at -inf until it has that many tokens).
   Greedy rows take the argmax of the adjusted logits.
2. ``warp`` (sampled rows only): temperature, then top-k, then top-p (over the top-k survivors),
   then min-p (keep tokens whose probability is at least ``min_p`` times the top one's).

Randomness: row b at its t-th generated token uses ``fold_in(key(seed_b), t)``, so a request's
tokens depend only on its seed and its own logits, not on the batch or its padding.
"""

from __future__ import annotations

from functools import partial

from typing import Any, NamedTuple

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


class Penalties(NamedTuple):
    """Per-row penalties [B] f32 each: repetition (1 = off), frequency and presence (0 = off)."""

    repetition: Any
    frequency: Any
    presence: Any


class LogitBias(NamedTuple):
    """A sparse per-row bias: ids [B, L] int32 (-1 = unused entry), values [B, L] f32."""

    ids: Any
    values: Any


class History(NamedTuple):
    """What the penalties look at, per row: counts [B, V] int32 of the tokens generated so far
    and in_prompt [B, V] bool."""

    counts: Any
    in_prompt: Any


class SamplingParams(NamedTuple):
    """Per-row settings. temperature [B] f32 (0 = greedy); top_k [B] int32 (0 = off);
    top_p [B] f32 in (0, 1] (1 = off); seed [B] uint32; optional (None = no row uses it):
    min_p [B] f32 (0 = off), ``Penalties``, ``LogitBias``, min_tokens [B] int32."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    min_p: Any = None
    penalties: Any = None
    bias: Any = None
    min_tokens: Any = None

    @property
    def needs_history(self) -> bool:
        return self.penalties is not None

    def pad(self, rows: int) -> "SamplingParams":
        """Host arrays padded with rows that use no setting (greedy, no penalty) up to ``rows``."""
        def p(a, value=0):
            a = np.asarray(a)
            return np.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1), constant_values=value).astype(a.dtype)

        opt = lambda x, f: None if x is None else f(x)  # noqa: E731
        return SamplingParams(p(self.temperature), p(self.top_k), p(self.top_p, 1.0), p(self.seed),
                              opt(self.min_p, p),
                              opt(self.penalties, lambda q: Penalties(p(q.repetition, 1.0), p(q.frequency), p(q.presence))),
                              opt(self.bias, lambda q: LogitBias(p(q.ids, -1), p(q.values))),
                              opt(self.min_tokens, p))

    def to_device(self) -> "SamplingParams":
        return jax.tree.map(jnp.asarray, self)

    @classmethod
    def make_host(cls, batch: int, temperature=0.0, top_k=None, top_p=None, seed=0, *, min_p=None,
                  repetition_penalty=None, frequency_penalty=None, presence_penalty=None, logit_bias=None,
                  min_tokens=None, vocab_size: int | None = None, pad_to: int | None = None) -> "SamplingParams":
        """Validate on the host and broadcast to numpy arrays [batch].

        Each setting is a scalar or one value per row (``None`` entries = the default);
        ``logit_bias`` is one ``{token id: bias}`` map for all rows or one per row (needs
        ``vocab_size`` to check the ids). An optional setting that no row uses stays None.
        ``pad_to`` appends rows that use no setting (padding of a bucketed batch).
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
        mp = _per_row(min_p, 0.0, batch, "min_p")
        _first_bad(mp, ~np.isfinite(mp) | (mp < 0) | (mp > 1), "min_p", "in [0, 1] (0 or None = off)")
        rep = _per_row(repetition_penalty, 1.0, batch, "repetition_penalty")
        _first_bad(rep, ~np.isfinite(rep) | (rep <= 0), "repetition_penalty", "finite and > 0 (1 or None = off)")
        freq = _per_row(frequency_penalty, 0.0, batch, "frequency_penalty")
        pres = _per_row(presence_penalty, 0.0, batch, "presence_penalty")
        _first_bad(freq, ~np.isfinite(freq) | (np.abs(freq) > 2), "frequency_penalty", "in [-2, 2] (0 or None = off)")
        _first_bad(pres, ~np.isfinite(pres) | (np.abs(pres) > 2), "presence_penalty", "in [-2, 2] (0 or None = off)")
        mt = _per_row(min_tokens, 0, batch, "min_tokens")
        _first_bad(mt, ~np.isfinite(mt) | (mt < 0) | (mt != np.round(mt)) | (mt >= 2**31), "min_tokens",
                   "a non-negative integer (0 or None = off)")
        penalties = None
        if (rep != 1).any() or (freq != 0).any() or (pres != 0).any():
            penalties = Penalties(rep.astype(np.float32), freq.astype(np.float32), pres.astype(np.float32))
        host = cls(t.astype(np.float32), k.astype(np.int32), p.astype(np.float32), s.astype(np.uint32),
                   mp.astype(np.float32) if (mp > 0).any() else None, penalties,
                   _logit_bias(logit_bias, batch, vocab_size), mt.astype(np.int32) if (mt > 0).any() else None)
        return host if pad_to is None else host.pad(max(pad_to, batch))

    @classmethod
    def make(cls, batch: int, temperature=0.0, top_k=None, top_p=None, seed=0, *, pad_to: int | None = None,
             **optional) -> "SamplingParams":
        """``make_host`` (all checks before any device work), then to device arrays."""
        return cls.make_host(batch, temperature, top_k, top_p, seed, pad_to=pad_to, **optional).to_device()


MAX_BIAS = 100.0  # OpenAI's bound; +-100 already forces or bans a token


def _logit_bias(bias, batch: int, vocab_size: int | None) -> LogitBias | None:
    """None, one {token id: bias} map, or one map (or None) per row -> ``LogitBias`` (the table
    width bucketed to a power of two >= 4), or None when every map is empty."""
    if bias is None:
        return None
    rows = list(bias) if isinstance(bias, (list, tuple)) else [bias] * batch
    if len(rows) != batch:
        raise RealmError(f"logit_bias: expected one map or {batch} maps (one per prompt), got {len(rows)}")
    items = []
    for i, m in enumerate(rows):
        m = {} if m is None else m
        if not isinstance(m, dict):
            raise RealmError(f"logit_bias: expected a {{token id: bias}} map, got {type(m).__name__}"
                             + (f" (row {i})" if isinstance(bias, (list, tuple)) else ""))
        row = []
        for tid, val in m.items():
            if isinstance(tid, str) and tid.strip().lstrip("-").isdigit():  # JSON object keys are strings
                tid = int(tid)
            if not isinstance(tid, (int, np.integer)) or isinstance(tid, bool) or (
                    vocab_size is not None and not 0 <= tid < vocab_size):
                raise RealmError(f"logit_bias: key {tid!r} is not a token id in [0, {vocab_size})")
            if not _is_number(val) or not abs(float(val)) <= MAX_BIAS:
                raise RealmError(f"logit_bias[{tid}]: expected a number in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {val!r}")
            row.append((int(tid), float(val)))
        items.append(row)
    width = max(len(r) for r in items)
    if width == 0:
        return None
    from .buckets import bucket_table

    w = bucket_table(width)
    ids, vals = np.full((batch, w), -1, np.int32), np.zeros((batch, w), np.float32)
    for i, r in enumerate(items):
        for j, (tid, val) in enumerate(r):
            ids[i, j], vals[i, j] = tid, val
    return LogitBias(ids, vals)


def row_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """seed [B] uint32, step [B] int32 (index of the token being generated) -> keys [B]."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, step)


RADIX_BITS = 4  # bits of the threshold found per pass of ``_select_threshold``: 8 passes of 15 candidates


def _sort_key(x: jax.Array) -> jax.Array:
    """float32 [...] -> uint32 [...] with the same order (-0.0 and +0.0 the same key)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _select_threshold(key: jax.Array, enough) -> jax.Array:
    """key [B, V] uint32, enough(candidates [B, C]) -> bool [B, C], true for small candidates
    and monotone -> the largest t [B] with enough(t): a radix search from the high bits, one
    pass over the row per ``RADIX_BITS`` (no sort). ``enough`` must hold at t = 0. Each pass
    reads the whole row, so the cost is passes x row bytes (benchmarks.md, sampling surface)."""
    digits = jnp.arange(1, 1 << RADIX_BITS, dtype=jnp.uint32)
    t = jnp.zeros(key.shape[:1], jnp.uint32)
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        cand = t[:, None] + (digits << shift)[None, :]
        t = t + (jnp.sum(enough(cand), axis=1).astype(jnp.uint32) << shift)
    return t


def _filter_rows(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, *, use_k: bool = True,
                 use_p: bool = True) -> jax.Array:
    """logits [B, V] f32 (already temperature-scaled), top_k [B], top_p [B] -> logits with the
    excluded entries at -inf. ``use_k=False`` / ``use_p=False``: no row has top-k / top-p on
    (``warp`` knows), and that threshold search is skipped (each costs 8 passes over the row).

    Top-k keeps the tokens at or above the k-th largest logit (ties there all kept, as HF's
    top-k warper does). Top-p then keeps, over those survivors, the tokens at or above the
    largest threshold whose mass (renormalised over the survivors) reaches p: token i stays iff
    the tokens strictly better than it hold less than p. Both thresholds come from
    ``_select_threshold`` over an order-preserving integer key, so no row is sorted.
    """
    v = logits.shape[-1]
    key = _sort_key(logits)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    # [B, V, C] with C minor, summed over V: each element is read once for all C candidates
    # (on an H200 0.71 ms against 0.82 for [B, C, V] at B=64, V=128k)
    at_least = lambda c: key[:, :, None] >= c[:, None, :]  # noqa: E731
    if use_k:
        kth = _select_threshold(key, lambda c: jnp.sum(at_least(c), axis=1) >= k[:, None])
    else:
        kth = jnp.zeros(key.shape[:1], jnp.uint32)  # every key is >= 0: all survive
    if not use_p:
        return jnp.where(key >= kth[:, None], logits, -jnp.inf)
    survivor = key >= kth[:, None]
    w = jnp.where(survivor, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
    need = top_p * jnp.sum(w, axis=-1)
    nucleus = _select_threshold(key, lambda c: jnp.sum(jnp.where(at_least(c), w[:, :, None], 0.0), axis=1)
                                >= need[:, None])
    thresh = jnp.where(top_p >= 1.0, kth, jnp.maximum(nucleus, kth))  # p = 1 is "off" exactly
    return jnp.where(key >= thresh[:, None], logits, -jnp.inf)


def _min_p_row(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """HF's min-p: drop tokens whose probability is below ``min_p`` times the top probability."""
    probs = jax.nn.softmax(logits)
    return jnp.where(probs >= min_p * jnp.max(probs), logits, -jnp.inf)


def adjust(logits: jax.Array, sp: SamplingParams, *, num_new=None, stop_ids=None,
           history: History | None = None) -> jax.Array:
    """logits [B, V] -> float32 logits after the processors (module docstring, step 1): logit
    bias, repetition / frequency / presence penalties (need ``history``), ``min_tokens`` (needs
    ``num_new`` [B] and ``stop_ids`` [B, E], -1 = none). Settings left None cost nothing."""
    logits = logits.astype(jnp.float32)
    b, v = logits.shape
    rows = jnp.arange(b)[:, None]
    if sp.bias is not None:
        ids = jnp.where(sp.bias.ids >= 0, sp.bias.ids, v)  # unused entries fall outside: dropped
        logits = logits.at[rows, ids].add(sp.bias.values, mode="drop")
    if sp.penalties is not None:
        if history is None:
            raise RealmError("penalties need the token history (generation carries it; this caller does not)")
        # elementwise over [B, V], no lax.cond: on an H200 a cond here cost more than the math
        # (benchmarks.md, sampling surface)
        pen = sp.penalties
        seen = history.in_prompt | (history.counts > 0)
        r = pen.repetition[:, None]
        logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
        counts = history.counts.astype(jnp.float32)
        logits = logits - pen.frequency[:, None] * counts - pen.presence[:, None] * (counts > 0)
    if sp.min_tokens is not None:
        early = (num_new < sp.min_tokens)[:, None]
        ids = jnp.where(early & (stop_ids >= 0), stop_ids, v)
        logits = logits.at[rows, ids].set(-jnp.inf, mode="drop")
    return logits


def warp(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Adjusted logits [B, V] -> the sampled rows' distribution (module docstring, step 2):
    temperature, top-k, top-p, min-p; excluded entries at -inf. Greedy rows pass unscaled."""
    logits = logits.astype(jnp.float32)
    greedy = sp.temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, sp.temperature)[:, None]
    def filters(x, use_k: bool, use_p: bool):
        if use_k or use_p:
            x = _filter_rows(x, sp.top_k, sp.top_p, use_k=use_k, use_p=use_p)
        if sp.min_p is not None:
            x = jnp.where((~greedy & (sp.min_p > 0))[:, None], jax.vmap(_min_p_row)(x, sp.min_p), x)
        return x

    # one lax.switch (one predicate, as one cond would cost: benchmarks.md, run 4) picks what
    # the batch needs: nothing, top-k only, top-p only or both (then min-p, in every branch)
    need_k = jnp.any(~greedy & (sp.top_k > 0))
    need_p = jnp.any(~greedy & (sp.top_p < 1.0))
    branches = [partial(filters, use_k=k, use_p=p) for k, p in ((False, False), (True, False), (False, True),
                                                                (True, True))]
    return jax.lax.switch(need_k.astype(jnp.int32) + 2 * need_p.astype(jnp.int32), branches, scaled)


def processed_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Adjusted logits [B, V] -> float32 logits of the distribution actually sampled from.

    Greedy rows (temperature 0) become one-hot (0 at the argmax, -inf elsewhere); other rows are
    ``warp``ed. ``softmax`` of the result is the per-row sampling distribution (used by
    speculative decoding for p and q alike).
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    onehot = jnp.where(jnp.arange(v)[None, :] == jnp.argmax(logits, axis=-1)[:, None], 0.0, -jnp.inf)
    return jnp.where((sp.temperature <= 0)[:, None], onehot, warp(logits, sp))


def sample(logits: jax.Array, sp: SamplingParams, step: jax.Array) -> jax.Array:
    """Adjusted logits [B, V], step [B] int32 -> tokens [B] int32 (greedy rows: argmax, no
    randomness). When every row is greedy the filtering and the random draw are skipped."""
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        drawn = jax.vmap(jax.random.categorical)(row_keys(sp.seed, step), processed_logits(logits, sp))
        return jnp.where(sp.temperature <= 0, greedy_tok, drawn.astype(jnp.int32))

    return jax.lax.cond(jnp.all(sp.temperature <= 0), lambda _: greedy_tok, draw, None)


def sample_with_dist(logits: jax.Array, sp: SamplingParams, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``sample``, and the float32 logits [B, V] of the distribution each row was drawn from
    (greedy rows: the adjusted logits; sampled rows: ``warp``ed), for the log-probs. One
    ``lax.cond`` on "every row greedy" decides both (on an H200 each cond in the decode loop
    costs about a tenth of a 1B step at batch 1: benchmarks.md, sampling surface)."""
    adj = logits.astype(jnp.float32)
    greedy = sp.temperature <= 0
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        warped = warp(adj, sp)
        drawn = jax.vmap(jax.random.categorical)(row_keys(sp.seed, step), warped).astype(jnp.int32)
        return jnp.where(greedy, greedy_tok, drawn), jnp.where(greedy[:, None], adj, warped)

    return jax.lax.cond(jnp.all(greedy), lambda _: (greedy_tok, adj), draw, None)
