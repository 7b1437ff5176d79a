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
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .buckets import bucket_batch, bucket_cache, bucket_length, bucket_table, next_pow2  # noqa: F401
from .config import ModelConfig
from .errors import RealmError
from .kv_cache import KVCache
from .model import forward_cached, forward_cached_hidden, lm_head
from .sampling import SamplingParams, sample
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
    """A validated batch (host numpy). B rows, before bucketing."""

    prompt_ids: list[list[int]]
    prompt_lengths: np.ndarray  # [B] int32
    max_new_tokens: np.ndarray  # [B] int32
    stop_ids: list[tuple[int, ...]]  # per row
    cache_len: int  # S
    sampling: SamplingParams  # numpy, [B]
    adapter_ids: np.ndarray | None  # [B] int32 or None

    @property
    def batch(self) -> int:
        return len(self.prompt_ids)


def validate_request(cfg: ModelConfig, prompt_ids: Sequence[Sequence[int]], max_new_tokens, *,
                     max_len: int | None = None, stop_ids=None, temperature=0.0, top_k=None, top_p=None,
                     seed=0, adapters=None, adapter_ids=None, num_adapters: int = 0) -> Request:
    """Check everything on the host; raise ``RealmError`` naming the argument and the values.

    max_new_tokens: int or one per row (>= 1). max_len: the cache length S (default: the
    prompt + max_new_tokens need, rounded up to a multiple of 64, and at most the model's
    ``max_position_embeddings``). stop_ids: ids shared by all rows, or one list per row.
    adapters: canonical adapters for this call; else ``num_adapters``: how many the runtime
    already serves (``adapter_ids`` index them).
    """
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
    sp = SamplingParams.make_host(b, temperature, top_k, top_p, seed)

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
    elif adapter_ids is not None:
        raise RealmError("adapter_ids given without adapters")
    return Request([list(p) for p in prompt_ids], lengths, mn, rows_stop, cache_len, sp, ids)


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
    """Bucketed host arrays for the device. Bp >= B rows; rows >= B are padding (born done)."""

    tokens: np.ndarray  # [Bp, Tp] int32, right-padded with 0
    lengths: np.ndarray  # [Bp] int32 (0 for padding rows)
    limits: np.ndarray  # [Bp] int32 max new tokens (0 for padding rows)
    stop_ids: np.ndarray  # [Bp, E] int32, -1 = no id
    sampling: SamplingParams  # numpy [Bp]
    adapter_ids: np.ndarray | None  # [Bp] int32 (-1 for padding rows)
    cache_len: int  # S


def pad_request(req: Request, batch: int | None = None) -> Padded:
    """Right-pad to bucketed shapes (``batch`` overrides the batch bucket)."""
    b = req.batch
    bp = bucket_batch(b) if batch is None else batch
    if bp < b:
        raise RealmError(f"batch: {bp} rows cannot hold {b} prompts")
    tp = bucket_length(int(req.prompt_lengths.max()))
    tokens = np.zeros((bp, tp), np.int32)
    for i, p in enumerate(req.prompt_ids):
        tokens[i, :len(p)] = p
    lengths = np.zeros((bp,), np.int32)
    lengths[:b] = req.prompt_lengths
    limits = np.zeros((bp,), np.int32)
    limits[:b] = req.max_new_tokens
    e = bucket_table(max(len(s) for s in req.stop_ids))
    stop = np.full((bp, e), -1, np.int32)
    for i, s in enumerate(req.stop_ids):
        stop[i, :len(s)] = s
    sp = SamplingParams(*(np.pad(a, (0, bp - b), constant_values=(1.0 if n == "top_p" else 0)).astype(a.dtype)
                          for n, a in zip(SamplingParams._fields, req.sampling)))
    ids = None
    if req.adapter_ids is not None:
        ids = np.full((bp,), -1, np.int32)
        ids[:b] = req.adapter_ids
    return Padded(tokens, lengths, limits, stop, sp, ids, req.cache_len)


# ---------------------------------------------------------------------------------------- device


class Controls(NamedTuple):
    """Per-row settings, fixed for a whole decode."""

    sampling: SamplingParams  # [B] each
    limits: jax.Array  # [B] int32 max new tokens
    stop_ids: jax.Array  # [B, E] int32 (-1 = none)

    @classmethod
    def of(cls, pad: "Padded") -> "Controls":
        """The device controls of a padded request."""
        return cls(SamplingParams(*(jnp.asarray(a) for a in pad.sampling)), jnp.asarray(pad.limits),
                   jnp.asarray(pad.stop_ids))


class DecodeState(NamedTuple):
    """Loop carry. M = capacity of ``out`` (the cache length S in ``generate``)."""

    cache: KVCache
    last: jax.Array  # [B] int32 the latest emitted token (input of the next step)
    num_new: jax.Array  # [B] int32 tokens emitted so far
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool: ended by a stop id
    out: jax.Array  # [B, M] int32 emitted tokens (0 past num_new)


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
    last = jnp.maximum(lengths.astype(jnp.int32) - 1, 0)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    return lm_head(rt, cfg, h)[:, 0], cache


