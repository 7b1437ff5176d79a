"""Decode speed of the fast path before and after the runtime-form change, in one process.

Runs ``bench.bench_jax`` (prompt 128, 128 new tokens, bf16, random weights) for the 1B and 8B
shapes at batch 1 and 64 with the package found first on ``sys.path``: the current tree's
per-layer runtime (``runtime.prepare(params, cfg, layout="per_layer")``), or, with
``--old DIR``, a checkout of the previous commit whose fast path was ``model.decode_layout``.
Also reports the compile time (first ``generate`` call minus a warm one).

    python benchmarks/runtime_form.py --out new.json
    PYTHONPATH=OLD_CHECKOUT python benchmarks/runtime_form.py --old --out old.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import jax
import jax.numpy as jnp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", action="store_true", help="the package on sys.path is the pre-runtime-form one")
    ap.add_argument("--shapes", nargs="+", default=["llama-1b", "llama-8b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from realm_jax import bench
    from realm_jax import generation as gen
    from realm_jax.config import ModelConfig

    rows = []
    for shape in args.shapes:
        cfg = ModelConfig(**bench.SHAPES[shape])
        params = bench.random_params(cfg, jnp.bfloat16)
        if args.old:
            from realm_jax.model import decode_layout

            fast = decode_layout(params)
        else:
            from realm_jax.runtime import prepare

            fast = prepare(params, cfg, layout="per_layer")
        del params
        gc.collect()
        for b in args.batch:
            req = gen.validate_request(cfg, [[5] * 128] * b, 128, stop_ids=[])
            pad = gen.pad_request(req)
            ctl = gen.Controls.of(pad)

            def once():
                cache = gen.new_cache(cfg, fast, pad.tokens.shape[0], pad.cache_len)
                t0 = time.perf_counter()
                jax.block_until_ready(gen.generate_jit(fast, cfg, jnp.asarray(pad.tokens), jnp.asarray(pad.lengths),
                                                       cache, ctl, out_len=pad.cache_len).out)
                return time.perf_counter() - t0

            first, warm = once(), once()
            r = bench.bench_jax(cfg, fast, b, 128, 128, 1, args.repeats)
            r.update(shape=shape, impl="old decode_layout" if args.old else "runtime per_layer",
                     compile_s=first - warm)
            r.pop("timings", None)
            rows.append(r)
            print(f"{r['impl']:>18} {shape:>9} B={b:<3} decode {r['decode_ms_per_step']:.3f} ms/step  "
                  f"prefill {r['prefill_ms']:.2f} ms  compile+first {r['compile_s']:.1f} s", flush=True)
        del fast
        gc.collect()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": bench.environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
