"""The engine's scheduling: the request queue, which slot each request runs in, and the admission
policy (first come, first served; the admitted grouped by prompt length; the prefill size and
prompt bucket of each group). With a paged KV cache (``blocks.BlockPool``) admission also waits
for free blocks, each decode call's blocks are taken before it is dispatched (``reserve``), and
a pool that runs short preempts the youngest running request (recompute: back to the queue's
front, prefilled again with the tokens it made). With prefix caching an admission first shares
the cached blocks of its context's longest cached run (``take``), and its prefill covers only
the rest; with chunked prefill (``chunk``) a request holds its slot while its context is
prefilled ``chunk`` tokens per step (``filling``), and it decodes only after its last chunk.

B = the engine's slots, P = rows per prefill call, T = a prompt bucket. The host arrays here are
the kill flags, bool [B] (slots whose request was cancelled, to be marked done by the next decode
call), and a decode call's results [B, W + 6] held in ``Call`` until they are fetched (see
``state``). A ``Scheduler`` is plain host bookkeeping: every method runs under the engine's lock.
"""

from __future__ import annotations

import collections
import itertools
import time
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..buckets import bucket_length
from ..errors import RealmError
from ..generation import _is_int
from .blocks import BlockPool, blocks_for, chain_keys


class Call(NamedTuple):
    """A decode call dispatched and not yet fetched: its results [B, W + 6] (``state.decode``;
    a future of them while its dispatch runs) and the handles that owned the slots when it was
    dispatched."""

    out: Any
    owners: list


def default_buckets(max_seq_len: int) -> tuple[int, ...]:
    """``buckets.bucket_length``'s sizes below ``max_seq_len`` (powers of two from 16, then
    multiples of 512), then ``max_seq_len``."""
    out, b = [], bucket_length(1)
    while b < max_seq_len:
        out.append(b)
        b = bucket_length(b + 1)
    return tuple(out) + (max_seq_len,)


def prefill_length(h) -> int:
    """The tokens of ``h``'s context at an admission: its prompt, and after a preemption the
    tokens it had made but the last (which the next decode step feeds)."""
    return h.prompt_length + max(h._resume - 1, 0)


def context(h) -> list[int]:
    """Those tokens (``prefill_length``)."""
    return h.prompt_ids + h._tokens[:max(h._resume - 1, 0)]


def prefix_start(h, block_size: int | None) -> int:
    """Where ``h``'s prefill starts: after the cached blocks its admission shares (0 without)."""
    return len(h._shared) * block_size if h._shared else 0


def filling(h) -> bool:
    """Whether ``h`` holds a slot while its prefill goes on in chunks (it is not decoding yet)."""
    return h is not None and h._filled < prefill_length(h)


def _cap(h) -> int:
    return h.prompt_length + h.max_new_tokens - 1


def _check_pos_int(name: str, value, low: int = 1) -> int:
    if not _is_int(value) or value < low:
        raise RealmError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def check_pages(block_size, num_blocks, max_slots: int, max_seq_len: int) -> tuple[int, int] | None:
    """The engine's paging settings validated: (block_size, num_blocks), or None (dense slots).
    num_blocks defaults to enough for every slot at max_seq_len (no preemption ever)."""
    if block_size is None:
        if num_blocks is not None:
            raise RealmError(f"num_blocks: needs block_size (the paged KV cache), got num_blocks={num_blocks!r} "
                             f"with block_size=None")
        return None
    bs = _check_pos_int("block_size", block_size)
    if bs > max_seq_len:
        raise RealmError(f"block_size: expected at most max_seq_len={max_seq_len}, got {bs}")
    per_seq = blocks_for(max_seq_len, bs)
    if num_blocks is None:
        return bs, max_slots * per_seq
    nb = _check_pos_int("num_blocks", num_blocks)
    if nb < per_seq:
        raise RealmError(f"num_blocks: the pool must hold at least one request of max_seq_len={max_seq_len} "
                         f"({per_seq} blocks of block_size={bs}), got {nb}")
    return bs, nb


