"""JAX's persistent compilation cache, on by default.

Compiled XLA programs are stored under ``<realm_jax cache>/xla`` (see ``builtin.cache_dir``), so
a second process (a CLI call, a notebook restart, a batch job's next shard) skips compilation.
Opt out with ``REALM_JAX_COMPILATION_CACHE=0``. A cache directory the user already configured
(``jax_compilation_cache_dir`` / ``JAX_COMPILATION_CACHE_DIR``) is left alone.
"""

from __future__ import annotations

import os

import jax

ENV = "REALM_JAX_COMPILATION_CACHE"
MIN_COMPILE_SECONDS = 0.5  # cache only programs that took at least this long to compile


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn the persistent cache on (idempotent). Returns the directory in use, or None when
    opted out. ``path`` overrides the default location."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if path is None:
        if not enabled_by_env():
            return None
        from .builtin import cache_dir

        path = cache_dir() / "xla"
    path = str(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
