"""LoRA serving benchmark: decode tokens/s with no adapter, one merged, and several unmerged
adapters in one batch (one per row), on the same base model.

    python benchmarks/lora.py                   # Llama-3.2-1B shape, bf16, rank 16, batch 4 and 16
    python benchmarks/lora.py --tiny            # a tiny config: a CPU smoke test

Rows (same random base weights, same prompts, greedy, no stop ids), each a runtime
(``runtime.prepare(..., layout=--layout)``, built before timing):
- ``base``: no adapter.
- ``merged``: one adapter merged into the canonical weights (``lora.merge``), then prepared;
  should cost what ``base`` does.
- ``unmerged x1``: one adapter served unmerged to every row (``runtime.with_adapters``).
- ``unmerged x4``: a stack of 4 adapters (``lora.stack_adapters``), row b uses adapter b mod 4:
  ``with_adapters(base, cfg, stack)`` (every adapter's factors side by side on the rank axis,
  q|k|v and gate|up fused: two matmuls per fused projection and a per-row mask, no gather).
- ``unmerged x4 folded``: ``prepare(params, cfg, adapters=stack, fold=True)``: the A factors
  appended to the base weights, so the base matmul also gives the rank activations: one extra
  matmul (``@ b``) per fused projection and a mask.
Adapters target all seven projections at ``--rank``. The folded row checks that its tokens
match the plain stack's (``same_tokens_as_stack``: 90% of them, bf16 rounding may flip a few).
(``--only`` still takes the old names ``unmerged x4 fused`` / ``concat``: both are ``unmerged x4`` now.)

``--hlo`` adds op counts of one compiled decode step (``generation.decode_step``) per row: dots
(matmul ops and gemm library calls), gathers, concatenates (a concatenate of weights in every step
is XLA merging two matmuls that share an input by copying the weights) and top-level ops of the
step program (about its kernels on a GPU).

Method: prefill (``generation.start_jit``, untimed) then ``generation.decode_loop_jit`` for
``--new-tokens`` - 1 steps in one call, timed (warm-up first, median of ``--repeats``);
tokens/s = B * steps / time. ``overhead`` = base tokens/s / row tokens/s - 1.

Prints a markdown table (device, date, versions) and writes all numbers to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
import decode  # noqa: E402  (the decode benchmark: model shapes and random weights)
from realm_jax import generation as gen  # noqa: E402
from realm_jax import lora as lora_lib  # noqa: E402
from realm_jax.config import ModelConfig  # noqa: E402
from realm_jax.runtime import prepare, with_adapters  # noqa: E402


_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "opt-barrier"}


def hlo_counts(text: str) -> dict:
    """Op counts in compiled HLO text: ``dots`` (dot ops anywhere, fused or not, plus gemm library
    calls), ``gathers``, ``concatenates`` (anywhere) and ``top_ops`` (ops of the entry computation
    other than parameters, constants, tuples and bitcasts: about the kernels one call launches)."""
    import re

    counts = {"dots": 0, "gathers": 0, "concatenates": 0, "top_ops": 0}
    in_entry = False
    for line in text.splitlines():
        if line and not line[0].isspace():
            in_entry = line.startswith("ENTRY")
            continue
        m = re.search(r"=.*? ([a-z][\w\-]*)\(", line)
        if not m:
            continue
        op = m.group(1)
        gemm = op == "custom-call" and re.search(r'custom_call_target="[^"]*(gemm|matmul)', line)
        counts["dots"] += op == "dot" or bool(gemm)
        counts["gathers"] += op == "gather"
        counts["concatenates"] += op == "concatenate"
        counts["top_ops"] += in_entry and op not in _NOT_KERNELS
    return counts


def bench_decode(cfg, rt, batch, prompt_len, new_tokens, warmup, repeats, seed=0, hlo=False) -> dict:
    """Decode-loop timing for one runtime (and the adapters it serves: rows use adapter ``b % A``).
    ``hlo``: also ``hlo_counts`` of one compiled decode step."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()
    num = rt.num_adapters
    ids = [b % num for b in range(batch)] if num else None
    req = gen.validate_request(cfg, prompts, new_tokens, stop_ids=[], adapter_ids=ids, num_adapters=num)
    pad = gen.pad_request(req)
    bp, s = pad.tokens.shape[0], pad.cache_len
    ctl = gen.Controls.of(pad)
    tokens, lengths = jnp.asarray(pad.tokens), jnp.asarray(pad.lengths)
    aid = None if pad.adapter_ids is None else jnp.asarray(pad.adapter_ids)

    def prefilled():
        cache = gen.new_cache(cfg, rt, bp, s)
        return (gen.start_jit(rt, cfg, tokens, lengths, cache, ctl, out_len=s, adapter_ids=aid),)

    def run(state):
        return gen.decode_loop_jit(rt, cfg, state, ctl, adapter_ids=aid)

    counts = {}
    if hlo:
        step = jax.jit(gen.decode_step, static_argnames=("cfg",))
        text = step.lower(rt, cfg, *prefilled(), ctl, adapter_ids=aid).compile().as_text()
        counts = {"hlo_" + k: v for k, v in hlo_counts(text).items()}
    t = common.time_call(run, prefilled, warmup=warmup, repeats=repeats)
    final = run(*prefilled())
    got = np.asarray(final.num_new)[:batch]
    assert (got == new_tokens).all(), f"rows produced {got.tolist()} tokens, expected {new_tokens}"
    out = np.asarray(final.out)[:batch, :new_tokens]
    del final
    steps = new_tokens - 1
    return {"batch": batch, "cache_len": s, "decode_ms_per_step": t["median_s"] / steps * 1e3,
            "tokens_per_s": batch * steps / t["median_s"], "timings": t, "tokens": out, **counts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, choices=["llama-1b", "llama-8b", "tiny"],
                    help="model shape (default llama-1b; tiny with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="the tiny config with short lengths (CPU smoke test)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="default 4 16 (4 with --tiny)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4, help="adapters in the unmerged stack")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (16 with --tiny)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256 (16 with --tiny)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--layout", default="per_layer", choices=["per_layer", "stacked", "decode"],
                    help="runtime layout (runtime.prepare): 'per_layer' ('decode' is an alias) or 'stacked'")
    ap.add_argument("--hlo", action="store_true", help="add op counts of one compiled decode step per row")
    ap.add_argument("--only", nargs="+", default=None, metavar="SETTING",
                    help='run only these settings (and "base"), e.g. "unmerged x4 folded"')
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON results path (default benchmarks/results/lora-<device>.json)")
    args = ap.parse_args(argv)
    if args.layout == "decode":
        args.layout = "per_layer"

    name = args.config or ("tiny" if args.tiny else "llama-1b")
    batches = args.batch or ([4] if args.tiny else [4, 16])
    plen = args.prompt_len or (16 if args.tiny else 128)
    ntok = args.new_tokens or (16 if args.tiny else 256)
    if ntok < 2:
        ap.error("--new-tokens must be >= 2 (decode steps = new tokens - 1)")
    dtype = jnp.dtype(args.dtype)
    env = common.environment()
    print(f"# LoRA serving benchmark\n\n{common.environment_line(env)}\n", flush=True)

    cfg = ModelConfig(**decode.SHAPES[name])
    params = decode.random_params(cfg, dtype)  # canonical
    adapters = [lora_lib.init_adapter(cfg, 100 + i, rank=args.rank, b_std=0.02, dtype=dtype)
                for i in range(args.adapters)]
    stack = lora_lib.stack_adapters(adapters)
    base = prepare(params, cfg, layout=args.layout)
    multi = f"unmerged x{args.adapters}"
    # (label, build () -> runtime): each setting is built right before it runs and dropped after,
    # so that an 8B model's copies (merged, folded) are never all alive at once
    settings = [("base", lambda: base),
                ("merged", lambda: prepare(lora_lib.merge(params, adapters[0]), cfg, layout=args.layout)),
                ("unmerged x1", lambda: with_adapters(base, cfg, adapters[0])),
                (multi, lambda: with_adapters(base, cfg, stack)),
                (f"{multi} folded", lambda: prepare(params, cfg, adapters=stack, fold=True, layout=args.layout))]
    if args.only:
        args.only = [multi if o in (f"{multi} fused", f"{multi} concat") else o for o in args.only]  # old names
        unknown = set(args.only) - {label for label, _ in settings}
        if unknown:
            ap.error(f"--only: unknown settings {sorted(unknown)}; known: {[label for label, _ in settings]}")
        settings = [(label, build) for label, build in settings if label in args.only or label == "base"]

    rows = []
    for b in batches:
        ref = stack_tokens = None
        for label, build in settings:
            rt = build()
            r = {"config": name, "layout": args.layout, "dtype": args.dtype, "rank": args.rank, "setting": label}
            r.update(bench_decode(cfg, rt, b, plen, ntok, args.warmup, args.repeats, hlo=args.hlo))
            del rt
            gc.collect()
            toks = r.pop("tokens")
            if label == "base":
                ref = r["tokens_per_s"]
            elif label == multi:
                stack_tokens = toks
            elif label.startswith(multi) and stack_tokens is not None:  # the same math as the plain stack
                r["same_tokens_as_stack"] = bool((toks == stack_tokens).mean() > 0.9)
            r["overhead"] = ref / r["tokens_per_s"] - 1
            rows.append(r)
            hlo = "".join(f", {k[4:]} {v}" for k, v in r.items() if k.startswith("hlo_"))
            same = "" if "same_tokens_as_stack" not in r else f", same tokens as stack: {r['same_tokens_as_stack']}"
            print(f"B={b} {label}: {r['decode_ms_per_step']:.3f} ms/step, {r['tokens_per_s']:.0f} tok/s, "
                  f"overhead {r['overhead']:+.1%}{same}{hlo}", flush=True)

    cols = [("config", "config"), ("layout", "layout"), ("batch", "B"), ("rank", "R"), ("setting", "adapters"),
            ("decode_ms_per_step", "ms/step"), ("tokens_per_s", "tok/s"), ("overhead", "overhead vs base")]
    if args.hlo:
        cols += [("hlo_dots", "dots/step"), ("hlo_gathers", "gathers/step"), ("hlo_concatenates", "concats/step"),
                 ("hlo_top_ops", "top-level ops/step")]
    print()
    print(common.markdown_table(rows, cols))
    print(f"\n{common.environment_line(env)}; prompt {plen}, {ntok} new tokens")
    out = common.results_path(args.out, "lora", env)
    common.write_json(out, {"environment": env, "args": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
