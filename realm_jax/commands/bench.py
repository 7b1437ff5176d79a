"""``realm-jax bench``: prefill and decode speed with memory-bandwidth utilisation, for a built-in
shape with random weights or any checkpoint."""

from __future__ import annotations

import argparse

HELP = "measure prefill / decode speed and MBU for a model shape or checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench import SHAPES

    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", choices=sorted(SHAPES), action="append", default=None,
                     help="random weights of this shape (default: llama-1b); repeatable, one copy-bandwidth "
                          "measurement serves every shape")
    src.add_argument("--model", default=None, help="a checkpoint: HF dir, .gguf, or a built-in name")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--layout", default="per_layer", choices=["per_layer", "stacked"],
                   help="runtime layout (runtime.prepare; per_layer is the fast one for small batches on GPU)")
    p.add_argument("--int8", action="store_true", help="int8 weight-only (runtime.prepare(quantize='int8'))")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None,
                   help="also write every number (rows, copy kernels, environment) to this JSON file")
    from . import show_defaults

    show_defaults(p)


def run(args) -> int:
    import gc

    import jax.numpy as jnp

    from .. import bench
    from ..config import ModelConfig
    from ..errors import RealmError
    from ..runtime import prepare

    for name in ("prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < (2 if name == "new_tokens" else 1):
            raise RealmError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    if any(b < 1 for b in args.batch):
        raise RealmError(f"--batch: expected positive sizes, got {args.batch}")
    dtype = jnp.dtype(args.dtype)
    loaded = None
    if args.model:  # loaded first: a bad checkpoint fails before any measurement
        from ..loading import load

        model = load(args.model, dtype=dtype)
        loaded = model.config, model.params
        del model
    env = bench.environment()
    bw = bench.copy_bandwidth()
    rows = []
    for label in [args.model] if args.model else (args.shape or ["llama-1b"]):
        if loaded is not None:
            (cfg, params), loaded = loaded, None
        else:
            cfg = ModelConfig(**bench.SHAPES[label])
            params = bench.random_params(cfg, dtype)
        params = prepare(params, cfg, quantize="int8" if args.int8 else None, layout=args.layout)
        for b in args.batch:
            r = {"model": label, "layout": args.layout + (" int8" if args.int8 else "")}
            r.update(bench.bench_jax(cfg, params, b, args.prompt_len, args.new_tokens, 1, args.repeats,
                                     profile_kernels=True))
            r.update(bench.roofline(r["param_bytes_per_step"], r["kv_bytes_per_step"], r["decode_ms_per_step"] / 1e3,
                                    bw))
            r["kernels"] = bench.kernels_per_step(params, cfg, b, r["cache_len"])
            rows.append(r)
        del params
        gc.collect()
    cols = [("model", "model"), ("layout", "layout"), ("batch", "B"), ("prompt_len", "prompt"),
            ("new_tokens", "new"), ("prefill_ms", "prefill ms"), ("decode_ms_per_step", "decode ms/step"),
            ("tokens_per_s", "tok/s"), ("gb_per_step", "GB read/step"), ("floor_ms", "floor ms"),
            ("achieved_gb_s", "achieved GB/s"), ("kernels", "kernels/step"), ("mbu_pct", "MBU %")]
    print(bench.markdown_table(rows, cols))
    print()
    for r in rows:
        print(bench.roofline_line(f"{r['model']} B={r['batch']}", r))
    ranked = sorted(bench.copy_candidates(bw).items(), key=lambda kv: -kv[1])
    kinds = ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in ranked)
    sheet = f"; datasheet {bw['datasheet_bytes_per_s'] / 1e9:,.0f} GB/s" if "datasheet_bytes_per_s" in bw else ""
    print(f"\n{bench.environment_line(env)}; ceiling {bw['bytes_per_s'] / 1e9:,.1f} GB/s from {bw['best']} "
          f"({bw['best_kernel']}), the best of: {kinds} GB/s{sheet}; floor = bytes read per step / the ceiling; "
          "MBU = floor / step time")
    for name, err in bw.get("errors", {}).items():
        print(f"copy kernel {name} did not run: {err}")
    if not bw["meaningful"]:
        print("MBU: not reported on the CPU (the copy measures host memory, which decode does not stream the "
              "way an accelerator does)")
    if args.out:
        bench.write_json(args.out, {"environment": env, "bandwidth": bw, "args": vars(args), "rows": rows})
    return 0
