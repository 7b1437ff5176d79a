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


# Datasheet peak memory bandwidth (bytes/s) of known cards, by a substring of the device name.
DATASHEET_BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
                       "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100": 1.555e12,
                       "L40S": 0.864e12, "TPU v5 lite": 0.819e12, "TPU v5e": 0.819e12, "TPU v5p": 2.765e12,
                       "TPU v4": 1.228e12, "TPU v6": 1.64e12}


def datasheet_bandwidth(device_kind: str) -> float | None:
    """The datasheet figure for a device kind (longest matching name), or None."""
    hits = [k for k in DATASHEET_BANDWIDTH if k.lower() in device_kind.lower()]
    return DATASHEET_BANDWIDTH[max(hits, key=len)] if hits else None


def copy_bandwidth(nbytes: int | None = None, repeats: int = 10, *, torch_check: bool = True) -> dict:
    """Device memory bandwidth (bytes/s): the best of several copy kernels, each counting the read
    and the write (2 x size per copy), cross-checked against an outside number.

    Kernels: a jitted ``jnp.copy`` (``xla_copy``); a streaming ``x + 1`` (``xla_add_one``); a copy
    into a preallocated, donated buffer (``xla_donated``: ``dynamic_update_slice`` in place); and
    ``xla_loop``: K in-place ``x + 1`` passes inside one compiled loop, timed as
    (t(2K) - t(K)) / K so that dispatch and the host clock cancel out. Outside: ``torch``'s
    ``copy_`` into a preallocated tensor timed with CUDA events (when torch with CUDA is
    installed) and the datasheet figure for known cards (``datasheet_bandwidth``).
    ``bytes_per_s`` is the best measured copy (torch included): MBU is reported against it.
    On the CPU the numbers describe the host's memory and no MBU is meaningful (``meaningful``).
    """
    dev = jax.devices()[0]
    if nbytes is None:
        nbytes = (2 << 30) if dev.platform != "cpu" else (256 << 20)
    n = nbytes // 4
    x = jax.device_put(jnp.arange(n, dtype=jnp.float32), dev)
    moved = 2 * n * 4
    out = {"bytes": int(n * 4), "device_kind": dev.device_kind, "meaningful": dev.platform != "cpu"}
    for name, f in (("xla_copy", jax.jit(lambda a: jnp.copy(a))), ("xla_add_one", jax.jit(lambda a: a + 1.0))):
        y = f(x)
        y.block_until_ready()
        assert y.unsafe_buffer_pointer() != x.unsafe_buffer_pointer()  # a real copy, not an alias
        del y
        out[f"{name}_bytes_per_s"] = moved / time_call(lambda: f(x), warmup=2, repeats=repeats)["median_s"]

    into = jax.jit(lambda dst, src: jax.lax.dynamic_update_slice(dst, src, (0,)), donate_argnums=0)
    box = [jnp.zeros_like(x)]

    def donated():
        box[0] = into(box[0], x)
        return box[0]

    out["xla_donated_bytes_per_s"] = moved / time_call(donated, warmup=2, repeats=repeats)["median_s"]
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
    out["xla_loop_bytes_per_s"] = moved * k / max(t2 - t1, 1e-9)
    del x
    gc.collect()
    if torch_check and dev.platform == "gpu":
        out.update(_torch_copy(nbytes, repeats))
    sheet = datasheet_bandwidth(dev.device_kind)
    if sheet:
        out["datasheet_bytes_per_s"] = sheet
    measured = {k_: v for k_, v in out.items() if k_.endswith("_bytes_per_s") and not k_.startswith("datasheet")}
    out["best"] = max(measured, key=measured.get)[: -len("_bytes_per_s")]
    out["bytes_per_s"] = measured[out["best"] + "_bytes_per_s"]
    out["xla_best_bytes_per_s"] = max(v for k_, v in measured.items() if k_.startswith("xla_"))
    return out


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
    return {"torch_copy_bytes_per_s": 2 * (nbytes // 4) * 4 / statistics.median(times)}


def kernels_per_step(rt, cfg: ModelConfig, batch: int, cache_len: int) -> int:
    """Kernels one decode step launches: the instructions of the compiled step's entry
    computation that run as device kernels (fusions, library calls, copies); a proxy on the CPU."""
    tokens = jnp.zeros((batch, 1), jnp.int32)
    lengths = jnp.ones((batch,), jnp.int32)
    cache = gen.new_cache(cfg, rt, batch, cache_len)
    text = jax.jit(lambda r, t, n, c: gen.forward_cached(r, cfg, t, n, c)).lower(rt, tokens, lengths,
                                                                                cache).compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    ops = ("fusion(", "custom-call(", "copy(", "dot(", "convolution(", "dynamic-update-slice(", "all-reduce(",
           "gather(", "scatter(", "sort(", "reduce(")
    return sum(1 for line in entry.splitlines() if any(f" {op}" in line for op in ops))


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


def bench_jax(cfg, params, batch, prompt_len, new_tokens, warmup, repeats, seed=0, settings=None) -> dict:
    """Prefill, decode-loop and end-to-end timings of ``generate``'s programs; ``settings``:
    ``Sampling`` fields for every row (e.g. logprobs, penalties), default none."""
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
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "cache_len": s,
        "prefill_ms": pre["median_s"] * 1e3, "decode_ms_per_step": step_s * 1e3,
        "tokens_per_s": batch / step_s, "e2e_s": end["median_s"],
        "param_bytes_per_step": p_bytes, "kv_bytes_per_step": kv_bytes, "kv_valid_bytes_per_step": kv_valid,
        "timings": {"prefill": pre, "decode_loop": dec, "end_to_end": end},
    }
