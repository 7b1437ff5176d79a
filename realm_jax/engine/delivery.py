"""The engine's delivery and statistics: request handles (results, streaming, finish reasons,
waiting with a timeout), handing device results to them, and the engine's counters and timings.

B = the engine's slots, W = tokens a decode call can hand back per slot, E = the stop-id table
width, N = the engine's log-prob alternatives. Arrays here are host numpy: a decode call's results
[B, W + 6 (+ W (2 + 2N))] (``state.decode``: the new tokens, then ``state.DECODE_COLS``, then with
log-probs ``state.logprob_cols``), an admission's [P, 2 (+ 2 + 2N)], and each handle's fixed
admission row (``state.request_settings``). Tokens reach handles as Python ints, log-probs as
``TokenLogprob``s (for the requests that asked for them).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Iterator, NamedTuple

import numpy as np

from ..generation import TokenLogprob, _token_logprobs, visible_text
from ..stop_strings import StopScan
from . import state as es

CANCELLED = "cancelled"


@dataclasses.dataclass
class RequestResult:
    """One request's output, the per-row fields of ``GenerationResult``: ``tokens`` (new ids; a
    stop id that ended it is the last), ``text`` (None without a tokenizer), ``finish_reason``
    ("stop", "length" or "cancelled") and ``prompt_length``; ``cancel_reason`` says why a
    cancelled request was (``cancel()`` or ``Engine.close()``), else None."""

    tokens: list[int]
    text: str | None
    finish_reason: str
    prompt_length: int
    cancel_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # with ``logprobs=n``: one per token
    cumulative_logprob: float | None = None  # their sum (model log-probs)


class Chunk(NamedTuple):
    """What ``chunks()`` and ``Cursor.poll()`` give: the new tokens and text, the finish reason
    (None until the last chunk), and with ``logprobs=n`` the new tokens' ``TokenLogprob``s."""

    tokens: list[int]
    text: str | None
    finish: str | None
    logprobs: list[TokenLogprob] | None = None


