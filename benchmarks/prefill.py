"""Prefill benchmark: time and MFU of a prompt pass (long prompts, compute bound).

    python benchmarks/prefill.py --config llama-8b --batch 1 8 --prompt-len 2048
    python benchmarks/prefill.py --config llama-8b --batch 1 8 --prompt-len 2048 --peer-only   # HF alone
    python benchmarks/prefill.py --tiny                                                         # CPU smoke test

JAX side: ``generation.prefill`` (jitted, the cache donated, ``empty_cache=True``) of a
``[B, P]`` batch of random full-length prompts into a fresh cache of P slots, logits at each
row's last token; warm-up first, median of ``--repeats``. Run once per attention choice in
``--attention`` (the per-layer runtime ``runtime.prepare(params, cfg, layout="per_layer",
attention=choice)``; ``auto`` = cuDNN flash attention on a GPU, ``reference`` = the einsum path), and
the max |difference| of the last-token logits between the choices is recorded.

HF peer (``--peer-only``, in its own process so the two memory pools do not meet):
``model(ids, logits_to_keep=1)`` under ``torch.no_grad`` with SDPA attention, random bf16 weights
built from the same config, timed the same way.

FLOPs per call = 2 x non-embedding params x B x P (every matmul) + 2 x L x B x P^2 x N x H
(causal attention: QK^T and PV over the lower triangle) + 2 x D x V x B (the head, last token).
MFU = FLOPs / time / peak, with peak = the card's dense bf16 figure (H100/H200 SXM: 989 TFLOP/s);
the bf16 matmul rate measured in the same run (an 8192^3 matmul) is reported beside it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from realm_jax import generation as gen  # noqa: E402
from realm_jax.bench import (SHAPES, environment, environment_line, markdown_table, random_params,  # noqa: E402
                             time_call, write_json)
from realm_jax.config import ModelConfig  # noqa: E402
from realm_jax.params import param_bytes  # noqa: E402
from realm_jax.runtime import prepare  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM), FLOP/s


def peak_flops() -> float | None:
    kind = getattr(jax.devices()[0], "device_kind", "")
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 FLOP/s of one n^3 matmul (f32 accumulation, bf16 out)."""
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    t = time_call(lambda: f(a, a), warmup=2, repeats=repeats)
    return 2 * n ** 3 / t["median_s"]


def flops(cfg: ModelConfig, params, batch: int, plen: int) -> float:
    """``params``: canonical (the layer leaves are the non-embedding weights)."""
    non_embed = param_bytes(params["layers"]) // jnp.dtype(params["embed"].dtype).itemsize
    attn = 2 * cfg.num_layers * batch * plen ** 2 * cfg.num_heads * cfg.head_dim
    head = 2 * cfg.hidden_size * cfg.vocab_size * batch
    return 2 * non_embed * batch * plen + attn + head


def bench_jax(cfg, rt, batch, plen, repeats, seed=0):
    r = np.random.default_rng(seed)
    tokens = jnp.asarray(r.integers(3, cfg.vocab_size, (batch, plen)), jnp.int32)
    lengths = jnp.full((batch,), plen, jnp.int32)
    fn = jax.jit(lambda p, t, n, c: gen.prefill(p, cfg, t, n, c, empty_cache=True)[0], donate_argnums=3)

    def args():
        return rt, tokens, lengths, gen.new_cache(cfg, rt, batch, plen)

    t = time_call(fn, args, warmup=1, repeats=repeats)
    logits = np.asarray(fn(*args()), np.float32)
    return t, logits


def bench_hf(cfg: ModelConfig, batch, plen, repeats, seed=0):
    import torch
    import transformers

    d = cfg.to_hf_dict()
    d.pop("architectures", None)
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, cfg.vocab_size, (batch, plen), device="cuda")
    ts = []
    for i in range(2 + repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, logits_to_keep=1, use_cache=False)
        torch.cuda.synchronize()
        if i >= 2:
            ts.append(time.perf_counter() - t0)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return float(np.median(ts)), ts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="the tiny config, short prompts (CPU smoke test)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=None, help="default 2048 (64 with --tiny)")
    ap.add_argument("--attention", nargs="+", default=["auto", "reference"],
                    choices=["auto", "reference", "cudnn", "xla"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peer-only", action="store_true", help="run only HF transformers (needs CUDA)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    name = "tiny" if args.tiny else args.config
    plen = args.prompt_len or (64 if args.tiny else 2048)
    cfg = ModelConfig(**SHAPES[name])
    env = environment()
    print(f"# prefill benchmark\n\n{environment_line(env)}\n", flush=True)
    rows = []
    if args.peer_only:
        import torch

        env["torch"] = torch.__version__
        for b in args.batch:
            med, ts = bench_hf(cfg, b, plen, args.repeats)
            rows.append({"config": name, "batch": b, "prompt_len": plen, "impl": "hf", "ms": med * 1e3, "all_s": ts})
            print(f"{name} B={b} P={plen} HF: {med * 1e3:.1f} ms", flush=True)
    else:
        peak, measured = peak_flops(), matmul_rate() if jax.default_backend() != "cpu" else None
        params = random_params(cfg, jnp.bfloat16 if not args.tiny else jnp.float32)
        for b in args.batch:
            ref_logits = None
            for choice in args.attention:
                rt = prepare(params, cfg, layout="per_layer", attention=choice)  # a static choice of the runtime
                t, logits = bench_jax(cfg, rt, b, plen, args.repeats)
                del rt
                gc.collect()
                f = flops(cfg, params, b, plen)
                row = {"config": name, "batch": b, "prompt_len": plen, "impl": f"jax/{choice}",
                       "ms": t["median_s"] * 1e3, "tflops": f / t["median_s"] / 1e12, "flops": f,
                       "mfu_pct": None if peak is None else 100 * f / t["median_s"] / peak,
                       "of_matmul_pct": None if measured is None else 100 * f / t["median_s"] / measured,
                       "all_s": t["all_s"]}
                if ref_logits is None:
                    ref_logits = logits
                else:
                    row["max_abs_logit_diff_vs_first"] = float(np.abs(logits - ref_logits).max())
                rows.append(row)
                print(f"{name} B={b} P={plen} {choice}: {row['ms']:.1f} ms, {row['tflops']:.0f} TFLOP/s"
                      + ("" if peak is None else f", MFU {row['mfu_pct']:.1f}%")
                      + (f", max|dlogit| vs {args.attention[0]} {row['max_abs_logit_diff_vs_first']:.3g}"
                         if "max_abs_logit_diff_vs_first" in row else ""), flush=True)
        env["peak_bf16_flops"] = peak
        env["measured_matmul_flops"] = measured
        print()
        print(markdown_table(rows, [("config", "config"), ("batch", "B"), ("prompt_len", "prompt"), ("impl", "impl"),
                                    ("ms", "ms"), ("tflops", "TFLOP/s"), ("mfu_pct", "MFU %"),
                                    ("of_matmul_pct", "% of measured matmul")]))
        if measured:
            print(f"\nmeasured 8192^3 bf16 matmul: {measured / 1e12:.0f} TFLOP/s; peak used for MFU: "
                  f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    if args.out:
        write_json(args.out, {"environment": env, "args": vars(args), "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
