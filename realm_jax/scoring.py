"""Batch evaluation: log-likelihood of continuations (``score``) and rolling perplexity.

A request is ``(context, continuation)``: two strings, or two lists of token ids. Strings follow
the evaluation-harness convention (``encode_pair``): trailing whitespace of the context moves to
the continuation, the whole text is encoded once and split after the context's own tokens, so
the continuation tokens are exactly those of the joint encoding; an empty context becomes the
prefix token (BOS, else EOS).

How a batch runs: requests are sorted by length (longest first) and packed into batches of
``batch_size`` requests; a batch's rows are its requests rounded up to a power of two, at most
``batch_size`` (so a lone request is not padded to a full batch). The model input length T is
rounded up to a bucket (powers of two from 16 to 512, then multiples of 512) and the scored
span C to a power of two, so the number of compilations is bounded by the number of
(rows, T, C) buckets. On device, only the C positions that predict continuation tokens go through
the LM head, in float32, and only their log-probs [B, C] and greedy flags [B, C] come back to
the host, never the [B, T, V] logits. Results are returned in input order.

Shared prefixes (``share_prefixes=True``, the default): requests whose model inputs start with
the same tokens (at least ``MIN_SHARED_PREFIX``, same adapter; the rule is ``prefix_groups``) are
scored as one group: the shared prefix is prefilled once into a KV cache [G, Tp] (G groups a
batch), and the members' remaining tokens run as batches [B, Ts] over it, each row gathering its
group's cache row (``shared_continuation_logprobs``). Tp and Ts are the same input-length
buckets, so compilations stay bounded by (G, Tp) and (G, Tp, B, Ts, C) buckets, not by groups.
The plain path (every request whole) is the reference it is tested against.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import progress as _progress
from .buckets import bucket_batch, bucket_length, bucket_table
from .errors import RealmError
from .kv_cache import KVCache, extend, rows_of
from .model import forward_cached_hidden, forward_hidden, lm_head

# Upper bound on the float32 logits materialised at once: B * c * V elements (512 MiB).
LOGITS_BUDGET = 2 ** 27


@dataclasses.dataclass(frozen=True)
class Score:
    """The log-likelihood of one continuation.

    logprob: sum of ``token_logprobs`` (natural log).
    token_logprobs: log p(token | everything before it), one per continuation token.
    is_greedy: every continuation token is the argmax of the model's next-token distribution.
    token_ids: the continuation's token ids (after tokenization).
    """

    logprob: float
    token_logprobs: tuple[float, ...]
    is_greedy: bool
    token_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """Rolling-window result over one or more documents.

    nll: total negative log-likelihood (nats) over ``num_tokens`` scored tokens.
    documents: ``(nll, num_tokens)`` for each document, in input order.
    """

    nll: float
    num_tokens: int
    documents: tuple[tuple[float, int], ...]

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.num_tokens)


# ----------------------------------------------------------------------------- tokenization
def prefix_token_id(tokenizer) -> int:
    """The token standing in for an empty context: BOS, else EOS (as the harness does)."""
    for tid in (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)):
        if tid is not None:
            return int(tid)
    raise RealmError("context: an empty context needs a BOS or EOS token to stand in for it, "
                     "but the tokenizer has neither")


def encode_pair(tokenizer, context: str, continuation: str, *, encode=None,
                prefix: int | None = None) -> tuple[list[int], list[int]]:
    """Harness tokenization of a string request -> (context_ids, continuation_ids).

    Trailing whitespace of ``context`` is moved to the front of ``continuation``; then
    ``context + continuation`` is encoded whole and split after ``len(encode(context))`` tokens.
    An empty context gives ``[prefix token]`` and the continuation encoded without special
    tokens (unless it already starts with the prefix token, which then becomes the context).
    encode: ``encode(text)`` / ``encode(text, add_special_tokens=False)`` (default: the
    tokenizer's, with its special tokens); prefix: the prefix token (default ``prefix_token_id``).
    """
    if encode is None:
        encode = tokenizer.encode
    if context == "":
        cont = encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer) if prefix is None else prefix
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    n_ws = len(context) - len(context.rstrip())
    if n_ws:
        context, continuation = context[:-n_ws], context[-n_ws:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


def _as_ids(x, vocab: int, what: str) -> list[int] | None:
    """A list of ints in [0, vocab) from a list/tuple/ndarray, or None if ``x`` is not one."""
    if isinstance(x, np.ndarray):
        if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
            raise RealmError(f"{what}: expected a 1-D integer array of token ids, got {x.dtype} {x.shape}")
        x = x.tolist()
    if not isinstance(x, (list, tuple)):
        return None
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in x):
        bad = next(t for t in x if not isinstance(t, (int, np.integer)) or isinstance(t, bool))
        raise RealmError(f"{what}: expected token ids (ints), got an element {bad!r}")
    out = [int(t) for t in x]
    bad = [t for t in out if not 0 <= t < vocab]
    if bad:
        raise RealmError(f"{what}: token ids must be in [0, {vocab}) (vocab size), got {bad[0]}")
    return out


def tokenize_requests(model, requests: Sequence) -> list[tuple[list[int], list[int]]]:
    """Validate requests and turn each into ``(context_ids, continuation_ids)``.

    Every problem is reported (naming the request index) before any device work.
    """
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
        raise RealmError(f"requests: expected a list of (context, continuation) pairs, got {type(requests).__name__}")
    vocab = model.config.vocab_size
    out = []
    for i, req in enumerate(requests):
        if not isinstance(req, (tuple, list)) or len(req) != 2:
            raise RealmError(f"requests[{i}]: expected a (context, continuation) pair, got {req!r:.80}")
        context, continuation = req
        if isinstance(context, str) and isinstance(continuation, str):
            if continuation == "":
                raise RealmError(f"requests[{i}]: continuation is empty (nothing to score)")
            if model.tokenizer is None:
                raise RealmError(f"requests[{i}]: string requests need a tokenizer, but the model has none; "
                                 "pass token ids instead")
            ctx, cont = encode_pair(model.tokenizer, context, continuation)
            if not cont:
                raise RealmError(f"requests[{i}]: continuation {continuation!r} tokenizes to no tokens "
                                 "after the context (nothing to score)")
            _as_ids(ctx + cont, vocab, f"requests[{i}] (tokenized)")
        else:
            ctx = _as_ids(context, vocab, f"requests[{i}] context")
            cont = _as_ids(continuation, vocab, f"requests[{i}] continuation")
            if ctx is None or cont is None:
                raise RealmError(f"requests[{i}]: context and continuation must both be strings or both be "
                                 f"token id lists, got {type(context).__name__} and {type(continuation).__name__}")
            if not cont:
                raise RealmError(f"requests[{i}]: continuation is empty (nothing to score)")
            if not ctx:
                raise RealmError(f"requests[{i}]: context ids are empty; the first continuation token needs "
                                 "at least one context token (e.g. the BOS id)")
        out.append((ctx, cont))
    return out


# ----------------------------------------------------------------------------- shapes
def _logits_chunk(b: int, c: int, v: int) -> int:
    """Largest power of two dividing c with b * chunk * v <= LOGITS_BUDGET (at least 1)."""
    chunk = c & -c
    while chunk > 1 and b * chunk * v > LOGITS_BUDGET:
        chunk //= 2
    return chunk


def batch_rows(n: int, batch_size: int) -> int:
    """Rows of a device batch holding n requests: n rounded up to a power of two, at most
    batch_size (the last, short batch of a run, or a lone request, is not padded to a full one)."""
    return min(int(batch_size), bucket_batch(n))


# ----------------------------------------------------------------------------- shared prefixes
# The shortest prefix worth sharing (tokens): a shorter one saves less than its prefill dispatch costs.
MIN_SHARED_PREFIX = 16


@dataclasses.dataclass(frozen=True)
class PrefixGroup:
    """Requests computed over one shared prefix: their first ``prefix`` model-input tokens are
    the same (as is their adapter), so those tokens' K/V are computed once for all of them."""

    prefix: int
    members: tuple[int, ...]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    hi = min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    lo, hi = 0, hi - 1  # a binary search over slice equality (compared in C, not token by token)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def prefix_groups(inputs: Sequence[Sequence[int]], caps: Sequence[int], keys: Sequence | None = None, *,
                  min_shared: int = MIN_SHARED_PREFIX) -> tuple[list[PrefixGroup], list[int]]:
    """Find requests that share a token prefix -> (groups of two or more, indices left alone).

    inputs[i]: request i's tokens; caps[i]: how many of its first tokens may be shared (for
    scoring: its tokens before the position predicting its first continuation token, which must
    be computed with the request's own suffix); keys[i]: what must also be equal to share (the
    adapter id: it changes the K/V), default all equal.

    The rule: requests are sorted by (key, tokens, index) and walked in that order. The current
    group G has prefix P: the common prefix of its members, at most each member's cap (in sorted
    order the common prefix of a run is the least of its neighbours' ones). The next request r
    joins G when its key is G's and p' = min(P, common_prefix(previous, r), caps[r]) is at least
    ``min_shared`` and joining saves tokens: (|G| - 1) * (P - p') < p' (every member recomputes
    P - p' more tokens, r skips p'); otherwise r starts a new group. So the 4 choices of a
    question share its context, and the questions of a few-shot subject share its few-shot
    prefix, but a long group does not shrink to take in a request sharing a little less.
    Deterministic: the same requests give the same groups.
    """
    n = len(inputs)
    if len(caps) != n or (keys is not None and len(keys) != n):
        raise ValueError(f"prefix_groups: expected one cap and one key per input ({n}), got {len(caps)} caps "
                         f"and {'no' if keys is None else len(keys)} keys")
    keys = [0] * n if keys is None else list(keys)
    order = sorted(range(n), key=lambda i: (keys[i], list(inputs[i]), i))
    runs: list[tuple[int, list[int]]] = []
    for r in order:
        if runs:
            p, members = runs[-1]
            last = members[-1]
            if keys[last] == keys[r]:
                shared = min(p, caps[r], common_prefix(inputs[last], inputs[r]))
                if shared >= min_shared and (len(members) - 1) * (p - shared) < shared:
                    members.append(r)
                    runs[-1] = (shared, members)
                    continue
        runs.append((int(caps[r]), [r]))
    groups = [PrefixGroup(p, tuple(m)) for p, m in runs if len(m) > 1]
    alone = sorted(m[0] for p, m in runs if len(m) == 1)
    return groups, alone


