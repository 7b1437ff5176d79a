"""Progress on stderr for the long steps: bars (tqdm) and one-line status messages.

Shown only where someone is watching: stderr is a terminal, and neither ``set_quiet(True)``
(the CLI's ``--quiet``) nor ``REALM_JAX_QUIET=1`` asked for silence. Everything goes to
stderr, never stdout, so piped results stay clean.

- ``status("loading X")``: a context manager; prints ``loading X ...`` and, when the step ends,
  `` done (1.2 s)`` on the same line (on its own line when something else was printed
  in between, e.g. a download inside a load).
- ``bar(total, desc)``: a tqdm bar (disabled when progress is off).
- ``compile_notice(what, key)``: ``compiling WHAT ...`` once per key (the first call of a
  jitted program at a new shape, which is where a first call spends its time).
- ``note(msg)``: a one-off fact worth a line (e.g. the batch size ``auto`` chose); shown unless
  quiet, also when stderr is not a terminal.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from typing import Hashable, Iterator

_quiet = False
_lock = threading.Lock()
_open: list[dict] = []  # status lines begun and not ended, innermost last
_seen: set = set()  # compile_notice keys already announced


def set_quiet(quiet: bool = True) -> None:
    """Silence (or re-enable) all progress output of this process."""
    global _quiet
    _quiet = bool(quiet)


@contextlib.contextmanager
def quieted(flag: bool = True) -> Iterator[None]:
    """Silence progress inside the block when ``flag`` (a command's ``--quiet``); restored after."""
    global _quiet
    before = _quiet
    _quiet = before or bool(flag)
    try:
        yield
    finally:
        _quiet = before


def quiet() -> bool:
    """True when progress was silenced (``set_quiet`` or ``REALM_JAX_QUIET``)."""
    return _quiet or os.environ.get("REALM_JAX_QUIET", "").strip().lower() not in ("", "0", "false", "no")


def enabled() -> bool:
    """Progress is shown: not quiet, and stderr is a terminal."""
    if quiet():
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _write(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass


def _break_open_line() -> None:
    """End an open ``msg ...`` line so the next output starts on a line of its own."""
    if _open and not _open[-1]["broken"]:
        _write("\n")
        for s in _open:
            s["broken"] = True


def line(msg: str) -> None:
    """One line of progress (shown only when ``enabled()``)."""
    if not enabled():
        return
    with _lock:
        _break_open_line()
        _write(msg + "\n")


def note(msg: str) -> None:
    """One line that is worth showing unless quiet (also when stderr is not a terminal)."""
    if quiet():
        return
    with _lock:
        _break_open_line()
        _write(msg + "\n")


@contextlib.contextmanager
def status(msg: str) -> Iterator[None]:
    """``msg ...`` now, `` done (N s)`` when the block ends (``failed`` if it raised)."""
    if not enabled():
        yield
        return
    with _lock:
        _break_open_line()
        _write(f"{msg} ...")
        entry = {"msg": msg, "broken": False}
        _open.append(entry)
    start = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        dt = time.perf_counter() - start
        with _lock:
            if entry in _open:
                _open.remove(entry)
            word = "done" if ok else "failed"
            if entry["broken"]:
                _write(f"{msg}: {word} ({dt:.1f} s)\n")
            else:
                _write(f" {word} ({dt:.1f} s)\n")


def compile_notice(what: str, key: Hashable) -> None:
    """``compiling WHAT ...`` the first time ``key`` is seen in this process (when enabled)."""
    with _lock:
        if key in _seen:
            return
        _seen.add(key)
    line(f"compiling {what} (first call at this shape) ...")


def bar(total: int | None = None, desc: str | None = None, unit: str = "it", disable: bool = False, **kw):
    """A tqdm bar on stderr; a no-op bar when progress is off or ``disable``."""
    from tqdm import tqdm

    off = disable or not enabled()
    if not off:
        with _lock:
            _break_open_line()
    try:  # a terminal that reports no size (a bare pty) would hide the bar (0 columns, 0 rows)
        size = os.get_terminal_size(sys.stderr.fileno())
        sized = size.columns > 0 and size.lines > 0
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        sized = False
    if not sized:
        kw.setdefault("ncols", 80)
        kw.setdefault("nrows", 24)
    return tqdm(total=total, desc=desc, unit=unit, disable=off, file=sys.stderr, dynamic_ncols=sized,
                mininterval=0.2, **kw)
