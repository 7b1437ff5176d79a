"""What HTTP costs: one workload through ``realm-jax serve``'s app (uvicorn on 127.0.0.1, streamed
completions, ``concurrency`` clients at a time) against the same workload submitted to the same
in-process ``Engine`` (``concurrency`` threads at a time). Throughput (generated tokens / wall
second), time to first token and latency percentiles. 1B shape (``--shape``), bf16, random
weights, a real tokenizer (``--tokenizer``: an HF tokenizer directory), greedy, random prompts;
the HTTP clients run in a separate process (httpx, raw server-sent events).

    python benchmarks/serve.py --tokenizer DIR --requests 256 --concurrency 32 --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import jax.numpy as jnp
import numpy as np


def percentiles(xs) -> dict:
    xs = np.asarray(xs, float)
    return {f"p{q}": round(float(np.percentile(xs, q)) * 1e3, 2) for q in (50, 90, 99)}


def in_process(engine, prompts, new: int, concurrency: int) -> dict:
    lock, nxt, rows = threading.Lock(), [0], []

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(prompts):
                return
            h = engine.submit(prompts[i], new, temperature=0.0)
            r = h.result()
            rows.append((h.ttft, h.latency, len(r.tokens)))

    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    return _summary(rows, wall)


async def _http(url: str, prompts, new: int, concurrency: int) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    rows = []

    async def one(client, p):
        async with gate:
            t0 = time.perf_counter()
            first, used = None, 0
            body = {"model": "base", "prompt": p, "max_tokens": new, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if ev.get("usage"):
                        used = ev["usage"]["completion_tokens"]
                    elif first is None and ev["choices"] and ev["choices"][0]["text"]:
                        first = time.perf_counter()
            end = time.perf_counter()
            rows.append(((first or end) - t0, end - t0, used))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t = time.perf_counter()
        await asyncio.gather(*(one(client, p) for p in prompts))
        wall = time.perf_counter() - t
    return _summary(rows, wall)


def engine_delta(before, after, wall: float) -> dict:
    """What the engine did between two ``stats()``: its calls, and per decode call the wall time,
    the host's own time (``busy``, dispatch and waits included), its dispatch and its waits for
    device results (while the wait stays above zero, the host keeps the device fed)."""
    calls = max(1, after.decode_calls - before.decode_calls)
    per = lambda a, b: round(1e3 * (a - b) / calls, 2)  # noqa: E731
    return {"decode_calls": after.decode_calls - before.decode_calls,
            "prefill_calls": after.prefill_calls - before.prefill_calls,
            "wall_ms_per_call": round(1e3 * wall / calls, 2), "busy_ms_per_call": per(after.busy_s, before.busy_s),
            "dispatch_ms_per_call": per(after.dispatch_s, before.dispatch_s),
            "wait_ms_per_call": per(after.wait_s, before.wait_s)}


def _summary(rows, wall: float) -> dict:
    ttft, lat, toks = zip(*rows)
    return {"requests": len(rows), "tokens": int(sum(toks)), "wall_s": round(wall, 3),
            "tokens_per_s": round(sum(toks) / wall, 1), "ttft_ms": percentiles(ttft), "latency_ms": percentiles(lat)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--slots", type=int, default=None, help="engine slots (default: --concurrency)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-batch", type=int, nargs="+", default=None,
                    help="the engine's prefill call sizes (default: the engine's)")
    ap.add_argument("--max-id", type=int, default=40000, help="prompt ids are drawn from [3, max-id)")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--switch-interval", type=float, default=None, metavar="S",
                    help="the interpreter's thread switch interval for the server process (default: Python's 5 ms)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--client", default=None, metavar="URL",
                    help="(internal) run only the HTTP clients against URL and print their summary")
    args = ap.parse_args()
    if args.client:
        rng = np.random.default_rng(0)
        prompts = rng.integers(3, args.max_id, (args.requests, args.prompt)).tolist()
        print(json.dumps(asyncio.run(_http(args.client, prompts, args.new_tokens, args.concurrency))))
        return
    import subprocess
    import sys

    import uvicorn

    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    from realm_jax import bench
    from realm_jax.compilation_cache import enable_compilation_cache
    from realm_jax.config import ModelConfig
    from realm_jax.engine import Engine
    from realm_jax.loading import Model
    from realm_jax.server import Server, build_app
    from realm_jax.tokenizer import Tokenizer

    enable_compilation_cache()  # a second run (another code version, another setting) skips compiling
    cfg = ModelConfig(**bench.SHAPES[args.shape])
    model = Model(cfg, bench.random_params(cfg, jnp.bfloat16), Tokenizer.from_hf_dir(args.tokenizer))
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, args.max_id, (args.requests, args.prompt)).tolist()  # the client process draws the same
    engine = Engine(model, max_slots=args.slots or args.concurrency, max_seq_len=args.prompt + args.new_tokens + 16,
                    prefill_buckets=(args.prompt,), prefill_batch=args.prefill_batch)
    engine.warmup()
    engine.start()
    in_process(engine, prompts[:args.concurrency], args.new_tokens, args.concurrency)  # warm
    # (warm-up also reaches every prefill size a later admission uses)
    s0 = engine.stats()
    direct = in_process(engine, prompts, args.new_tokens, args.concurrency)
    s1 = engine.stats()
    direct["engine"] = engine_delta(s0, s1, direct["wall_s"])

    server = Server(model, engine, name="base", max_queue=10 * args.requests)
    uv = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=args.port, log_level="warning"))
    th = threading.Thread(target=uv.run, daemon=True)
    th.start()
    while not uv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{args.port}"
    # the clients run in a process of their own, as they would on other machines
    cmd = [sys.executable, __file__, "--tokenizer", args.tokenizer, "--client", url,
           "--concurrency", str(args.concurrency), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
           "--max-id", str(args.max_id)]

    def clients(requests: int) -> dict:
        out = subprocess.run(cmd + ["--requests", str(requests)], check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    clients(args.concurrency)  # warm: the app's own first requests
    s2 = engine.stats()
    http = clients(args.requests)
    http["engine"] = engine_delta(s2, engine.stats(), http["wall_s"])
    uv.should_exit = True
    th.join(30)
    engine.close()
    out = {"shape": args.shape, "requests": args.requests, "concurrency": args.concurrency,
           "slots": args.slots or args.concurrency, "prompt": args.prompt,
           "new_tokens": args.new_tokens, "switch_interval_s": sys.getswitchinterval(),
           "prefill_batch": engine.prefill_rows, "in_process": direct, "http": http,
           "http_throughput_cost": round(1 - http["tokens_per_s"] / direct["tokens_per_s"], 4)}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
