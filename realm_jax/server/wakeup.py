"""Waking the event loop from the engine's thread, once per delivery round, not once per request.

The engine hands every running request its tokens at the end of each decode call and calls each
handle's ``on_update`` callbacks. A callback that woke the loop by itself would write the loop's
self-pipe once per request; each write lets the interpreter lock go, and the engine's thread can
then wait on the event loop's Python work before it dispatches the next decode call (the device
idles meanwhile). ``LoopWaker`` collects the events due and keeps at most one wake-up pending.
"""

from __future__ import annotations

import asyncio
import threading


class LoopWaker:
    """``wake(event)`` from any thread: ``event.set()`` soon on ``loop``, with at most one
    ``call_soon_threadsafe`` pending however many events are due."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._due: set[asyncio.Event] = set()
        self._pending = False

    def wake(self, event: asyncio.Event) -> None:
        with self._lock:
            self._due.add(event)
            if self._pending:
                return
            self._pending = True
        try:
            self.loop.call_soon_threadsafe(self._fire)
        except RuntimeError:  # the loop is closed: nobody waits any more
            with self._lock:
                self._pending = False

    def _fire(self) -> None:
        with self._lock:
            due, self._due, self._pending = self._due, set(), False
        for e in due:
            e.set()
