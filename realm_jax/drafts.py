"""Draft proposers for speculative decoding: a separate draft model, a self-draft (the first N
layers of the target) and prompt lookup (n-gram match, no model), behind one small interface.

A proposer is split in two:

- a **spec** (frozen, hashable, static under ``jit``) with three pure functions::

      init(params, tokens [B, P], lengths [B], max_len) -> state
      propose(params, state, seq [B, S], n [B], active [B], keys [B, k], sp, k)
          -> drafts [B, k] int32, q_logits [B, k, V] f32, state
      rollback(state, lengths [B]) -> state

  ``seq[b, :n[b]]`` is row b's committed text (prompt + generated); the drafts continue it.
  ``q_logits`` are the logits of the distribution each draft token was sampled from
  (``softmax`` gives q; prompt lookup gives one-hot logits). ``rollback`` keeps at most
  ``lengths[b]`` cached tokens.
- a **Draft** (host side): the spec, its params and a running acceptance estimate that adaptive
  k reads across calls.

Model drafts keep their own KV cache holding the committed text except its last one or two
tokens; each ``propose`` first feeds the missing tail (``T = 2`` with per-row lengths 1 or 2),
so a fully accepted round (whose last draft token never went through the draft) needs no
extra draft step.

k is at most ``MAX_K`` (64) and must leave room in the cache (``check_k``); every proposer's
program has the same operations whatever k is (a scan for model drafts, one gather for prompt
lookup), so compiling at k = 32 costs about what it costs at k = 4.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import RealmError
from .kv_cache import KVCache, init_cache, rollback
from .model import forward_cached, forward_cached_hidden
from .runtime import without_adapters
from .sampling import SamplingParams, processed_logits

DEFAULT_PAIRINGS = Path(__file__).resolve().parent / "drafts.json"  # installed with the package


class DraftError(RealmError):
    """A draft that cannot be paired with the target (vocabulary, special tokens, layers)."""


MAX_K = 64
"""The most tokens drafted per round. Beyond it a round gains nothing measurable (all k drafts
are accepted with probability alpha**k) while the draft logits [B, k, V] and the verify pass
over k + 1 tokens grow with k. Every proposer's program is linear in k (a scan for model drafts,
one gather for prompt lookup), so compile time grows about linearly up to this bound."""


def check_k(k, cache_len: int | None = None) -> int:
    """``k`` (tokens drafted per round): an integer in [1, MAX_K], and with ``cache_len`` (the
    KV cache / sequence length S) small enough that a round's k + 1 verified tokens fit after at
    least one committed token: k + 2 <= S. Raises ``RealmError`` naming k and the bound. Called by
    the proposers at trace time (k and S are static) and by the engine at construction."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_K:
        raise RealmError(f"k: expected an integer in [1, {MAX_K}] (tokens drafted per round; drafts.MAX_K), "
                         f"got {k!r}")
    if cache_len is not None and int(k) + 2 > int(cache_len):
        raise RealmError(f"k: {k} drafted tokens (+1 verified, +1 committed) do not fit in a cache of "
                         f"{cache_len} positions; expected k <= {int(cache_len) - 2}")
    return int(k)


