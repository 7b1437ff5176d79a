"""JAX's persistent compilation cache, on by default.

Compiled XLA programs are stored under ``<realm_jax cache>/xla`` (see ``builtin.cache_dir``), so
a second process (a CLI call, a notebook restart, a batch job's next shard) skips compilation.
Opt out with ``REALM_JAX_COMPILATION_CACHE=0``. A cache directory the user already configured
(``jax_compilation_cache_dir`` / ``JAX_COMPILATION_CACHE_DIR``) is left alone: its safety is
the user's choice.

Security: the cache holds native code that the process runs. Whoever can write into the cache
directory can make this library execute code of their choosing. So the directory we use (the
default one, or ``path``) is created private (mode 0700), and an existing
one is refused with a ``CacheDirError`` when it is not a directory, is owned by another user,
or can be written by the group or others (on POSIX systems; a symbolic link is judged by what it
points to). Fix such a directory with ``chmod 700 DIR`` (or remove it), or opt out with
``REALM_JAX_COMPILATION_CACHE=0``. Cache entries are read only by JAX, by key; nothing in the
directory is ever unpickled.
"""

from __future__ import annotations

import os
import stat

import jax

from .errors import RealmError

ENV = "REALM_JAX_COMPILATION_CACHE"
MIN_COMPILE_SECONDS = 0.5  # cache only programs that took at least this long to compile


class CacheDirError(RealmError):
    """A compilation cache directory that others could plant code in."""


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def check_private_dir(path: str | os.PathLike) -> str:
    """Create ``path`` (and missing parents) with mode 0700, or check an existing one: a
    directory owned by this user that neither the group nor others can write. Returns the
    path; raises ``CacheDirError`` naming the directory, its owner and mode otherwise."""
    path = os.fspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise CacheDirError(f"compilation cache {path!r}: exists and is not a directory") from None
    except OSError as e:
        raise CacheDirError(f"compilation cache {path!r}: cannot be created ({e.strerror or e})") from None
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"compilation cache {path!r}: exists and is not a directory")
    if not hasattr(os, "getuid"):  # no POSIX owners / modes (Windows): nothing more to check
        return path
    fix = f"run 'chmod 700 {path}' if it is yours, remove it, or set {ENV}=0"
    if st.st_uid != os.getuid():
        raise CacheDirError(f"compilation cache {path!r}: owned by user id {st.st_uid}, not by this user "
                            f"({os.getuid()}); whoever owns it can plant code this process would run. "
                            f"Remove it or set {ENV}=0")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheDirError(f"compilation cache {path!r}: mode {stat.S_IMODE(st.st_mode):04o} lets the group or "
                            f"others write into it (they could plant code this process would run); expected "
                            f"0700: {fix}")
    return path


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn the persistent cache on (idempotent). Returns the directory in use, or None when
    opted out. ``path`` overrides the default location. The directory is checked (and created
    private) with ``check_private_dir``."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if path is None:
        if not enabled_by_env():
            return None
        from .builtin import cache_dir

        path = cache_dir() / "xla"
    path = check_private_dir(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
