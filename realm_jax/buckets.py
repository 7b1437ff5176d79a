"""The one bucketing rule: shapes rounded up so that new inputs rarely retrace a jitted program.

Generation, scoring, speculative decoding and the engine all round with these:

- rows (B): a power of two (padding rows are born done);
- input length (T): a power of two >= 16, then multiples of 512 past 512;
- cache length (S): a multiple of ``CACHE_BUCKET`` (64);
- small tables (stop ids, scored spans): a power of two with a floor.
"""

from __future__ import annotations

CACHE_BUCKET = 64


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_batch(b: int) -> int:
    """Rows -> a power of two."""
    return next_pow2(b)


def bucket_length(t: int) -> int:
    """Input length -> a power of two >= 16, or a multiple of 512 past 512."""
    return max(16, next_pow2(t)) if t <= 512 else -(-int(t) // 512) * 512


def bucket_cache(s: int) -> int:
    """Cache length -> a multiple of CACHE_BUCKET."""
    return -(-int(s) // CACHE_BUCKET) * CACHE_BUCKET


def bucket_table(n: int, floor: int = 4, cap: int | None = None) -> int:
    """A small table's width (stop ids per row, scored span) -> a power of two >= floor, at most cap."""
    w = max(floor, next_pow2(max(n, 1)))
    return w if cap is None else min(cap, w)
