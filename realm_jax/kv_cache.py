"""KV caches: the dense ``KVCache`` (keys/values ``[L, B, S, K, H]``) and the paged
``PagedKVCache`` (fixed-size blocks of one pool, found through a block table), each with
per-row valid lengths ``[B]``.

Slot s of row b holds the key/value of absolute position s. ``lengths[b]`` slots are valid;
anything beyond is garbage that masks exclude and later writes overwrite. Rolling back
(speculative decoding) is just lowering ``lengths``.

Paged (NB = blocks in the pool, bs = block size, M = blocks a row may hold): position s of row
b lives in block ``block_table[b, s // bs]`` at offset ``s % bs``; a row's blocks need not be
contiguous or in order, so memory is held per token written, not per row at its longest.
``layer_io`` gives the forward one way to write and read a layer of either kind: writes scatter
into the pool through the table, and reads gather a row's blocks into the dense view
``[B, M * bs, K, H]`` that the attention of the dense cache takes unchanged. Rows may share
blocks by reference (a cached prompt prefix): ``rows_view`` lets a prefill append at an offset
into its own blocks while attending over shared ones, and ``copy_pages`` gives rows their own
copies of the blocks they do not share.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from .config import ModelConfig


class KVCache(NamedTuple):
    """k, v: stacked ``[L, B, S, K, H]`` arrays, or (per-layer layout, for the decode layout of
    params) tuples of L ``[B, S, K, H]`` arrays; lengths [B] int32."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1] if self.per_layer else self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, *,
               per_layer: bool = False, num_layers: int | None = None) -> KVCache:
    """Zeroed cache for ``batch`` rows of ``max_len`` slots (``num_layers`` defaults to all)."""
    n = cfg.num_layers if num_layers is None else num_layers
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    lengths = jnp.zeros((batch,), jnp.int32)
    if per_layer:
        return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(n)),
                       tuple(jnp.zeros(shape, dtype) for _ in range(n)), lengths)
    return KVCache(jnp.zeros((n,) + shape, dtype), jnp.zeros((n,) + shape, dtype), lengths)


