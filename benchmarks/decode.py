"""Decode benchmark: prefill time, ms per decode step, tokens/s and memory-bandwidth utilisation.

    python benchmarks/decode.py                       # llama-1b, llama-8b, smollm2 at batch 1 and 64
    python benchmarks/decode.py --config llama-1b --peer hf
    python benchmarks/decode.py --tiny                # a tiny config: a CPU smoke test

Models: random bf16 weights in the Llama-3.2-1B shape (L16 D2048 F8192 N32 K8 H64 V128256, tied)
and the Llama-3-8B shape (L32 D4096 F14336 N32 K8 H128 V128256), the built-in SmolLM2-135M
(real weights, cast to bf16), and ``tiny``. Every row: ``--prompt-len`` random prompt tokens per
row, ``--new-tokens`` greedy new tokens, no stop ids (every row runs to the limit).

The JAX side runs the runtime form ``runtime.prepare(params, cfg, layout=--layout)``
(per-layer by default: each layer's weights their own buffers).

Method (JAX side), all through ``realm_jax.generation``'s jitted building blocks:
- prefill: ``start_jit`` (prefill of the [B, P] batch + the first token), a fresh cache per call.
- decode: ``decode_loop_jit`` alone, on a state just prefilled (untimed), running the whole
  ``lax.while_loop`` of N-1 steps in one call; ms/step = time / (N-1), tokens/s = B (N-1) / time.
- end-to-end: ``generate_jit`` (prefill + loop in one program), as a cross-check.
Each is warmed up first (compilation), blocked on with ``block_until_ready``, and the median of
``--repeats`` runs is reported.

MBU = bytes read per decode step / step time / measured bandwidth, where bytes per step =
params (the embedding table only when it doubles as the tied head; otherwise only B rows of it
are gathered) + the whole allocated KV cache (K and V, [L, B, S, K, H]: the attention reads all
S slots every step, masked). The bandwidth is measured in the same run: the best of several
device-to-device copy kernels, counting read + write (``bench.copy_bandwidth``; ``best`` names
it). ``mbu_valid_cache`` in the JSON counts only the average valid cache length instead of S.

``--peer hf``: HF transformers ``generate`` on the same device in the same process, same shapes,
random bf16 weights (built from the config), ``cache_implementation="static"`` (on CUDA,
``generate`` then compiles the forward with ``torch.compile``, mode reduce-overhead); greedy with
``min_new_tokens = max_new_tokens`` so no row stops early. Its decode ms/step is
(time for N new tokens - time for 1) / (N-1); its prefill is the time for 1 new token.

Prints a markdown table (device, date, versions) and writes all numbers to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for the HF peer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from realm_jax.config import ModelConfig  # noqa: E402
from realm_jax.runtime import prepare  # noqa: E402

from realm_jax.bench import CONFIGS, SHAPES, bench_jax, bytes_per_step, random_params  # noqa: E402,F401
from realm_jax.bench import roofline as bench_roofline  # noqa: E402


LAYOUT_ALIASES = {"decode": "per_layer"}  # the old name of the per-layer runtime


def load_config(name: str, dtype):
    """(cfg, canonical params) for a benchmark config."""
    if name == "smollm2":
        import realm_jax

        model = realm_jax.load("smollm2-135m-instruct", dtype=dtype)
        return model.config, model.params
    cfg = ModelConfig(**SHAPES[name])
    return cfg, random_params(cfg, dtype)


def bench_hf(cfg: ModelConfig, batch, prompt_len, new_tokens, warmup, repeats, seed=0) -> dict:
    """HF transformers generate, static cache (+ torch.compile on CUDA), random bf16 weights."""
    import time

    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d = cfg.to_hf_dict()
    d.pop("architectures", None)
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), device=dev)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 cache_implementation="static", pad_token_id=0)
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    def timed(n):
        ts = []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            out = run(n)
            if i >= warmup:
                ts.append(time.perf_counter() - t0)
        assert out.shape[1] == prompt_len + n
        return float(np.median(ts)), ts

    t1, all1 = timed(1)
    tn, alln = timed(new_tokens)
    step = (tn - t1) / (new_tokens - 1)
    del model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    # generate compiles the forward by itself for a static cache on CUDA; on CPU it runs eager
    return {"hf_device": dev, "hf_compiled": dev == "cuda",
            "hf_prefill_ms": t1 * 1e3, "hf_decode_ms_per_step": step * 1e3, "hf_tokens_per_s": batch / step,
            "hf_generate_s": tn, "hf_timings": {"one_token_s": all1, "all_tokens_s": alln}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", choices=CONFIGS, help="repeatable (default: llama-1b, llama-8b, smollm2)")
    ap.add_argument("--tiny", action="store_true", help="the tiny config with short lengths (CPU smoke test)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (16 with --tiny)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256 (16 with --tiny)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--layout", default="per_layer", choices=["per_layer", "stacked", "decode"],
                    help="runtime layout (runtime.prepare): 'per_layer' (fused, per-layer buffers; 'decode' is "
                         "an alias) or 'stacked' ([L, ...] leaves, lax.scan)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peer", choices=["hf"], default=None, help="also run HF transformers generate")
    ap.add_argument("--peer-only", action="store_true",
                    help="run only the peer (e.g. in its own process, so JAX's memory pool cannot starve it)")
    ap.add_argument("--out", default=None, help="JSON results path (default benchmarks/results/decode-<device>.json)")
    args = ap.parse_args(argv)
    args.layout = LAYOUT_ALIASES.get(args.layout, args.layout)
    if args.peer_only and not args.peer:
        ap.error("--peer-only needs --peer")

    configs = args.config or (["tiny"] if args.tiny else ["llama-1b", "llama-8b", "smollm2"])
    plen = args.prompt_len or (16 if args.tiny else 128)
    ntok = args.new_tokens or (16 if args.tiny else 256)
    if ntok < 2:
        ap.error("--new-tokens must be >= 2 (decode steps = new tokens - 1)")
    dtype = jnp.dtype(args.dtype)
    env = common.environment()
    bw = common.copy_bandwidth()
    print(f"# decode benchmark\n\n{common.environment_line(env)}\n")
    print(f"measured copy bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s (read + write), the best copy kernel: "
          f"{bw['best']} ({bw['best_kernel']})\n", flush=True)

    rows = []
    for name in configs:
        if args.peer_only:
            cfg = ModelConfig(**SHAPES[name])
            for b in args.batch:
                r = {"config": name, "batch": b, "prompt_len": plen, "new_tokens": ntok}
                r.update(bench_hf(cfg, b, plen, ntok, max(args.warmup, 2), args.repeats))
                rows.append(r)
                print(f"{name} B={b} HF: {r['hf_decode_ms_per_step']:.3f} ms/step, {r['hf_tokens_per_s']:.0f} tok/s, "
                      f"prefill {r['hf_prefill_ms']:.1f} ms (compiled: {r['hf_compiled']})", flush=True)
                if args.out:
                    common.write_json(args.out, {"environment": env, "rows": rows})
            continue
        cfg, params = load_config(name, dtype)
        rt = prepare(params, cfg, layout=args.layout)
        del params  # the runtime holds its own copy of the projections
        gc.collect()
        for b in args.batch:
            r = {"config": name, "layout": args.layout, "dtype": args.dtype}
            r.update(bench_jax(cfg, rt, b, plen, ntok, args.warmup, args.repeats))
            step_s = r["decode_ms_per_step"] / 1e3
            r.update(bench_roofline(r["param_bytes_per_step"], r["kv_bytes_per_step"], step_s, bw))
            r["mbu"] = r["floor_ms"] / r["decode_ms_per_step"]
            r["mbu_valid_cache"] = (r["param_bytes_per_step"] + r["kv_valid_bytes_per_step"]) / step_s / bw["bytes_per_s"]
            rows.append(r)
            print(f"{name} B={b}: prefill {r['prefill_ms']:.2f} ms, decode {r['decode_ms_per_step']:.3f} ms/step, "
                  f"{r['tokens_per_s']:.0f} tok/s, MBU {r['mbu']:.1%} (vs {bw['best']})", flush=True)
        del rt
        gc.collect()
        if args.peer == "hf":
            for r in [r for r in rows if r["config"] == name]:
                r.update(bench_hf(cfg, r["batch"], plen, ntok, max(args.warmup, 2), args.repeats))
                r["speedup_vs_hf"] = r["tokens_per_s"] / r["hf_tokens_per_s"]
                print(f"{name} B={r['batch']} HF: {r['hf_decode_ms_per_step']:.3f} ms/step "
                      f"(compiled: {r['hf_compiled']})", flush=True)

    if args.peer_only:
        return 0
    cols = [("config", "config"), ("layout", "layout"), ("batch", "B"), ("prompt_len", "prompt"),
            ("new_tokens", "new"), ("prefill_ms", "prefill ms"), ("decode_ms_per_step", "decode ms/step"),
            ("tokens_per_s", "tok/s"), ("gb_per_step", "GB read/step"), ("mbu_pct", "MBU %")]
    if args.peer == "hf":
        cols += [("hf_prefill_ms", "HF prefill ms"), ("hf_decode_ms_per_step", "HF ms/step"),
                 ("hf_tokens_per_s", "HF tok/s"), ("speedup_vs_hf", "x HF")]
    print()
    print(common.markdown_table(rows, cols))
    print(f"\n{common.environment_line(env)}; copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['best']})")
    out = common.results_path(args.out, "decode", env)
    common.write_json(out, {"environment": env, "bandwidth": bw, "args": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