class Scheduler:
    """The queue and the B slots' owners (a ``RequestHandle`` or None), with the settings that
    decide admissions: ``prefill_buckets`` (prompt lengths compiled for), ``prefill_rows`` (rows
    per prefill call) and ``decode_steps_per_call`` (validated here, with the engine's errors)."""

    def __init__(self, max_slots: int, max_seq_len: int, prefill_buckets: Sequence[int] | None,
                 prefill_batch, decode_steps_per_call, pages: BlockPool | None = None, chunk: int | None = None):
        self.max_slots = max_slots
        self.chunk = chunk  # chunked prefill: at most this many context tokens per request and step
        self.pages = pages  # the paged KV cache's blocks (None: every slot holds max_seq_len rows)
        buckets = default_buckets(max_seq_len) if prefill_buckets is None else prefill_buckets
        if (not isinstance(buckets, (list, tuple)) or not buckets
                or not all(_is_int(b) and 1 <= b <= max_seq_len for b in buckets)):
            raise RealmError(f"prefill_buckets: expected a non-empty list of ints in [1, max_seq_len="
                             f"{max_seq_len}], got {buckets!r}")
        self.prefill_buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.max_prompt_len = min(self.prefill_buckets[-1], max_seq_len - 1)
        # the prompt lengths compiled for: a preempted request comes back as its prompt and the
        # tokens it had made, which may be longer than any prompt bucket
        self.buckets = self.prefill_buckets
        if pages is not None and self.buckets[-1] < max_seq_len:
            self.buckets += (max_seq_len,)
        if prefill_batch is None:
            prefill_batch = tuple(sorted({1, min(max_slots, 8)}))
        sizes = prefill_batch if isinstance(prefill_batch, (list, tuple)) else (prefill_batch,)
        if not sizes or not all(_is_int(r) and 1 <= r <= max_slots for r in sizes):
            raise RealmError(f"prefill_batch: expected an int or a list of ints in [1, max_slots={max_slots}], "
                             f"got {prefill_batch!r}")
        self.prefill_rows = tuple(sorted(set(int(r) for r in sizes)))
        self.decode_steps_per_call = _check_pos_int("decode_steps_per_call", decode_steps_per_call)

        self.queue: collections.deque = collections.deque()  # RequestHandles, in arrival order
        self.slots: list = [None] * max_slots  # the RequestHandle in each slot, or None
        self.kill = np.zeros((max_slots,), bool)
        self.inflight: Call | None = None  # the decode call dispatched, results not yet fetched
        self._ids = itertools.count()

    # ---------------------------------------------------------------- the queue
    def enqueue(self, handles: list) -> None:
        for h in handles:
            h.id = next(self._ids)
            h.submitted_at = time.perf_counter()
            self.queue.append(h)

    def has_work(self) -> bool:
        return bool(self.queue) or self.inflight is not None or any(h is not None for h in self.slots)

    def active(self) -> int:
        return sum(h is not None for h in self.slots)

    def _keys(self, h, tokens: list[int], blocks: int) -> list[bytes]:
        return chain_keys(tokens, self.pages.block_size, h.cache_tag, blocks) if self.pages.prefix_caching else []

    def _vacate(self, s: int) -> None:
        """Slot ``s`` has no request now: its blocks go back to the pool, those fully written
        (its prompt, and the tokens delivered but the last, whose calls have run) entered in the
        prefix cache first."""
        h, self.slots[s] = self.slots[s], None
        if self.pages is not None and self.pages.held[s]:
            seq = h.prompt_ids + h._tokens
            written = h._filled if filling(h) else max(h.prompt_length + len(h._tokens) - 1, prefill_length(h))
            self.pages.release(s, self._keys(h, seq, written // self.pages.block_size))

    def cancel(self, h) -> None:
        """Take ``h`` out of the queue, or out of its slot (marking the slot to kill)."""
        if h in self.queue:
            self.queue.remove(h)
        else:
            for s, owner in enumerate(self.slots):
                if owner is h:
                    self._vacate(s)
                    self.kill[s] = True

    def release(self, s: int, h) -> None:
        """``h`` finished: free slot ``s`` unless it was already given to a new request."""
        if self.slots[s] is h:
            self._vacate(s)

    def pending(self) -> list:
        """Every handle queued, in a slot or in the call in flight, and not yet finished."""
        held = list(self.queue) + [h for h in self.slots if h is not None]
        if self.inflight is not None:
            held += [h for h in self.inflight.owners if h is not None]
        return [h for h in dict.fromkeys(held) if not h.done]

    def drain(self) -> list:
        """Empty the queue and the slots and forget the call in flight; every handle they held."""
        pending = list(self.queue) + [h for h in self.slots if h is not None]
        if self.inflight is not None:
            pending += [h for h in self.inflight.owners if h is not None]
        self.queue.clear()
        self.slots = [None] * self.max_slots
        self.inflight = None
        if self.pages is not None:
            self.pages.release_all()
        return pending

    # ---------------------------------------------------------------- admission
    def ends_in_flight(self, s: int, h) -> bool:
        """Whether slot ``s``'s request ``h`` is certain to end within the decode call in flight:
        it was in that call with at most ``decode_steps_per_call`` tokens of its budget left
        (every token before that call has been delivered)."""
        return (self.inflight is not None and self.inflight.owners[s] is h
                and h.max_new_tokens - len(h._tokens) <= self.decode_steps_per_call)

    def free_slots(self) -> list[int]:
        """Empty slots, then (while requests wait) slots whose request ends within the decode call
        in flight. An admission into such a slot runs after that call on the device; the request
        still gets its last tokens from that call."""
        free = [s for s, h in enumerate(self.slots) if h is None]
        if len(free) < len(self.queue):
            free += [s for s, h in enumerate(self.slots) if h is not None and self.ends_in_flight(s, h)]
        return free

    def plan(self) -> tuple[list[tuple[int, list[int], list]], np.ndarray]:
        """Assign queued requests to free slots, in prefill-sized groups (rows, slots, handles);
        take the cancelled slots' kill flags [B]."""
        groups = []
        free = self.free_slots()
        # first come, first served decides who is admitted; within the admitted, prompts of
        # similar length share a prefill call, so each call's bucket fits its group tightly (a
        # stable sort: the samples of one prompt stay together)
        # (chunked prefill: the requests whose prefill goes on keep their slots and come first)
        going = [(s, h) for s, h in enumerate(self.slots) if filling(h)]
        taken = self.take(free)
        for h in taken:
            h._filled = prefix_start(h, self.pages and self.pages.block_size)
        rows_in = going + list(zip(free, taken))
        rows_in.sort(key=lambda sh: self.remaining(sh[1]))
        placed = []
        while rows_in:
            rows = self.rows_for(len(rows_in))
            call, rows_in = rows_in[:rows], rows_in[rows:]
            for s, h in call:
                if self.slots[s] is not h:  # admitted now
                    self._vacate(s)  # a request ending in the call in flight: its blocks are free after it
                    self.slots[s] = h
                    if self.pages is not None:
                        self.pages.assign(s, prefill_length(h), _cap(h), h._shared)
                h._start = h._filled
                h._filled += self.remaining(h)  # this call's part of its context
                if not filling(h):
                    self.kill[s] = False  # the insert overwrites a cancelled row
                if self.pages is not None:
                    placed.append((s, h))
            groups.append((rows, [s for s, _ in call], [h for _, h in call]))
        # the prompts' full blocks are cached once this step's prefills are dispatched: a request
        # admitted later reads them after they are written (none of this step shares them)
        for s, h in placed:
            self.pages.register(s, self._keys(h, context(h), h._filled // self.pages.block_size))
        kill = self.kill.copy()
        self.kill[:] = False
        return groups, kill

    def remaining(self, h) -> int:
        """The tokens the next prefill call of ``h`` (queued, or holding its slot while its
        prefill goes on) covers: its context after the shared blocks and the chunks done, at
        most ``chunk`` of them unless it is one of a group's samples (prefilled whole)."""
        left = prefill_length(h) - h._filled
        return left if self.chunk is None or h.group is not None else min(left, self.chunk)

    def take(self, free: list[int]) -> list:
        """Pop the queue's head while it fits: in the ``free`` slots and, paged, in the pool, which
        must hold each one's prefill and first decode call besides the next decode call of every
        request already running (a request taking the i-th free slot takes the blocks of that
        slot's owner, which ends in the call in flight). The samples of one prompt (a
        ``RequestGroup``: queued together) are taken all or none, so a group waits, and the
        queue behind it, until enough slots are free (validation keeps a group <= B). Sets each
        one's ``_resume`` (tokens it made before a preemption; 0 = a new request)."""
        if any(h.done for h in self.queue):  # preempted, then ended by the call in flight
            self.queue = collections.deque(h for h in self.queue if not h.done)
        pages, w = self.pages, self.decode_steps_per_call
        owed = 0  # new blocks of the requests taken so far (``plan`` assigns them)
        taken: list = []
        while self.queue:
            g = self.queue[0].group
            unit = 1 if g is None else sum(1 for _ in itertools.takewhile(lambda h: h.group is g, self.queue))
            if len(taken) + unit > len(free):
                break
            hs = list(itertools.islice(self.queue, unit))
            for h in hs:
                h._resume = len(h._tokens)
                h._shared = []
                h._filled = 0
            if pages is not None:
                held = [s for s in free[len(taken):len(taken) + unit] if self.slots[s] is not None]
                for h in hs:  # the cached blocks it shares; at least one token is left to prefill
                    n = prefill_length(h)
                    h._shared = pages.lookup(self._keys(h, context(h), (n - 1) // pages.block_size))
                shared = [b for h in hs for b in h._shared]
                need = sum(pages.need(prefill_length(h) + w, _cap(h)) - len(h._shared) for h in hs)
                reserve = sum(pages.growth(s, w) for s, o in enumerate(self.slots) if o is not None and s not in held)
                if need + owed + reserve > pages.available + pages.gain(held, shared):
                    for h in hs:
                        h._shared = []
                    break
                for s in held:  # they end in the call in flight: their blocks are free after it
                    self._vacate(s)
                pages.pin(shared)
                owed += need
            taken += [self.queue.popleft() for _ in range(unit)]
        return taken

    @staticmethod
    def sources(hs: list) -> list[int]:
        """The prefill row of each row of a call of ``hs``: its own, or the first row of its
        ``RequestGroup`` in the call (the one row that prefills the group's prompt). A request
        back from a preemption prefills its own tokens, and no other row takes them."""
        out: list[int] = []
        for i, h in enumerate(hs):
            same = (i > 0 and h.group is not None and hs[i - 1].group is h.group
                    and not h._resume and not hs[i - 1]._resume)
            out.append(out[-1] if same else i)
        return out

    def reserve(self, kill: np.ndarray) -> list:
        """Paged: take the blocks every running request needs for the next decode call. While the
        pool is short, the youngest running request (the last to arrive) is preempted: it gives
        its blocks back, its slot is marked in ``kill`` [B] (this call's flags) and it goes back
        to the front of the queue, to be prefilled again with the tokens it made once they have
        all been delivered (the call in flight's are, before the next ``plan``). The preempted,
        oldest first."""
        pages = self.pages
        if pages is None:
            return []
        w = self.decode_steps_per_call
        running = [s for s, h in enumerate(self.slots) if h is not None and not filling(h)]
        preempted = []
        while sum(pages.growth(s, w) for s in running) > pages.available:
            s = max(running, key=lambda s: self.slots[s].id)
            running.remove(s)
            preempted.append(self.slots[s])
            self.slots[s].preemptions += 1
            self._vacate(s)
            kill[s] = True
        for s in running:
            pages.grow(s, w)
        preempted.sort(key=lambda h: h.id)
        self.queue.extendleft(reversed(preempted))
        return preempted

    def rows_for(self, g: int) -> int:
        """The prefill size for ``g`` waiting prompts: the smallest size >= g unless more than
        half of it would be padding, else the largest size <= g (then more calls follow)."""
        up = [r for r in self.prefill_rows if r >= g]
        down = [r for r in self.prefill_rows if r <= g]
        if up and (not down or up[0] <= 2 * g):
            return up[0]
        return down[-1] if down else self.prefill_rows[-1]

    def bucket_for(self, hs: list) -> int:
        """The prompt bucket (T) of a prefill call of ``hs`` (planned: each covers its context
        from ``_start`` to ``_filled``): the smallest that fits the longest."""
        longest = max((h._filled - h._start for h in hs), default=1)
        return next(b for b in self.buckets if b >= longest)

    def needs_decode(self, kill: np.ndarray, owners: list) -> bool:
        """Whether a decode call is needed: unless every request in a slot ends at its admission
        (a budget of one token) or within the call in flight, and no slot is to be killed."""
        return bool(kill.any()) or any(h is not None and h.max_new_tokens > 1 and not self.ends_in_flight(s, h)
                                       and not filling(h) for s, h in enumerate(owners))
