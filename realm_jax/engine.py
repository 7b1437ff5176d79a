"""Continuous batching: a fixed set of slots that admits waiting requests as others finish.

    engine = Engine(model, max_slots=8, max_seq_len=1024)
    h = engine.submit("Hello", 32, temperature=0.7, seed=1)      # from any thread
    engine.run_until_idle()                                        # or engine.start() ... stop()
    h.result().tokens, h.result().text, h.result().finish_reason

A static batch runs until its longest row ends; the engine instead keeps every slot busy. Each
``step`` of the host loop:

1. **admit**: waiting requests (first come, first served) take free slots, several per prefill
   call (``prefill_batch`` rows; the admitted are grouped by prompt length, and each group's
   prompts are right-padded to the smallest of ``prefill_buckets`` that fits its longest); the
   prefill also samples each row's first token and **inserts** the rows' cache, counters and
   settings into their slots (one jitted, donated call);
2. **decode**: dispatch ``decode_steps_per_call`` steps over all slots as one jitted call (empty
   and finished slots idle); with a ``draft``, speculative rounds instead (up to k+1 tokens each);
3. **evict**: while that call runs, fetch the *previous* decode call's tokens and hand them to
   their requests' handles (``stream``); finished rows resolve their handles (``result``) and free
   their slots for the next step's admission. Then the admitted rows' first tokens.

JAX dispatch is asynchronous and the state stays on the device, so the host's bookkeeping overlaps
the device's work: the device always has the next call queued. The price: a row that ends by a
stop id is seen one call late, and its slot idles through that call (the device's done flag stops
it making tokens). A row that runs out of its token budget costs nothing: the host knows a slot
whose budget ends within the call in flight is free once that call is done, and admits into it
right away (the admission runs after that call on the device).

Every device call has a fixed shape (see ``engine_state``): after ``warmup()`` (or once every
bucket was used) nothing recompiles. Requests are validated on the host at ``submit`` with
generation's own checks (a bad request raises there; others are unaffected). Per-request
sampling settings, stop ids and LoRA adapters (``adapters={name: adapter}``, stacked once)
live in per-slot arrays; a request's output equals ``generate`` on it alone (greedy: the same
tokens; sampled: the same tokens for the same seed).

Threads: ``submit``/``cancel`` are safe from any thread. Requests advance when someone drives
the loop: ``start()`` runs it on a background thread; otherwise ``run_until_idle()``,
``generate_many``, ``handle.result()`` and ``handle.stream()`` drive it from the caller.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from .errors import RealmError
from .generation import (GenerationResult, _is_int, _row_text, default_stop_ids, next_pow2, prepare_prompts,
                         validate_request)
from .model import is_unstacked
from . import engine_state as es

CANCELLED = "cancelled"


@dataclasses.dataclass
class RequestResult:
    """One request's output, the per-row fields of ``GenerationResult``: ``tokens`` (new ids; a
    stop id that ended it is the last), ``text`` (None without a tokenizer), ``finish_reason``
    ("stop", "length" or "cancelled") and ``prompt_length``."""

    tokens: list[int]
    text: str | None
    finish_reason: str
    prompt_length: int


class RequestHandle:
    """A submitted request: ``result()``, ``stream()``, ``cancel()``, timings."""

    def __init__(self, engine: "Engine", rid: int, prompt_ids: list[int], max_new_tokens: int,
                 adapter: str | None, settings: np.ndarray, floats: np.ndarray):
        self._engine = engine
        self.id = rid
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.adapter = adapter
        self._settings = settings  # int32 [E + 4]: its part of an admission row (engine_state.request_settings)
        self._floats = floats  # float32 [2]: temperature, top_p
        self._tokens: list[int] = []
        self._cond = threading.Condition()
        self._finish: str | None = None
        self._error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    # ---------------------------------------------------------------- state
    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self._finish is not None or self._error is not None

    @property
    def finish_reason(self) -> str | None:
        return self._finish

    @property
    def tokens(self) -> list[int]:
        """The tokens produced so far (a copy)."""
        with self._cond:
            return list(self._tokens)

    @property
    def ttft(self) -> float | None:
        """Seconds from ``submit`` to the first token reaching the host."""
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def latency(self) -> float | None:
        """Seconds from ``submit`` to the last token (None while running)."""
        return None if self.finished_at is None else self.finished_at - self.submitted_at

    # ---------------------------------------------------------------- engine side
    def _push(self, tokens: list[int], finish: str | None = None) -> bool:
        """Append tokens (Python ints) and finish; False if the handle had already finished
        (e.g. cancelled)."""
        with self._cond:
            if self.done:
                return False
            now = time.perf_counter()
            if tokens and self.first_token_at is None:
                self.first_token_at = now
            self._tokens.extend(tokens)
            if finish is not None:
                self._finish = finish
                self.finished_at = now
            self._cond.notify_all()
            return True

    def _fail(self, err: BaseException) -> None:
        with self._cond:
            if not self.done:
                self._error = err
                self.finished_at = time.perf_counter()
            self._cond.notify_all()

    # ---------------------------------------------------------------- user side
    def _wait(self, until, timeout: float | None) -> None:
        """Block until ``until()`` holds, driving the engine when no background loop runs."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            with self._cond:
                if until():
                    return
                if self._engine._background:
                    left = None if deadline is None else deadline - time.perf_counter()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"request {self.id}: not finished after {timeout} s")
                    self._cond.wait(0.1 if left is None else min(left, 0.1))
                    continue
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError(f"request {self.id}: not finished after {timeout} s")
            self._engine._drive_once()

    def result(self, timeout: float | None = None) -> RequestResult:
        """Block until the request ends; its ``RequestResult``. Re-raises a device error."""
        self._wait(lambda: self.done, timeout)
        if self._error is not None:
            raise RuntimeError(f"request {self.id} failed: {self._error}") from self._error
        stopped = self._finish == "stop"
        tok = getattr(self._engine.model, "tokenizer", None)
        with self._cond:
            tokens = list(self._tokens)
        return RequestResult(tokens, _row_text(tok, tokens, stopped), self._finish, self.prompt_length)

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Yield the request's tokens as they reach the host, until it ends."""
        i = 0
        while True:
            self._wait(lambda: len(self._tokens) > i or self.done, timeout)
            with self._cond:
                new = self._tokens[i:]
                finished = self.done
            for t in new:
                yield t
            i += len(new)
            if finished and i >= len(self._tokens):
                if self._error is not None:
                    raise RuntimeError(f"request {self.id} failed: {self._error}") from self._error
                return

    def cancel(self) -> bool:
        """Stop the request now (its slot frees at the next step); ``result()`` then gives the
        tokens so far with finish reason "cancelled". False if it had already ended."""
        return self._engine._cancel(self)

    def __repr__(self) -> str:
        state = self._finish or ("error" if self._error else "running")
        return f"RequestHandle(id={self.id}, prompt_length={self.prompt_length}, tokens={len(self._tokens)}, {state})"


