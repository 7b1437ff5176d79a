"""The engine's device side: fixed-shape slot state, its two jitted steps, and ``Device``, which
holds that state with the served params and makes the engine's device calls.

B = the engine's slots, S = its cache length, P = rows per prefill call, T = a prompt bucket,
E = the stop-id table width, L = the logit-bias table width, W = tokens a decode call can hand back per slot,
N = log-prob alternatives per token (``top_logprobs``; None = the engine computes no log-probs).

``admit``  prefill P right-padded prompts [P, T] (generation's ``prefill``: a fresh [P, T] cache,
           logits at each row's last prompt token; a row may instead take another row's prefill:
           the samples of one prompt share one), sample each row's first token (``emit``),
           then scatter the rows (cache, last token, counts, flags, sampling settings, stop ids,
           adapter ids) into their slots [P]. A slot index of B marks a padding row: dropped.
``decode`` up to ``steps`` decode steps over all B slots in a ``lax.while_loop`` (generation's
           ``decode_step``; or, with a draft, speculative's ``speculative_round``, each committing
           1..k+1 tokens per slot), finished and empty slots idle (``done``), then hand back the
           tokens each slot produced since the previous call.

Both donate the state, so the cache is updated in place; every shape is fixed by the engine's
settings (one ``admit`` program per (rows, prompt bucket), one ``decode`` program), so a warm
engine never recompiles whatever requests come.

Host <-> device traffic is one array each way per call: an admission is an int32 table
[P, T + E + L + 9] and a float32 table [P, 6 + L] (``admission``); ``admit`` answers [P, 2] and
``decode`` [B, W + 6] (``ADMIT_COLS``, ``DECODE_COLS``). An empty slot holds the settings of a
padding row of that table. With log-probs (N not None) each token also brings 2 + 2N values,
packed after those columns as int32 bits (``logprob_cols``, read back by ``unpack_logprobs``):
``admit`` answers [P, 2 + (2 + 2N)] and ``decode`` [B, W + 6 + W (2 + 2N)].

Sampling is per row and batch-invariant: a slot's t-th token uses ``fold_in(key(seed), t)``
exactly as ``generate`` does (speculative rounds use speculative's per-row keys), so a request's
tokens do not depend on the other slots.

Paged (``pages`` = (NB, bs)): the state's cache is a ``kv_cache.PagedKVCache``; ``admit`` still
prefills into a fresh dense [P, T] cache and then writes its rows into their blocks
(``insert_pages``; the table rows travel in the ints, ``PAGE_COLS``), and rows that come back
from a preemption skip their first draw (``_resume``); ``decode`` takes the host's block table
[B, M] with each call. With prefix caching or chunked prefill (``admit(..., offset_prefill=True)``) ``admit``
instead prefills each row's context from its ``start`` (after the cached blocks it shares)
straight into its blocks (``kv_cache.rows_view``), a group's samples copy the prompt's blocks
they do not share (``kv_cache.copy_pages``), and the penalties' history comes from the whole
context the table carries.

``prepare_adapters`` is the one place that puts adapters (and, folded, the params) into the
layout the params are served in.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import ModelConfig
from ..errors import RealmError
from ..generation import (Controls, DecodeState, LogprobTrace, decode_step, emit, init_state, new_cache, new_history,
                          prefill)
from ..kv_cache import KVCache, PagedKVCache, copy_pages, insert_pages, insert_rows, place_rows, rows_of, rows_view
from ..sampling import History, SamplingParams
from ..sharding import DATA, batch_spec, init_paged_cache_like, keep_cache


class EngineState(NamedTuple):
    """All slots' state (device arrays, leading axis B).

    ``dec``: generation's decode carry (cache [B, S], last token, tokens so far, done, stopped,
    out [B, S] tokens). ``ctl``: per-slot sampling settings, token limits and stop ids [B, E].
    ``adapter_ids`` [B] int32 (-1 = base); ``prompt_len`` [B]; ``reported`` [B]: tokens already
    handed to the host. With a draft: ``seq`` [B, S + 1] committed text, ``draft`` (the draft's
    state, e.g. its own KV cache over B slots), and per-slot counts ``passes``/``drafted``/
    ``accepted`` (None without a draft).
    """

    dec: DecodeState
    ctl: Controls
    adapter_ids: jax.Array
    prompt_len: jax.Array
    reported: jax.Array
    seq: Any = None
    draft: Any = None
    passes: Any = None
    drafted: Any = None
    accepted: Any = None


# Per-request columns of an admission's int32 table, after the prompt [T], stop ids [E] and
# logit-bias ids [L]: what ``request_settings`` fixes at submit, then where the row goes.
# constraint: the key of the request's grammar matcher (``constraints.register``; -1 = none)
SETTINGS_COLS = ("limit", "top_k", "seed", "adapter", "min_tokens", "constraint")  # seed: the uint32's bits
# source: the row of the same table whose prefill the row takes (itself, or the first row of its
# ``n`` group in this call: that row alone holds the prompt, the others have length 0)
PLACE_COLS = ("length", "slot", "source")
# Paged, then: tokens the request had made before a preemption (0 = new; else its context is the
# prompt and those tokens but the last) and that last token, where its prefill starts (prefix
# caching: after the cached blocks it shares; its prompt columns then hold the context from
# there); then its block table row [M] and, with prefix caching, its whole context [C] (C = S:
# the penalties' history needs the tokens of the cached blocks too).
PAGE_COLS = ("resumed", "last", "start")
# The float32 table: these columns, then the logit-bias values [L]; a padding row's values.
FLOAT_COLS = ("temperature", "top_p", "min_p", "repetition", "frequency", "presence")
FLOAT_PAD = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
# ``admit`` answers [P, 2]: the first token, and its status.
ADMIT_COLS = ("first", "status")
# ``decode`` answers [B, W + 6]: the new tokens (the first ``count``), then these columns.
DECODE_COLS = ("count", "status", "live", "passes", "drafted", "accepted")
# status: 0 = running, 1 = ended (its token limit, or cancelled), 2 = ended by a stop id.
RUNNING, ENDED, STOPPED = 0, 1, 2


# ------------------------------------------------------------------------------ host tables
def request_settings(stop_ids, stop_width: int, bias_width: int, limit: int, adapter_id: int,
                     sp: SamplingParams, constraint_key: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """One request's fixed part of an admission row, from its host ``SamplingParams`` [1]:
    ints [E + L + 6] = stop ids (-1 = none) | bias ids | ``SETTINGS_COLS``; floats [6 + L] =
    ``FLOAT_COLS`` | bias values."""
    row = np.full((stop_width + bias_width + len(SETTINGS_COLS),), -1, np.int32)
    row[:len(stop_ids)] = stop_ids
    floats = np.zeros((len(FLOAT_COLS) + bias_width,), np.float32)
    floats[:len(FLOAT_COLS)] = FLOAT_PAD
    floats[:2] = sp.temperature[0], sp.top_p[0]
    if sp.min_p is not None:
        floats[2] = sp.min_p[0]
    if sp.penalties is not None:
        floats[3:6] = sp.penalties.repetition[0], sp.penalties.frequency[0], sp.penalties.presence[0]
    if sp.bias is not None:
        ids, vals = sp.bias.ids[0], sp.bias.values[0]
        n = int((ids >= 0).sum())
        if n > bias_width:
            raise RealmError(f"logit_bias: expected at most max_logit_bias={bias_width} entries, got {n}")
        row[stop_width:stop_width + n], floats[len(FLOAT_COLS):len(FLOAT_COLS) + n] = ids[:n], vals[:n]
    min_tokens = 0 if sp.min_tokens is None else int(sp.min_tokens[0])
    row[stop_width + bias_width:] = (limit, int(sp.top_k[0]), np.array(sp.seed[0], np.uint32).view(np.int32),
                                     adapter_id, min_tokens, constraint_key)
    return row, floats


def admission(rows: int, bucket: int, stop_width: int, bias_width: int, slots: int,
              fill=(), pages: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Host tables for a prefill call of ``rows`` (P) prompts padded to ``bucket`` (T), every row
    padding (length 0, limit 0, slot B = dropped, its own source): ints [P, T + E + L + 9] =
    prompt [T] | stop ids [E] | bias ids [L] | ``SETTINGS_COLS`` | ``PLACE_COLS``; floats
    [P, 6 + L]. ``fill``: the first rows' (slot, prompt ids [<= T], ``request_settings``' ints and
    floats, source row; paged, also (resumed, last, block table row [M])). A row whose source is
    another row carries no prompt (length 0): it takes that row's prefill (cache and first-token
    logits), so a prompt's ``n`` samples share one. ``pages`` = (M, NB, C) for a paged cache:
    ints then end with ``PAGE_COLS``, the block table row [M] (padding: no blocks, NB) and, C > 0
    (prefix caching), the context [C]; a paged row's fill ends with (resumed, last, start, block
    table row, context), its prompt ids being the context from ``start``."""
    fixed = stop_width + bias_width + len(SETTINGS_COLS)
    e = bucket + fixed
    m, nb, c = (0, 0, 0) if pages is None else pages
    extra = 0 if pages is None else len(PAGE_COLS) + m + c
    ints = np.zeros((rows, e + len(PLACE_COLS) + extra), np.int32)
    ints[:, bucket:bucket + stop_width + bias_width] = -1
    ints[:, e + 1] = slots
    ints[:, e + 2] = np.arange(rows)
    q = e + len(PLACE_COLS) + len(PAGE_COLS)
    ints[:, q:q + m] = nb
    floats = np.zeros((rows, len(FLOAT_COLS) + bias_width), np.float32)
    floats[:, :len(FLOAT_COLS)] = FLOAT_PAD
    for i, (s, ids, settings, row_floats, src, *page) in enumerate(fill):
        ids = ids if src == i else ()
        ints[i, :len(ids)] = ids
        ints[i, bucket:e] = settings
        ints[i, e:e + len(PLACE_COLS)] = (len(ids), s, src)
        if page:
            resumed, last, start, table, ctx = page[0]
            ints[i, q - len(PAGE_COLS):q + m] = (resumed, last, start, *table)
            if c:
                ints[i, q + m:q + m + len(ctx)] = ctx
        floats[i] = row_floats
    return ints, floats


