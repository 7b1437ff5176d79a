"""Continuous batching benchmark: the slot engine vs static batching with ``generate``, same batch
size, on a mixed-length workload.

    python benchmarks/engine.py                 # GPU: Llama-3.2-1B shape (random bf16), 256 requests, 32 slots
    python benchmarks/engine.py --tiny          # the tiny config, 48 requests, 8 slots (CPU smoke test)

Workload (seeded): ``--requests`` requests, all submitted at t = 0, prompt lengths uniform in
``[--prompt-min, --prompt-max]`` (random ids), new-token budgets long-tailed: 1 + an exponential
of mean ``--new-mean``, clipped to ``--new-max``; no stop ids, so every request runs to its own
budget (random weights would hit eos by chance only). Greedy.

- **static**: requests in arrival order, ``--slots`` at a time, each batch one ``generate`` call
  with per-row budgets (a batch lasts as long as its longest row) and the engine's cache length
  (``--static-cache tight``: each batch's own bucketed length instead). A request's latency is
  its batch's end (``generate`` returns all rows together).
- **engine**: ``Engine(max_slots=--slots, max_seq_len, --buckets, --prefill-batch,
  --steps-per-call)``, max_seq_len = longest prompt + longest budget rounded up to a multiple of
  64; submit everything, ``run_until_idle``. TTFT = submit to the first token
  on the host. Several ``--steps-per-call`` values give one engine row each. ``host ms/call`` =
  the loop's own time per decode call (delivery, bookkeeping: it overlaps the device's work),
  ``dispatch ms/call`` = time inside the jitted calls' dispatch, ``wait ms/call`` = time it waited
  for device results. While the wait is well above zero the host keeps the device fed; a large
  dispatch time means the calls block on the device (it is the bottleneck).

- **paged** (``--block-size``): the same engine with ``Engine(block_size=, num_blocks=--num-blocks)``
  (default: the dense cache's memory, so no preemption), one more row per ``--steps-per-call``;
  ``preemptions`` counts the requests that gave their blocks back and were recomputed.

Both are warm: the engine's ``warmup()`` compiles its programs; the static pass runs the whole
workload once untimed (compiling every batch's shapes) before the timed passes; each method
reports its median of ``--repeats`` passes. Throughput =
generated tokens / wall time (prefill included). ``slot_use`` = useful decode steps / (slots x
steps run): for static, sum of budgets / sum over batches of (slots x longest budget).

Prints a markdown table (device, date, versions) and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from decode import SHAPES, random_params  # noqa: E402
from realm_jax.config import ModelConfig  # noqa: E402
from realm_jax.engine import Engine  # noqa: E402
from realm_jax.generation import bucket_cache, generate  # noqa: E402
from realm_jax.loading import Model  # noqa: E402


def workload(n: int, vocab: int, pmin: int, pmax: int, new_mean: float, new_max: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(pmin, pmax + 1, n)
    news = np.clip(1 + rng.exponential(new_mean - 1, n).astype(int), 1, new_max)
    return [rng.integers(3, vocab, int(p)).tolist() for p in lens], [int(x) for x in news]


def run_static(model, prompts, news, slots: int, max_len: int | None) -> dict:
    t0 = time.perf_counter()
    latencies, tokens, steps = [], 0, 0
    for i in range(0, len(prompts), slots):
        ps, ns = prompts[i:i + slots], news[i:i + slots]
        res = generate(model, ps, ns, stop_ids=[], max_len=max_len)
        done = time.perf_counter() - t0
        latencies += [done] * len(ps)
        tokens += sum(len(t) for t in res.tokens)
        steps += max(ns)
    wall = time.perf_counter() - t0
    assert tokens == sum(news)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "slot_use": sum(news) / (slots * steps),
            "latency_p50_s": float(np.percentile(latencies, 50)), "latency_p90_s": float(np.percentile(latencies, 90)),
            "ttft_p50_s": None}


def run_engine(eng: Engine, prompts, news, **settings) -> dict:
    before = eng.stats()
    t0 = time.perf_counter()
    handles = [eng.submit(p, n, stop_ids=[], **settings) for p, n in zip(prompts, news)]
    eng.run_until_idle()
    wall = time.perf_counter() - t0
    tokens = sum(len(h.result().tokens) for h in handles)
    assert tokens == sum(news)
    st = eng.stats()
    lat = [h.latency for h in handles]
    ttft = [h.ttft for h in handles]
    calls = st.decode_calls - before.decode_calls
    occupancy = (st.mean_occupancy * st.decode_calls - before.mean_occupancy * before.decode_calls) / calls
    wait = st.wait_s - before.wait_s
    dispatch = st.dispatch_s - before.dispatch_s
    host = st.busy_s - before.busy_s - wait - dispatch
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "slot_use": None,
            "mean_occupancy": occupancy, "decode_calls": calls,
            "prefill_calls": st.prefill_calls - before.prefill_calls,
            "host_ms_per_call": 1e3 * host / calls, "wait_ms_per_call": 1e3 * wait / calls,
            "dispatch_ms_per_call": 1e3 * dispatch / calls,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p90_s": float(np.percentile(lat, 90)),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p90_s": float(np.percentile(ttft, 90)),
            "preemptions": st.preemptions - before.preemptions}


def host_profile(fn, top: int) -> None:
    """Run ``fn`` once under cProfile; print its ``top`` functions by own time and by cumulative time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    for key in ("tottime", "cumulative"):
        print(f"\n## host profile of one engine pass, by {key}\n", flush=True)
        pstats.Stats(prof, stream=sys.stdout).sort_stats(key).print_stats(top)