def prefix_batches(groups: Sequence[PrefixGroup], batch_size: int) -> list[list[PrefixGroup]]:
    """Groups into prefill batches, longest prefix first: ``batch_size`` groups while at least that
    many are left, then the largest power of two that is left, so no prefill row is padding."""
    todo = sorted(groups, key=lambda g: (-g.prefix, g.members))
    out = []
    while todo:
        m = batch_size if len(todo) >= batch_size else 1 << (len(todo).bit_length() - 1)
        out.append(todo[:m])
        todo = todo[m:]
    return out


# ----------------------------------------------------------------------------- device part
def _span_logprobs(rt, cfg, hidden, starts, targets, chunk: int):
    """hidden [B, T, D] -> (logprobs [B, C] float32, greedy [B, C] bool) of targets [B, C], target
    c of row b predicted at position ``starts[b] + c`` (clamped to T - 1). The LM head runs on the
    C positions only, ``chunk`` at a time."""
    b, t, d = hidden.shape
    c = targets.shape[1]
    pos = jnp.minimum(starts[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :], t - 1)
    h = jnp.take_along_axis(hidden, pos[:, :, None], axis=1)  # [B, C, D]

    def head(xs):
        hc, tc = xs  # [B, c, D], [B, c]
        logits = lm_head(rt, cfg, hc)  # [B, c, V] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[:, :, None], axis=-1)[:, :, 0]
        return picked - lse, jnp.argmax(logits, axis=-1).astype(jnp.int32) == tc

    n = c // chunk
    hs = h.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    lp, greedy = jax.lax.map(head, (hs, ts))  # [n, B, chunk]
    return lp.swapaxes(0, 1).reshape(b, c), greedy.swapaxes(0, 1).reshape(b, c)