def init_state(cache: KVCache, limits: jax.Array, out_len: int) -> DecodeState:
    """A state before the first token: rows with limit 0 (padding) are born done."""
    b = limits.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    return DecodeState(cache, zeros, zeros, limits <= 0, jnp.zeros((b,), bool),
                       jnp.zeros((b, out_len), jnp.int32))


def emit(state: DecodeState, logits: jax.Array, ctl: Controls) -> DecodeState:
    """Sample one token per live row from logits [B, V]; record it; mark finished rows done."""
    live = ~state.done
    tok = sample(logits, ctl.sampling, state.num_new)
    tok = jnp.where(live, tok, state.last)
    b, m = state.out.shape
    idx = jnp.where(live, state.num_new, m)  # done rows write out of range: dropped
    out = state.out.at[jnp.arange(b), idx].set(tok, mode="drop")
    num_new = state.num_new + live.astype(jnp.int32)
    hit = live & jnp.any(tok[:, None] == ctl.stop_ids, axis=1)
    done = state.done | hit | (num_new >= ctl.limits)
    return DecodeState(state.cache, tok, num_new, done, state.stopped | hit, out)


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
          adapter_ids=None) -> DecodeState:
    """Prefill an empty cache, then emit each row's first token."""
    logits, cache = prefill(rt, cfg, tokens, lengths, cache, adapter_ids=adapter_ids, empty_cache=True)
    return emit(init_state(cache, ctl.limits, out_len), logits, ctl)


def generate_on_device(rt, cfg: ModelConfig, tokens, lengths, cache: KVCache, ctl: Controls, *,
                       out_len: int, adapter_ids=None) -> DecodeState:
    """Prefill + first token + the whole decode loop (one program under ``generate_jit``)."""
    state = start(rt, cfg, tokens, lengths, cache, ctl, out_len=out_len, adapter_ids=adapter_ids)
    return decode_loop(rt, cfg, state, ctl, adapter_ids=adapter_ids)


start_jit = jax.jit(start, static_argnames=("cfg", "out_len"), donate_argnames=("cache",))
decode_loop_jit = jax.jit(decode_loop, static_argnames=("cfg",), donate_argnames=("state",))
generate_jit = jax.jit(generate_on_device, static_argnames=("cfg", "out_len"), donate_argnames=("cache",))


# ------------------------------------------------------------------------------------------- API


@dataclasses.dataclass
class GenerationResult:
    """Per row: ``tokens`` (new ids; a stop id that ended the row is the last one), ``texts``
    (decoded new text without that stop id and special tokens; None without a tokenizer),
    ``finish_reasons`` ("stop" or "length") and ``prompt_lengths``."""

    tokens: list[list[int]]
    texts: list[str | None]
    finish_reasons: list[str]
    prompt_lengths: list[int]

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass
class StreamChunk:
    """What ``generate_stream`` yields: per row, the ids and text produced since the previous
    chunk (possibly empty) and the finish reason once the row has ended (else None)."""

    tokens: list[list[int]]
    texts: list[str | None]
    finish_reasons: list[str | None]


def prepare_request(model, prompts, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None, seed=0,
                    stop_ids=None, max_len=None, adapters=None, adapter_ids=None,
                    chat: bool = False) -> tuple[Request, Padded]:
    """All host work of a call (prompts -> ids, default stop ids, validation, bucketed padding):
    ``(Request, Padded)``, before any device work."""
    ids = prepare_prompts(model, prompts, chat)
    if stop_ids is None:
        stop_ids = default_stop_ids(model)
    req = validate_request(model.config, ids, max_new_tokens, max_len=max_len, stop_ids=stop_ids,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           adapters=adapters, adapter_ids=adapter_ids,
                           num_adapters=0 if adapters is not None else model.runtime.num_adapters)
    return req, pad_request(req)


def runtime_for(model, adapters=None):
    """The runtime a call runs: ``model.runtime``, serving this call's canonical ``adapters`` when
    given (``runtime.with_adapters``: the base weights are shared, the adapters built per call)."""
    if adapters is None:
        return model.runtime
    from .runtime import with_adapters

    return with_adapters(model.runtime, model.config, adapters)


def _setup(model, prompts, max_new_tokens, *, temperature, top_k, top_p, seed, stop_ids, max_len,
           adapters, adapter_ids, chat):
    """Host work (``prepare_request``), then the device arrays and a fresh cache."""
    req, pad = prepare_request(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, stop_ids=stop_ids, max_len=max_len,
                               adapters=adapters, adapter_ids=adapter_ids, chat=chat)
    rt = runtime_for(model, adapters)
    compile_notice(f"generate for batch {pad.tokens.shape[0]} x {pad.cache_len}",
                   ("generate", model.config, rt.options, pad.tokens.shape, pad.cache_len))
    cache = new_cache(model.config, rt, pad.tokens.shape[0], pad.cache_len)
    aid = None if pad.adapter_ids is None else jnp.asarray(pad.adapter_ids)
    return req, pad, Controls.of(pad), cache, aid, rt


