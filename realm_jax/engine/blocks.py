"""The engine's paged KV blocks on the host: the free list of the device pool, the blocks each
slot holds, and the block table the device reads.

NB = blocks in the pool, bs = positions per block, B = slots, M = blocks a slot may hold
(ceil(max_seq_len / bs)). The table is host int32 [B, M] (``state.decode`` takes it with every
call, an admission takes its rows); an entry of NB means no block. Plain bookkeeping: every
method runs under the engine's lock.

A slot's ``positions`` is an upper bound on the cache positions its request will have written
once every call dispatched so far has run (a decode call of W steps writes at most W positions
per slot); ``cap`` is the most it can ever write (prompt + max_new_tokens - 1: the last token is
never fed back). Blocks are taken for positions before the call that writes them is dispatched,
and given back when the slot's request ends, is cancelled or is preempted.

Reusing a freed block is safe without waiting for the device: the device runs the calls in the
order they were dispatched, so the old owner's last write lands before the new owner's first, a
row only reads positions it has written, and a row never writes into blocks outside its table
row as dispatched (``kv_cache.page_slots`` drops writes of rows that do not advance).
"""

from __future__ import annotations

import numpy as np

from ..errors import RealmError


def blocks_for(positions: int, block_size: int) -> int:
    return -(-positions // block_size)


def check_pages(block_size, num_blocks, max_slots: int, max_seq_len: int) -> tuple[int, int] | None:
    """The engine's paging settings validated: (block_size, num_blocks), or None (dense slots).
    num_blocks defaults to enough for every slot at max_seq_len (no preemption ever)."""
    from .scheduler import _check_pos_int

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


class BlockPool:
    """The free list of ``num_blocks`` blocks of ``block_size`` positions, and per slot of
    ``slots``: the blocks it holds (in position order), ``positions`` and ``cap`` (see the
    module doc), and ``table`` [B, M] int32."""

    def __init__(self, num_blocks: int, block_size: int, slots: int, max_seq_len: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_blocks = blocks_for(max_seq_len, block_size)  # M
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # popped from the end: 0, 1, ...
        self.held: list[list[int]] = [[] for _ in range(slots)]
        self.positions = [0] * slots
        self.cap = [0] * slots
        self.table = np.full((slots, self.max_blocks), num_blocks, np.int32)

    @property
    def in_use(self) -> int:
        return self.num_blocks - len(self.free)

    def need(self, positions: int, cap: int) -> int:
        """Blocks a new slot needs for ``positions`` (capped at ``cap``)."""
        return blocks_for(min(positions, cap), self.block_size)

    def growth(self, s: int, window: int) -> int:
        """More blocks slot ``s`` needs for a call that writes up to ``window`` positions."""
        return self.need(self.positions[s] + window, self.cap[s]) - len(self.held[s])

    def _take(self, s: int, n: int) -> None:
        if n > len(self.free):
            raise RealmError(f"paged KV cache: {n} blocks wanted, {len(self.free)} free (a scheduling bug)")
        have = len(self.held[s])
        new = [self.free.pop() for _ in range(n)]
        self.held[s].extend(new)
        self.table[s, have:have + n] = new

    def assign(self, s: int, positions: int, cap: int) -> None:
        """Give empty slot ``s`` the blocks of its first ``positions`` (a prefill); at most ``cap``
        positions ever."""
        assert not self.held[s], f"slot {s} still holds blocks"
        self.cap[s] = cap
        self.positions[s] = positions
        self._take(s, self.need(positions, cap))

    def grow(self, s: int, window: int) -> None:
        """Take the blocks of slot ``s``'s next ``window`` positions (a decode call)."""
        self._take(s, self.growth(s, window))
        self.positions[s] = min(self.positions[s] + window, self.cap[s])

    def release(self, s: int) -> int:
        """Slot ``s`` gives its blocks back (no-op when it holds none); how many."""
        n = len(self.held[s])
        self.free.extend(reversed(self.held[s]))
        self.held[s] = []
        self.positions[s] = self.cap[s] = 0
        self.table[s] = self.num_blocks
        return n

    def release_all(self) -> None:
        for s in range(len(self.held)):
            self.release(s)