def _columns(ints: jax.Array, floats: jax.Array, stop_width: int, constrained: bool, pages: tuple = (0, 0)):
    """An admission's tables by column: prompts [P, T], the rows' ``Controls`` [P] (stop ids
    [P, E], every optional sampling setting; the constraint keys when ``constrained``), adapter
    ids, lengths, slots and source rows [P], and paged (``pages`` = (M, C), M > 0) (resumed [P],
    last [P], start [P], block tables [P, M], contexts [P, C] or None), else None."""
    from ..sampling import LogitBias, Penalties

    lb = floats.shape[1] - len(FLOAT_COLS)
    m, c = pages
    extra = len(PAGE_COLS) + m + c if m else 0
    t = ints.shape[1] - stop_width - lb - len(SETTINGS_COLS) - len(PLACE_COLS) - extra
    e = t + stop_width + lb
    limits, top_k, seed, adapter_ids, min_tokens, keys = (ints[:, e + j] for j in range(len(SETTINGS_COLS)))
    sp = SamplingParams(floats[:, 0], top_k, floats[:, 1], jax.lax.bitcast_convert_type(seed, jnp.uint32),
                        floats[:, 2], Penalties(floats[:, 3], floats[:, 4], floats[:, 5]),
                        LogitBias(ints[:, t + stop_width:e], floats[:, len(FLOAT_COLS):]), min_tokens)
    ctl = Controls(sp, limits, ints[:, t:t + stop_width], keys if constrained else None)
    q = e + len(SETTINGS_COLS)
    lengths, slots, sources = (ints[:, q + j] for j in range(len(PLACE_COLS)))
    q += len(PLACE_COLS)
    paged = None
    if m:
        r = q + len(PAGE_COLS)
        paged = (ints[:, q], ints[:, q + 1], ints[:, q + 2], ints[:, r:r + m], ints[:, r + m:] if c else None)
    return ints[:, :t], ctl, adapter_ids, lengths, slots, sources, paged