def write_rows(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write new [B, T, K, H] into one layer's buf [B, S, K, H] at slots start[b] + t."""
    t = new.shape[1]
    # per row (vmapped): with B split over a mesh's data axis each device writes its own rows;
    # a scatter indexed by arange(B) makes XLA gather the rows and indices over the data axis
    return jax.vmap(lambda rb, nb, sb: rb.at[sb + jnp.arange(t, dtype=jnp.int32)].set(nb.astype(buf.dtype),
                                                                                       mode="drop"))(buf, new, start)


def write_layer(buf: jax.Array, layer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write new [B, T, K, H] into buf [L, B, S, K, H] at layer ``layer``, slots start[b] + t.

    A scatter into the (donated, loop-carried) buffer: updated in place, no cache copy.
    Slots past S are dropped (they belong to padding tokens).
    """
    t = new.shape[1]
    return jax.vmap(lambda rb, nb, sb: rb.at[layer, sb + jnp.arange(t, dtype=jnp.int32)].set(
        nb.astype(buf.dtype), mode="drop"), in_axes=(1, 0, 0), out_axes=1)(buf, new, start)


def rollback(cache: KVCache, lengths: jax.Array) -> KVCache:
    """Keep only the first ``lengths[b]`` slots of each row (no data moves)."""
    return cache._replace(lengths=jnp.minimum(cache.lengths, lengths.astype(jnp.int32)))


def insert_rows(cache: KVCache, rows: KVCache, slots: jax.Array) -> KVCache:
    """Copy the P rows of ``rows`` (cache length T <= S) into rows ``slots`` [P] of ``cache``.

    rows.k/v ``[L, P, T, K, H]`` (or per-layer tuples of ``[P, T, K, H]``, matching ``cache``)
    land at slots 0..T-1 of the chosen rows; their lengths replace the rows' lengths. A slot
    index outside ``[0, B)`` drops that row (padding rows of a fixed-size batch). A scatter:
    in place when ``cache`` is donated.
    """
    if rows.per_layer != cache.per_layer:
        raise ValueError("insert_rows: rows and cache must share a layout (both stacked or both per-layer)")
    t = rows.max_len
    slots = slots.astype(jnp.int32)
    if cache.per_layer:
        k = tuple(c.at[slots, :t].set(r.astype(c.dtype), mode="drop") for c, r in zip(cache.k, rows.k))
        v = tuple(c.at[slots, :t].set(r.astype(c.dtype), mode="drop") for c, r in zip(cache.v, rows.v))
    else:
        k = cache.k.at[:, slots, :t].set(rows.k.astype(cache.k.dtype), mode="drop")
        v = cache.v.at[:, slots, :t].set(rows.v.astype(cache.v.dtype), mode="drop")
    return KVCache(k, v, cache.lengths.at[slots].set(rows.lengths, mode="drop"))


def repeat_rows(cache: KVCache, times: int) -> KVCache:
    """Each row repeated ``times`` times in place (row b -> rows b * times .. b * times + times - 1):
    B -> B * times rows sharing one prefill."""
    rep = lambda x, axis: jnp.repeat(x, times, axis=axis)  # noqa: E731
    if cache.per_layer:
        k, v = tuple(rep(x, 0) for x in cache.k), tuple(rep(x, 0) for x in cache.v)
    else:
        k, v = rep(cache.k, 1), rep(cache.v, 1)
    return KVCache(k, v, rep(cache.lengths, 0))


def rows_of(cache: KVCache, rows) -> KVCache:
    """The cache of the batch rows ``rows`` (an index, slice or index array)."""
    if cache.per_layer:
        return KVCache(tuple(x[rows] for x in cache.k), tuple(x[rows] for x in cache.v), cache.lengths[rows])
    return KVCache(cache.k[:, rows], cache.v[:, rows], cache.lengths[rows])


def extend(cache: KVCache, slots: int) -> KVCache:
    """The cache with ``slots`` more (zeroed, not yet valid) slots at the end of S: S -> S + slots,
    lengths unchanged (room for tokens appended after the cached ones)."""
    def pad(x, axis):
        width = [(0, 0)] * x.ndim
        width[axis] = (0, int(slots))
        return jnp.pad(x, width)

    if cache.per_layer:
        return KVCache(tuple(pad(x, 1) for x in cache.k), tuple(pad(x, 1) for x in cache.v), cache.lengths)
    return KVCache(pad(cache.k, 2), pad(cache.v, 2), cache.lengths)


# ------------------------------------------------------------------------------ paged
class PagedKVCache(NamedTuple):
    """k, v: the pool, stacked ``[L, NB, bs, K, H]`` or (per-layer layout) tuples of L
    ``[NB, bs, K, H]``; block_table [B, M] int32 (an entry outside [0, NB) = no block: writes to
    it are dropped, reads give zeros); lengths [B] int32."""

    k: jax.Array
    v: jax.Array
    block_table: jax.Array
    lengths: jax.Array

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def _pool_shape(self) -> tuple:
        """[NB, bs, K, H]."""
        return self.k[0].shape if self.per_layer else self.k.shape[1:]

    @property
    def block_size(self) -> int:
        return self._pool_shape[1]

    @property
    def num_blocks(self) -> int:
        return self._pool_shape[0]

    @property
    def max_len(self) -> int:
        """S of the dense view: M * bs."""
        return self.block_table.shape[1] * self.block_size

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def init_paged_cache(cfg: ModelConfig, batch: int, num_blocks: int, block_size: int, max_blocks: int,
                     dtype=jnp.bfloat16, *, per_layer: bool = False) -> PagedKVCache:
    """A zeroed pool of ``num_blocks`` blocks of ``block_size`` positions, and ``batch`` rows
    holding no block yet (table [B, max_blocks] all ``num_blocks``)."""
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    table = jnp.full((batch, max_blocks), num_blocks, jnp.int32)
    lengths = jnp.zeros((batch,), jnp.int32)
    if per_layer:
        n = cfg.num_layers
        return PagedKVCache(tuple(jnp.zeros(shape, dtype) for _ in range(n)),
                            tuple(jnp.zeros(shape, dtype) for _ in range(n)), table, lengths)
    return PagedKVCache(jnp.zeros((cfg.num_layers,) + shape, dtype), jnp.zeros((cfg.num_layers,) + shape, dtype),
                        table, lengths)


def page_slots(table: jax.Array, num_blocks: int, block_size: int, start: jax.Array, lengths: jax.Array,
               t: int) -> tuple[jax.Array, jax.Array]:
    """Where the T tokens of a call land: (block, offset) [B, T] of positions start[b] + t.
    Tokens t >= lengths[b] (padding; rows that do not advance) and positions without a block get
    block ``num_blocks``: their writes are dropped, so a row never writes into blocks it does not
    hold, whatever its table still says."""
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    j = pos // block_size
    m = table.shape[1]
    blk = jnp.take_along_axis(table, jnp.clip(j, 0, m - 1), axis=1)
    ok = (jnp.arange(t)[None, :] < lengths[:, None]) & (j < m) & (blk >= 0) & (blk < num_blocks)
    return jnp.where(ok, blk, num_blocks), pos % block_size


def _lead(layer) -> tuple:
    return () if layer is None else (layer,)


def write_pages(buf: jax.Array, layer, new: jax.Array, blocks: jax.Array, offsets: jax.Array) -> jax.Array:
    """Scatter new [B, T, K, H] (or [L, B, T, K, H] with ``layer`` a slice) into the pool
    ``buf`` at (blocks, offsets) [B, T] (``page_slots``); ``layer``: the index into a stacked
    pool, None for one layer's [NB, bs, K, H]. Out-of-range blocks are dropped."""
    return buf.at[_lead(layer) + (blocks, offsets)].set(new.astype(buf.dtype), mode="drop")


def gather_pages(buf: jax.Array, layer, table: jax.Array) -> jax.Array:
    """The dense view [B, M * bs, K, H] of the rows' blocks (table [B, M]) in one layer of the
    pool (``layer`` as in ``write_pages``); positions without a block read zeros."""
    view = buf.at[_lead(layer) + (table,)].get(mode="fill", fill_value=0)  # [B, M, bs, K, H]
    b, m, bs = view.shape[:3]
    return view.reshape((b, m * bs) + view.shape[3:])


def layer_io(cache, start: jax.Array, lengths: jax.Array, t: int) -> tuple[Callable, Callable]:
    """``(write(buf, layer, new) -> buf, read(buf, layer) -> [B, S, K, H])`` for one call that
    appends T tokens [B, T, K, H] at positions start[b] + t (the first lengths[b] of them real)
    to one k or v buffer of ``cache``: a ``KVCache`` (dense rows) or a ``PagedKVCache`` (the
    pool, through its block table; S = M * bs). ``layer``: the layer index into a stacked
    buffer, None for a per-layer one."""
    if isinstance(cache, PagedKVCache):
        blocks, offsets = page_slots(cache.block_table, cache.num_blocks, cache.block_size, start, lengths, t)
        nb = cache.num_blocks
        table = jnp.where((cache.block_table >= 0) & (cache.block_table < nb), cache.block_table, nb)
        return (lambda buf, layer, new: write_pages(buf, layer, new, blocks, offsets),
                lambda buf, layer: gather_pages(buf, layer, table))
    if cache.per_layer:
        return lambda buf, layer, new: write_rows(buf, new, start), lambda buf, layer: buf
    return lambda buf, layer, new: write_layer(buf, layer, new, start), lambda buf, layer: buf[layer]


def insert_pages(cache: PagedKVCache, rows: KVCache, slots: jax.Array, tables: jax.Array) -> PagedKVCache:
    """``insert_rows`` for a pool: the P dense rows of ``rows`` (``[L, P, T, K, H]``, or per-layer
    tuples; its first rows.lengths[p] positions) are written into the blocks of their tables
    [P, M], which become rows ``slots`` [P] of the block table, with their lengths. A slot
    outside ``[0, B)`` drops that row's table and length (its blocks should be none: length 0)."""
    if rows.per_layer != cache.per_layer:
        raise ValueError("insert_pages: rows and cache must share a layout (both stacked or both per-layer)")
    slots = slots.astype(jnp.int32)
    zero = jnp.zeros_like(rows.lengths)
    blocks, offsets = page_slots(tables.astype(jnp.int32), cache.num_blocks, cache.block_size, zero,
                                 rows.lengths, rows.max_len)
    if cache.per_layer:
        k = tuple(write_pages(c, None, r, blocks, offsets) for c, r in zip(cache.k, rows.k))
        v = tuple(write_pages(c, None, r, blocks, offsets) for c, r in zip(cache.v, rows.v))
    else:
        k = write_pages(cache.k, slice(None), rows.k, blocks, offsets)
        v = write_pages(cache.v, slice(None), rows.v, blocks, offsets)
    return place_rows(cache._replace(k=k, v=v), slots, tables, rows.lengths)


def place_rows(cache: PagedKVCache, slots: jax.Array, tables: jax.Array, lengths: jax.Array) -> PagedKVCache:
    """Rows ``slots`` [P] of the block table and lengths become ``tables`` [P, M] and
    ``lengths`` [P] (their blocks already written); a slot outside ``[0, B)`` is dropped."""
    slots = slots.astype(jnp.int32)
    return cache._replace(block_table=cache.block_table.at[slots].set(tables.astype(jnp.int32), mode="drop"),
                          lengths=cache.lengths.at[slots].set(lengths.astype(jnp.int32), mode="drop"))


def rows_view(cache: PagedKVCache, tables: jax.Array, lengths: jax.Array) -> PagedKVCache:
    """The pool seen as P other rows: block tables [P, M] and lengths [P] (the positions those
    rows hold already, e.g. a cached prefix). ``forward_cached`` over it appends a call's tokens
    at positions lengths[p] + t into the rows' blocks and attends over their whole view: a
    prefill at an offset, its first positions read from blocks other requests wrote."""
    return PagedKVCache(cache.k, cache.v, tables.astype(jnp.int32), lengths.astype(jnp.int32))


def copy_pages(cache: PagedKVCache, src: jax.Array, dst: jax.Array) -> PagedKVCache:
    """Copy block ``src[p, j]`` of the pool into block ``dst[p, j]`` wherever the two differ
    (tables [P, M]; an entry outside [0, NB) on either side copies nothing): rows that share
    some blocks by reference get their own copies of the others."""
    nb = cache.num_blocks
    ok = (src != dst) & (src >= 0) & (src < nb) & (dst >= 0) & (dst < nb)
    to = jnp.where(ok, dst, nb)
    frm = jnp.where(ok, src, nb)

    def one(buf, layer):
        lead = _lead(layer)
        blocks = buf.at[lead + (frm,)].get(mode="fill", fill_value=0)  # [(L,) P, M, bs, K, H]
        return buf.at[lead + (to,)].set(blocks, mode="drop")

    if cache.per_layer:
        return cache._replace(k=tuple(one(x, None) for x in cache.k), v=tuple(one(x, None) for x in cache.v))
    return cache._replace(k=one(cache.k, slice(None)), v=one(cache.v, slice(None)))