@partial(jax.jit, static_argnames=("cfg", "chunk"))
def continuation_logprobs(rt, cfg, tokens, lengths, starts, targets, adapter_ids=None, *, chunk: int):
    """Log-probs of target tokens over a span of each row.

    tokens [B, T] int32 right-padded, lengths [B] int32; starts [B] int32: the position whose
    next-token distribution predicts targets[:, 0]; targets [B, C] int32.
    Returns logprobs [B, C] float32 (``log_softmax(logits[b, starts[b] + c])[targets[b, c]]``)
    and greedy [B, C] bool (that target is the argmax). Positions past T - 1 are clamped
    (the caller ignores them). The LM head runs on C positions only, ``chunk`` at a time.
    """
    hidden = forward_hidden(rt, cfg, tokens, lengths, adapter_ids=adapter_ids)
    return _span_logprobs(rt, cfg, hidden, starts, targets, chunk)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill_prefixes(rt, cfg, tokens, lengths, cache: KVCache, adapter_ids=None) -> KVCache:
    """Shared prefixes into an empty cache: tokens [G, Tp] int32 right-padded, lengths [G] int32
    (each prefix's length P_g) -> the (donated) cache of G rows and Tp slots, lengths = P_g."""
    _, cache = forward_cached_hidden(rt, cfg, tokens, lengths, cache, adapter_ids=adapter_ids, empty_cache=True)
    return cache