def _status(done: jax.Array, stopped: jax.Array) -> jax.Array:
    return jnp.where(stopped, STOPPED, jnp.where(done, ENDED, RUNNING)).astype(jnp.int32)


def logprob_cols(trace: LogprobTrace) -> jax.Array:
    """A trace's tokens [B, W] as int32 columns [B, W (2 + 2N)]: per token its logprob, sampled,
    top ids [N] and top [N] (floats as their bits)."""
    bits = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)  # noqa: E731
    per = jnp.concatenate([bits(trace.logprob)[..., None], bits(trace.sampled)[..., None], trace.top_ids,
                           bits(trace.top)], axis=-1)  # [B, W, 2 + 2N]
    return per.reshape(per.shape[0], -1)


def unpack_logprobs(cols: np.ndarray, n: int) -> LogprobTrace:
    """``logprob_cols``' host columns [R, W (2 + 2N)] back to a trace of numpy arrays [R, W(, N)]."""
    per = cols.reshape(cols.shape[0], -1, 2 + 2 * n)
    floats = per.view(np.float32)
    return LogprobTrace(floats[..., 0], floats[..., 1], per[..., 2:2 + n], floats[..., 2 + n:])


def _window(x: jax.Array, start: jax.Array, width: int) -> jax.Array:
    """x [B, M, ...] -> x[b, start[b] : start[b] + width] [B, width, ...] (clipped at M - 1)."""
    m = x.shape[1]
    idx = jnp.clip(start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :], 0, m - 1)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