class RequestHandle:
    """A submitted request: ``result()``, ``stream()``, ``cancel()``, timings."""

    def __init__(self, engine, rid: int, prompt_ids: list[int], max_new_tokens: int,
                 adapter: str | None, settings: np.ndarray, floats: np.ndarray, constraint_key: int = -1,
                 stops: tuple = (), logprobs: int | None = None):
        self._engine = engine
        self.id = rid
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.adapter = adapter
        self._settings = settings  # int32 [E + 4]: its part of an admission row (state.request_settings)
        self._floats = floats  # float32 [6 + L]: state.FLOAT_COLS, then logit-bias values
        self._constraint_key = constraint_key  # its grammar matcher (constraints.register), -1 = none
        self._tokens: list[int] = []
        self._resume = 0  # tokens made before a preemption, at its latest admission (0: none)
        self.preemptions = 0  # times the paged engine preempted it (recomputed it later)
        self.cache_tag = b""  # prefix caching: its adapter's tag in the block keys (set when queued)
        self._shared: list[int] = []  # prefix caching: the cached blocks its latest admission shares
        self._filled = 0  # context tokens in its blocks once the prefill calls dispatched have run
        self._start = 0  # where its latest prefill call started
        self.logprobs = logprobs  # alternatives asked for (None: no log-probs)
        self._lps: list[TokenLogprob] = []  # one per token in _tokens (with logprobs)
        self.stop = tuple(stops)  # its stop strings (checked here, on the host, as tokens arrive)
        tok = getattr(engine.model, "tokenizer", None)
        self._scan = StopScan(tok.decode, self.stop) if self.stop else None
        self._cut: int | None = None  # where a matched stop string begins in the text
        self.ended_on_host = False  # ended by a stop string: its slot is still running on the device
        self.group: RequestGroup | None = None  # the samples of its prompt it belongs to (n, best_of)
        self._listeners: list = []  # on_update callbacks
        self._cond = threading.Condition()
        self._finish: str | None = None
        self.cancel_reason: str | None = None  # why it was cancelled (cancel() or Engine.close())
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
    def _push(self, tokens: list[int], finish: str | None = None, logprobs: list | None = None) -> bool:
        """Append tokens (Python ints), their ``TokenLogprob``s (with ``logprobs``) and finish;
        False if the handle had already finished (e.g. cancelled)."""
        with self._cond:
            if self.done:
                return False
            now = time.perf_counter()
            if tokens and self.first_token_at is None:
                self.first_token_at = now
            self._tokens.extend(tokens)
            if logprobs is not None:
                self._lps.extend(logprobs)
            if self._scan is not None and finish != CANCELLED:
                hit = self._scan.scan(self._tokens)
                if hit is not None:  # ends with the token that completed the match
                    k, self._cut = hit
                    del self._tokens[k:]
                    del self._lps[k:]
                    self.ended_on_host = finish is None
                    finish = "stop"
            if finish is not None:
                self._finish = finish
                self.finished_at = now
                self._release()
            self._cond.notify_all()
        self._notify()
        return True

    def _release(self) -> None:
        """Forget the request's grammar matcher (it has ended)."""
        if self._constraint_key >= 0:
            from ..constraints import release

            release([self._constraint_key])
            self._constraint_key = -1

    def _fail(self, err: BaseException) -> None:
        with self._cond:
            if not self.done:
                self._error = err
                self.finished_at = time.perf_counter()
                self._release()
            self._cond.notify_all()
        self._notify()

    # ---------------------------------------------------------------- user side
    def _wait(self, until, timeout: float | None) -> None:
        """Block until ``until()`` holds, driving the engine when no background loop runs."""
        deadline = None if timeout is None else time.perf_counter() + timeout

        def timeout_error():
            return TimeoutError(f"request {self.id}: not finished after {timeout} s")

        while True:
            with self._cond:
                if until():
                    return
                if self._engine._background:
                    wait_a_while(self._cond, deadline, timeout_error)
                    continue
            if past(deadline):
                raise timeout_error()
            self._engine._drive_once()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"request {self.id} failed: {self._error}") from self._error

    def result(self, timeout: float | None = None) -> RequestResult:
        """Block until the request ends; its ``RequestResult``. Re-raises a device error."""
        self._wait(lambda: self.done, timeout)
        self._raise_error()
        with self._cond:
            tokens, lps = list(self._tokens), list(self._lps)
        with_lp = self.logprobs is not None
        return RequestResult(tokens, self._text(tokens, True, self._finish, self._cut), self._finish, self.prompt_length,
                             self.cancel_reason if self._finish == CANCELLED else None, lps if with_lp else None,
                             float(sum(t.logprob for t in lps)) if with_lp else None)

    @property
    def stop_ids(self) -> list[int]:
        return [int(i) for i in self._settings[:self._engine.stop_width] if i >= 0]

    def _text(self, tokens: list[int], finished: bool, finish: str | None, cut: int | None) -> str | None:
        """The visible text of a snapshot (tokens, done, finish reason, stop-string cut)."""
        tok = getattr(self._engine.model, "tokenizer", None)
        if tok is None:
            return None
        return visible_text(tok, tokens, stopped=finish == "stop", stop_ids=self.stop_ids, cut=cut,
                            finished=finished, stops=self.stop)

    def chunks(self, timeout: float | None = None) -> Iterator[Chunk]:
        """Yield ``Chunk(new tokens, new text, finish reason, new log-probs)`` as tokens reach the
        host, until the request ends (the reason is None before the last chunk). The texts
        concatenate to ``result().text`` and never show what a later stop-string match removes
        (None without a tokenizer)."""
        cur = self.cursor()
        while True:
            self._wait(lambda: len(self._tokens) > cur.seen or self.done, timeout)
            chunk = cur.poll()
            yield chunk
            if chunk.finish is not None:
                return

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Yield the request's tokens as they reach the host, until it ends (``chunks`` for the
        text and log-probs too)."""
        for chunk in self.chunks(timeout):
            yield from chunk.tokens

    def cursor(self) -> "Cursor":
        """A non-blocking reader of ``chunks`` (for callers with their own waiting, e.g. an event
        loop woken by ``on_update``)."""
        return Cursor(self)

    def on_update(self, fn) -> None:
        """Call ``fn()`` (from the engine's thread; it must not block) whenever tokens arrive or
        the request ends; at once if it has ended."""
        with self._cond:
            self._listeners.append(fn)
            ended = self.done
        if ended:
            fn()

    def _notify(self) -> None:
        for fn in list(self._listeners):
            fn()

    def cancel(self) -> bool:
        """Stop the request now (its slot frees at the next step); ``result()`` then gives the
        tokens so far with finish reason "cancelled". False if it had already ended."""
        return self._engine._cancel([self])

    def __repr__(self) -> str:
        state = self._finish or ("error" if self._error else "running")
        return f"RequestHandle(id={self.id}, prompt_length={self.prompt_length}, tokens={len(self._tokens)}, {state})"


class RequestGroup:
    """The samples of one prompt submitted with ``n`` > 1 or ``best_of``: ``handles``, one
    ``RequestHandle`` per sample (sample j drew with seed + j; with ``best_of``, all ``best_of``
    of them), admitted together and sharing one prefill. Each handle streams, waits and reports
    on its own; ``cancel()`` ends them all (their slots free at the next step); ``results()``
    gives the ``n`` results."""

    def __init__(self, handles: list[RequestHandle], n: int, best_of: int | None, logprobs: bool):
        self.handles = list(handles)
        self.n, self.best_of = n, best_of
        self._logprobs = logprobs  # the caller asked for log-probs (best_of keeps them regardless)
        for h in self.handles:
            h.group = self

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[RequestHandle]:
        return iter(self.handles)

    def __getitem__(self, j: int) -> RequestHandle:
        return self.handles[j]

    @property
    def done(self) -> bool:
        return all(h.done for h in self.handles)

    def results(self, timeout: float | None = None) -> list[RequestResult]:
        """Block until every sample ends; the ``n`` ``RequestResult``s: in sample order, or with
        ``best_of`` the ``n`` of the highest cumulative log-prob, best first (ties: the lower
        sample), as ``generate`` picks them (log-probs only if asked for)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        rows = [h.result(None if deadline is None else max(0.0, deadline - time.perf_counter()))
                for h in self.handles]
        if self.best_of is None:
            return rows
        order = sorted(range(len(rows)), key=lambda i: (-rows[i].cumulative_logprob, i))[:self.n]
        if self._logprobs:
            return [rows[i] for i in order]
        return [dataclasses.replace(rows[i], logprobs=None, cumulative_logprob=None) for i in order]

    def cancel(self) -> bool:
        """Cancel every sample still running; False if all had already ended."""
        return self.handles[0]._engine._cancel(self.handles)

    def __repr__(self) -> str:
        return f"RequestGroup(n={self.n}, best_of={self.best_of}, {self.handles!r})"


class Cursor:
    """Where a reader of a handle's output is: ``poll()`` -> the ``Chunk`` since the last poll,
    without waiting (empty lists and "" while nothing is new; the reason is set on the last
    chunk). Re-raises the request's device error."""

    def __init__(self, handle: RequestHandle):
        self.handle, self.seen, self.shown = handle, 0, ""

    def poll(self) -> Chunk:
        h = self.handle
        with h._cond:
            tokens, finished, finish, cut = list(h._tokens), h.done, h._finish, h._cut
            lps = h._lps[self.seen:len(tokens)] if h.logprobs is not None else None
        if finished:
            h._raise_error()
        text = h._text(tokens, finished, finish, cut)
        delta = None if text is None else text[len(self.shown):]
        self.shown = text
        new, self.seen = tokens[self.seen:], len(tokens)
        return Chunk(new, delta, finish if finished else None, lps)


# ------------------------------------------------------------------------------ waiting
def wait_a_while(cond: threading.Condition, deadline: float | None, timeout_error) -> None:
    """With ``cond`` held: wait on it up to 0.1 s, not past ``deadline`` (``perf_counter`` time;
    None = none); raise ``timeout_error()`` if the deadline has passed."""
    left = None if deadline is None else deadline - time.perf_counter()
    if left is not None and left <= 0:
        raise timeout_error()
    cond.wait(0.1 if left is None else min(left, 0.1))


def past(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline


# ------------------------------------------------------------------------------ handing results over
def finish_reason(status: int) -> str | None:
    """A device status (``state.RUNNING``/``ENDED``/``STOPPED``) as a finish reason (None: running)."""
    return None if status == es.RUNNING else ("stop" if status == es.STOPPED else "length")


def push(items: list) -> list[tuple[int, RequestHandle, int, bool]]:
    """Hand (slot, handle, new tokens, status, their log-probs or None) to the handles; (slot,
    handle, tokens taken, finished) for each that took them. A handle that finished meanwhile
    (cancelled) takes nothing."""
    delivered = []
    for s, h, tokens, status, lps in items:
        if h._push(tokens, finish_reason(status), lps):  # a stop string may end it before the device does
            delivered.append((s, h, len(tokens), h.done))
    return delivered


def _logprobs_of(h: RequestHandle, trace, row: int, tokens: list[int]) -> list[TokenLogprob] | None:
    """The ``TokenLogprob``s of ``tokens`` (row ``row`` of a host trace [R, W(, N)]) with the
    handle's number of alternatives; None for a handle that asked for none."""
    if h.logprobs is None or trace is None:
        return None
    n = h.logprobs
    return _token_logprobs((trace.logprob, trace.sampled, trace.top_ids[..., :n], trace.top[..., :n]), row, tokens,
                           len(tokens))


def admit_items(slots: list[int], handles: list, out: np.ndarray, top_logprobs: int | None) -> list:
    """An admission's answer [P, 2 (+ 2 + 2N)] as ``push`` items (each row's first token; none
    for a request that came back from a preemption: its tokens were delivered before)."""
    trace = None if top_logprobs is None else es.unpack_logprobs(out[:, len(es.ADMIT_COLS):], top_logprobs)
    items = []
    for i, (s, h) in enumerate(zip(slots, handles)):
        if h._resume or s is None:  # s None: a chunk of its prefill before the last
            continue
        first = [int(out[i, 0])]
        items.append((s, h, first, int(out[i, 1]), _logprobs_of(h, trace, i, first)))
    return items


def decode_items(owners: list, out: np.ndarray, window: int, top_logprobs: int | None = None):
    """A decode call's results [B, W + 6 (+ W (2 + 2N))] as ``push`` items for the handles that
    owned the slots when it was dispatched (rows with new tokens or a new end), and the call's
    totals: target passes, drafted, accepted, and live slots at its start."""
    ncols = window + len(es.DECODE_COLS)
    count, status, live, passes, drafted, accepted = (out[:, window + j] for j in range(len(es.DECODE_COLS)))
    trace = None if top_logprobs is None else es.unpack_logprobs(out[:, ncols:], top_logprobs)
    rows = np.flatnonzero((count > 0) | (status != es.RUNNING))
    items = []
    for s in rows.tolist():
        h = owners[s]
        if h is None or h.done:
            continue
        tokens = out[s, :count[s]].tolist()
        items.append((s, h, tokens, int(status[s]), _logprobs_of(h, trace, s, tokens)))
    return items, int(passes.sum()), int(drafted.sum()), int(accepted.sum()), int(live.sum())


# ------------------------------------------------------------------------------ statistics
@dataclasses.dataclass
class EngineStats:
    """A snapshot. Times in seconds; ``tokens_per_s`` = generated tokens / time spent in steps
    (``busy_s``), of which ``wait_s`` the host waited for device results and ``dispatch_s`` it
    spent inside the jitted calls' dispatch (argument transfer, launch; blocking there means the
    device is the bottleneck); the rest is host bookkeeping, which overlaps the device's work.
    ``mean_occupancy`` = slots running at the start of a decode
    call / max_slots, averaged over decode calls; TTFT and latency over finished (not cancelled)
    requests; speculative counts are 0 without a draft. With the paged KV cache (``block_size``):
    ``blocks_in_use`` / ``blocks_free`` of the pool now, and ``preemptions``: running requests
    that gave their blocks back to be prefilled again later (all 0 without paging). With prefix
    caching: ``blocks_cached`` (blocks holding a cached prefix, held by requests or not: those
    held by none count in ``blocks_free``, being reclaimable), ``prompt_tokens`` (the contexts
    admissions prefilled: prompts, and a preempted request's tokens when it comes back; a
    group's prompt once per prefill call) and ``cached_prompt_tokens`` (of those, read from
    cached blocks instead of being prefilled); ``prefix_hit_rate`` is their ratio."""

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
    blocks_in_use: int = 0
    blocks_free: int = 0
    preemptions: int = 0
    blocks_cached: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0

    @property
    def prefix_hit_rate(self) -> float | None:
        """Prompt tokens served from the prefix cache / prompt tokens admitted (None before any)."""
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else None

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
        if self.blocks_in_use or self.blocks_free:
            s += f" blocks={self.blocks_in_use}/{self.blocks_in_use + self.blocks_free} preemptions={self.preemptions}"
        if self.blocks_cached:
            s += f" cached_blocks={self.blocks_cached} prefix_hit_rate={self.prefix_hit_rate:.2f}"
        return s


def _percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def _spread(xs: list[float]) -> tuple[float | None, float | None, float | None]:
    """Mean, p50, p90 (None each without samples)."""
    return (float(np.mean(xs)) if xs else None), _percentile(xs, 50), _percentile(xs, 90)


class Stats:
    """The engine's counters (``n``: submitted, rejected, cancelled, completed, generated_tokens,
    prefill_calls, decode_calls, target_passes, drafted, accepted, preemptions, prompt_tokens,
    cached_prompt_tokens), the host seconds spent in steps
    (``busy``), the summed occupancy of decode calls, and the finished requests' TTFTs and
    latencies (the last 100,000). Updated under the engine's lock."""

    def __init__(self):
        self.n = collections.Counter()
        self.busy = 0.0
        self.occupancy_sum = 0.0
        self.ttfts: collections.deque[float] = collections.deque(maxlen=100_000)
        self.latencies: collections.deque[float] = collections.deque(maxlen=100_000)

    def delivered(self, delivered: list[tuple[int, RequestHandle, int, bool]]) -> None:
        """Count what ``push`` delivered: tokens, and the requests it finished."""
        for _, h, n, done in delivered:
            self.n["generated_tokens"] += n
            if done:
                self.n["completed"] += 1
                self.ttfts.append(h.ttft)
                self.latencies.append(h.latency)

    def decoded(self, passes: int, drafted: int, accepted: int, occupancy: float) -> None:
        """Count one decode call (``decode_items``' totals; occupancy = live slots / B)."""
        self.n["decode_calls"] += 1
        self.n["target_passes"] += passes
        self.n["drafted"] += drafted
        self.n["accepted"] += accepted
        self.occupancy_sum += occupancy

    def copy(self) -> "Stats":
        """A copy to build a snapshot from (cheap: taken under the engine's lock, so that
        ``snapshot``'s percentiles, O(samples), are computed after the lock is let go)."""
        c = Stats()
        c.n, c.busy, c.occupancy_sum = collections.Counter(self.n), self.busy, self.occupancy_sum
        c.ttfts.extend(self.ttfts)
        c.latencies.extend(self.latencies)
        return c

    def snapshot(self, *, queue_length: int, active: int, max_slots: int, wait_s: float,
                 dispatch_s: float, blocks: tuple[int, int, int] = (0, 0, 0)) -> EngineStats:
        """``blocks``: the paged pool's blocks (in use, free or reclaimable, holding a cached prefix)."""
        n = self.n
        calls = n["decode_calls"]
        ttft_mean, ttft_p50, ttft_p90 = _spread(list(self.ttfts))
        lat_mean, lat_p50, lat_p90 = _spread(list(self.latencies))
        return EngineStats(
            queue_length=queue_length, active_slots=active, max_slots=max_slots,
            occupancy=active / max_slots, mean_occupancy=self.occupancy_sum / calls if calls else 0.0,
            submitted=n["submitted"], completed=n["completed"], cancelled=n["cancelled"], rejected=n["rejected"],
            generated_tokens=n["generated_tokens"], busy_s=self.busy,
            tokens_per_s=n["generated_tokens"] / self.busy if self.busy > 0 else 0.0,
            prefill_calls=n["prefill_calls"], decode_calls=calls,
            ttft_mean_s=ttft_mean, ttft_p50_s=ttft_p50, ttft_p90_s=ttft_p90,
            latency_mean_s=lat_mean, latency_p50_s=lat_p50, latency_p90_s=lat_p90,
            target_passes=n["target_passes"], drafted=n["drafted"], accepted=n["accepted"], wait_s=wait_s,
            dispatch_s=dispatch_s, blocks_in_use=blocks[0], blocks_free=blocks[1], preemptions=n["preemptions"],
            blocks_cached=blocks[2], prompt_tokens=n["prompt_tokens"], cached_prompt_tokens=n["cached_prompt_tokens"])
