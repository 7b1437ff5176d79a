"""Benchmark machinery (``realm-jax bench`` and ``benchmarks/``): model shapes with random
weights, timing, memory bandwidth, the decode benchmark, environment and reporting.

Every timing blocks on the result (``jax.block_until_ready``), runs warm-up calls first (which
include compilation) and reports the median of the repeats.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import time
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import generation as gen
from .config import ModelConfig
from .params import init_params, param_bytes


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


# Datasheet peak memory bandwidth (bytes/s) of known cards, by a substring of the device name
# (the longest match wins, so "H100 PCIe" beats "H100").
DATASHEET_BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
                       "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12,
                       "A100-SXM4-40GB": 1.555e12, "A100": 1.555e12, "L40S": 0.864e12,
                       "TPU v5 lite": 0.819e12, "TPU v5e": 0.819e12, "TPU v5p": 2.765e12, "TPU v4": 1.228e12,
                       "TPU v6": 1.64e12}

# What each copy-bandwidth candidate is and which clock timed it (``copy_bandwidth``'s keys).
COPY_KERNELS = {
    "xla_copy": "jitted jnp.copy, host clock",
    "xla_copy_device": "jitted jnp.copy, device kernel time from a profiler trace",
    "xla_add_one": "jitted x + 1 (a streaming read and write), host clock",
    "xla_donated": "dynamic_update_slice into a preallocated donated buffer, host clock",
    "xla_donated_device": "dynamic_update_slice into a preallocated donated buffer, device kernel time from a "
                          "profiler trace",
    "xla_loop": "K vs 2K in-place x + 1 passes in one compiled loop, host-clock difference",
    "pallas_tma": "Pallas Mosaic GPU copy, TMA global -> shared -> global, host clock",
    "pallas_tma_device": "Pallas Mosaic GPU copy, TMA global -> shared -> global, device kernel time from a "
                         "profiler trace",
    "pallas_block": "Pallas block copy (pallas_call BlockSpecs, Mosaic TPU), host clock",
    "pallas_block_device": "Pallas block copy (pallas_call BlockSpecs, Mosaic TPU), device time from a profiler trace",
    "torch_copy": "torch copy_ into a preallocated tensor, CUDA events",
}
_RATE = "_bytes_per_s"
_NOT_CANDIDATES = ("datasheet" + _RATE, "xla_best" + _RATE, "bytes_per_s")


def datasheet_bandwidth(device_kind: str) -> float | None:
    """The datasheet figure for a device kind (longest matching name), or None."""
    hits = [k for k in DATASHEET_BANDWIDTH if k.lower() in device_kind.lower()]
    return DATASHEET_BANDWIDTH[max(hits, key=len)] if hits else None


def copy_candidates(bw: dict) -> dict[str, float]:
    """The measured copy rates of a ``copy_bandwidth`` result, by kernel name (bytes/s); the
    datasheet figure and the summary keys are not candidates."""
    return {k[:-len(_RATE)]: v for k, v in bw.items() if k.endswith(_RATE) and k not in _NOT_CANDIDATES}


def best_copy(rates: dict[str, float]) -> tuple[str, float]:
    """(name, bytes/s) of the fastest candidate: the ceiling MBU is reported against."""
    if not rates:
        raise ValueError("no copy kernel produced a measurement")
    name = max(rates, key=rates.get)
    return name, rates[name]


def busy_seconds(events: Sequence[dict]) -> float:
    """Seconds during which at least one event runs: the union of [ts, ts + dur] intervals
    (trace-event units, microseconds), so that kernels overlapping on two streams count once."""
    total, end = 0.0, None
    for e in sorted(events, key=lambda e: e["ts"]):
        a, b = e["ts"], e["ts"] + e["dur"]
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e6


def device_events(trace, *, host_fallback: bool = True) -> list[dict]:
    """Complete events on device streams ("/device:GPU:n" processes, "Stream" threads) of a
    trace-event JSON; with ``host_fallback`` and no device streams (a CPU backend), XLA's
    host-thunk events instead."""
    ev = trace["traceEvents"] if isinstance(trace, dict) else trace
    pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    tname = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = [e for e in ev if e.get("ph") == "X" and "GPU" in pname.get(e["pid"], "")
           and "Stream" in tname.get((e["pid"], e["tid"]), "")]
    if gpu or not host_fallback:
        return gpu
    nested = ("while", "ThunkExecutor", "conditional", "call")  # containers of other events
    return [e for e in ev if e.get("ph") == "X" and "dur" in e and "XLA" in tname.get((e["pid"], e["tid"]), "")
            and not e["name"].startswith(nested)]


def traced_events(fn: Callable[..., Any], make_args: Callable[[], tuple] | None = None, calls: int = 1, *,
                  host_fallback: bool = False) -> list[dict]:
    """Run ``fn(*make_args())`` ``calls`` times under ``jax.profiler.trace`` and return the
    trace's device-stream events (``device_events``); the inputs are built and made ready before
    the trace starts."""
    import glob
    import gzip

    args = [make_args() if make_args is not None else () for _ in range(calls)]
    jax.block_until_ready(args)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for a in args:
                jax.block_until_ready(fn(*a))
        paths = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
        if not paths:
            return []
        with gzip.open(paths[0]) as f:
            return device_events(json.load(f), host_fallback=host_fallback)


def _pallas_tma_copy(x: jax.Array, rows: int = 32, interpret: Any = None) -> jax.Array:
    """Copy a [R, C] array through shared memory with the Hopper tensor-memory accelerator
    (Pallas Mosaic GPU): block b loads rows [b * rows, (b + 1) * rows) into shared memory and
    stores them back out; no registers touch the data. ``interpret``: Mosaic GPU's interpret
    parameters, to run it on the CPU."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n_rows, cols = x.shape
    if n_rows % rows:
        raise ValueError(f"rows {n_rows} is not a multiple of the block's {rows}")

    def body(x_ref, o_ref, smem, bar):
        blk = pl.ds(jax.lax.axis_index("b") * rows, rows)
        plgpu.copy_gmem_to_smem(x_ref.at[blk], smem, bar)
        plgpu.barrier_wait(bar)
        plgpu.copy_smem_to_gmem(smem, o_ref.at[blk])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                        scratch_types=[plgpu.SMEM((rows, cols), x.dtype), plgpu.Barrier(num_arrivals=1)],
                        grid=(n_rows // rows,), grid_names=("b",), interpret=interpret)(x)


def _pallas_block_copy(x: jax.Array, rows: int = 512, interpret: bool = False) -> jax.Array:
    """Copy a [R, C] array block by block with ``pallas_call`` BlockSpecs (the backend pipelines
    the blocks through on-chip memory): Mosaic TPU on a TPU; ``interpret`` on the CPU."""
    from jax.experimental import pallas as pl

    n_rows, cols = x.shape
    if n_rows % rows:
        raise ValueError(f"rows {n_rows} is not a multiple of the block's {rows}")

    def body(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((rows, cols), lambda i: (i, 0))
    return pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(n_rows // rows,),
                          in_specs=[spec], out_specs=spec, interpret=interpret)(x)


def pallas_copy_kernel(dev) -> tuple[str, Callable[[jax.Array], jax.Array]] | None:
    """(name, copy of a [R, 256] float32 array) for the backend's Pallas: Mosaic GPU on NVIDIA
    Hopper or newer, Mosaic TPU on a TPU; None elsewhere (the CPU has no Pallas compiler)."""
    if dev.platform == "gpu":
        cc = getattr(dev, "compute_capability", None)
        if cc is not None and float(cc) >= 9.0:
            return "pallas_tma", _pallas_tma_copy
        return None
    if dev.platform == "tpu":
        return "pallas_block", _pallas_block_copy
    return None


def copy_bandwidth(nbytes: int | None = None, repeats: int = 10, *, torch_check: bool = True,
                   pallas: bool = True, profile: bool = True) -> dict:
    """Device memory bandwidth (bytes/s): the best of several copy kernels, each counting the read
    and the write (2 x size per copy), cross-checked against outside numbers.

    Candidates (``COPY_KERNELS`` says what each is and which clock timed it): a jitted ``jnp.copy``
    (``xla_copy``); a streaming ``x + 1`` (``xla_add_one``); a copy into a preallocated, donated
    buffer (``xla_donated``: ``dynamic_update_slice`` in place); ``xla_loop``: K in-place ``x + 1``
    passes inside one compiled loop, timed as (t(2K) - t(K)) / K so that dispatch and the host
    clock cancel out; the backend's Pallas copy (``pallas_copy_kernel``); on a GPU with
    ``profile``, the device kernel time of the copies from a profiler trace (``*_device``); and
    ``torch``'s ``copy_`` into a preallocated tensor timed with CUDA events (when torch with CUDA
    is installed). A candidate that fails is left out, its error under ``errors``.

    ``bytes_per_s`` is the best candidate (``best`` names it): MBU is reported against it. Cross
    checks: ``datasheet_bytes_per_s`` for known cards (``datasheet_bandwidth``) and
    ``best_vs_datasheet``; ``xla_best_bytes_per_s``, the best JAX-side kernel. On the CPU the
    numbers describe the host's memory and no MBU is meaningful (``meaningful``).
    """
    dev = jax.devices()[0]
    if nbytes is None:
        nbytes = (2 << 30) if dev.platform != "cpu" else (256 << 20)
    cols = 256
    n = nbytes // 4 // cols * cols
    x = jax.device_put(jnp.arange(n, dtype=jnp.float32), dev)
    moved = 2 * n * 4
    out: dict[str, Any] = {"bytes": int(n * 4), "device_kind": dev.device_kind, "meaningful": dev.platform != "cpu"}
    errors: dict[str, str] = {}
    timed_on_device = profile and dev.platform == "gpu"

    def measure(name, fn, make_args=None, device_too=False):
        try:
            out[name + _RATE] = moved / time_call(fn, make_args, warmup=2, repeats=repeats)["median_s"]
        except Exception as e:  # a kernel this backend or version cannot build: reported, not fatal
            errors[name] = _error_line(e)
            return
        if device_too and timed_on_device:
            try:
                events = traced_events(fn, make_args, calls=repeats)
                if not events:
                    raise RuntimeError("the profiler trace holds no device-stream events")
                out[name + "_device" + _RATE] = moved * repeats / busy_seconds(events)
            except Exception as e:
                errors[name + "_device"] = _error_line(e)

    copy = jax.jit(lambda a: jnp.copy(a))
    y = copy(x)
    y.block_until_ready()
    assert y.unsafe_buffer_pointer() != x.unsafe_buffer_pointer()  # a real copy, not an alias
    del y
    measure("xla_copy", lambda: copy(x), device_too=True)
    add_one = jax.jit(lambda a: a + 1.0)
    measure("xla_add_one", lambda: add_one(x))

    into = jax.jit(lambda dst, src: jax.lax.dynamic_update_slice(dst, src, (0,)), donate_argnums=0)
    box = [jnp.zeros_like(x)]

    def donated():
        box[0] = into(box[0], x)
        return box[0]

    measure("xla_donated", donated, device_too=True)
    del box

    loop = jax.jit(lambda a, k: jax.lax.fori_loop(0, k, lambda i, c: c + 1.0, a), donate_argnums=0)
    k = 8

    def run(reps):
        a = jnp.copy(x)
        a.block_until_ready()
        t0 = time.perf_counter()
        loop(a, reps).block_until_ready()
        return time.perf_counter() - t0

    run(1)
    t1 = statistics.median(run(k) for _ in range(3))
    t2 = statistics.median(run(2 * k) for _ in range(3))
    out["xla_loop" + _RATE] = moved * k / max(t2 - t1, 1e-9)

    kernel = pallas_copy_kernel(dev) if pallas else None
    if kernel is not None:
        name, fn = kernel
        x2 = x.reshape(n // cols, cols)
        pcopy = jax.jit(fn)
        try:
            y = pcopy(x2)
            if not bool(jnp.array_equal(y, x2)):
                raise AssertionError("the Pallas copy did not reproduce its input")
            del y
            measure(name, lambda: pcopy(x2), device_too=True)
        except Exception as e:
            errors[name] = _error_line(e)
        del x2
    elif pallas and dev.platform == "gpu":
        errors["pallas_tma"] = (f"not run: Mosaic GPU needs compute capability 9.0 or newer, this device reports "
                                f"{getattr(dev, 'compute_capability', None)}")
    del x
    gc.collect()
    if torch_check and dev.platform == "gpu":
        out.update(_torch_copy(nbytes, repeats))
    sheet = datasheet_bandwidth(dev.device_kind)
    if sheet:
        out["datasheet" + _RATE] = sheet
    rates = copy_candidates(out)
    out["best"], out["bytes_per_s"] = best_copy(rates)
    out["best_kernel"] = COPY_KERNELS.get(out["best"], out["best"])
    out["xla_best" + _RATE] = max(v for k_, v in rates.items() if k_.startswith("xla_"))
    if sheet:
        out["best_vs_datasheet"] = out["bytes_per_s"] / sheet
    out["errors"] = errors
    return out


def _error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _torch_copy(nbytes: int, repeats: int) -> dict:
    """``torch``'s ``dst.copy_(src)`` on CUDA, timed with CUDA events (median), or {} without it."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    src = torch.rand(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return {"torch_copy" + _RATE: 2 * (nbytes // 4) * 4 / statistics.median(times)}


# HLO instructions that launch no device work: values, views, tuples and the second half of an
# async pair. ``call``, ``while`` and ``conditional`` hold other computations (walked instead).
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier", "after-all",
              "add-dependency", "partition-id", "replica-id", "domain"}
_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\(")


def count_kernels(hlo_text: str) -> int:
    """Device kernels one run of a compiled module's entry computation launches, read from its HLO
    text: every instruction but the launch-free ones (``_NO_KERNEL``, ``*-done``); ``call`` and
    ``while`` bodies are walked (a loop body once: per iteration), a ``conditional`` counts its
    largest branch; fusion bodies are not walked (a fusion is one kernel)."""
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            cur = head.group(2)
            comps[cur] = []
            if head.group(1):
                entry = cur
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            comps[cur].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    def refs(line, key):
        m = re.search(key + r"=\{([^}]*)\}", line) or re.search(key + r"=(%?[\w.\-]+)", line)
        return [r.strip().lstrip("%") for r in m.group(1).split(",") if r.strip()] if m else []

    def walk(name, depth=0):
        if depth > 50:
            raise ValueError("HLO call graph too deep")
        total = 0
        for line in comps.get(name, []):
            m = _HLO_INSTR.match(line)
            if not m:
                continue
            op = m.group(1)
            if op == "call":
                total += sum(walk(c, depth + 1) for c in refs(line, "to_apply"))
            elif op == "while":
                total += sum(walk(c, depth + 1) for c in refs(line, "condition") + refs(line, "body"))
            elif op == "conditional":
                total += max((walk(c, depth + 1) for c in refs(line, "branch_computations")
                              + refs(line, "true_computation") + refs(line, "false_computation")), default=0)
            elif op not in _NO_KERNEL and not op.endswith("-done"):
                total += 1
        return total

    return walk(entry)


def kernels_per_step(rt, cfg: ModelConfig, batch: int, cache_len: int) -> int:
    """Kernels one decode step's forward launches: ``count_kernels`` over the compiled HLO of
    ``forward_cached`` for a [batch, 1] step (no sampling, no loop bookkeeping); a proxy on the
    CPU, whose compiler fuses differently."""
    tokens = jnp.zeros((batch, 1), jnp.int32)
    lengths = jnp.ones((batch,), jnp.int32)
    cache = gen.new_cache(cfg, rt, batch, cache_len)
    return count_kernels(jax.jit(lambda r, t, n, c: gen.forward_cached(r, cfg, t, n, c)).lower(
        rt, tokens, lengths, cache).compile().as_text())


def roofline(param_bytes: int, kv_bytes: int, step_s: float, bw: dict) -> dict:
    """A decode step against the memory roofline: bytes read per step (params + KV cache), the
    floor (those bytes at the best measured copy bandwidth), the achieved bandwidth and MBU
    (floor / step time; None where ``bw`` is not ``meaningful``), and which copy set the ceiling."""
    moved = int(param_bytes) + int(kv_bytes)
    floor_s = moved / bw["bytes_per_s"]
    return {"bytes_per_step": moved, "gb_per_step": moved / 1e9, "floor_ms": floor_s * 1e3,
            "achieved_gb_s": moved / step_s / 1e9, "mbu_pct": 100 * floor_s / step_s if bw["meaningful"] else None,
            "ceiling": bw["best"], "ceiling_gb_s": bw["bytes_per_s"] / 1e9}


def roofline_line(label: str, r: dict) -> str:
    """One printed line of a row's roofline (``roofline``'s fields, with ``kernels`` and
    ``kernels_profiled`` when the row has them)."""
    kern = f"{r['kernels']} kernels/step (compiled forward step)" if r.get("kernels") is not None else \
        "kernels/step not counted"
    if r.get("kernels_profiled") is not None:
        kern += f", {r['kernels_profiled']:.0f} (profiled decode loop, sampling included)"
    mbu = f"MBU {r['mbu_pct']:.1f}%" if r.get("mbu_pct") is not None else "MBU n/a (CPU)"
    return (f"roofline {label}: {r['gb_per_step']:.4g} GB/step, floor {r['floor_ms']:.4g} ms at "
            f"{r['ceiling_gb_s']:,.4g} GB/s ({r['ceiling']}), achieved {r['achieved_gb_s']:,.0f} GB/s, {mbu}; {kern}")


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
    """Write JSON atomically (temp file + rename): never a half-written results file. An
    ``obj["args"]["out"]`` (the command line's output path) is stored as its file name only, so
    results files name no machine's directories."""
    if isinstance(obj, dict) and isinstance(obj.get("args"), dict) and obj["args"].get("out"):
        obj = {**obj, "args": {**obj["args"], "out": os.path.basename(str(obj["args"]["out"]))}}
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


# ----------------------------------------------------------------------------- decode benchmark
SHAPES = {
    "llama-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                     num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
                     rope_theta=500000.0, rope_type="llama3", rope_factor=32.0, rope_original_max_positions=8192,
                     max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001,)),
    "llama-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                     num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=False, rms_norm_eps=1e-5,
                     rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000,
                     eos_token_ids=(128001,)),
    "tiny": dict(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True),
}
CONFIGS = ("llama-1b", "llama-8b", "smollm2", "tiny")