# ------------------------------------------------------------------------------ device programs
def empty_state(params, cfg: ModelConfig, slots: int, max_len: int, stop_width: int, bias_width: int, *,
                spec=None, dparams=None, constrained: bool = False, top_logprobs: int | None = None,
                pages: tuple[int, int] | None = None) -> EngineState:
    """Every slot empty (done, limit 0); the cache [B, S] in the params dtype and layout, or with
    ``pages`` = (NB, bs) a pool of NB blocks of bs positions (``kv_cache.PagedKVCache``, every
    slot holding none). ``constrained``: the programs ask the host for grammar masks
    (``constraints``); ``top_logprobs``: N, to keep a ``LogprobTrace`` [B, S] of every slot's tokens."""
    b = slots
    zi = jnp.zeros((b,), jnp.int32)
    history = History(jnp.zeros((b, cfg.vocab_size), jnp.int32), jnp.zeros((b, cfg.vocab_size), bool))
    if pages is None:
        cache = new_cache(cfg, params, b, max_len)
    else:
        nb, bs = pages
        cache = init_paged_cache_like(params, cfg, b, nb, bs, -(-max_len // bs))
    dec = DecodeState(cache, zi, zi, jnp.ones((b,), bool), jnp.zeros((b,), bool),
                      jnp.zeros((b, max_len), jnp.int32), history,
                      None if top_logprobs is None else LogprobTrace.empty(b, max_len, top_logprobs))
    ints, floats = admission(b, 0, stop_width, bias_width, b)  # B padding rows: greedy, limit 0, no stop ids
    _, ctl, *_ = _columns(jnp.asarray(ints), jnp.asarray(floats), stop_width, constrained)
    state = EngineState(dec, ctl, jnp.full((b,), -1, jnp.int32), zi, zi)
    if spec is None:
        return keep_state(state, params)
    draft = spec.init(dparams, jnp.zeros((b, 1), jnp.int32), zi, max_len)
    return keep_state(state._replace(seq=jnp.zeros((b, max_len + 1), jnp.int32), draft=draft, passes=zi, drafted=zi,
                                     accepted=zi), params)


def keep_state(state: EngineState, params) -> EngineState:
    """Inside a program: on the params' mesh, the state constrained to the one layout every
    program takes and hands back, so a warm engine never meets a new input sharding (without
    it the layouts that ``empty_state``, ``admit`` and ``decode`` hand back differ on a mesh
    with a ``data`` axis, and each new pairing compiles a program again): the cache per
    ``sharding.cache_shardings`` (dense: B on ``data``, K on ``model``; paged: the pool's K on
    ``model``, its blocks never split, the block table's B on ``data``), every other per-slot
    leaf [B, ...] with B on ``data`` (replicated when the data axis does not divide B). The
    draft's state is left as its programs make it. Unchanged without a mesh."""
    mesh = params.mesh
    if mesh is None:
        return state
    b, data = state.reported.shape[0], int(mesh.shape[DATA])

    def one(x):
        split = x.ndim and x.shape[0] == b and b % data == 0
        return NamedSharding(mesh, batch_spec(x.ndim, mesh) if split else P())

    dec = state.dec._replace(cache=None)
    rest = state._replace(dec=dec, draft=None)
    rest = jax.lax.with_sharding_constraint(rest, jax.tree.map(one, rest))
    return rest._replace(dec=rest.dec._replace(cache=keep_cache(state.dec.cache, params)), draft=state.draft)


def _put(dst: jax.Array, src: jax.Array, slots: jax.Array) -> jax.Array:
    return dst.at[slots].set(src.astype(dst.dtype), mode="drop")


def _insert_draft(dst, src, slots):
    """Insert a draft's per-row state: a KVCache (model drafts) or None (prompt lookup)."""
    if dst is None:
        return None
    if isinstance(dst, KVCache):
        return insert_rows(dst, src, slots)
    raise TypeError(f"the engine cannot insert a draft state of type {type(dst).__name__}")


def admit(params, cfg: ModelConfig, state: EngineState, ints: jax.Array, floats: jax.Array, *,
          dparams=None, spec=None, offset_prefill: bool = False) -> tuple[EngineState, jax.Array]:
    """Prefill the prompts of an admission (``admission``'s tables: ints [P, T + E + L + 9], floats
    [P, 6 + L]; length 0 = padding row), sample the first tokens with the rows' settings and insert
    everything into the rows' slots (B = drop). A row whose ``source`` is another row takes that
    row's prefill: its cache rows, first-token logits and prompt (each sample of an ``n`` group
    then draws with its own settings, seed + j). Returns the state and [P, 2] (``ADMIT_COLS``)."""
    p = ints.shape[0]
    d = state.dec
    paged = isinstance(d.cache, PagedKVCache)
    prefix = paged and offset_prefill
    tokens, ctl, adapter_ids, lengths, slots, src, page = _columns(
        ints, floats, state.ctl.stop_ids.shape[1], state.ctl.constraint is not None,
        (d.cache.block_table.shape[1], d.out.shape[1] if prefix else 0) if paged else (0, 0))
    t = tokens.shape[1]
    aid = adapter_ids if params.num_adapters else None
    if prefix:  # prefill at each row's offset straight into its blocks, over the cached ones it shares
        _, _, start, tables, seq = page
        logits, view = prefill(params, cfg, tokens, lengths, rows_view(d.cache, tables, start), adapter_ids=aid)
        view = copy_pages(view, tables[src], tables)  # a group's sample: its own copy of the prompt's blocks
        logits, seq, seq_len = logits[src], seq[src], view.lengths[src]
        cache = view._replace(lengths=seq_len)
    else:
        logits, cache = prefill(params, cfg, tokens, lengths, new_cache(cfg, params, p, t), adapter_ids=aid,
                                empty_cache=True)
        # each row takes its source row's prefill (a sample of a group: the prompt's cache and logits)
        logits, cache, tokens, lengths = logits[src], rows_of(cache, src), tokens[src], lengths[src]
        seq, seq_len = tokens, lengths
    top = None if d.logprobs is None else d.logprobs.top.shape[-1]
    drawn = ctl
    if paged and ctl.constraint is not None:
        # a row back from a preemption discards this draw (``_resume``): it must not ask its grammar
        # matcher, which has consumed the tokens the row made and waits for the last of them
        drawn = ctl._replace(constraint=jnp.where(page[0] > 0, -1, ctl.constraint))
    rows = emit(init_state(cache, ctl.limits, 1, history=new_history(seq, seq_len, cfg.vocab_size),
                           top_logprobs=top), logits, drawn)
    if paged:
        rows = _resume(rows, seq, seq_len, ctl.limits, page[0], page[1], cfg.vocab_size)
    if prefix:
        inserted = place_rows(d.cache._replace(k=cache.k, v=cache.v), slots, page[3], seq_len)
    elif paged:
        inserted = insert_pages(d.cache, rows.cache, slots, page[3])
    else:
        inserted = insert_rows(d.cache, rows.cache, slots)
    trace = None
    if top is not None:  # the first token's log-probs at index 0 of the slots' traces
        trace = LogprobTrace(*(old.at[slots, 0].set(x[:, 0], mode="drop") for old, x in zip(d.logprobs, rows.logprobs)))
    dec = DecodeState(inserted, _put(d.last, rows.last, slots),
                      _put(d.num_new, rows.num_new, slots), _put(d.done, rows.done, slots),
                      _put(d.stopped, rows.stopped, slots), d.out.at[slots, 0].set(rows.last, mode="drop"),
                      jax.tree.map(lambda a, b: _put(a, b, slots), d.history, rows.history), trace)
    new = EngineState(
        dec, jax.tree_util.tree_map(lambda a, b: _put(a, b, slots), state.ctl, ctl),
        _put(state.adapter_ids, adapter_ids, slots), _put(state.prompt_len, lengths, slots),
        _put(state.reported, rows.num_new, slots))
    if spec is not None:
        seq = state.seq.at[slots, :t].set(tokens, mode="drop")
        seq = seq.at[slots, lengths].set(rows.last, mode="drop")
        draft = _insert_draft(state.draft, spec.init(dparams, tokens, lengths, t), slots)
        zero = jnp.zeros((p,), jnp.int32)
        new = new._replace(seq=seq, draft=draft, passes=_put(state.passes, zero, slots),
                           drafted=_put(state.drafted, zero, slots), accepted=_put(state.accepted, zero, slots))
    answer = jnp.stack([rows.last, _status(rows.done, rows.stopped)], axis=1)
    if top is not None:
        answer = jnp.concatenate([answer, logprob_cols(rows.logprobs)], axis=1)
    return keep_state(new, params), answer


def _resume(rows: DecodeState, tokens: jax.Array, lengths: jax.Array, limits: jax.Array, resumed: jax.Array,
            last: jax.Array, vocab: int) -> DecodeState:
    """An admission's rows [P] after their prefill and first draw, with the rows that come back
    from a preemption (resumed [P] > 0: the tokens they had made; their prefill was the prompt
    and those tokens but the ``last``) set to where they were: ``last`` to feed next,
    ``resumed`` tokens made (so the next draw uses ``fold_in(key(seed), resumed)``, as it
    would have), running, and the penalties' history of those tokens (counts) and the prompt."""
    back = resumed > 0
    if rows.history is not None:
        p, t = tokens.shape
        prompt = jnp.where(back, lengths - resumed + 1, lengths)
        pos = jnp.arange(t)[None, :]
        made = jnp.where((pos >= prompt[:, None]) & (pos < lengths[:, None]), tokens, vocab)
        counts = jnp.zeros((p, vocab), jnp.int32).at[jnp.arange(p)[:, None], made].add(1, mode="drop")
        counts = counts.at[jnp.arange(p), last].add(1, mode="drop")
        sel = lambda new, old: jnp.where(back[:, None], new, old)  # noqa: E731
        history = History(sel(counts, rows.history.counts),
                          sel(new_history(tokens, prompt, vocab).in_prompt, rows.history.in_prompt))
        rows = rows._replace(history=history)
    return rows._replace(last=jnp.where(back, last, rows.last), num_new=jnp.where(back, resumed, rows.num_new),
                         done=jnp.where(back, resumed >= limits, rows.done), stopped=rows.stopped & ~back)


def decode(params, cfg: ModelConfig, state: EngineState, kill: jax.Array, table: jax.Array | None = None, *,
           steps: int, window: int, dparams=None, spec=None, k: int = 0) -> tuple[EngineState, jax.Array]:
    """Mark ``kill`` [B] slots done (cancelled), run up to ``steps`` steps (rounds, with a draft)
    while any slot is live; returns the state and [B, W + 6]: the tokens each slot made since the
    last call, then ``DECODE_COLS`` (this call's counts per slot; ``live``: running at its start).
    ``table`` [B, M]: a paged cache's block table for this call (the host's, with the blocks of
    every position the call may write).

    A slot running at the start makes at least one token per step until it ends, so one whose
    token budget has at most ``steps`` tokens left is certain to have ended after the call."""
    from ..speculative import SpecState, speculative_round

    dec = state.dec._replace(done=state.dec.done | kill)
    if table is not None:
        dec = dec._replace(cache=keep_cache(dec.cache._replace(block_table=table.astype(jnp.int32)), params))
    ctl = state.ctl
    aid = state.adapter_ids if params.num_adapters else None

    def cond(carry):
        s, i = carry
        return jnp.any(~(s.done if spec is None else s.dec.done)) & (i < steps)

    if spec is None:
        def body(carry):
            s, i = carry
            return decode_step(params, cfg, s, ctl, adapter_ids=aid), i + 1

        dec, _ = jax.lax.while_loop(cond, body, (dec, jnp.int32(0)))
        new = state._replace(dec=dec)
        zero = jnp.zeros_like(state.reported)
        counts = (zero, zero, zero)
    else:
        def body(carry):
            s, i = carry
            return speculative_round(params, dparams, cfg, spec, k, state.prompt_len, ctl, s,
                                     adapter_ids=aid), i + 1

        start = SpecState(dec, state.seq, state.draft, state.passes, state.drafted, state.accepted)
        ss, _ = jax.lax.while_loop(cond, body, (start, jnp.int32(0)))
        dec = ss.dec
        new = state._replace(dec=dec, seq=ss.seq, draft=ss.draft, passes=ss.passes, drafted=ss.drafted,
                             accepted=ss.accepted)
        counts = (ss.passes - state.passes, ss.drafted - state.drafted, ss.accepted - state.accepted)
    tokens = _window(dec.out, state.reported, window)
    count = dec.num_new - state.reported
    new = new._replace(reported=dec.num_new)
    live = (~state.dec.done & ~kill).astype(jnp.int32)
    cols = [tokens, jnp.stack([count, _status(dec.done, dec.stopped), live, *counts], axis=1).astype(jnp.int32)]
    if dec.logprobs is not None:
        cols.append(logprob_cols(LogprobTrace(*(_window(x, state.reported, window) for x in dec.logprobs))))
    return keep_state(new, params), jnp.concatenate(cols, axis=1)


empty_state_jit = jax.jit(empty_state, static_argnames=("cfg", "slots", "max_len", "stop_width", "bias_width", "spec",
                                                     "constrained", "top_logprobs", "pages"))
admit_jit = jax.jit(admit, static_argnames=("cfg", "spec", "offset_prefill"), donate_argnames=("state",))
decode_jit = jax.jit(decode, static_argnames=("cfg", "steps", "window", "spec", "k"), donate_argnames=("state",))


# ------------------------------------------------------------------------------ served params
def check_adapters(model, adapters: Mapping[str, Any]) -> tuple[str, ...]:
    """Validate {name: single adapter} against the model; the names, in order."""
    from .. import lora

    if not isinstance(adapters, Mapping) or not adapters:
        raise RealmError(f"adapters: expected a non-empty dict {{name: adapter}}, got {type(adapters).__name__}")
    cfg = model.config
    dims = lora.projection_dims(cfg)
    for name, ad in adapters.items():
        if not isinstance(name, str) or not name:
            raise RealmError(f"adapters: names must be non-empty strings, got {name!r}")
        lora.check_adapter(ad, dims, cfg.num_layers, f"adapters[{name!r}]", stacked=False)
    return tuple(adapters)


def prepare_adapters(model, adapters: Sequence, fold: bool = False):
    """Stack checked adapters once and return the runtime they are served by: ``model.runtime``'s
    base weights with the stack (``runtime.with_adapters``), or with ``fold`` a new runtime with
    the stack folded into its weights (``prepare(..., fold=True)``, ``model.runtime``'s choices)."""
    from .. import lora
    from ..runtime import choices_of, prepare, with_adapters

    cfg = model.config
    stack = lora.stack_adapters(list(adapters), dtype=model.dtype)
    if fold:
        return prepare(model.params, cfg, adapters=stack, fold=True, **choices_of(model.runtime))
    return with_adapters(model.runtime, cfg, stack)


# ------------------------------------------------------------------------------ the engine's device calls
class Device:
    """The slot state [B] on the device, the params it is served with, and the engine's three
    device calls: ``admit`` (prefill + insert: tables [P, T + E + L + 9], [P, 6 + L] -> [P, 2]), ``decode``
    (one call of ``steps`` steps: kill flags [B] -> [B, W + 6]) and ``fetch`` (a result to the
    host). Dispatches are asynchronous; every result starts its copy to the host at once.
    ``decode_async`` dispatches from a thread of the device's own (see there).
    ``dispatch_s`` / ``wait_s``: host seconds spent dispatching / waiting for results. Only the
    thread driving the engine calls these (and the dispatch thread, while it holds a decode)."""

    def __init__(self, params, cfg: ModelConfig, *, slots: int, max_len: int, stop_width: int, steps: int,
                 bias_width: int = 4, draft=None, k: int = 0, constrained: bool = False,
                 top_logprobs: int | None = None, pages: tuple[int, int] | None = None,
                 offset_prefill: bool = False):
        self.params = params  # the target's params as served (folded with fold_adapters)
        self.cfg = cfg
        self.slots = slots
        self.stop_width = stop_width
        self.bias_width = bias_width
        self.spec = None if draft is None else draft.spec
        self.dparams = None if draft is None else draft.params
        self.steps = steps
        self.k = k
        self.window = steps * (k + 1)  # W
        self.top_logprobs = top_logprobs  # N (None: no log-probs)
        self.pages = pages  # (NB, bs) of a paged cache, or None
        self.offset_prefill = offset_prefill  # admissions prefill at an offset into their blocks
        # admission tables' paged columns: (M, NB, C)
        self.page_cols = None if pages is None else (-(-max_len // pages[1]), pages[0], max_len if offset_prefill else 0)
        self.state = empty_state_jit(params, cfg, slots=slots, max_len=max_len, stop_width=stop_width,
                                     bias_width=bias_width, spec=self.spec, dparams=self.dparams,
                                     constrained=constrained, top_logprobs=top_logprobs, pages=pages)
        self.no_kill = jax.device_put(np.zeros((slots,), bool))  # passed when nothing was cancelled
        self.dispatch_s = 0.0
        self.wait_s = 0.0
        self._dispatcher: ThreadPoolExecutor | None = None

    def _dispatch(self, program, *args, **static) -> jax.Array:
        t = time.perf_counter()
        self.state, out = program(self.params, self.cfg, self.state, *args,
                                  dparams=self.dparams, spec=self.spec, **static)
        out.copy_to_host_async()  # comes back as soon as it is ready
        self.dispatch_s += time.perf_counter() - t
        return out

    def admit(self, ints: np.ndarray, floats: np.ndarray) -> jax.Array:
        """Prefill and insert one admission (``admission``'s tables); its [P, 2] (``ADMIT_COLS``)."""
        return self._dispatch(admit_jit, ints, floats, offset_prefill=self.offset_prefill)

    def decode(self, kill, table: np.ndarray | None = None) -> jax.Array:
        """One decode call over all slots, ``kill`` [B] cancelled first (paged: with the block
        table [B, M]); its [B, W + 6]."""
        return self._dispatch(decode_jit, kill, table, steps=self.steps, window=self.window, k=self.k)

    def decode_async(self, kill, table: np.ndarray | None = None) -> Future:
        """``decode`` dispatched from the device's dispatch thread; a future of its [B, W + 6].

        XLA runs the call's ``while_loop`` from the host (it reads the loop predicate every
        iteration), so dispatching it returns only once its last iteration has been launched:
        nearly the whole call. Meanwhile the engine's thread fetches and delivers the previous
        call's tokens, so they reach readers as that call ends, not as the next one does. The
        caller must let the future finish before it touches ``state`` again."""
        if self._dispatcher is None:
            self._dispatcher = ThreadPoolExecutor(1, thread_name_prefix="realm-jax-dispatch")
        return self._dispatcher.submit(self.decode, kill, table)

    def close(self) -> None:
        """Drop the state and end the dispatch thread."""
        self.state = None
        if self._dispatcher is not None:
            self._dispatcher.shutdown(wait=False)

    def fetch(self, out: jax.Array | Future) -> np.ndarray:
        t = time.perf_counter()
        host = np.asarray(out.result() if isinstance(out, Future) else out)
        self.wait_s += time.perf_counter() - t
        return host

    def warmup(self, prefill_rows: Sequence[int], buckets: Sequence[int], kill: np.ndarray,
               table: np.ndarray | None = None) -> None:
        """Compile every program now: one (padding) admission per (rows, bucket), and a decode with
        each kind of kill flags (``no_kill`` and a host [B] ``kill``; paged, with the host's
        block ``table``). Not counted as dispatch time."""
        dispatched = self.dispatch_s
        outs = [self.admit(*admission(p, t, self.stop_width, self.bias_width, self.slots, pages=self.page_cols))
                for p, t in itertools.product(prefill_rows, buckets)]
        outs += [self.decode(self.no_kill, table), self.decode(kill, table)]
        jax.block_until_ready(outs)
        self.dispatch_s = dispatched  # compilation is not serving time