@dataclasses.dataclass
class EngineStats:
    """A snapshot. Times in seconds; ``tokens_per_s`` = generated tokens / time spent in steps
    (``busy_s``), of which ``wait_s`` the host waited for device results and ``dispatch_s`` it
    spent inside the jitted calls' dispatch (argument transfer, launch; blocking there means the
    device is the bottleneck); the rest is host bookkeeping, which overlaps the device's work.
    ``mean_occupancy`` = slots running at the start of a decode
    call / max_slots, averaged over decode calls; TTFT and latency over finished (not cancelled)
    requests; speculative counts are 0 without a draft."""

    queue_length: int
    active_slots: int
    max_slots: int
    occupancy: float
    mean_occupancy: float
    submitted: int
    completed: int
    cancelled: int
    rejected: int
    generated_tokens: int
    busy_s: float
    tokens_per_s: float
    prefill_calls: int
    decode_calls: int
    ttft_mean_s: float | None
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    latency_mean_s: float | None
    latency_p50_s: float | None
    latency_p90_s: float | None
    target_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    wait_s: float = 0.0
    dispatch_s: float = 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def summary(self) -> str:
        def ms(x):
            return "-" if x is None else f"{1e3 * x:.1f} ms"

        s = (f"queue={self.queue_length} slots={self.active_slots}/{self.max_slots} "
             f"mean_occupancy={self.mean_occupancy:.2f} done={self.completed} cancelled={self.cancelled} "
             f"tokens={self.generated_tokens} tokens/s={self.tokens_per_s:.1f} "
             f"ttft p50={ms(self.ttft_p50_s)} latency p50={ms(self.latency_p50_s)}")
        if self.drafted:
            s += f" acceptance={self.acceptance_rate:.2f}"
        return s