def device_profile(fn) -> None:
    """Run ``fn`` once under ``jax.profiler.trace``; print the device's busy time per compiled
    program, and its idle time: gaps between consecutive kernels, summed by the programs on either
    side (a gap inside one program is launch overhead; one between programs is the host being late)."""
    import glob
    import gzip
    import json
    import tempfile

    from profile_decode import device_events

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            fn()
        with gzip.open(glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)[0]) as f:
            events = sorted(device_events(json.load(f)), key=lambda e: e["ts"])
    if not events:
        print("no device events in the trace")
        return
    module = [str(e.get("args", {}).get("hlo_module", "?")) for e in events]
    busy, gaps = {}, {}
    end = events[0]["ts"]
    for i, e in enumerate(events):
        busy[module[i]] = busy.get(module[i], 0.0) + e["dur"]
        if i:
            key = module[i - 1] if module[i - 1] == module[i] else f"{module[i - 1]} -> {module[i]}"
            n, t = gaps.get(key, (0, 0.0))
            gaps[key] = (n + 1, t + max(0.0, e["ts"] - end))
        end = max(end, e["ts"] + e["dur"])
    span = (end - events[0]["ts"]) / 1e3
    print(f"\n## device profile of one engine pass: {len(events)} kernels, span {span:.1f} ms, "
          f"busy {sum(busy.values()) / 1e3:.1f} ms\n")
    for name, t in sorted(busy.items(), key=lambda kv: -kv[1])[:8]:
        print(f"busy {t / 1e3:9.1f} ms  {name}")
    for name, (n, t) in sorted(gaps.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"idle {t / 1e3:9.1f} ms  {n:7d} gaps  {name}")
    sys.stdout.flush()