@partial(jax.jit, static_argnames=("cfg", "chunk"))
def shared_continuation_logprobs(rt, cfg, prefixes: KVCache, rows, tokens, lengths, starts, targets,
                                 adapter_ids=None, *, chunk: int):
    """``continuation_logprobs`` of rows that continue cached prefixes.

    prefixes: the cache of G prefixes (``prefill_prefixes``: G rows of Sp slots, lengths P_g);
    rows [B] int32: the prefix row b continues; tokens [B, T] int32: row b's model input after
    its prefix (token t at position P + t), right-padded, lengths [B]; starts [B]: the suffix
    position predicting targets[:, 0]; targets [B, C]. Each row gets its prefix's K/V (a gather:
    [B, Sp] slots) extended by T slots, and its suffix runs through ``forward_cached_hidden``,
    attending over prefix and suffix: the same numbers as ``continuation_logprobs`` on the whole
    input, to float rounding. Returns logprobs [B, C] float32 and greedy [B, C] bool.
    """
    cache = extend(rows_of(prefixes, rows), tokens.shape[1])
    hidden, _ = forward_cached_hidden(rt, cfg, tokens, lengths, cache, adapter_ids=adapter_ids)
    return _span_logprobs(rt, cfg, hidden, starts, targets, chunk)


# ----------------------------------------------------------------------------- host part
def _adapter_ids_per_request(cfg, adapters, adapter_ids, n: int, num_adapters: int = 0) -> np.ndarray | None:
    """Validate adapters (as ``generate`` does) and give one adapter id per request (or None).
    ``num_adapters``: how many the model's runtime serves when no ``adapters`` are passed."""
    if adapters is None and not num_adapters:
        if adapter_ids is not None:
            raise RealmError("adapter_ids: given without adapters (pass adapters=..., or drop adapter_ids)")
        return None
    from .lora import check_adapter, check_adapter_ids
    from .params import projection_dims

    count = check_adapter(adapters, projection_dims(cfg), cfg.num_layers, "adapters") if adapters is not None \
        else (None if num_adapters == 1 else num_adapters)
    if adapter_ids is None:
        if count is not None:
            raise RealmError(f"adapter_ids: required with a stack of {count} adapters "
                             "(one id per request or one for all, -1 = base model)")
        return None
    if np.ndim(adapter_ids) == 0:
        adapter_ids = np.full(n, int(adapter_ids))
    return check_adapter_ids(adapter_ids, count, n)


def _truncate(ctx: list[int], cont: list[int], max_length: int | None, i: int) -> list[int]:
    """context + continuation, left-truncated so the model input (all but the last) fits."""
    full = ctx + cont
    if max_length is not None and len(full) - 1 > max_length:
        if len(cont) > max_length:
            raise RealmError(f"requests[{i}]: continuation has {len(cont)} tokens, more than "
                             f"max_length={max_length}")
        full = full[-(max_length + 1):]
    return full


