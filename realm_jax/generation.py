"""Generation: prompts -> new tokens, many rows at once, the whole decode loop inside one jit.

The pieces, each reusable on its own (the engine and speculative decoding build on them)::

    host    prepare_prompts   strings / chat messages / token ids -> token-id lists
            validate_request  every check (clear errors) before any device work -> Request
            pad_request       bucketed, right-padded numpy arrays: tokens [B, T], lengths [B], ...
    device  prefill           padded prompts -> logits at each row's last prompt token [B, V], cache
            init_state, emit  sample a token per live row, record it, mark rows done
            decode_step       one token per row through the cache
            decode_loop       lax.while_loop of decode_step until every row is done (or max_steps)

``generate`` runs prefill + the whole loop as ONE jitted call (``generate_jit``, cache donated);
``generate_stream`` runs prefill, then ``chunk`` steps per jitted call (``decode_loop_jit``,
same shapes every chunk, so nothing retraces) and yields tokens and text as they come.

Shapes are bucketed (``buckets.py``, the one rule) so that new prompts rarely retrace: the batch
to a power of two (padding rows are born done), the prompt length to a power of two >= 16
(multiples of 512 past 512), the cache length S to a multiple of 64 (or exactly ``max_len``),
the stop-id table to a power of two >= 4.
A row stops when it emits one of its stop ids (the id is kept as its last token, with finish
reason "stop") or after its ``max_new_tokens`` (finish reason "length").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .buckets import bucket_batch, bucket_cache, bucket_length, bucket_table, next_pow2  # noqa: F401
from .config import ModelConfig
from .constraints import step_masks
from .errors import RealmError
from .kv_cache import KVCache, repeat_rows, rows_of
from .model import forward_cached, forward_cached_hidden, lm_head
from .sampling import History, SamplingParams, adjust, sample, sample_with_dist
from .settings import Sampling
from .progress import compile_notice



# ------------------------------------------------------------------------------------------ host


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def prepare_prompts(model, prompts, chat: bool = False) -> list[list[int]]:
    """Prompts -> token-id lists (host only).

    Each prompt is a string (encoded with ``model.tokenizer``; with ``chat=True`` it becomes one
    user message rendered with the chat template), a list of chat messages
    (``[{"role", "content"}, ...]``, needs ``chat=True``), or a list of token ids (used as is).
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise RealmError(f"prompts: expected a list of strings or token-id lists, got {type(prompts).__name__}"
                         + (" (wrap a single prompt in a list)" if isinstance(prompts, str) else ""))
    if not prompts:
        raise RealmError("prompts: expected at least one prompt, got an empty list")
    tok = getattr(model, "tokenizer", None)
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, np.ndarray):
            p = p.tolist()
        if isinstance(p, str) or (isinstance(p, (list, tuple)) and p and isinstance(p[0], dict)):
            if tok is None:
                raise RealmError(f"prompt {i}: the model has no tokenizer; pass token-id lists instead of text")
            if chat:
                messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
                if not tok.chat_template:
                    raise RealmError(f"chat=True: the model's tokenizer has no chat template (prompt {i})")
                text = tok.apply_chat_template(messages, add_generation_prompt=True)
                ids = tok.encode(text, add_special_tokens=False)  # the template holds any bos
            elif isinstance(p, str):
                ids = tok.encode(p)
            else:
                raise RealmError(f"prompt {i}: chat messages need chat=True")
        elif isinstance(p, (list, tuple)):
            if not all(_is_int(x) for x in p):
                bad = next(x for x in p if not _is_int(x))
                raise RealmError(f"prompt {i}: expected a string or a list of int token ids, got an element {bad!r}")
            ids = [int(x) for x in p]
        else:
            raise RealmError(f"prompt {i}: expected a string or a list of token ids, got {type(p).__name__}")
        out.append(ids)
    return out


def default_stop_ids(model) -> tuple[int, ...]:
    """The tokenizer's eos ids and the config's, in that order, without repeats."""
    tok = getattr(model, "tokenizer", None)
    ids = list(getattr(tok, "eos_ids", ()) or ()) + list(model.config.eos_token_ids)
    return tuple(dict.fromkeys(int(i) for i in ids))


@dataclasses.dataclass
class Request:
    """A validated batch (host numpy), before bucketing: B prompts, R = B * samples rows (the
    per-row fields have R entries)."""

    prompt_ids: list[list[int]]
    prompt_lengths: np.ndarray  # [B] int32
    max_new_tokens: np.ndarray  # [B] int32
    stop_ids: list[tuple[int, ...]]  # per row
    cache_len: int  # S
    sampling: SamplingParams  # numpy, [R]
    adapter_ids: np.ndarray | None  # [R] int32 or None
    settings: Sampling = Sampling()  # the call's settings (stop strings, n, logprobs, ...)
    stop_strings: list = dataclasses.field(default_factory=list)  # [R] tuples of strings
    constraints: list = dataclasses.field(default_factory=list)  # [R] Constraint or None
    matchers: list | None = None  # [R] host grammar matchers (``constraints.compile_rows``), or None

    @property
    def batch(self) -> int:
        """B: prompts."""
        return len(self.prompt_ids)

    @property
    def samples(self) -> int:
        """Rows per prompt (``settings.samples``); rows are prompt-major: R = B * samples."""
        return self.settings.samples

    @property
    def rows(self) -> int:
        return self.batch * self.samples