def sample_rows(keys: jax.Array, logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """keys [B], logits [B, V] (processed; -inf = excluded) -> tokens [B] int32.

    A batch of greedy rows (one-hot logits) skips the random draw: argmax is the same token."""
    def draw(_):
        return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

    return jax.lax.cond(jnp.all(sp.temperature <= 0), lambda _: jnp.argmax(logits, -1).astype(jnp.int32),
                        draw, None)


# ----------------------------------------------------------------------------- model drafts
@dataclasses.dataclass(frozen=True)
class ModelDraftSpec:
    """A draft transformer: ``cfg`` with the first ``num_layers`` layers (None = all)."""

    cfg: ModelConfig
    num_layers: int | None = None

    @property
    def name(self) -> str:
        return "model" if self.num_layers is None else f"self:{self.num_layers}"

    def _forward(self, params, tokens, lengths, cache):
        return forward_cached(params, self.cfg, tokens, lengths, cache, num_layers=self.num_layers)

    def init(self, params, tokens, lengths, max_len: int) -> KVCache:
        cache = init_cache(self.cfg, tokens.shape[0], max_len, params.dtype, per_layer=not params.stacked,
                           num_layers=self.num_layers)
        _, cache = forward_cached_hidden(params, self.cfg, tokens, lengths, cache, num_layers=self.num_layers,
                                         empty_cache=True)
        return cache

    def propose(self, params, cache: KVCache, seq, n, active, keys, sp: SamplingParams, k: int):
        b = seq.shape[0]
        check_k(k, seq.shape[1] - 1)  # seq holds the cache length S + 1
        start = cache.lengths
        idx = jnp.minimum(start[:, None] + jnp.arange(2, dtype=jnp.int32)[None, :], seq.shape[1] - 1)
        tail = jnp.take_along_axis(seq, idx, axis=1)
        count = jnp.where(active, n - start, 0).astype(jnp.int32)  # 1 or 2 tokens the cache lacks
        logits, cache = self._forward(params, tail, count, cache)
        last = jnp.take_along_axis(logits, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
        q0 = processed_logits(last, sp)
        d0 = sample_rows(keys[:, 0], q0, sp)
        one = active.astype(jnp.int32)

        def step(carry, key):
            cache, tok = carry
            logits, cache = self._forward(params, tok[:, None], one, cache)
            q = processed_logits(logits[:, 0], sp)
            nxt = sample_rows(key, q, sp)
            return (cache, nxt), (nxt, q)

        if k == 1:
            return d0[:, None], q0[:, None], cache
        (cache, _), (ds, qs) = jax.lax.scan(step, (cache, d0), jnp.swapaxes(keys[:, 1:], 0, 1))
        drafts = jnp.concatenate([d0[:, None], jnp.swapaxes(ds, 0, 1)], axis=1)
        q_logits = jnp.concatenate([q0[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)
        assert drafts.shape == (b, k)
        return drafts, q_logits, cache

    def rollback(self, cache: KVCache, lengths) -> KVCache:
        return rollback(cache, lengths)


# ----------------------------------------------------------------------------- prompt lookup
@dataclasses.dataclass(frozen=True)
class LookupDraftSpec:
    """Prompt lookup: find the most recent earlier occurrence of the last ``g`` committed tokens
    (longest g in ``max_ngram..1`` that matches) and propose what followed it. q is one-hot.
    Without a match the last token is repeated (a cheap guess; exactness does not depend on it).
    """

    vocab_size: int
    max_ngram: int = 3

    name = "lookup"

    def init(self, params, tokens, lengths, max_len: int):
        return None

    def propose(self, params, state, seq, n, active, keys, sp: SamplingParams, k: int):
        b, s = seq.shape
        check_k(k, s - 1)  # seq holds the cache length S + 1
        pos = jnp.arange(s, dtype=jnp.int32)[None, :]
        best = jnp.full((b,), -1, jnp.int32)  # start of the continuation
        for g in range(1, self.max_ngram + 1):  # longer matches override shorter ones
            suffix = jnp.take_along_axis(seq, jnp.maximum(n[:, None] - g + jnp.arange(g)[None, :], 0), axis=1)
            match = pos + g <= n[:, None] - 1  # the continuation seq[j + g] is committed
            match &= (n[:, None] >= g + 1)
            for t in range(g):
                shifted = jnp.roll(seq, -t, axis=1)
                match &= shifted == suffix[:, t:t + 1]
            last = jnp.max(jnp.where(match, pos, -1), axis=1)
            best = jnp.where(last >= 0, last + g, best)
        last_tok = jnp.take_along_axis(seq, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
        # The continuation x[n + i] = x[best + i] runs into its own proposals once best + i >= n,
        # so it repeats with period d = n - best: x[n + i] = seq[best + i mod d]. One gather over
        # fixed shapes [B, k] (the program's size does not depend on k beyond that).
        period = jnp.maximum(n - best, 1)[:, None]
        at = jnp.clip(best[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :] % period, 0, s - 1)
        drafts = jnp.take_along_axis(seq, at, axis=1)
        drafts = jnp.where((best < 0)[:, None], last_tok[:, None], drafts).astype(jnp.int32)
        v = jnp.arange(self.vocab_size, dtype=jnp.int32)
        q_logits = jnp.where(v[None, None, :] == drafts[:, :, None], 0.0, -jnp.inf).astype(jnp.float32)
        return drafts, q_logits, state

    def rollback(self, state, lengths):
        return state


# ----------------------------------------------------------------------------- host side
@dataclasses.dataclass
class Draft:
    """A proposer ready to use with one target: static ``spec``, its ``params`` (a runtime; None for
    lookup) and the running acceptance counts (updated by every speculative call)."""

    spec: Any
    params: Any = None
    source: str = ""
    drafted: int = 0
    accepted: int = 0
    prior_acceptance: float = 0.5

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def acceptance(self) -> float:
        """Running acceptance rate (the prior until something was drafted)."""
        return self.accepted / self.drafted if self.drafted else self.prior_acceptance

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted += int(drafted)
        self.accepted += int(accepted)


_SELF_RE = re.compile(r"^self:(\d+)$")


def make_draft(target, draft, *, prior_acceptance: float | None = None) -> Draft:
    """Build the proposer for ``target`` (a loaded Model) from ``draft``:

    a ``Draft`` (returned as is, keeping its running statistics), a loaded Model with the
    same vocabulary and special tokens, ``"self:N"`` (1 <= N < target layers) or ``"lookup"``.
    """
    if isinstance(draft, Draft):
        return draft
    tcfg: ModelConfig = target.config
    if isinstance(draft, str):
        m = _SELF_RE.match(draft.strip())
        if draft.strip() == "lookup":
            d = Draft(LookupDraftSpec(tcfg.vocab_size), None, "lookup", prior_acceptance=0.3)
        elif m:
            layers = int(m.group(1))
            if not 1 <= layers < tcfg.num_layers:
                raise DraftError(f"draft 'self:N': expected 1 <= N < {tcfg.num_layers} (the target's "
                                 f"layers), got N={layers}")
            d = Draft(ModelDraftSpec(tcfg, layers), without_adapters(target.runtime), draft.strip())
        else:
            raise DraftError(f"draft: expected a loaded Model, 'self:N' (N an integer) or 'lookup', "
                             f"got {draft!r}")
    elif hasattr(draft, "config") and hasattr(draft, "params"):
        check_compatible(target, draft)
        d = Draft(ModelDraftSpec(draft.config), without_adapters(draft.runtime), getattr(draft, "source", ""))
    else:
        raise DraftError(f"draft: expected a loaded Model, 'self:N' or 'lookup', got {type(draft).__name__}")
    if prior_acceptance is not None:
        ok = isinstance(prior_acceptance, (int, float, np.integer, np.floating)) and not isinstance(
            prior_acceptance, bool) and 0.0 <= float(prior_acceptance) <= 1.0
        if not ok:
            raise DraftError(f"prior_acceptance: expected a rate in [0, 1], got {prior_acceptance!r}")
        d.prior_acceptance = float(prior_acceptance)
    return d


def check_compatible(target, draft) -> None:
    """A separate draft must share the target's vocabulary and special tokens."""
    tc, dc = target.config, draft.config
    if tc.vocab_size != dc.vocab_size:
        raise DraftError(f"draft vocab_size: expected {tc.vocab_size} (the target's), got {dc.vocab_size}")
    for field in ("bos_token_id", "eos_token_ids"):
        a, b = getattr(tc, field), getattr(dc, field)
        if a != b:
            raise DraftError(f"draft {field}: expected {a!r} (the target's), got {b!r}")
    tt, dt = getattr(target, "tokenizer", None), getattr(draft, "tokenizer", None)
    if tt is not None and dt is not None:
        for field in ("vocab_size", "bos_id", "eos_ids"):
            a, b = getattr(tt, field, None), getattr(dt, field, None)
            if a != b:
                raise DraftError(f"draft tokenizer {field}: expected {a!r} (the target's), got {b!r}")


def load_pairings(path: str | Path | None = None) -> list[dict]:
    """The draft pairings config (``realm_jax/drafts.json``): a list of
    ``{"target": SOURCE, "draft": SOURCE | "self:N" | "lookup", "k": int, ...}``."""
    path = Path(path) if path is not None else DEFAULT_PAIRINGS
    if not path.is_file():
        raise DraftError(f"draft pairings config: expected a JSON file, got {str(path)!r} (not found)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DraftError(f"draft pairings config {str(path)!r}: not valid JSON ({e})") from None
    pairs = data.get("pairings") if isinstance(data, dict) else None
    if not isinstance(pairs, list) or not all(isinstance(p, dict) and "target" in p and "draft" in p for p in pairs):
        raise DraftError(f"draft pairings config {str(path)!r}: expected "
                         "{\"pairings\": [{\"target\": ..., \"draft\": ...}, ...]}")
    return pairs


def pairing_for(target_source: str, path: str | Path | None = None) -> dict:
    """The pairing whose ``target`` equals ``target_source`` (or its file / directory name)."""
    pairs = load_pairings(path)
    names = {str(target_source), Path(str(target_source)).name}
    for p in pairs:
        if p["target"] in names:
            return p
    raise DraftError(f"draft pairing for target {target_source!r}: none in the config "
                     f"(targets: {', '.join(p['target'] for p in pairs)})")


def resolve_draft(target, source: str, *, dtype=None, pairings: str | Path | None = None):
    """A ``--draft`` value -> (draft for ``make_draft``, k from the pairing or None).

    ``"self:N"`` and ``"lookup"`` pass through; ``"paired"`` takes the pairing of the target's
    source from the pairings config (``realm_jax/drafts.json``); anything else is a checkpoint
    source loaded like the target (a name without a path is also looked up beside the
    target's checkpoint) and checked against it.
    """
    source = str(source).strip()
    if source == "lookup" or source.startswith("self:"):
        return source, None
    if source == "paired":
        pair = pairing_for(getattr(target, "source", ""), pairings)
        draft, _ = resolve_draft(target, pair["draft"], dtype=dtype)
        return draft, pair.get("k")
    from .loading import load

    path = Path(source)
    beside = Path(str(getattr(target, "source", ""))).parent / source
    if not path.exists() and str(getattr(target, "source", "")) and beside.exists():
        path = beside
    model = load(path if path.exists() else source, dtype=dtype or jnp.dtype(target.dtype).name)
    check_compatible(target, model)
    return model, None
