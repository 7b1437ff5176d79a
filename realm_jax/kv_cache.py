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
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    lengths: jax.Array  # [B] int32

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


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
