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

**Prefix caching** (``prefix_caching=True``): a full block is known by the key of its tokens,
a chain (``chain_keys``: block i's key is a SHA-256 digest of block i - 1's key, the adapter's
tag and the block's token ids as int32 bytes), so one key names the whole prefix up to the end
of its block, under one adapter. ``cached`` maps keys to blocks holding them. A block has a
reference count: the slots holding it. A new request looks its context's full blocks up
(``lookup``); the longest chain found is shared (referenced, never written: the request's
tokens start after it, in blocks of its own), and its remaining full prompt blocks are entered
in ``cached`` once its prefill is dispatched (``register``). When a slot lets go of its blocks
(``release``), those of them fully written (its prompt, and the tokens it made but the last)
are entered too, and a block no slot references goes to ``lru`` if it is cached, else to
``free``. Taking a block takes a free one, else evicts the least recently released cached
block (its key forgotten): cached-but-unreferenced blocks are reclaimable, so ``available``
counts them, and eviction always comes before preemption. A slot's blocks go to the LRU tail
first, so a chain is evicted from its end and its head stays findable longest.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

from ..errors import RealmError


def blocks_for(positions: int, block_size: int) -> int:
    return -(-positions // block_size)


def chain_keys(tokens, block_size: int, tag: bytes, blocks: int) -> list[bytes]:
    """The keys of the first ``blocks`` full blocks of ``tokens`` under the adapter ``tag``
    (see the module doc): 32-byte SHA-256 digests, so distinct prefixes never share a key in
    practice."""
    ids = np.asarray(tokens[:blocks * block_size], dtype="<i4")
    keys, prev = [], b""
    for i in range(blocks):
        prev = hashlib.sha256(prev + tag + ids[i * block_size:(i + 1) * block_size].tobytes()).digest()
        keys.append(prev)
    return keys


class BlockPool:
    """The free list of ``num_blocks`` blocks of ``block_size`` positions, and per slot of
    ``slots``: the blocks it holds (in position order), ``positions`` and ``cap`` (see the
    module doc), and ``table`` [B, M] int32. ``refs`` [NB]: the slots holding each block; with
    ``prefix_caching``, ``cached`` (key -> block), ``key_of`` (block -> key) and ``lru`` (cached
    blocks no slot holds, least recently released first)."""

    def __init__(self, num_blocks: int, block_size: int, slots: int, max_seq_len: int, prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_blocks = blocks_for(max_seq_len, block_size)  # M
        self.prefix_caching = prefix_caching
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # popped from the end: 0, 1, ...
        self.refs = np.zeros((num_blocks,), np.int32)
        self.cached: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.held: list[list[int]] = [[] for _ in range(slots)]
        self.positions = [0] * slots
        self.cap = [0] * slots
        self.table = np.full((slots, self.max_blocks), num_blocks, np.int32)

    @property
    def available(self) -> int:
        """Blocks that can be taken now: free, or cached and held by no slot (evicted when taken)."""
        return len(self.free) + len(self.lru)

    @property
    def in_use(self) -> int:
        """Blocks some slot holds (a shared block once)."""
        return self.num_blocks - self.available

    def need(self, positions: int, cap: int) -> int:
        """Blocks a new slot needs for ``positions`` (capped at ``cap``)."""
        return blocks_for(min(positions, cap), self.block_size)

    def growth(self, s: int, window: int) -> int:
        """More blocks slot ``s`` needs for a call that writes up to ``window`` positions."""
        return self.need(self.positions[s] + window, self.cap[s]) - len(self.held[s])

    # ---------------------------------------------------------------- prefix cache
    def lookup(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of ``keys`` from the first (none without
        prefix caching)."""
        out = []
        for k in keys if self.prefix_caching else ():
            b = self.cached.get(k)
            if b is None:
                break
            out.append(b)
        return out

    def pin(self, blocks: list[int]) -> None:
        """Reference ``blocks`` (cached ones a request shares) before its slot holds them."""
        for b in blocks:
            self.refs[b] += 1
            self.lru.pop(b, None)

    def gain(self, slots: list[int], shared: list[int]) -> int:
        """Blocks ``available`` would gain if ``slots`` let go of theirs and then the blocks
        ``shared`` were pinned (a request taking the slots of requests that end)."""
        drop = collections.Counter(b for s in slots for b in self.held[s])
        freed = sum(1 for b, n in drop.items() if self.refs[b] == n)
        pinned = sum(1 for b in set(shared) if self.refs[b] == drop.get(b, 0))
        return freed - pinned

    def register(self, s: int, keys: list[bytes]) -> None:
        """Enter slot ``s``'s blocks under ``keys`` (its first len(keys) blocks, fully written
        or about to be by a call dispatched before any that reads them); a key already cached
        keeps its block (this one stays private)."""
        if not self.prefix_caching:
            return
        for k, b in zip(keys, self.held[s]):
            if k not in self.cached and b not in self.key_of:
                self.cached[k] = b
                self.key_of[b] = k

    def _drop(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] == 0:
            if b in self.key_of:
                self.lru[b] = None
            else:
                self.free.append(b)

    def _fresh(self) -> int:
        if self.free:
            return self.free.pop()
        b, _ = self.lru.popitem(last=False)  # evict the least recently released cached block
        del self.cached[self.key_of.pop(b)]
        return b

    # ---------------------------------------------------------------- slots
    def _take(self, s: int, n: int) -> None:
        if n > self.available:
            raise RealmError(f"paged KV cache: {n} blocks wanted, {self.available} available (a scheduling bug)")
        have = len(self.held[s])
        new = [self._fresh() for _ in range(n)]
        for b in new:
            self.refs[b] += 1
        self.held[s].extend(new)
        self.table[s, have:have + n] = new

    def assign(self, s: int, positions: int, cap: int, shared: list[int] = ()) -> None:
        """Give empty slot ``s`` the blocks of its first ``positions`` (a prefill): ``shared``
        (cached blocks, already pinned), then blocks of its own; at most ``cap`` positions ever."""
        assert not self.held[s], f"slot {s} still holds blocks"
        self.cap[s] = cap
        self.positions[s] = positions
        self.held[s] = list(shared)
        self.table[s, :len(shared)] = list(shared)
        self._take(s, self.need(positions, cap) - len(shared))

    def grow(self, s: int, window: int) -> None:
        """Take the blocks of slot ``s``'s next ``window`` positions (a decode call)."""
        self._take(s, self.growth(s, window))
        self.positions[s] = min(self.positions[s] + window, self.cap[s])

    def release(self, s: int, keys: list[bytes] = ()) -> int:
        """Slot ``s`` lets go of its blocks (no-op when it holds none), entering its first
        len(``keys``) blocks in the prefix cache first (``register``); how many it held."""
        self.register(s, keys)
        n = len(self.held[s])
        for b in reversed(self.held[s]):  # the tail first: a chain is evicted from its end
            self._drop(b)
        self.held[s] = []
        self.positions[s] = self.cap[s] = 0
        self.table[s] = self.num_blocks
        return n

    def release_all(self) -> None:
        for s in range(len(self.held)):
            self.release(s)