def iter_scores(model, requests: Sequence, *, batch_size: int = 8, max_length: int | None = None,
                adapters=None, adapter_ids=None,
                share_prefixes: bool = True) -> Iterator[tuple[list[int], list[Score]]]:
    """Score requests batch by batch: yields ``(request indices, scores)`` per batch.

    Batches come in no particular order (not input order); every request appears exactly once,
    and the same arguments give the same batches. All validation happens before the first batch
    is dispatched. While the host unpacks one batch, the next is already running on the device.

    share_prefixes: requests whose model inputs (after ``max_length`` truncation) share at least
    ``MIN_SHARED_PREFIX`` leading tokens, with the same adapter, are grouped (``prefix_groups``);
    each group's prefix is prefilled once into a KV cache (``prefill_prefixes``: groups batched
    ``batch_size`` at a time, [G, Tp] with Tp the input-length bucket of the longest prefix) and
    its members' suffixes are scored from that cache (``shared_continuation_logprobs``: batches
    of ``batch_size`` rows [B, Ts], Ts the bucket of the longest suffix, over a cache of
    Tp + Ts slots). The other requests run as without sharing. False: every request runs whole
    (``continuation_logprobs`` over its full input), the plain reference of the shared path.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise RealmError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not isinstance(share_prefixes, (bool, np.bool_)):
        raise RealmError(f"share_prefixes: expected True or False, got {share_prefixes!r}")
    positions = int(model.config.max_position_embeddings)
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
                                   or not 1 <= max_length <= positions):
        raise RealmError(f"max_length: expected an int in [1, {positions}] (the model's max_position_embeddings) "
                         f"or None, got {max_length!r}")
    pairs = tokenize_requests(model, requests)
    fulls = [_truncate(ctx, cont, max_length, i) for i, (ctx, cont) in enumerate(pairs)]
    for i, full in enumerate(fulls):
        if len(full) - 1 > positions:
            raise RealmError(f"requests[{i}]: {len(full) - 1} input tokens (context + continuation - 1), more "
                             f"than the model's max_position_embeddings={positions}; pass max_length to "
                             f"truncate the context from the left")
    ids_per_req = _adapter_ids_per_request(model.config, adapters, adapter_ids, len(pairs),
                                           0 if adapters is not None else model.num_adapters)
    from .generation import new_cache, runtime_for

    rt = runtime_for(model, adapters)
    conts = [cont for _, cont in pairs]
    inputs = [len(f) - 1 for f in fulls]  # model input length n: the scored span is [n - k, n)
    cfg = model.config
    from .sharding import place_batch

    on_mesh = rt.mesh is not None

    def adapter_rows(idx, rows):
        if ids_per_req is not None:
            aids = np.full(rows, -1, np.int32)
            aids[:len(idx)] = ids_per_req[idx]
            return aids
        return np.zeros(rows, np.int32) if rt.num_adapters else None  # one adapter: every row, as in forward

    def pack(idx, skip):
        """Host arrays of a batch: row r is request idx[r]'s model input from token skip[r] on."""
        t = bucket_length(max(inputs[i] - s for i, s in zip(idx, skip)))
        c = bucket_table(max(len(conts[i]) for i in idx), cap=t)
        rows = batch_rows(len(idx), batch_size)
        tokens = np.zeros((rows, t), np.int32)
        lengths = np.ones(rows, np.int32)
        starts = np.zeros(rows, np.int32)
        targets = np.zeros((rows, c), np.int32)
        for r, (i, s) in enumerate(zip(idx, skip)):
            full, n, k = fulls[i], inputs[i], len(conts[i])
            tokens[r, :n - s] = full[s:n]
            lengths[r] = n - s
            starts[r] = n - k - s
            targets[r, :k] = full[-k:]
        return (tokens, lengths, starts, targets, adapter_rows(idx, rows)), _logits_chunk(rows, c, cfg.vocab_size)

    def placed(x):  # B on the mesh's data axis: each data replica computes its own rows
        return place_batch(x, rt, strict=False) if on_mesh else x

    def dispatch_plain(idx):
        (tokens, lengths, starts, targets, aids), chunk = pack(idx, [0] * len(idx))
        rows, t, c = targets.shape[0], tokens.shape[1], targets.shape[1]
        _progress.compile_notice(f"score for batch {rows} x {t} (span {c})",
                                 ("score", cfg, rt.options, rows, t, c, chunk, aids is None))
        return continuation_logprobs(rt, cfg, *placed((tokens, lengths, starts, targets, aids)), chunk=chunk)

    def dispatch_prefill(groups):
        rows = batch_rows(len(groups), batch_size)
        tp = bucket_length(max(g.prefix for g in groups))
        tokens = np.zeros((rows, tp), np.int32)
        lengths = np.ones(rows, np.int32)
        for r, g in enumerate(groups):
            tokens[r, :g.prefix] = fulls[g.members[0]][:g.prefix]
            lengths[r] = g.prefix
        aids = adapter_rows([g.members[0] for g in groups], rows)
        _progress.compile_notice(f"score: shared prefixes {rows} x {tp}",
                                 ("score-prefix", cfg, rt.options, rows, tp, aids is None))
        return prefill_prefixes(rt, cfg, *placed((tokens, lengths)), new_cache(cfg, rt, rows, tp), placed(aids))

    def dispatch_shared(prefixes, idx, skip, row_of):
        (tokens, lengths, starts, targets, aids), chunk = pack(idx, skip)
        grp = np.zeros(tokens.shape[0], np.int32)
        grp[:len(idx)] = row_of
        rows, t, c = targets.shape[0], tokens.shape[1], targets.shape[1]
        _progress.compile_notice(f"score for batch {rows} x {t} (span {c}) after shared prefixes",
                                 ("score-shared", cfg, rt.options, prefixes.batch, prefixes.max_len, rows, t, c,
                                  chunk, aids is None))
        return shared_continuation_logprobs(rt, cfg, prefixes, *placed((grp, tokens, lengths, starts, targets, aids)),
                                             chunk=chunk)

    def collect(idx, out):
        lp, greedy = (np.asarray(a) for a in out)
        scores = []
        for r, i in enumerate(idx):
            k = len(conts[i])
            tok_lp = tuple(float(x) for x in lp[r, :k])
            scores.append(Score(math.fsum(tok_lp), tok_lp, bool(greedy[r, :k].all()), tuple(conts[i])))
        return list(idx), scores

    def jobs():  # (request indices, a function dispatching their batch), shared groups first
        if share_prefixes:
            keys = [-2] * len(pairs) if ids_per_req is None else ids_per_req.tolist()
            caps = [inputs[i] - len(conts[i]) for i in range(len(pairs))]
            groups, alone = prefix_groups(fulls, caps, keys)
        else:
            groups, alone = [], list(range(len(pairs)))
        for part in prefix_batches(groups, batch_size):
            members = [(i, g.prefix, r) for r, g in enumerate(part) for i in g.members]
            members.sort(key=lambda m: (-(inputs[m[0]] - m[1]), -len(conts[m[0]]), m[0]))
            state = {}

            def prefixes(part=part, state=state):  # prefilled when its first suffix batch is dispatched
                if "cache" not in state:
                    state["cache"] = dispatch_prefill(part)
                return state["cache"]

            for s in range(0, len(members), batch_size):
                batch = members[s:s + batch_size]
                idx = [m[0] for m in batch]
                yield idx, (lambda batch=batch, idx=idx, prefixes=prefixes: dispatch_shared(
                    prefixes(), idx, [m[1] for m in batch], [m[2] for m in batch]))
        order = sorted(alone, key=lambda i: (-len(fulls[i]), -len(conts[i]), i))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            yield idx, (lambda idx=idx: dispatch_plain(idx))

    pending = None
    for idx, run in jobs():
        nxt = (idx, run())
        if pending is not None:
            yield collect(*pending)
        pending = nxt
    if pending is not None:
        yield collect(*pending)