def validate_request(cfg: ModelConfig, prompt_ids: Sequence[Sequence[int]], max_new_tokens, *,
                     max_len: int | None = None, stop_ids=None, sampling: Sampling | None = None,
                     adapters=None, adapter_ids=None, num_adapters: int = 0, **settings) -> Request:
    """Check everything on the host; raise ``RealmError`` naming the argument and the values.

    sampling / settings: a ``Sampling`` and/or its fields by name (temperature, top_k, ...);
    per-prompt values are given once per prompt and repeated for its ``n`` (or ``best_of``)
    samples, sample i of a prompt drawing with seed + i.
    max_new_tokens: int or one per row (>= 1). max_len: the cache length S (default: the
    prompt + max_new_tokens need, rounded up to a multiple of 64, and at most the model's
    ``max_position_embeddings``). stop_ids: ids shared by all rows, or one list per row.
    adapters: canonical adapters for this call; else ``num_adapters``: how many the runtime
    already serves (``adapter_ids`` index them).
    """
    settings = Sampling.of(sampling, **settings)
    settings.check_counts()
    if isinstance(prompt_ids, np.ndarray):
        prompt_ids = list(prompt_ids)
    if not isinstance(prompt_ids, (list, tuple)):
        raise RealmError(f"prompts: expected a list of token-id lists, got {type(prompt_ids).__name__}")
    b = len(prompt_ids)
    if b == 0:
        raise RealmError("prompts: expected at least one prompt, got an empty list")
    v = cfg.vocab_size
    rows = []
    for i, p in enumerate(prompt_ids):
        if isinstance(p, np.ndarray):
            p = p.tolist() if p.ndim == 1 else p
        if not isinstance(p, (list, tuple)):
            raise RealmError(f"prompt {i}: expected a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise RealmError(f"prompt {i} is empty (0 tokens); every prompt needs at least one token")
        try:
            a = np.asarray(p)
        except (OverflowError, ValueError):
            a = None
        if a is not None and a.ndim == 1 and a.dtype.kind in "iu" and not ((a < 0) | (a >= v)).any():
            rows.append(a.tolist())
            continue
        for j, t in enumerate(p):  # the slow path finds the culprit (Python ints: no overflow)
            if not _is_int(t) or not 0 <= int(t) < v:
                what = f"{int(t)}" if _is_int(t) else f"{t!r} ({type(t).__name__})"
                raise RealmError(f"prompt {i}: token id {what} at position {j} is outside the vocabulary [0, {v})"
                                 + ("" if _is_int(t) else ": expected an integer"))
        rows.append([int(t) for t in p])
    prompt_ids = rows
    lengths = np.array([len(p) for p in prompt_ids], np.int32)

    if isinstance(max_new_tokens, (list, tuple, np.ndarray)):
        mn = list(max_new_tokens)
        if len(mn) != b:
            raise RealmError(f"max_new_tokens: expected an int or {b} values (one per prompt), got {len(mn)} values")
    else:
        mn = [max_new_tokens] * b
    for i, m in enumerate(mn):
        if not _is_int(m) or m < 1:
            raise RealmError(f"max_new_tokens must be an integer >= 1, got {m!r}" + (f" (row {i})" if b > 1 else ""))
    mn = np.asarray(mn, np.int32)

    need = lengths.astype(np.int64) + mn
    worst = int(np.argmax(need))
    if max_len is not None:
        if not _is_int(max_len) or max_len < 1:
            raise RealmError(f"max_len must be a positive integer, got {max_len!r}")
        limit, what = int(max_len), f"the cache length max_len={int(max_len)}"
    else:
        limit, what = cfg.max_position_embeddings, f"the model's max_position_embeddings={cfg.max_position_embeddings}"
    if need[worst] > limit:
        raise RealmError(
            f"prompt {worst} has {int(lengths[worst])} tokens + max_new_tokens {int(mn[worst])} = {int(need[worst])} "
            f"tokens, over {what}; shorten the prompt, lower max_new_tokens"
            + (" or raise max_len" if max_len is not None else " or pass a larger max_len explicitly"))
    cache_len = int(max_len) if max_len is not None else bucket_cache(int(need.max()))

    rows_stop = _validate_stop_ids(stop_ids, b, v)
    st = settings
    sp = SamplingParams.make_host(b, st.temperature, st.top_k, st.top_p, st.seed, min_p=st.min_p,
                                  repetition_penalty=st.repetition_penalty, frequency_penalty=st.frequency_penalty,
                                  presence_penalty=st.presence_penalty, logit_bias=st.logit_bias,
                                  min_tokens=st.min_tokens, vocab_size=v)
    stops = st.stop_strings(b)
    from .constraints import constraints_per_prompt

    cons = constraints_per_prompt(st.constraint, b)
    if any(c is not None for c in cons) and sp.min_tokens is not None:
        raise RealmError("min_tokens: not available with a constraint (the grammar decides where the text may end)")
    m = st.samples
    if m > 1:  # R = B * m rows, prompt-major; sample i of a prompt draws with seed + i
        sp = jax.tree.map(lambda a: np.repeat(a, m, axis=0), sp)
        sp = sp._replace(seed=(sp.seed.astype(np.uint64) + np.tile(np.arange(m, dtype=np.uint64), b)).astype(np.uint32))
        mn, rows_stop = np.repeat(mn, m), [r for r in rows_stop for _ in range(m)]
        stops = [r for r in stops for _ in range(m)]
        cons = [c for c in cons for _ in range(m)]

    ids = None
    count = None if num_adapters <= 1 else num_adapters
    if adapters is not None:
        from .lora import check_adapter
        from .params import projection_dims

        count = check_adapter(adapters, projection_dims(cfg), cfg.num_layers, "adapters")
    if adapters is not None or num_adapters:
        from .lora import check_adapter_ids

        if adapter_ids is None and count is not None:
            raise RealmError(f"adapter_ids: required with a stack of {count} adapters (one id per prompt, -1 = base)")
        if adapter_ids is not None:
            ids = check_adapter_ids(adapter_ids, count, b)
            ids = ids if m == 1 else np.repeat(ids, m)
    elif adapter_ids is not None:
        raise RealmError("adapter_ids given without adapters")
    return Request([list(p) for p in prompt_ids], lengths, mn, rows_stop, cache_len, sp, ids, settings, stops, cons)


def _validate_stop_ids(stop_ids, b: int, v: int) -> list[tuple[int, ...]]:
    if stop_ids is None:
        stop_ids = []
    if isinstance(stop_ids, np.ndarray):
        stop_ids = stop_ids.tolist()
    if _is_int(stop_ids):
        stop_ids = [stop_ids]
    if not isinstance(stop_ids, (list, tuple)):
        raise RealmError(f"stop_ids: expected a list of token ids or one list per prompt, got {stop_ids!r}")
    if stop_ids and all(isinstance(s, (list, tuple, np.ndarray)) for s in stop_ids):
        if len(stop_ids) != b:
            raise RealmError(f"stop_ids: per-row lists must number {b} (one per prompt), got {len(stop_ids)}")
        rows = [tuple(np.asarray(s).tolist()) for s in stop_ids]
    else:
        rows = [tuple(stop_ids)] * b
    for r in rows:
        for s in r:
            if not _is_int(s) or not 0 <= s < v:
                raise RealmError(f"stop_ids: {s!r} is not a token id in [0, {v})")
    return [tuple(int(s) for s in r) for r in rows]


class Padded(NamedTuple):
    """Bucketed host arrays for the device: Bp >= B prompts, Rp = Bp * samples rows (prompt-major;
    rows of padding prompts are born done)."""

    tokens: np.ndarray  # [Bp, Tp] int32, right-padded with 0
    lengths: np.ndarray  # [Bp] int32 (0 for padding prompts)
    limits: np.ndarray  # [Rp] int32 max new tokens (0 for padding rows)
    stop_ids: np.ndarray  # [Rp, E] int32, -1 = no id
    sampling: SamplingParams  # numpy [Rp]
    adapter_ids: np.ndarray | None  # [Rp] int32 (-1 for padding rows)
    cache_len: int  # S
    samples: int = 1  # rows per prompt


def pad_request(req: Request, batch: int | None = None) -> Padded:
    """Right-pad to bucketed shapes (``batch`` overrides the prompt-batch bucket)."""
    b, m = req.batch, req.samples
    bp = bucket_batch(b) if batch is None else batch
    if bp < b:
        raise RealmError(f"batch: {bp} rows cannot hold {b} prompts")
    r, rp = b * m, bp * m
    tp = bucket_length(int(req.prompt_lengths.max()))
    tokens = np.zeros((bp, tp), np.int32)
    for i, p in enumerate(req.prompt_ids):
        tokens[i, :len(p)] = p
    lengths = np.zeros((bp,), np.int32)
    lengths[:b] = req.prompt_lengths
    limits = np.zeros((rp,), np.int32)
    limits[:r] = req.max_new_tokens
    e = bucket_table(max(len(s) for s in req.stop_ids))
    stop = np.full((rp, e), -1, np.int32)
    for i, s in enumerate(req.stop_ids):
        stop[i, :len(s)] = s
    ids = None
    if req.adapter_ids is not None:
        ids = np.full((rp,), -1, np.int32)
        ids[:r] = req.adapter_ids
    return Padded(tokens, lengths, limits, stop, req.sampling.pad(rp), ids, req.cache_len, m)


# ---------------------------------------------------------------------------------------- device


class Controls(NamedTuple):
    """Per-row settings, fixed for a whole decode."""

    sampling: SamplingParams  # [B] each
    limits: jax.Array  # [B] int32 max new tokens
    stop_ids: jax.Array  # [B, E] int32 (-1 = none)
    constraint: Any = None  # [B] int32 keys of the rows' grammar matchers (-1 = none; ``constraints``)

    @classmethod
    def of(cls, pad: "Padded", constraint_keys: np.ndarray | None = None) -> "Controls":
        """The device controls of a padded request (``constraint_keys`` [R]: padded with -1)."""
        keys = None
        if constraint_keys is not None:
            keys = np.full(pad.limits.shape, -1, np.int32)
            keys[:len(constraint_keys)] = constraint_keys
            keys = jnp.asarray(keys)
        return cls(pad.sampling.to_device(), jnp.asarray(pad.limits), jnp.asarray(pad.stop_ids), keys)


class DecodeState(NamedTuple):
    """Loop carry. M = capacity of ``out`` (the cache length S in ``generate``)."""

    cache: KVCache
    last: jax.Array  # [B] int32 the latest emitted token (input of the next step)
    num_new: jax.Array  # [B] int32 tokens emitted so far
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool: ended by a stop id
    out: jax.Array  # [B, M] int32 emitted tokens (0 past num_new)
    history: History | None = None  # token counts for the penalties (None: no row has one)
    logprobs: "LogprobTrace | None" = None  # per emitted token (None: not asked for)
    prompt_logprobs: "LogprobTrace | None" = None  # per prompt token [Bp, T] (None: not asked for)


class LogprobTrace(NamedTuple):
    """Log-probs per token, at the token's index (M positions; float32):

    logprob [B, M]: the token under the model's distribution (log-softmax of the raw logits);
    sampled [B, M]: under the distribution it was chosen from (the adjusted logits for greedy
    rows, adjusted and warped for sampled rows: ``sampling``'s order); top_ids / top [B, M, N]:
    the model's N most likely tokens and their log-probs. For prompt tokens (M = T, index t =
    token t given tokens < t; index 0 holds nothing) ``sampled`` equals ``logprob``."""

    logprob: jax.Array
    sampled: jax.Array
    top_ids: jax.Array
    top: jax.Array

    @classmethod
    def empty(cls, b: int, m: int, n: int) -> "LogprobTrace":
        z = jnp.zeros((b, m), jnp.float32)
        return cls(z, z, jnp.zeros((b, m, n), jnp.int32), jnp.zeros((b, m, n), jnp.float32))


def _logprobs(raw: jax.Array, dist: jax.Array | None, tok: jax.Array, n: int):
    """raw / dist logits [..., V], tok [...] -> (logprob, sampled, top ids [..., n], top [..., n])
    (dist None: ``sampled`` is ``logprob``). log-softmax(x)[i] = x[i] - logsumexp(x), and the
    top n of log-softmax(x) are the top n of x: only reductions and picks over V, so no [..., V]
    log-softmax is written."""
    raw = raw.astype(jnp.float32)
    lse = jax.nn.logsumexp(raw, axis=-1)
    pick = lambda x: jnp.take_along_axis(x, tok[..., None], axis=-1)[..., 0]  # noqa: E731
    lp = pick(raw) - lse
    sampled = lp if dist is None else pick(dist) - jax.nn.logsumexp(dist, axis=-1)
    ids, top = _top_n(raw, n)
    return lp, sampled, ids, top - lse[..., None]


SMALL_TOP = 8  # top-n of at most this many, over at most this many rows: n argmax passes, not a sort


def _top_n(x: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """x [..., V] -> (ids [..., n] int32, values [..., n]), best first (ties: the lower id).
    A few rows and a small n take n argmax passes (a sort of V per row costs more there)."""
    lead = x.shape[:-1]
    if n == 0:
        return jnp.zeros(lead + (0,), jnp.int32), jnp.zeros(lead + (0,), x.dtype)
    if n > SMALL_TOP or int(np.prod(lead)) > SMALL_TOP:
        top, ids = jax.lax.top_k(x, n)
        return ids.astype(jnp.int32), top
    ids, vals, v = [], [], x.shape[-1]
    for _ in range(n):
        i = jnp.argmax(x, axis=-1).astype(jnp.int32)
        vals.append(jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0])
        ids.append(i)
        x = jnp.where(jnp.arange(v) == i[..., None], -jnp.inf, x)
    return jnp.stack(ids, -1), jnp.stack(vals, -1)


def new_cache(cfg: ModelConfig, rt, batch: int, max_len: int) -> KVCache:
    """A zeroed cache for the runtime ``rt``: in its dtype, per layer or stacked as it needs, and
    on its mesh sharded like it (B on ``data``, K on ``model``)."""
    from .sharding import init_cache_like

    return init_cache_like(rt, cfg, batch, max_len)


def prefill(rt, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, cache: KVCache, *,
            adapter_ids=None, empty_cache: bool = False) -> tuple[jax.Array, KVCache]:
    """Run right-padded prompts through the cache.

    tokens [B, T] int32, lengths [B] int32 (0 = row takes no tokens) -> logits [B, V] float32 at
    each row's last prompt token (only those B positions go through the vocab projection), cache.
    ``empty_cache=True`` (every cache length is 0) lets attention take the fused prompt path.
    """
    hidden, cache = forward_cached_hidden(rt, cfg, tokens, lengths, cache, adapter_ids=adapter_ids,
                                          empty_cache=empty_cache)
    return last_logits(rt, cfg, hidden, lengths), cache


def last_logits(rt, cfg: ModelConfig, hidden: jax.Array, lengths: jax.Array) -> jax.Array:
    """hidden [B, T, D] -> logits [B, V] at each row's last token (only those go through the head)."""
    last = jnp.maximum(lengths.astype(jnp.int32) - 1, 0)
    return lm_head(rt, cfg, jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0]


def init_state(cache: KVCache, limits: jax.Array, out_len: int, *, history: History | None = None,
               top_logprobs: int | None = None) -> DecodeState:
    """A state before the first token: rows with limit 0 (padding) are born done. ``history``:
    the penalties' token counts; ``top_logprobs``: N, to record a ``LogprobTrace``."""
    b = limits.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    trace = None if top_logprobs is None else LogprobTrace.empty(b, out_len, top_logprobs)
    return DecodeState(cache, zeros, zeros, limits <= 0, jnp.zeros((b,), bool),
                       jnp.zeros((b, out_len), jnp.int32), history, trace)


def new_history(tokens: jax.Array, lengths: jax.Array, vocab: int) -> History:
    """The penalties' history before the first token: no counts; the prompt's tokens seen."""
    b, t = tokens.shape
    ids = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], tokens, vocab)  # padding falls outside
    seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], ids].set(True, mode="drop")
    return History(jnp.zeros((b, vocab), jnp.int32), seen)