def random_params(cfg: ModelConfig, dtype, seed: int = 0) -> dict:
    """``params.init_params`` drawn straight on the device, as one compiled program (large shapes
    in seconds, no float32 copy of the weights)."""
    return jax.jit(partial(init_params, cfg, dtype=dtype))(jax.random.key(seed))


def bytes_per_step(cfg: ModelConfig, rt, batch: int, cache_len: int, kv_itemsize: int) -> tuple[int, int]:
    """(param bytes read per decode step, KV cache bytes read per step for ``cache_len`` slots);
    ``rt``: the runtime (canonical params count the same)."""
    p = param_bytes(rt)
    if not cfg.tie_word_embeddings:
        p -= param_bytes(rt.embed if hasattr(rt, "embed") else rt["embed"])  # a gather of B rows, not a read
    kv = 2 * cfg.num_layers * batch * cache_len * cfg.num_kv_heads * cfg.head_dim * kv_itemsize
    return p, kv


def bench_jax(cfg, params, batch, prompt_len, new_tokens, warmup, repeats, seed=0, settings=None, *,
              profile_kernels: bool = False) -> dict:
    """Prefill, decode-loop and end-to-end timings of ``generate``'s programs; ``settings``:
    ``Sampling`` fields for every row (e.g. logprobs, penalties), default none. With
    ``profile_kernels``, on a GPU, one more decode loop runs under the profiler:
    ``kernels_profiled`` (device kernels per step, sampling and loop bookkeeping included; memory
    copies and sets, such as the loop predicate's read-back, apart in ``copies_profiled``) and
    ``profiled_busy_ms_per_step`` (their summed time; the profiler slows the loop, so no step time)."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()
    settings = dict(settings or {})
    top = settings.get("logprobs")
    req = gen.validate_request(cfg, prompts, new_tokens, stop_ids=[], **settings)
    pad = gen.pad_request(req)
    bp, s = pad.tokens.shape[0], pad.cache_len
    ctl = gen.Controls.of(pad)
    tokens, lengths = jnp.asarray(pad.tokens), jnp.asarray(pad.lengths)

    def fresh_cache():
        return (gen.new_cache(cfg, params, bp, s),)

    def start(cache):
        return gen.start_jit(params, cfg, tokens, lengths, cache, ctl, out_len=s, top_logprobs=top)

    def prefilled():
        return (start(*fresh_cache()),)

    def decode(state):
        return gen.decode_loop_jit(params, cfg, state, ctl)

    def e2e(cache):
        return gen.generate_jit(params, cfg, tokens, lengths, cache, ctl, out_len=s, top_logprobs=top)

    pre = time_call(start, fresh_cache, warmup=warmup, repeats=repeats)
    dec = time_call(decode, prefilled, warmup=warmup, repeats=repeats)
    end = time_call(e2e, fresh_cache, warmup=warmup, repeats=repeats)
    final = decode(*prefilled())
    got = np.asarray(final.num_new)[:batch]
    assert (got == new_tokens).all(), f"rows produced {got.tolist()} tokens, expected {new_tokens}"
    steps = new_tokens - 1
    step_s = dec["median_s"] / steps
    kv_item = jnp.dtype(params.dtype).itemsize
    p_bytes, kv_bytes = bytes_per_step(cfg, params, batch, s, kv_item)
    _, kv_valid = bytes_per_step(cfg, params, batch, prompt_len + new_tokens // 2, kv_item)
    del final
    gc.collect()
    profiled = {}
    if profile_kernels and jax.devices()[0].platform == "gpu":
        events = traced_events(decode, prefilled)
        if events:
            copies = [e for e in events if e["name"].lower().startswith(("memcpy", "memset"))]
            profiled = {"kernels_profiled": (len(events) - len(copies)) / steps,
                        "copies_profiled": len(copies) / steps,
                        "profiled_busy_ms_per_step": busy_seconds(events) * 1e3 / steps}
    return {**profiled,
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "cache_len": s,
        "prefill_ms": pre["median_s"] * 1e3, "decode_ms_per_step": step_s * 1e3,
        "tokens_per_s": batch / step_s, "e2e_s": end["median_s"],
        "param_bytes_per_step": p_bytes, "kv_bytes_per_step": kv_bytes, "kv_valid_bytes_per_step": kv_valid,
        "timings": {"prefill": pre, "decode_loop": dec, "end_to_end": end},
    }