def median_run(fn, repeats: int) -> dict:
    """The run with the median wall time of ``repeats`` runs."""
    runs = sorted((fn() for _ in range(max(1, repeats))), key=lambda r: r["wall_s"])
    return runs[len(runs) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, choices=["llama-1b", "llama-8b", "tiny"])
    ap.add_argument("--tiny", action="store_true", help="tiny config and small workload (CPU smoke test)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default bf16 (f32 with --tiny)")
    ap.add_argument("--layout", default="per_layer", choices=["per_layer", "stacked", "decode"],
                    help="the model's runtime layout (runtime.prepare); 'decode' is the old name of per_layer")
    ap.add_argument("--requests", type=int, default=None, help="default 256 (48 with --tiny)")
    ap.add_argument("--slots", type=int, default=None, help="engine slots = static batch size; default 32 (8 tiny)")
    ap.add_argument("--prompt-min", type=int, default=None, help="default 32 (4 tiny)")
    ap.add_argument("--prompt-max", type=int, default=None, help="default 512 (48 tiny)")
    ap.add_argument("--new-mean", type=float, default=None, help="default 128 (24 tiny)")
    ap.add_argument("--new-max", type=int, default=None, help="default 512 (96 tiny)")
    ap.add_argument("--steps-per-call", type=int, nargs="+", default=[16],
                    help="decode steps per device call; several values: one engine row each")
    ap.add_argument("--prefill-batch", type=int, nargs="+", default=None,
                    help="prefill call sizes (rows); default 1 2 4 8 (1 2 4 tiny)")
    ap.add_argument("--buckets", type=int, nargs="+", default=None,
                    help="prompt buckets (default: 1/4, 2/4, 3/4 and 4/4 of the longest prompt's power of two)")
    ap.add_argument("--static-cache", default="same", choices=["same", "tight"])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of each method; the median is reported")
    ap.add_argument("--host-profile", type=int, default=0, metavar="N",
                    help="after the timed passes, one more engine pass under cProfile: print its top N functions")
    ap.add_argument("--trace", action="store_true",
                    help="after the timed passes, one more engine pass under the profiler: device busy time per "
                         "program and the idle gaps between kernels")
    ap.add_argument("--logprobs", type=int, default=None, metavar="N",
                    help="also run each engine with max_logprobs=N, every request asking for N alternatives")
    ap.add_argument("--block-size", type=int, default=None, metavar="N",
                    help="also run the engine with a paged KV cache of blocks of N positions")
    ap.add_argument("--num-blocks", type=int, default=None, metavar="N",
                    help="blocks in the paged pool (default: slots x max_seq_len / block size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    tiny = args.tiny or args.config == "tiny"
    name = args.config or ("tiny" if tiny else "llama-1b")
    d = (lambda v, big, small: v if v is not None else (small if tiny else big))  # noqa: E731
    n, slots = d(args.requests, 256, 48), d(args.slots, 32, 8)
    pmin, pmax = d(args.prompt_min, 32, 4), d(args.prompt_max, 512, 48)
    new_mean, new_max = d(args.new_mean, 128.0, 24.0), d(args.new_max, 512, 96)
    pbatch = tuple(d(args.prefill_batch, (1, 2, 4, 8), (1, 2, 4)))
    dtype = jnp.dtype(d(args.dtype, "bfloat16", "float32"))

    cfg = ModelConfig(**SHAPES[name])
    if args.layout == "decode":
        args.layout = "per_layer"
    model = Model(cfg, random_params(cfg, dtype), None)
    model.prepare(layout=args.layout)  # the runtime the engine and generate serve
    prompts, news = workload(n, cfg.vocab_size, pmin, pmax, new_mean, new_max, args.seed)
    max_seq_len = bucket_cache(pmax + new_max)
    top = 1 << (pmax - 1).bit_length()  # four prompt buckets: multiples of a quarter of pmax (power of two)
    buckets = args.buckets or sorted({min(max(16, top * i // 4), max_seq_len) for i in (1, 2, 3, 4)})

    env = common.environment()
    print(f"# engine benchmark\n\n{common.environment_line(env)}\n", flush=True)
    print(f"{name} {args.layout} {dtype.name}: {n} requests, prompts {pmin}..{pmax}, new tokens mean "
          f"{np.mean(news):.0f} max {max(news)}; {slots} slots, max_seq_len {max_seq_len}, buckets {buckets}",
          flush=True)

    rows = []
    runs = [(steps, None, None) for steps in args.steps_per_call]
    if args.logprobs is not None:
        runs += [(steps, args.logprobs, None) for steps in args.steps_per_call]
    if args.block_size is not None:
        runs += [(steps, None, args.block_size) for steps in args.steps_per_call]
    for steps, lp, bs in runs:
        eng = Engine(model, max_slots=slots, max_seq_len=max_seq_len, prefill_buckets=buckets,
                     prefill_batch=pbatch, decode_steps_per_call=steps, max_logprobs=lp, block_size=bs,
                     num_blocks=None if bs is None else args.num_blocks)
        t = time.perf_counter()
        eng.warmup()
        extra = ("" if lp is None else f", logprobs={lp}") + ("" if bs is None else f", paged {bs}x{eng.num_blocks}")
        label = f"engine ({steps} steps/call{extra})"
        print(f"{label} warm-up (compile): {time.perf_counter() - t:.1f} s", flush=True)
        settings = {} if lp is None else {"logprobs": lp}
        rows.append({"method": label, "steps_per_call": steps, "logprobs": lp, "block_size": bs,
                     **median_run(lambda e=eng, s=settings: run_engine(e, prompts, news, **s), args.repeats)})
        print(f"{rows[-1]['method']}: {rows[-1]['tokens_per_s']:.0f} tok/s", flush=True)
        if args.host_profile:
            host_profile(lambda e=eng: run_engine(e, prompts, news), args.host_profile)
        if args.trace:
            device_profile(lambda e=eng: run_engine(e, prompts, news))
        del eng  # free its cache before the next one

    static_len = max_seq_len if args.static_cache == "same" else None
    t = time.perf_counter()
    run_static(model, prompts, news, slots, static_len)  # compiles every batch's shapes
    print(f"static warm-up pass: {time.perf_counter() - t:.1f} s", flush=True)
    rows.append({"method": f"static generate (cache {args.static_cache})",
                 **median_run(lambda: run_static(model, prompts, news, slots, static_len), args.repeats)})
    print(f"static: {rows[-1]['tokens_per_s']:.0f} tok/s", flush=True)
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / rows[-1]["tokens_per_s"]

    cols = [("method", "method"), ("tokens", "tokens"), ("wall_s", "wall s"), ("tokens_per_s", "tok/s"),
            ("speedup", "x static"), ("slot_use", "slot use"), ("mean_occupancy", "occupancy"),
            ("ttft_p50_s", "TTFT p50 s"), ("latency_p50_s", "latency p50 s"), ("latency_p90_s", "latency p90 s"),
            ("decode_calls", "decode calls"), ("host_ms_per_call", "host ms/call"),
            ("wait_ms_per_call", "wait ms/call"), ("dispatch_ms_per_call", "dispatch ms/call")]
    if args.block_size is not None:
        cols.append(("preemptions", "preemptions"))
    print()
    print(common.markdown_table(rows, cols))
    print(f"\n{common.environment_line(env)}; {name}, {n} requests, {slots} slots")
    out = common.results_path(args.out, f"engine-{name}", env)
    common.write_json(out, {"environment": env, "args": vars(args), "config": name, "slots": slots,
                            "max_seq_len": max_seq_len, "buckets": buckets, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