def emit(state: DecodeState, logits: jax.Array, ctl: Controls) -> DecodeState:
    """Sample one token per live row from logits [B, V] (through ``sampling``'s processors);
    record it (and its log-probs, with a trace); count it (with a history); mark finished rows."""
    live = ~state.done
    sp = ctl.sampling
    raw, finish = logits, None
    if ctl.constraint is not None:  # the grammar's mask first: no processor can bring a token back
        allowed, finish = step_masks(ctl.constraint, state.last, state.num_new, state.done, logits.shape[-1])
        logits = jnp.where(allowed, logits, -jnp.inf)
        live = live & ~finish
    adjusted = logits
    if sp.bias is not None or sp.penalties is not None or sp.min_tokens is not None:
        adjusted = adjust(logits, sp, num_new=state.num_new, stop_ids=ctl.stop_ids, history=state.history)
    trace = state.logprobs
    if trace is None:
        tok = sample(adjusted, sp, state.num_new)
    else:  # the distribution drawn from serves the log-probs too (one warp, one sort, one cond)
        tok, dist = sample_with_dist(adjusted, sp, state.num_new)
    tok = jnp.where(live, tok, state.last)
    b, m = state.out.shape
    rows = jnp.arange(b)
    idx = jnp.where(live, state.num_new, m)  # done rows write out of range: dropped
    out = state.out.at[rows, idx].set(tok, mode="drop")
    history = state.history
    if history is not None:
        history = history._replace(counts=history.counts.at[rows, tok].add(live.astype(jnp.int32)))
    if trace is not None:
        new = _logprobs(raw, dist, tok, trace.top.shape[-1])
        trace = LogprobTrace(*(old.at[rows, idx].set(x, mode="drop") for old, x in zip(trace, new)))
    num_new = state.num_new + live.astype(jnp.int32)
    hit = live & jnp.any(tok[:, None] == ctl.stop_ids, axis=1)
    if finish is not None:  # the grammar ended a row that has no stop id
        hit = hit | (finish & ~state.done)
    done = state.done | hit | (num_new >= ctl.limits)
    return state._replace(last=tok, num_new=num_new, done=done, stopped=state.stopped | hit, out=out,
                          history=history, logprobs=trace)


