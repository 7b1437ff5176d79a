"""Stop strings: a row ends at the first generated token whose decoded text contains one of its
stop strings. The text is cut before the match; the tokens end with the one that completed it.

Matching is checked token by token (``StopScan``), so the result does not depend on how many
decode steps run between checks. A stream shows only text that no later match can remove
(``held_back``).
"""

from __future__ import annotations

from typing import Callable, Sequence


def first_match(text: str, stops: Sequence[str]) -> int | None:
    """The earliest index at which any of ``stops`` occurs in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still begin a stop string (the longest
    suffix that is a proper prefix of one): a stream holds them back until it knows."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class StopScan:
    """Per-row incremental check. ``decode`` maps token ids to text; ``stops`` the row's strings."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]):
        self.decode, self.stops, self.checked = decode, tuple(stops), 0

    def scan(self, ids: list[int]) -> tuple[int, int] | None:
        """Check the tokens not checked yet: ``(tokens kept, text length)`` at the first token whose
        text holds a match, else None."""
        if not self.stops:
            return None
        for k in range(self.checked + 1, len(ids) + 1):
            at = first_match(self.decode(ids[:k]), self.stops)
            if at is not None:
                self.checked = k
                return k, at
        self.checked = len(ids)
        return None