def _row_text(tok, ids: list[int], stopped: bool) -> str | None:
    if tok is None:
        return None
    return tok.decode(ids[:-1] if stopped else ids)


def generate(model, prompts, max_new_tokens: int | Sequence[int], *, temperature=0.0, top_k=None, top_p=None,
             seed=0, stop_ids=None, max_len: int | None = None, adapters=None, adapter_ids=None,
             chat: bool = False) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens for each prompt; the decode loop is one jit.

    model: a loaded ``Model`` (config, params, tokenizer). prompts: strings, chat message lists
    or token-id lists (see ``prepare_prompts``). temperature / top_k / top_p / seed /
    max_new_tokens: a scalar or one value per prompt. stop_ids: None = the model's eos ids;
    a list shared by all rows or one list per row. max_len: the cache length (see
    ``validate_request``). adapters / adapter_ids [B]: per-row LoRA, passed to the model as is.
    """
    req, pad, ctl, cache, aid, rt = _setup(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                                           top_p=top_p, seed=seed, stop_ids=stop_ids, max_len=max_len,
                                           adapters=adapters, adapter_ids=adapter_ids, chat=chat)
    state = generate_jit(rt, model.config, jnp.asarray(pad.tokens), jnp.asarray(pad.lengths), cache,
                         ctl, out_len=pad.cache_len, adapter_ids=aid)
    return result_of(model, req, *jax.device_get((state.out, state.num_new, state.stopped)))


def result_of(model, req: Request, out: np.ndarray, num_new: np.ndarray, stopped: np.ndarray) -> GenerationResult:
    """A ``GenerationResult`` from a finished decode: out [B', M] ids, num_new [B'], stopped [B']
    (B' >= B padded rows; only the request's B rows are read)."""
    tok = getattr(model, "tokenizer", None)
    tokens = [out[i, :num_new[i]].tolist() for i in range(req.batch)]
    return GenerationResult(
        tokens=tokens,
        texts=[_row_text(tok, tokens[i], bool(stopped[i])) for i in range(req.batch)],
        finish_reasons=["stop" if stopped[i] else "length" for i in range(req.batch)],
        prompt_lengths=req.prompt_lengths.tolist())


def generate_stream(model, prompts, max_new_tokens: int | Sequence[int], *, temperature=0.0, top_k=None,
                    top_p=None, seed=0, stop_ids=None, max_len: int | None = None, adapters=None,
                    adapter_ids=None, chat: bool = False, chunk: int = 8) -> Iterator[StreamChunk]:
    """Like ``generate`` but yields a ``StreamChunk`` after prefill and after every ``chunk``
    decode steps (each a jitted call with the same shapes). Concatenating the chunks gives
    ``generate``'s tokens. Text deltas hold back an incomplete multi-byte character.
    Bad input raises here, at the call, not at the first iteration."""
    if not _is_int(chunk) or chunk < 1:
        raise RealmError(f"chunk must be an integer >= 1, got {chunk!r}")
    req, pad, ctl, cache, aid, rt = _setup(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                                           top_p=top_p, seed=seed, stop_ids=stop_ids, max_len=max_len,
                                           adapters=adapters, adapter_ids=adapter_ids, chat=chat)
    return _stream(model, rt, req, pad, ctl, cache, aid, chunk)


def _stream(model, rt, req: Request, pad: Padded, ctl: Controls, cache: KVCache, aid,
            chunk: int) -> Iterator[StreamChunk]:
    tok = getattr(model, "tokenizer", None)
    b = req.batch
    state = start_jit(rt, model.config, jnp.asarray(pad.tokens), jnp.asarray(pad.lengths), cache, ctl,
                      out_len=pad.cache_len, adapter_ids=aid)
    steps = jnp.int32(chunk)
    seen = [0] * b
    texts = [""] * b
    finished: list[str | None] = [None] * b
    while True:
        out, num_new, done, stopped = jax.device_get((state.out, state.num_new, state.done, state.stopped))
        new_tokens, deltas = [], []
        for i in range(b):
            n = int(num_new[i])
            new_tokens.append(out[i, seen[i]:n].tolist())
            seen[i] = n
            if done[i] and finished[i] is None:
                finished[i] = "stop" if stopped[i] else "length"
            delta = None
            if tok is not None:
                full = _row_text(tok, out[i, :n].tolist(), bool(stopped[i]))
                if finished[i] is None:
                    full = full.rstrip("\ufffd")  # an incomplete character: wait for its other bytes
                delta = full[len(texts[i]):]  # decoding more ids extends the text
                texts[i] = full
            deltas.append(delta)
        yield StreamChunk(new_tokens, deltas, list(finished))
        if all(done[:b]):
            return
        state = decode_loop_jit(rt, model.config, state, ctl, max_steps=steps, adapter_ids=aid)