def decode_step(rt, cfg: ModelConfig, state: DecodeState, ctl: Controls, *, adapter_ids=None) -> DecodeState:
    """Feed each row's last token [B, 1] (done rows do not advance their cache) and emit."""
    logits, cache = forward_cached(rt, cfg, state.last[:, None], (~state.done).astype(jnp.int32),
                                   state.cache, adapter_ids=adapter_ids)
    return emit(state._replace(cache=cache), logits[:, 0], ctl)


def decode_loop(rt, cfg: ModelConfig, state: DecodeState, ctl: Controls, *, max_steps=None,
                adapter_ids=None) -> DecodeState:
    """``decode_step`` in a ``lax.while_loop`` until every row is done or ``max_steps`` steps ran
    (``max_steps`` may be a traced int; None = no limit)."""
    limit = jnp.iinfo(jnp.int32).max if max_steps is None else max_steps

    def cond(carry):
        s, i = carry
        return jnp.any(~s.done) & (i < limit)

    def body(carry):
        s, i = carry
        return decode_step(rt, cfg, s, ctl, adapter_ids=adapter_ids), i + 1

    state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
    return state


def start(rt, cfg: ModelConfig, tokens, lengths, cache: KVCache, ctl: Controls, *, out_len: int,
          adapter_ids=None, samples: int = 1, top_logprobs: int | None = None,
          prompt_logprobs: int | None = None) -> DecodeState:
    """Prefill an empty cache with the Bp prompts tokens [Bp, T], then emit each row's first token.

    samples: rows per prompt: the cache [Bp * samples] (donated; one row per prompt is
    prefilled, then repeated), ``ctl`` and ``adapter_ids`` are per row. top_logprobs / prompt_logprobs: N, to record
    a ``LogprobTrace`` of the generated / prompt tokens with N alternatives (None: none)."""
    prompt_ids = adapter_ids if adapter_ids is None or samples == 1 else adapter_ids[::samples]
    if samples > 1:  # the cache has a row per sample: prefill one per prompt (then repeat it)
        cache = rows_of(cache, slice(None, None, samples))
    hidden, cache = forward_cached_hidden(rt, cfg, tokens, lengths, cache, adapter_ids=prompt_ids, empty_cache=True)
    logits = last_logits(rt, cfg, hidden, lengths)
    prompt_trace = None
    if prompt_logprobs is not None:
        nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)  # position t predicts t + 1
        lp = _logprobs(lm_head(rt, cfg, hidden), None, nxt, prompt_logprobs)
        shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)  # noqa: E731  index = token
        prompt_trace = LogprobTrace(*(shift(x) for x in lp))
    history = new_history(tokens, lengths, cfg.vocab_size) if ctl.sampling.needs_history else None
    if samples > 1:
        rep = lambda x: jnp.repeat(x, samples, axis=0)  # noqa: E731
        logits, history = rep(logits), None if history is None else jax.tree.map(rep, history)
        cache = repeat_rows(cache, samples)
    state = init_state(cache, ctl.limits, out_len, history=history, top_logprobs=top_logprobs)
    return emit(state._replace(prompt_logprobs=prompt_trace), logits, ctl)