class _Call(NamedTuple):
    """A decode call dispatched and not yet fetched: its results [B, W + 6] (``engine_state.decode``)
    and the handles that owned the slots when it was dispatched."""

    out: jax.Array
    owners: list


def default_buckets(max_seq_len: int) -> tuple[int, ...]:
    """Powers of two from 16 below ``max_seq_len``, then ``max_seq_len``."""
    out, b = [], 16
    while b < max_seq_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_seq_len,)


def _check_pos_int(name: str, value, low: int = 1) -> int:
    if not _is_int(value) or value < low:
        raise RealmError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


class Engine:
    """A continuous-batching engine over ``max_slots`` fixed slots (see the module doc).

    model: a loaded ``Model`` (config, params in the stacked or decode layout, tokenizer or None).
    max_slots (B): sequences decoded together. max_seq_len (S): prompt + new tokens of any one
    request (default: min(1024, the model's max_position_embeddings)). prefill_buckets: prompt
    lengths compiled for (default: powers of two from 16, and S; the largest bounds prompts).
    prefill_batch: rows per prefill call (P), an int or several sizes (default (1, min(B, 8))):
    each admission uses the smallest size that holds the free slots' worth of waiting prompts
    with at most half of its rows padding (else smaller calls); every (rows, bucket) pair is one
    compiled program. Prefill is about a quarter of the device's time on a mixed workload, and
    its padding is set by these two: finer buckets and more row sizes waste less but compile more
    programs (H100, 1B shape: buckets 128/256/384/512 with rows 1/2/4/8 gave 2.08x static
    batching, 128/256/512 with rows 1/8 1.97x). decode_steps_per_call:
    decode steps (or speculative rounds) per device call: enough that a call outlasts the host's
    bookkeeping of one step (so the device never waits), few enough that a row ending by a stop id
    (its slot idles until the end of the next call) wastes little. Default 16: on an H100 (1B shape,
    32 slots, mixed workload) 16 gave 1.99x static batching and 8 gave 1.88x (on the GPU a call
    with a decode loop returns from dispatch only once its last step is launched, so the host's
    bookkeeping, ~0.5 ms per call there, overlaps only the call's last steps). max_stop_ids (E):
    stop ids per request.
    adapters: {name: single LoRA adapter}, stacked once; requests pick one by name.
    fold_adapters: serve the adapters in ``lora.fold_layout``'s form (params in the decode
    layout, float weights): their A factors appended to the base weights, one matmul fewer per
    projection and step (H100, 4 adapters, rank 16: +9.5% over the base model on the 8B shape
    instead of +16.5%). The engine then holds a folded copy of the targeted weights besides
    ``model.params``.
    draft: a draft for speculative decoding (a loaded Model, "self:N", "lookup" or a
    ``drafts.Draft``), k tokens per round.
    """

    def __init__(self, model, *, max_slots: int = 8, max_seq_len: int | None = None,
                 prefill_buckets: Sequence[int] | None = None, prefill_batch: int | None = None,
                 decode_steps_per_call: int = 16, max_stop_ids: int = 8,
                 adapters: Mapping[str, Any] | None = None, fold_adapters: bool = False, draft=None,
                 k: int = 4):
        cfg = model.config
        self.model = model
        self.max_slots = _check_pos_int("max_slots", max_slots)
        if max_seq_len is None:
            max_seq_len = min(1024, cfg.max_position_embeddings)
        self.max_seq_len = _check_pos_int("max_seq_len", max_seq_len, 2)
        if self.max_seq_len > cfg.max_position_embeddings:
            raise RealmError(f"max_seq_len: expected at most the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}, got {max_seq_len}")
        buckets = default_buckets(self.max_seq_len) if prefill_buckets is None else prefill_buckets
        if (not isinstance(buckets, (list, tuple)) or not buckets
                or not all(_is_int(b) and 1 <= b <= self.max_seq_len for b in buckets)):
            raise RealmError(f"prefill_buckets: expected a non-empty list of ints in [1, max_seq_len="
                             f"{self.max_seq_len}], got {buckets!r}")
        self.prefill_buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.max_prompt_len = min(self.prefill_buckets[-1], self.max_seq_len - 1)
        if prefill_batch is None:
            prefill_batch = tuple(sorted({1, min(self.max_slots, 8)}))
        sizes = prefill_batch if isinstance(prefill_batch, (list, tuple)) else (prefill_batch,)
        if not sizes or not all(_is_int(r) and 1 <= r <= self.max_slots for r in sizes):
            raise RealmError(f"prefill_batch: expected an int or a list of ints in [1, max_slots={self.max_slots}], "
                             f"got {prefill_batch!r}")
        self.prefill_rows = tuple(sorted(set(int(r) for r in sizes)))
        self.decode_steps_per_call = _check_pos_int("decode_steps_per_call", decode_steps_per_call)
        self.max_stop_ids = _check_pos_int("max_stop_ids", max_stop_ids)
        self.stop_width = max(4, next_pow2(self.max_stop_ids))

        self.adapter_names: tuple[str, ...] = ()
        self._adapters = None
        self._params = model.params  # the target's params as served (folded with fold_adapters)
        if fold_adapters and (adapters is None or draft is not None):
            raise RealmError("fold_adapters: needs adapters, and no draft (a draft runs the unfolded weights)")
        if adapters is not None:
            self._adapters = self._stack_adapters(adapters, fold_adapters)
        self.draft = None
        self.k = 0
        if draft is not None:
            from .drafts import make_draft

            self.k = _check_pos_int("k", k)
            self.draft = make_draft(model, draft)
        self._spec = None if self.draft is None else self.draft.spec
        self._dparams = None if self.draft is None else self.draft.params
        self.window = self.decode_steps_per_call * (self.k + 1)

        self._state = es.empty_state_jit(self._params, cfg, slots=self.max_slots, max_len=self.max_seq_len,
                                         stop_width=self.stop_width, spec=self._spec, dparams=self._dparams)
        # host bookkeeping (under _lock)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._drive = threading.Lock()  # whoever holds it runs steps
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._slots: list[RequestHandle | None] = [None] * self.max_slots
        self._kill = np.zeros((self.max_slots,), bool)
        self._no_kill = jax.device_put(self._kill)  # passed when nothing was cancelled
        self._inflight: _Call | None = None  # the decode call dispatched, results not yet fetched
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        # statistics
        self._n = collections.Counter()
        self._busy = 0.0
        self._dispatch = 0.0
        self._wait = 0.0
        self._occupancy_sum = 0.0
        self._ttfts: collections.deque[float] = collections.deque(maxlen=100_000)
        self._latencies: collections.deque[float] = collections.deque(maxlen=100_000)

    # ------------------------------------------------------------------ setup helpers
    def _stack_adapters(self, adapters, fold: bool = False):
        """Validate and stack {name: adapter} once, in the serving layout of the params (with
        ``fold``: ``lora.fold_layout``, which also replaces ``self._params``)."""
        from . import lora

        if not isinstance(adapters, Mapping) or not adapters:
            raise RealmError(f"adapters: expected a non-empty dict {{name: adapter}}, got {type(adapters).__name__}")
        cfg = self.model.config
        dims = lora.projection_dims(cfg)
        for name, ad in adapters.items():
            if not isinstance(name, str) or not name:
                raise RealmError(f"adapters: names must be non-empty strings, got {name!r}")
            lora.check_adapter(ad, dims, cfg.num_layers, f"adapters[{name!r}]", stacked=False)
        self.adapter_names = tuple(adapters)
        stack = lora.stack_adapters([adapters[n] for n in self.adapter_names],
                                    dtype=self.model.params["embed"].dtype)
        unstacked = is_unstacked(self.model.params["layers"])
        if fold:
            if not unstacked:
                raise RealmError("fold_adapters: needs params in the decode layout (model.decode_layout)")
            self._params, stack = lora.fold_layout(self.model.params, stack, cfg)
            return stack
        return lora.decode_layout(stack, cfg) if unstacked else stack

    # ------------------------------------------------------------------ submission
    def _validate(self, prompt, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None, seed=0,
                  stop_ids=None, adapter=None, chat=False) -> RequestHandle:
        """All host checks; a handle not yet queued."""
        if isinstance(prompt, np.ndarray):
            prompt = prompt.tolist()
        ids = prepare_prompts(self.model, [prompt], chat)
        if stop_ids is None:
            stop_ids = default_stop_ids(self.model)
        req = validate_request(self.model.config, ids, max_new_tokens, max_len=self.max_seq_len, stop_ids=stop_ids,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        n = int(req.prompt_lengths[0])
        if n > self.max_prompt_len:
            raise RealmError(f"prompt has {n} tokens, over the engine's longest prompt bucket "
                             f"{self.max_prompt_len} (prefill_buckets={list(self.prefill_buckets)})")
        stops = req.stop_ids[0]
        if len(stops) > self.max_stop_ids:
            raise RealmError(f"stop_ids: expected at most max_stop_ids={self.max_stop_ids} ids, got {len(stops)}")
        if adapter is None:
            aid = -1
        elif isinstance(adapter, str) and adapter in self.adapter_names:
            aid = self.adapter_names.index(adapter)
        else:
            known = list(self.adapter_names) or "none (the engine was built without adapters)"
            raise RealmError(f"adapter: unknown name {adapter!r}; expected one of {known} or None (base model)")
        sp = req.sampling
        limit = int(req.max_new_tokens[0])
        settings = es.request_settings(stops, self.stop_width, limit, int(sp.top_k[0]), int(sp.seed[0]), aid)
        floats = np.array([sp.temperature[0], sp.top_p[0]], np.float32)
        return RequestHandle(self, -1, req.prompt_ids[0], limit, adapter, settings, floats)

    def submit(self, prompt, max_new_tokens: int, *, temperature=0.0, top_k=None, top_p=None, seed=0,
               stop_ids=None, adapter: str | None = None, chat: bool = False) -> RequestHandle:
        """Queue one request; returns its handle at once (thread-safe).

        prompt: a string (needs the model's tokenizer; ``chat=True`` applies the chat template),
        chat messages (with ``chat=True``) or token ids. max_new_tokens >= 1; prompt +
        max_new_tokens <= max_seq_len. temperature (0 = greedy), top_k, top_p, seed: this
        request's sampling. stop_ids: None = the model's eos ids; [] = none. adapter: a name
        given at construction, or None for the base model. Raises ``RealmError`` for bad input
        (nothing is queued; other requests are unaffected).
        """
        try:
            h = self._validate(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, stop_ids=stop_ids, adapter=adapter, chat=chat)
        except RealmError:
            with self._lock:
                self._n["rejected"] += 1
            raise
        self._enqueue([h])
        return h

    def _enqueue(self, handles: list[RequestHandle]) -> None:
        with self._lock:
            if self._error is not None:
                raise RuntimeError(f"the engine stopped after a device error: {self._error}") from self._error
            for h in handles:
                h.id = next(self._ids)
                h.submitted_at = time.perf_counter()
                self._queue.append(h)
                self._n["submitted"] += 1
            self._wake.notify_all()

    def generate_many(self, requests: Sequence, **defaults) -> GenerationResult:
        """Run many requests to completion; a ``GenerationResult`` in request order.

        Each request is a dict of ``submit`` arguments (``prompt``, ``max_new_tokens``, ...) or
        just a prompt; ``defaults`` fill in what a request leaves out. All are validated before
        any is queued.
        """
        if isinstance(requests, (str, dict)) or not isinstance(requests, (list, tuple)):
            raise RealmError(f"requests: expected a list of prompts or dicts of submit arguments, "
                             f"got {type(requests).__name__}")
        handles = []
        for i, r in enumerate(requests):
            kw = dict(defaults)
            kw.update(r if isinstance(r, Mapping) else {"prompt": r})
            if "prompt" not in kw or "max_new_tokens" not in kw:
                raise RealmError(f"requests[{i}]: needs 'prompt' and 'max_new_tokens' (in the request or as defaults)")
            try:
                handles.append(self._validate(kw.pop("prompt"), kw.pop("max_new_tokens"), **kw))
            except RealmError as e:
                raise type(e)(f"requests[{i}]: {e}") from None
            except TypeError as e:
                raise RealmError(f"requests[{i}]: {e}") from None
        self._enqueue(handles)
        rows = [h.result() for h in handles]
        return GenerationResult([r.tokens for r in rows], [r.text for r in rows], [r.finish_reason for r in rows],
                                [r.prompt_length for r in rows])

    def _cancel(self, h: RequestHandle) -> bool:
        with self._lock:
            if h.done:
                return False
            if h in self._queue:
                self._queue.remove(h)
            else:
                for s, owner in enumerate(self._slots):
                    if owner is h:
                        self._slots[s] = None
                        self._kill[s] = True
            ok = h._push([], CANCELLED)
            if ok:
                self._n["cancelled"] += 1
            self._wake.notify_all()
            return ok

    # ------------------------------------------------------------------ the loop
    def _has_work_locked(self) -> bool:
        return bool(self._queue) or self._inflight is not None or any(h is not None for h in self._slots)

    @property
    def _background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _drive_once(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine stopped after a device error: {self._error}") from self._error
        with self._drive:
            self._step()

    def step(self) -> bool:
        """One round (from the calling thread): admit into free slots, dispatch a decode call, and
        deliver the previous call's tokens and the admitted rows' first tokens. False if there was
        nothing to do."""
        if self._background:
            raise RealmError("step: the background loop is running (engine.start()); stop() it first")
        with self._drive:
            return self._step()

    def _ends_in_flight(self, s: int, h: RequestHandle) -> bool:
        """Whether slot ``s``'s request ``h`` is certain to end within the decode call in flight:
        it was in that call with at most ``decode_steps_per_call`` tokens of its budget left
        (every token before that call has been delivered)."""
        return (self._inflight is not None and self._inflight.owners[s] is h
                and h.max_new_tokens - len(h._tokens) <= self.decode_steps_per_call)

    def _free_slots(self) -> list[int]:
        """Under the lock: empty slots, then (while requests wait) slots whose request ends within
        the decode call in flight. An admission into such a slot runs after that call on the
        device; the request still gets its last tokens from that call."""
        free = [s for s, h in enumerate(self._slots) if h is None]
        if len(free) < len(self._queue):
            free += [s for s, h in enumerate(self._slots) if h is not None and self._ends_in_flight(s, h)]
        return free

    def _plan(self) -> tuple[list[tuple[int, list[int], list[RequestHandle]]], np.ndarray]:
        """Under the lock: assign queued requests to free slots, in prefill-sized groups; take the
        cancelled slots' kill flags."""
        groups = []
        free = self._free_slots()
        # first come, first served decides who is admitted; within the admitted, prompts of
        # similar length share a prefill call, so each call's bucket fits its group tightly
        admitted = sorted((self._queue.popleft() for _ in range(min(len(free), len(self._queue)))),
                          key=lambda h: h.prompt_length)
        while admitted:
            rows = self._rows_for(len(admitted))
            hs, admitted = admitted[:rows], admitted[rows:]
            slots, free = free[:len(hs)], free[len(hs):]
            for s, h in zip(slots, hs):
                self._slots[s] = h
                self._kill[s] = False  # the insert overwrites a cancelled row
            groups.append((rows, slots, hs))
        kill = self._kill.copy()
        self._kill[:] = False
        return groups, kill

    def _rows_for(self, g: int) -> int:
        """The prefill size for ``g`` waiting prompts: the smallest size >= g unless more than
        half of it would be padding, else the largest size <= g (then more calls follow)."""
        up = [r for r in self.prefill_rows if r >= g]
        down = [r for r in self.prefill_rows if r <= g]
        if up and (not down or up[0] <= 2 * g):
            return up[0]
        return down[-1] if down else self.prefill_rows[-1]

    def _admission(self, p: int, slots: list[int], hs: list[RequestHandle]) -> tuple[np.ndarray, np.ndarray]:
        """The host tables of one prefill call (``engine_state.admission``)."""
        longest = max((h.prompt_length for h in hs), default=1)
        t = next(b for b in self.prefill_buckets if b >= longest)
        ints, floats = es.admission(p, t, self.stop_width, self.max_slots)
        e = t + self.stop_width + len(es.SETTINGS_COLS)
        for i, (s, h) in enumerate(zip(slots, hs)):
            ints[i, :h.prompt_length] = h.prompt_ids
            ints[i, t:e] = h._settings
            ints[i, e:] = (h.prompt_length, s)
            floats[i] = h._floats
        return ints, floats

    def _admit(self, ints: np.ndarray, floats: np.ndarray) -> jax.Array:
        t = time.perf_counter()
        self._state, out = es.admit_jit(self._params, self.model.config, self._state, ints, floats,
                                        adapters=self._adapters, dparams=self._dparams, spec=self._spec)
        out.copy_to_host_async()  # comes back as soon as it is ready
        self._dispatch += time.perf_counter() - t
        return out

    def _decode(self, kill) -> jax.Array:
        t = time.perf_counter()
        self._state, out = es.decode_jit(self._params, self.model.config, self._state, kill,
                                         steps=self.decode_steps_per_call, window=self.window,
                                         adapters=self._adapters, dparams=self._dparams, spec=self._spec, k=self.k)
        out.copy_to_host_async()
        self._dispatch += time.perf_counter() - t
        return out

    def _fetch(self, out: jax.Array) -> np.ndarray:
        t = time.perf_counter()
        host = np.asarray(out)
        self._wait += time.perf_counter() - t
        return host

    def _step(self) -> bool:
        """Caller holds ``_drive``. Admit, dispatch decode N, then (while it runs) deliver decode
        N - 1 and the admitted rows' first tokens."""
        t0 = time.perf_counter()
        with self._lock:
            if not self._has_work_locked():
                return False
            groups, kill = self._plan()
            owners = list(self._slots)
            # a decode call is needed unless every request in a slot ends at its admission (a budget
            # of one token) or within the call in flight
            run = kill.any() or any(h is not None and h.max_new_tokens > 1 and not self._ends_in_flight(s, h)
                                    for s, h in enumerate(owners))
        try:
            admitted = [(slots, hs, self._admit(*self._admission(rows, slots, hs))) for rows, slots, hs in groups]
            call = None
            if run:
                call = _Call(self._decode(kill if kill.any() else self._no_kill), owners)
            if self._inflight is not None:
                self._deliver_decode(self._inflight.owners, self._fetch(self._inflight.out))
            self._inflight = call
            for slots, hs, out in admitted:
                first = self._fetch(out)
                self._deliver([(s, h, [int(first[i, 0])], int(first[i, 1])) for i, (s, h) in enumerate(zip(slots, hs))])
        except BaseException as e:  # the donated state is gone: fail everything in flight
            self._crash(e)
            raise
        with self._lock:
            self._n["prefill_calls"] += len(groups)
            self._busy += time.perf_counter() - t0
            self._wake.notify_all()
        return True

    def _deliver_decode(self, owners: list, out: np.ndarray) -> None:
        """Hand a decode call's results [B, W + 6] to the handles that owned the slots when it was
        dispatched; count the call."""
        w = self.window
        count, status, live, passes, drafted, accepted = (out[:, w + j] for j in range(len(es.DECODE_COLS)))
        rows = np.flatnonzero((count > 0) | (status != es.RUNNING))
        self._deliver([(s, owners[s], out[s, :count[s]].tolist(), int(status[s]))
                       for s in rows.tolist() if owners[s] is not None and not owners[s].done])
        drafted, accepted = int(drafted.sum()), int(accepted.sum())
        with self._lock:
            self._n["decode_calls"] += 1
            self._n["target_passes"] += int(passes.sum())
            self._n["drafted"] += drafted
            self._n["accepted"] += accepted
            self._occupancy_sum += int(live.sum()) / self.max_slots
        if self.draft is not None and drafted:
            self.draft.record(drafted, accepted)

    def _deliver(self, items: list[tuple[int, RequestHandle, list[int], int]]) -> None:
        """Hand (slot, handle, new tokens, status) to the handles; a finished one resolves and
        frees its slot (unless the slot was already given to a new request). A handle that
        finished meanwhile (cancelled) takes nothing."""
        delivered = []
        for s, h, tokens, status in items:
            finish = None if status == es.RUNNING else ("stop" if status == es.STOPPED else "length")
            if h._push(tokens, finish):
                delivered.append((s, h, len(tokens), finish is not None))
        with self._lock:
            for s, h, n, done in delivered:
                self._n["generated_tokens"] += n
                if done:
                    if self._slots[s] is h:
                        self._slots[s] = None
                    self._n["completed"] += 1
                    self._ttfts.append(h.ttft)
                    self._latencies.append(h.latency)

    def _crash(self, err: BaseException) -> None:
        with self._lock:
            self._error = err
            pending = list(self._queue) + [h for h in self._slots if h is not None]
            if self._inflight is not None:
                pending += [h for h in self._inflight.owners if h is not None]
            self._queue.clear()
            self._slots = [None] * self.max_slots
            self._inflight = None
            self._wake.notify_all()
        for h in pending:
            h._fail(err)

    def run_until_idle(self, timeout: float | None = None) -> None:
        """Drive the loop until no request is queued or running (with a background loop: wait)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        if self._background:
            with self._lock:
                while self._has_work_locked() and self._error is None:
                    left = None if deadline is None else deadline - time.perf_counter()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"run_until_idle: still busy after {timeout} s")
                    self._wake.wait(0.1 if left is None else min(left, 0.1))
            return
        with self._drive:
            while self._step():
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError(f"run_until_idle: still busy after {timeout} s")

    def start(self) -> "Engine":
        """Run the loop on a background thread (``stop()`` ends it). Returns the engine."""
        with self._lock:
            if self._background:
                return self
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="realm-jax-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """End the background loop after its current step. Queued and running requests stay;
        ``start()`` or ``run_until_idle()`` continues them."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            t = self._thread
        if t is not None:
            t.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._has_work_locked():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                with self._drive:
                    self._step()
            except BaseException:
                return  # handles were failed by _crash

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ warm-up and statistics
    def warmup(self) -> None:
        """Compile every device program now (one prefill per bucket, one decode) so that no
        request waits for a compilation. Only while idle."""
        with self._drive:
            with self._lock:
                if self._has_work_locked():
                    raise RealmError("warmup: the engine is busy; call it before submitting requests")
            dispatched = self._dispatch
            outs = [self._admit(*es.admission(p, t, self.stop_width, self.max_slots))
                    for p, t in itertools.product(self.prefill_rows, self.prefill_buckets)]
            outs += [self._decode(self._no_kill), self._decode(self._kill.copy())]  # both kinds of kill flags
            jax.block_until_ready(outs)
            self._dispatch = dispatched  # compilation is not serving time

    def stats(self) -> EngineStats:
        with self._lock:
            n = self._n
            active = sum(h is not None for h in self._slots)
            calls = n["decode_calls"]
            ttfts, lats = list(self._ttfts), list(self._latencies)
            return EngineStats(
                queue_length=len(self._queue), active_slots=active, max_slots=self.max_slots,
                occupancy=active / self.max_slots, mean_occupancy=self._occupancy_sum / calls if calls else 0.0,
                submitted=n["submitted"], completed=n["completed"], cancelled=n["cancelled"], rejected=n["rejected"],
                generated_tokens=n["generated_tokens"], busy_s=self._busy,
                tokens_per_s=n["generated_tokens"] / self._busy if self._busy > 0 else 0.0,
                prefill_calls=n["prefill_calls"], decode_calls=calls,
                ttft_mean_s=float(np.mean(ttfts)) if ttfts else None, ttft_p50_s=_percentile(ttfts, 50),
                ttft_p90_s=_percentile(ttfts, 90),
                latency_mean_s=float(np.mean(lats)) if lats else None, latency_p50_s=_percentile(lats, 50),
                latency_p90_s=_percentile(lats, 90),
                target_passes=n["target_passes"], drafted=n["drafted"], accepted=n["accepted"], wait_s=self._wait,
                dispatch_s=self._dispatch)
