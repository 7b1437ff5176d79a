"""Decode cost of the sampling surface: ms/step with log-probs, penalties, min-p and logit bias
on, against plain decoding, in one process (``bench.bench_jax``: prompt 128, 128 new tokens,
bf16, random weights, the per-layer runtime). Target (issue): each under +10% at batch 1 and 64
on the 1B shape.

    python benchmarks/sampling_surface.py --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json

import jax.numpy as jnp

VARIANTS = {
    "greedy": {},
    "greedy + logprobs=0": dict(logprobs=0),
    "greedy + logprobs=5": dict(logprobs=5),
    "sampled + logprobs=5": dict(temperature=0.7, top_p=0.9, logprobs=5),
    "greedy + penalties": dict(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.2),
    "greedy + logit_bias": dict(logit_bias={5: 1.0, 7: -1.0}),
    "sampled t=0.7 top_p=0.9": dict(temperature=0.7, top_p=0.9),
    "sampled + min_p=0.05": dict(temperature=0.7, top_p=0.9, min_p=0.05),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                    help="a subset (default: all; the first is the baseline)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from realm_jax import bench
    from realm_jax.config import ModelConfig
    from realm_jax.runtime import prepare

    cfg = ModelConfig(**bench.SHAPES[args.shape])
    rt = prepare(bench.random_params(cfg, jnp.bfloat16), cfg, layout="per_layer")
    gc.collect()
    rows = []
    for b in args.batch:
        base = None
        for name in args.variants or list(VARIANTS):
            settings = VARIANTS[name]
            r = bench.bench_jax(cfg, rt, b, 128, 128, 1, args.repeats, settings=settings)
            r.pop("timings", None)
            ms = r["decode_ms_per_step"]
            base = ms if base is None else base
            r.update(shape=args.shape, variant=name, vs_greedy=ms / base - 1)
            rows.append(r)
            print(f"{args.shape} B={b:<3} {name:>26}: {ms:.3f} ms/step ({100 * (ms / base - 1):+.1f}% vs greedy)",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": bench.environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
