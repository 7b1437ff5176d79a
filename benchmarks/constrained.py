"""Decode cost of constrained decoding: ms per decode step with a regex or a JSON schema on
every row, against the same rows unconstrained, in one process. 1B shape, bf16, random weights,
a real 49,152-token byte-level BPE tokenizer (``--tokenizer``: an HF tokenizer directory), prompt
128, stop ids off. The per-step cost is (t(N) - t(8)) / (N - 8) over whole ``generate`` calls,
so it includes the host's mask computation and the host round trip of every step.

    python benchmarks/constrained.py --tokenizer DIR --out results.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

VARIANTS = {
    "greedy": None,
    "regex [a-z ]*": {"regex": "[a-z ]*"},
    "json schema (array of strings)": {"json_schema": {"type": "array", "items": {"type": "string"}}},
}


def _time(model, prompts, n, **kw) -> tuple[float, float]:
    import realm_jax

    t = time.perf_counter()
    res = realm_jax.generate(model, prompts, n, stop_ids=[], **kw)
    return time.perf_counter() - t, float(np.mean([len(x) for x in res.tokens]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from realm_jax import bench
    from realm_jax.config import ModelConfig
    from realm_jax.loading import Model
    from realm_jax.tokenizer import Tokenizer

    cfg = ModelConfig(**bench.SHAPES[args.shape])
    model = Model(cfg, bench.random_params(cfg, jnp.bfloat16), Tokenizer.from_hf_dir(args.tokenizer))
    rng = np.random.default_rng(0)
    rows = []
    for b in args.batch:
        prompts = rng.integers(3, min(40000, cfg.vocab_size), (b, 128)).tolist()
        base = None
        for name, c in VARIANTS.items():
            kw = {} if c is None else {"constraint": c}
            n = args.new_tokens
            _time(model, prompts, n, **kw), _time(model, prompts, 8, **kw)  # compile
            long = min(_time(model, prompts, n, **kw) for _ in range(args.repeats))
            short = min(_time(model, prompts, 8, **kw) for _ in range(args.repeats))
            ms = 1e3 * (long[0] - short[0]) / (n - 8)
            base = ms if base is None else base
            rows.append(dict(shape=args.shape, batch=b, variant=name, ms_per_step=ms, vs_greedy=ms / base - 1,
                             mean_tokens=long[1], new_tokens=n))
            print(f"{args.shape} B={b:<3} {name:>32}: {ms:.3f} ms/step ({100 * (ms / base - 1):+.1f}% vs greedy; "
                  f"mean {long[1]:.0f} of {n} tokens)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": bench.environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