def generate_on_device(rt, cfg: ModelConfig, tokens, lengths, cache: KVCache, ctl: Controls, *,
                       out_len: int, adapter_ids=None, samples: int = 1, top_logprobs: int | None = None,
                       prompt_logprobs: int | None = None) -> DecodeState:
    """Prefill + first token + the whole decode loop (one program under ``generate_jit``)."""
    state = start(rt, cfg, tokens, lengths, cache, ctl, out_len=out_len, adapter_ids=adapter_ids, samples=samples,
                  top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs)
    return decode_loop(rt, cfg, state, ctl, adapter_ids=adapter_ids)


_STATIC = ("cfg", "out_len", "samples", "top_logprobs", "prompt_logprobs")
start_jit = jax.jit(start, static_argnames=_STATIC, donate_argnames=("cache",))
decode_loop_jit = jax.jit(decode_loop, static_argnames=("cfg",), donate_argnames=("state",))
generate_jit = jax.jit(generate_on_device, static_argnames=_STATIC, donate_argnames=("cache",))


# ------------------------------------------------------------------------------------------- API


class TokenLogprob(NamedTuple):
    """One token's log-probs (``LogprobTrace``): ``logprob`` under the model's distribution,
    ``sampled`` under the distribution it was chosen from, ``top``: the model's most likely
    tokens as (id, log-prob), best first."""

    token: int
    logprob: float
    sampled: float
    top: tuple


