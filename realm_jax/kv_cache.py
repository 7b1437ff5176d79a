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
    b, t = new.shape[:2]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    return buf.at[rows, slots].set(new.astype(buf.dtype), mode="drop")


def write_layer(buf: jax.Array, layer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write new [B, T, K, H] into buf [L, B, S, K, H] at layer ``layer``, slots start[b] + t.

    A scatter into the (donated, loop-carried) buffer: updated in place, no cache copy.
    Slots past S are dropped (they belong to padding tokens).
    """
    b, t = new.shape[:2]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    return buf.at[layer, rows, slots].set(new.astype(buf.dtype), mode="drop")


def rollback(cache: KVCache, lengths: jax.Array) -> KVCache:
    """Keep only the first ``lengths[b]`` slots of each row (no data moves)."""
    return cache._replace(lengths=jnp.minimum(cache.lengths, lengths.astype(jnp.int32)))