def score(model, requests: Sequence, *, batch_size: int = 8, max_length: int | None = None,
          adapters=None, adapter_ids=None, share_prefixes: bool = True, progress: bool | str = True,
          unit: str = "request") -> list[Score]:
    """Log-likelihood of each continuation given its context, in input order.

    model: a loaded ``Model`` (config, params, tokenizer).
    requests: ``(context, continuation)`` pairs, both strings (harness tokenization, see
    ``encode_pair``) or both token id lists (context non-empty).
    batch_size: requests per device batch (a batch's rows: its requests rounded up to a power
    of two, at most batch_size; ``batch_rows``).
    max_length: longest model input; longer requests lose context tokens from the left
    (default: no truncation).
    adapters / adapter_ids: stacked LoRA adapters and one adapter index per request
    (or one for all; -1 = base model), as in ``forward``.
    share_prefixes: compute a token prefix shared by several requests (same adapter) once, in a
    KV cache, and score their continuations from it (``iter_scores``; e.g. the choices of a
    multiple-choice question, the questions of one few-shot prompt); False: every request whole.
    The results are the same either way, to float32 rounding.
    progress: a bar on stderr (its label: "score", or the string given) when stderr is a
    terminal and progress is not silenced (``realm_jax.progress``); False: never.
    """
    results: list[Score | None] = [None] * len(requests)
    label = progress if isinstance(progress, str) else "score"
    with _progress.bar(len(requests), label, unit=unit, disable=not progress) as bar:
        for idx, scores in iter_scores(model, requests, batch_size=batch_size, max_length=max_length,
                                       adapters=adapters, adapter_ids=adapter_ids,
                                       share_prefixes=share_prefixes):
            for i, s in zip(idx, scores):
                results[i] = s
            bar.update(len(idx))
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- perplexity
def rolling_windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, target_start, end)`` over a document of n tokens (HF's stride method).

    Window k covers tokens [k * stride, min(k * stride + max_length, n)); it scores the tokens
    in [target_start, end) that no earlier window scored, each with every earlier token of the
    window as context. With 1 <= stride < max_length every token but the first is scored once,
    with at most max_length - 1 tokens of context.
    """
    out = []
    prev_end = 0
    begin = 0
    while prev_end < n:
        end = min(begin + max_length, n)
        start = max(prev_end, begin + 1)
        if start < end:
            out.append((begin, start, end))
        prev_end = end
        begin += stride
    return out


def _documents(model, texts_or_ids) -> list[list[int]]:
    if isinstance(texts_or_ids, str) or (isinstance(texts_or_ids, np.ndarray) and texts_or_ids.ndim == 1):
        texts_or_ids = [texts_or_ids]
    elif isinstance(texts_or_ids, (list, tuple)) and texts_or_ids and isinstance(texts_or_ids[0], (int, np.integer)):
        texts_or_ids = [texts_or_ids]
    if not isinstance(texts_or_ids, Sequence) or not texts_or_ids:
        raise RealmError(f"texts_or_ids: expected a non-empty list of strings or token id lists, got {texts_or_ids!r:.80}")
    docs = []
    for i, doc in enumerate(texts_or_ids):
        if isinstance(doc, str):
            if model.tokenizer is None:
                raise RealmError(f"texts_or_ids[{i}]: text needs a tokenizer, but the model has none")
            ids = model.tokenizer.encode(doc)
            prefix = prefix_token_id(model.tokenizer)
            if not ids or ids[0] != prefix:
                ids = [prefix] + ids
        else:
            ids = _as_ids(doc, model.config.vocab_size, f"texts_or_ids[{i}]")
            if ids is None:
                raise RealmError(f"texts_or_ids[{i}]: expected a string or a list of token ids, got {type(doc).__name__}")
        if len(ids) < 2:
            raise RealmError(f"texts_or_ids[{i}]: needs at least 2 tokens (the first is only context), got {len(ids)}")
        docs.append(ids)
    return docs


def perplexity(model, texts_or_ids, *, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 8, adapters=None, adapter_ids=None, progress: bool | str = True) -> Perplexity:
    """Rolling-window perplexity over documents.

    texts_or_ids: a string, a list of token ids, or a list of either (one per document).
    A text is encoded with the tokenizer's special tokens and gets the prefix token (BOS, else
    EOS) in front if it does not start with it, so every text token is scored; a list of ids
    is taken as is (its first token is context only).
    max_length: window length in tokens (default: the model's max_position_embeddings, at
    most 1024: attention is [T, T] per head, so longer windows cost quadratic memory);
    stride: how far each window moves, 1 <= stride < max_length (default max_length // 2).
    Each token is scored once, with up to max_length - 1 tokens of context (``rolling_windows``).
    adapters / adapter_ids: as in ``score``, with one adapter id per document (or one for all).
    progress: a bar over the windows, as in ``score`` (label "perplexity").
    The windows go through ``score`` with shared prefixes on, but the windows of one document
    share no prefix: each begins ``stride`` tokens after the last, and a token's K/V depends on
    its position in its window (rope), so the overlap of two windows cannot be reused without
    changing the numbers. Only windows of documents that begin alike share their start.
    """
    if max_length is None:
        max_length = min(int(model.config.max_position_embeddings), 1024)
    positions = int(model.config.max_position_embeddings)
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or not 2 <= max_length <= positions:
        raise RealmError(f"max_length: expected an int in [2, {positions}] (the model's max_position_embeddings), "
                         f"got {max_length!r}")
    if stride is None:
        stride = max(1, max_length // 2)
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not 1 <= stride < max_length:
        raise RealmError(f"stride: expected an int with 1 <= stride < max_length={max_length} "
                         f"(so every token is scored), got {stride!r}")
    docs = _documents(model, texts_or_ids)
    doc_adapters = _adapter_ids_per_request(model.config, adapters, adapter_ids, len(docs),
                                            0 if adapters is not None else model.num_adapters)
    requests, owner = [], []
    for d, ids in enumerate(docs):
        for begin, start, end in rolling_windows(len(ids), max_length, stride):
            requests.append((ids[begin:start], ids[start:end]))
            owner.append(d)
    scores = score(model, requests, batch_size=batch_size, adapters=adapters,
                   adapter_ids=None if doc_adapters is None else doc_adapters[owner],
                   progress=(progress if isinstance(progress, str) else "perplexity") if progress else False,
                   unit="window")
    token_lps: list[list[float]] = [[] for _ in docs]
    for d, s in zip(owner, scores):
        token_lps[d].extend(s.token_logprobs)
    per_doc = tuple((-math.fsum(lps), len(lps)) for lps in token_lps)
    return Perplexity(math.fsum(nll for nll, _ in per_doc), sum(n for _, n in per_doc), per_doc)


# ----------------------------------------------------------------------------- batch size "auto"
def _host_memory_available() -> int | None:
    """Bytes of host memory available now (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def row_bytes(cfg, length: int) -> int:
    """Estimated peak device bytes one row of ``length`` tokens needs (scoring: one layer's float32
    activations and attention scores at a time; generation: plus its KV cache)."""
    t = int(length)
    mlp = 3 * cfg.intermediate_size if cfg.dense_mlp else 0
    if cfg.moe:  # the router's probabilities, then k sorted rows per token through the expert MLP
        mlp += cfg.num_experts + cfg.num_experts_per_tok * (3 * cfg.moe_intermediate_size + 2 * cfg.hidden_size)
    acts = t * (4 * cfg.hidden_size + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + mlp) \
        + 2 * cfg.num_heads * t * t
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * t
    return 4 * (acts + kv)


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def fitting_batch_size(model, max_length: int, *, limit: int = 64) -> tuple[int, str]:
    """The largest batch of ``max_length``-token rows that fits, at most ``limit``, and how it was
    found (for the report). Powers of two only.

    On an accelerator: tried, from the largest power of two <= limit down, halving on
    out-of-memory, by running the scoring program at ``[B, bucket(max_length)]`` (the program the
    longest requests run) -- as the harness's ``hf`` backend probes its forward.
    On the CPU, where running out of memory is not an error one can catch: the largest B whose
    estimated need (``row_bytes``, scoring and KV cache) is within half the available host memory.
    """
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise RealmError(f"max_batch_size: expected a positive int, got {limit!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
        raise RealmError(f"max_length: expected a positive int, got {max_length!r}")
    cfg = model.config
    top = 1 << (int(limit).bit_length() - 1)
    t = bucket_length(int(max_length))
    if jax.default_backend() == "cpu":
        avail = _host_memory_available()
        if avail is None:
            return top, f"max_batch_size={limit} (host memory unknown)"
        b = top
        while b > 1 and b * row_bytes(cfg, t) > avail // 2:
            b //= 2
        return b, (f"estimated: {b} rows x {t} tokens need ~{b * row_bytes(cfg, t) / 2**30:.2f} GiB of "
                   f"{avail / 2**30:.1f} GiB available host memory (at most max_batch_size={limit})")
    rt = model.runtime
    c = bucket_table(t, cap=t)
    b = top
    while True:
        try:
            tokens = np.ones((b, t), np.int32)
            lengths = np.full(b, t, np.int32)
            aids = np.zeros(b, np.int32) if rt.num_adapters else None
            with _progress.status(f"batch_size=auto: trying {b} rows x {t} tokens"):
                out = continuation_logprobs(rt, cfg, tokens, lengths, np.zeros(b, np.int32), np.zeros((b, c), np.int32),
                                            aids, chunk=_logits_chunk(b, c, cfg.vocab_size))
                jax.block_until_ready(out)
            del out
            return b, f"tried: {b} rows x {t} tokens ran (at most max_batch_size={limit})"
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
            if not _out_of_memory(e) or b == 1:
                raise
            b //= 2