@dataclasses.dataclass
class GenerationResult:
    """Per row (prompt-major; ``n`` rows per prompt): ``tokens`` (new ids; a stop id that ended
    the row is the last one), ``texts`` (decoded new text without that stop id and special
    tokens, cut before a matched stop string; None without a tokenizer), ``finish_reasons``
    ("stop" or "length") and ``prompt_lengths``. With ``logprobs``: ``logprobs`` (a
    ``TokenLogprob`` per token) and ``cumulative_logprobs``; with ``prompt_logprobs``:
    ``prompt_logprobs`` per row (None for the first prompt token, which nothing predicts)."""

    tokens: list[list[int]]
    texts: list[str | None]
    finish_reasons: list[str]
    prompt_lengths: list[int]
    logprobs: list[list[TokenLogprob]] | None = None
    cumulative_logprobs: list[float] | None = None
    prompt_logprobs: list[list[TokenLogprob | None]] | None = None

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass
class StreamChunk:
    """What ``generate_stream`` yields: per row, the ids and text produced since the previous
    chunk (possibly empty), the finish reason once the row has ended (else None), and with
    ``logprobs`` the new tokens' ``TokenLogprob``s."""

    tokens: list[list[int]]
    texts: list[str | None]
    finish_reasons: list[str | None]
    logprobs: list[list[TokenLogprob]] | None = None


def prepare_request(model, prompts, max_new_tokens, *, stop_ids=None, max_len=None, adapters=None,
                    adapter_ids=None, chat: bool = False, sampling: Sampling | None = None,
                    **settings) -> tuple[Request, Padded]:
    """All host work of a call (prompts -> ids, default stop ids, validation, bucketed padding):
    ``(Request, Padded)``, before any device work."""
    ids = prepare_prompts(model, prompts, chat)
    if stop_ids is None:
        stop_ids = default_stop_ids(model)
    req = validate_request(model.config, ids, max_new_tokens, max_len=max_len, stop_ids=stop_ids,
                           sampling=sampling, adapters=adapters, adapter_ids=adapter_ids,
                           num_adapters=0 if adapters is not None else model.num_adapters, **settings)
    if any(req.stop_strings) and getattr(model, "tokenizer", None) is None:
        raise RealmError("stop: stop strings need the model's tokenizer (this model has none); use stop_ids")
    if any(c is not None for c in req.constraints):
        from .constraints import compile_rows

        req.matchers = compile_rows(model, req.constraints, req.stop_ids, default_stop_ids(model))
    return req, pad_request(req)


def runtime_for(model, adapters=None):
    """The runtime a call runs: ``model.runtime``, serving this call's canonical ``adapters`` when
    given (``runtime.with_adapters``: the base weights are shared, the adapters built per call)."""
    if adapters is None:
        return model.runtime
    from .runtime import with_adapters

    return with_adapters(model.runtime, model.config, adapters)


class _Call(NamedTuple):
    """One call after its host work: the request, its padded arrays and device inputs."""

    req: Request
    pad: Padded
    ctl: Controls
    cache: KVCache
    adapter_ids: jax.Array | None
    rt: object
    constraint_keys: np.ndarray | None = None  # [R] registered matchers (``constraints.register``)

    def static(self) -> dict:
        """The static arguments of ``start`` / ``generate_on_device`` beyond cfg."""
        st = self.req.settings
        top = st.logprobs if st.logprobs is not None else (0 if st.best_of is not None else None)
        return dict(out_len=self.pad.cache_len, samples=self.pad.samples, top_logprobs=top,
                    prompt_logprobs=st.prompt_logprobs)


def _setup(model, prompts, max_new_tokens, **kw) -> _Call:
    """Host work (``prepare_request``), then the device arrays and a fresh cache (a row per sample)."""
    req, pad = prepare_request(model, prompts, max_new_tokens, **kw)
    rt = runtime_for(model, kw.get("adapters"))
    compile_notice(f"generate for batch {pad.tokens.shape[0]} x {pad.cache_len}",
                   ("generate", model.config, rt.options, pad.tokens.shape, pad.cache_len))
    cache = new_cache(model.config, rt, pad.limits.shape[0], pad.cache_len)
    aid = None if pad.adapter_ids is None else jnp.asarray(pad.adapter_ids)
    keys = register_constraints(req)
    return _Call(req, pad, Controls.of(pad, keys), cache, aid, rt, keys)


def register_constraints(req: Request) -> np.ndarray | None:
    """Register a checked request's grammar matchers for a call: their keys [R] (None without);
    ``release_constraint_keys`` forgets them."""
    if req.matchers is None:
        return None
    from .constraints import register

    return register(req.matchers)


def _release(call: _Call) -> None:
    release_constraint_keys(call.constraint_keys)


def release_constraint_keys(keys: np.ndarray | None) -> None:
    """Forget a call's grammar matchers (``constraints.register``'s keys, or None); a matcher that
    met an error (a bug: the mask should have kept every refused token out) is raised here."""
    if keys is None:
        return
    from .constraints import release

    errors = release(keys)
    if errors:
        raise RealmError(f"constraint: the grammar engine failed: {errors[0]}")


