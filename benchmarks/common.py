"""Shared helpers for the benchmark scripts: timing, memory bandwidth, environment, reporting.

Every timing blocks on the result (``jax.block_until_ready``), runs warm-up calls first (which
include compilation) and reports the median of the repeats.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def time_call(fn: Callable[..., Any], make_args: Callable[[], tuple] | None = None, *, warmup: int = 1,
              repeats: int = 5) -> dict:
    """Seconds per call of ``fn(*make_args())``: median, min and all repeats.

    ``make_args`` builds fresh inputs before every call, untimed (needed when ``fn`` donates
    its inputs); its result is made ready before the clock starts.
    """
    times = []
    for i in range(warmup + repeats):
        args = make_args() if make_args is not None else ()
        jax.block_until_ready(args)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return {"median_s": statistics.median(times), "min_s": min(times), "all_s": times}


def tree_bytes(tree) -> int:
    """Total bytes of the array leaves of a pytree."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "shape")))


def copy_bandwidth(nbytes: int | None = None, repeats: int = 10) -> dict:
    """Device memory bandwidth (bytes/s) from large device-to-device copies, counting the read and
    the write (2 x size per copy). Two kernels are timed, a jitted ``jnp.copy`` and a jitted
    ``x + 1`` (a streaming read-modify-write); the faster one is the reference for MBU."""
    dev = jax.devices()[0]
    if nbytes is None:
        nbytes = (2 << 30) if dev.platform != "cpu" else (256 << 20)
    n = nbytes // 4
    x = jax.device_put(jnp.arange(n, dtype=jnp.float32), dev)
    out = {"bytes": int(n * 4)}
    for name, f in (("copy", jax.jit(lambda a: jnp.copy(a))), ("add_one", jax.jit(lambda a: a + 1.0))):
        y = f(x)
        y.block_until_ready()
        assert y.unsafe_buffer_pointer() != x.unsafe_buffer_pointer()  # a real copy, not an alias
        del y
        t = time_call(lambda: f(x), warmup=2, repeats=repeats)
        out[f"{name}_bytes_per_s"] = 2 * n * 4 / t["median_s"]
    out["bytes_per_s"] = max(out["copy_bytes_per_s"], out["add_one_bytes_per_s"])
    return out


def environment() -> dict:
    """Card name, date, versions: what a results table must state."""
    dev = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": getattr(dev, "device_kind", dev.platform),
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "host": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }
    try:
        import jaxlib

        env["jaxlib"] = jaxlib.__version__
    except Exception:
        pass
    for mod in ("torch", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            pass
    return env


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """rows: dicts; columns: (key, header). Floats get 3 significant-ish digits, None -> '-'."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def environment_line(env: dict) -> str:
    keys = ("device", "date", "jax", "jaxlib", "torch", "transformers")
    return ", ".join(f"{k}: {env[k]}" for k in keys if k in env)


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temp file + rename): never a half-written results file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=float)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
