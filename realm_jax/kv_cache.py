"""KV cache pytree: keys/values ``[L, B, S, K, H]`` plus per-row valid lengths ``[B]``.

Slot s of row b holds the key/value of absolute position s. ``lengths[b]`` slots are valid;
anything beyond is garbage that masks exclude and later writes overwrite. Rolling back
(speculative decoding) is just lowering ``lengths``.
"""

from __future__ import annotations

from typing import NamedTuple

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