def _row_text(tok, ids: list[int], stopped: bool, stop_ids=()) -> str | None:
    """The text of a row's ids, without the stop id that ended it (``stopped``: the row ended by a
    stop id or, with a constraint, by its grammar, which emits none; ``stop_ids``: the row's)."""
    if tok is None:
        return None
    return tok.decode(ids[:-1] if stopped and ids and ids[-1] in stop_ids else ids)


def visible_text(tok, ids: list[int], *, stopped: bool, stop_ids=(), cut: int | None = None,
                 finished: bool = True, stops=()) -> str:
    """The text of a row a reader may see now: ``_row_text`` cut before a matched stop string
    (``cut``: its index) or, while the row runs (``finished=False``), without a trailing
    incomplete character and without the tail that could still begin one of ``stops``."""
    from .stop_strings import held_back

    full = _row_text(tok, ids, stopped and cut is None, stop_ids)
    if cut is not None:
        return full[:cut]
    if not finished:
        full = full.rstrip("\ufffd")  # an incomplete character: wait for its other bytes
        full = full[:len(full) - held_back(full, stops)]
    return full


def generate(model, prompts, max_new_tokens: int | Sequence[int], *, stop_ids=None, max_len: int | None = None,
             adapters=None, adapter_ids=None, chat: bool = False, sampling: Sampling | None = None,
             **settings) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens for each prompt; the decode loop is one jit.

    model: a loaded ``Model`` (config, params, tokenizer). prompts: strings, chat message lists
    or token-id lists (see ``prepare_prompts``). max_new_tokens: a scalar or one per prompt.
    sampling / settings: a ``Sampling`` and/or its fields by name (temperature, top_k, top_p,
    min_p, seed, penalties, logit_bias, min_tokens, stop, logprobs, prompt_logprobs, n,
    best_of; see ``settings``). stop_ids: None = the model's eos ids; a list shared by all rows
    or one list per prompt. max_len: the cache length (see ``validate_request``). adapters /
    adapter_ids [B]: per-prompt LoRA, passed to the model as is.
    With stop strings the loop runs in jitted chunks of decode steps, checked on the host
    between chunks (``generate_stream``'s path), so rows end soon after a match.
    """
    call = _setup(model, prompts, max_new_tokens, stop_ids=stop_ids, max_len=max_len, adapters=adapters,
                  adapter_ids=adapter_ids, chat=chat, sampling=sampling, **settings)
    if any(call.req.stop_strings):
        return _collect(call.req, _Stream(model, call, 16))
    try:
        state = generate_jit(call.rt, model.config, jnp.asarray(call.pad.tokens), jnp.asarray(call.pad.lengths),
                             call.cache, call.ctl, adapter_ids=call.adapter_ids, **call.static())
        state = jax.block_until_ready(state)
    finally:
        _release(call)
    return result_of(model, call.req, *jax.device_get((state.out, state.num_new, state.stopped)),
                     logprobs=jax.device_get(state.logprobs), prompt_logprobs=jax.device_get(state.prompt_logprobs))


def _token_logprobs(trace, row: int, tokens, count: int, start: int = 0) -> list:
    """Host ``LogprobTrace`` -> ``TokenLogprob``s of row ``row`` (whose ids are ``tokens``),
    positions [start, count)."""
    lp, sampled, top_ids, top = trace
    return [TokenLogprob(int(tokens[j]), float(lp[row, j]), float(sampled[row, j]),
                         tuple(zip(top_ids[row, j].tolist(), top[row, j].tolist())))
            for j in range(start, count)]


def _prompt_logprobs(req: Request, trace) -> list[list[TokenLogprob | None]]:
    """Host prompt ``LogprobTrace`` [Bp, T] -> per row (each sample of a prompt gets its
    prompt's): None for the first token, then a ``TokenLogprob`` per prompt token."""
    out = []
    for i in range(req.rows):
        ids = req.prompt_ids[i // req.samples]
        out.append([None] + _token_logprobs(trace, i // req.samples, ids, len(ids), 1))
    return out


def _cumulative(rows: list[list[TokenLogprob]]) -> list[float]:
    return [float(sum(t.logprob for t in row)) for row in rows]


def result_of(model, req: Request, out: np.ndarray, num_new: np.ndarray, stopped: np.ndarray, *,
              logprobs=None, prompt_logprobs=None) -> GenerationResult:
    """A ``GenerationResult`` from a finished decode: out [R', M] ids, num_new [R'], stopped [R']
    (R' >= R padded rows; only the request's R rows are read) and the host ``LogprobTrace``s.
    With ``best_of``, each prompt's ``n`` rows of the highest cumulative log-prob, best first."""
    tok = getattr(model, "tokenizer", None)
    st, r = req.settings, req.rows
    tokens = [out[i, :num_new[i]].tolist() for i in range(r)]
    texts = [_row_text(tok, tokens[i], bool(stopped[i]), req.stop_ids[i]) for i in range(r)]
    reasons = ["stop" if stopped[i] else "length" for i in range(r)]
    lps = cum = None
    if logprobs is not None:
        lps = [_token_logprobs(logprobs, i, tokens[i], len(tokens[i])) for i in range(r)]
        cum = _cumulative(lps)
    plp = None if prompt_logprobs is None else _prompt_logprobs(req, prompt_logprobs)
    keep = list(range(r))
    if st.best_of is not None:  # each prompt's n best of best_of by cumulative log-prob
        m = req.samples
        keep = [i for p in range(req.batch)
                for i in sorted(range(p * m, p * m + m), key=lambda i: (-cum[i], i))[:st.n]]
    pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
    lengths = [int(req.prompt_lengths[i // req.samples]) for i in keep]
    return GenerationResult(pick(tokens), pick(texts), pick(reasons), lengths,
                            pick(lps) if st.logprobs is not None else None,
                            pick(cum) if st.logprobs is not None else None, pick(plp))


def _collect(req: Request, chunks: "_Stream") -> GenerationResult:
    """Concatenate a stream's chunks into the call's result (no ``best_of``: refused with stop)."""
    r = req.rows
    tokens, texts = [[] for _ in range(r)], [None] * r
    reasons, lps = [None] * r, [[] for _ in range(r)]
    for c in chunks:
        for i in range(r):
            tokens[i] += c.tokens[i]
            if c.texts[i] is not None:
                texts[i] = (texts[i] or "") + c.texts[i]
            reasons[i] = reasons[i] or c.finish_reasons[i]
            if c.logprobs is not None:
                lps[i] += c.logprobs[i]
    with_lp = req.settings.logprobs is not None
    lengths = [int(req.prompt_lengths[i // req.samples]) for i in range(r)]
    return GenerationResult(tokens, texts, reasons, lengths, lps if with_lp else None,
                            _cumulative(lps) if with_lp else None, chunks.prompt_logprobs)


def generate_stream(model, prompts, max_new_tokens: int | Sequence[int], *, stop_ids=None,
                    max_len: int | None = None, adapters=None, adapter_ids=None, chat: bool = False,
                    chunk: int = 8, sampling: Sampling | None = None, **settings) -> Iterator[StreamChunk]:
    """Like ``generate`` but yields a ``StreamChunk`` after prefill and after every ``chunk``
    decode steps (each a jitted call with the same shapes). Concatenating the chunks gives
    ``generate``'s tokens and texts. Text deltas hold back an incomplete multi-byte character
    and any tail that could still begin a stop string; nothing after a stop match is yielded.
    Bad input raises here, at the call, not at the first iteration."""
    if not _is_int(chunk) or chunk < 1:
        raise RealmError(f"chunk must be an integer >= 1, got {chunk!r}")
    call = _setup(model, prompts, max_new_tokens, stop_ids=stop_ids, max_len=max_len, adapters=adapters,
                  adapter_ids=adapter_ids, chat=chat, sampling=sampling, **settings)
    if call.req.settings.best_of is not None:
        raise RealmError("best_of: not available when streaming (the best rows are known only at the end)")
    return _Stream(model, call, chunk)


class _Stream:
    """The chunk iterator of ``generate_stream`` (and of ``generate`` with stop strings);
    ``prompt_logprobs`` is set once the prefill has run."""

    def __init__(self, model, call: _Call, chunk: int):
        self.model, self.call, self.chunk = model, call, chunk
        self.prompt_logprobs = None
        self._it = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> StreamChunk:
        return next(self._it)

    def _run(self) -> Iterator[StreamChunk]:
        try:
            yield from self._chunks()
        finally:  # the end, an error or the stream closed / dropped: forget the grammar matchers
            _release(self.call)

    def _chunks(self) -> Iterator[StreamChunk]:
        from .stop_strings import StopScan

        model, (req, pad, ctl, cache, aid, rt) = self.model, self.call[:6]
        tok = getattr(model, "tokenizer", None)
        r = req.rows
        state = start_jit(rt, model.config, jnp.asarray(pad.tokens), jnp.asarray(pad.lengths), cache, ctl,
                          adapter_ids=aid, **self.call.static())
        if state.prompt_logprobs is not None:
            self.prompt_logprobs = _prompt_logprobs(req, jax.device_get(state.prompt_logprobs))
        scans = [StopScan(tok.decode, s) if s else None for s in req.stop_strings]
        steps = jnp.int32(self.chunk)
        seen, texts = [0] * r, [""] * r
        finished: list[str | None] = [None] * r
        while True:
            out, num_new, done, stopped, trace = jax.device_get(
                (state.out, state.num_new, state.done, state.stopped, state.logprobs))
            new_tokens, deltas, new_lps, ended = [], [], [], []
            for i in range(r):
                n, cut = int(num_new[i]), None
                if finished[i] is not None:
                    n = seen[i]
                elif scans[i] is not None:
                    cut = scans[i].scan(out[i, :n].tolist())
                    if cut is not None:
                        n = cut[0]
                        ended.append(i)
                new_tokens.append(out[i, seen[i]:n].tolist())
                new_lps.append(None if trace is None else _token_logprobs(trace, i, out[i], n, seen[i]))
                fresh = finished[i] is None
                if fresh and cut is not None:
                    finished[i] = "stop"
                elif fresh and done[i]:
                    finished[i] = "stop" if stopped[i] else "length"
                delta = None
                if tok is not None and fresh:
                    full = visible_text(tok, out[i, :n].tolist(), stopped=bool(stopped[i]), stop_ids=req.stop_ids[i],
                                        cut=None if cut is None else cut[1], finished=finished[i] is not None,
                                        stops=req.stop_strings[i])
                    delta = full[len(texts[i]):]  # decoding more ids extends the text
                    texts[i] = full
                elif tok is not None:
                    delta = ""
                deltas.append(delta)
                seen[i] = n
            yield StreamChunk(new_tokens, deltas, list(finished), None if trace is None else new_lps)
            if all(f is not None for f in finished):
                return
            if ended:
                state = state._replace(done=state.done.at[jnp.asarray(ended)].set(True))
            state = decode_loop_jit(rt, model.config, state, ctl, max_steps=steps, adapter_ids=aid)

