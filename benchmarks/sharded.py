"""Tensor parallel and data parallel on several devices vs one.

1. Decode: the Llama-3-8B shape (random bf16 weights) on one device vs tensor parallel over
   ``--tp`` devices, greedy tokens/s at each ``--batches`` size. A prompt of ``--prompt-len``
   tokens is prefilled, then ``--steps`` tokens are decoded in one jitted loop (the cache
   donated, as in ``generate``); only the loop is timed.
2. Scoring: log-likelihood of every next token of ``--score-batch`` rows of ``--score-len``
   tokens (``scoring.continuation_logprobs``, the device part of ``score``), one device vs
   data parallel over ``--dp`` devices (params replicated, rows split).

    python benchmarks/sharded.py                      # on a machine with >= 2 GPUs
    python benchmarks/sharded.py --tiny               # CPU, tiny config, 8 simulated devices

The physical limit of decode at small batch is reading the weights once per step:
bytes of params / memory bandwidth (per device, so ~1/tp of it with tensor parallel).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU with 8 simulated devices")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel devices (model axis)")
    p.add_argument("--dp", type=int, default=2, help="data-parallel devices for scoring")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=None, help="default 512 (tiny: 16)")
    p.add_argument("--steps", type=int, default=None, help="decode steps timed (default 128; tiny: 8)")
    p.add_argument("--score-batch", type=int, default=None, help="default 16 (tiny: 8)")
    p.add_argument("--score-len", type=int, default=None, help="default 1024 (tiny: 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:  # before jax is imported
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from realm_jax import sharding as sh
    from realm_jax.config import ModelConfig
    from realm_jax.generation import prefill as prefill_fn
    from realm_jax.model import forward_cached
    from realm_jax.params import init_params, param_shapes
    from realm_jax.runtime import prepare
    from realm_jax.scoring import continuation_logprobs

    if args.tiny:
        cfg = ModelConfig(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16)
        dtype = jnp.float32
        prompt_len, steps = args.prompt_len or 16, args.steps or 8
        score_b, score_t = args.score_batch or 8, args.score_len or 32
    else:  # Llama-3-8B
        cfg = ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                          rope_type="llama3", rope_factor=8.0, max_position_embeddings=8192)
        dtype = jnp.bfloat16
        prompt_len, steps = args.prompt_len or 512, args.steps or 128
        score_b, score_t = args.score_batch or 16, args.score_len or 1024
    devices = jax.devices()
    need = max(args.tp, args.dp)
    if len(devices) < need:
        print(f"error: --tp {args.tp} / --dp {args.dp} need {need} devices, found {len(devices)}", file=sys.stderr)
        return 2
    print(f"devices: {len(devices)} x {devices[0].device_kind}; params {jnp.dtype(dtype).name}; "
          f"L={cfg.num_layers} D={cfg.hidden_size} F={cfg.intermediate_size} N={cfg.num_heads} "
          f"K={cfg.num_kv_heads} V={cfg.vocab_size}", flush=True)
    results = {"device": devices[0].device_kind, "config": cfg.to_dict(), "decode": [], "score": []}

    def make_runtime(mesh):
        """The runtime on ``mesh`` (``runtime.prepare(..., mesh=mesh)``, the default layout) of random
        canonical params created directly in their sharded layout (no device holds it all)."""
        specs = sh.param_specs(cfg, mesh)
        shardings = jax.tree_util.tree_map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
        init = jax.jit(partial(init_params, cfg, dtype=dtype), out_shardings=shardings)
        return jax.block_until_ready(prepare(init(jax.random.PRNGKey(0)), cfg, mesh=mesh))

    def timed(fn, *a):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            best = min(best, time.perf_counter() - t0)
        return best

    # ------------------------------------------------------------------ decode
    @partial(jax.jit, static_argnames=("n",), donate_argnames=("cache",))
    def decode(rt, first, cache, n):
        """n greedy steps from tokens first [B]: returns the last tokens and the cache."""
        def body(_, carry):
            tok, cache = carry
            logits, cache = forward_cached(rt, cfg, tok[:, None], jnp.ones_like(tok), cache)
            return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache
        return jax.lax.fori_loop(0, n, body, (first, cache))

    prefill = jax.jit(prefill_fn, static_argnums=1, donate_argnums=4)  # logits at each row's last token
    param_bytes = sum(int(np.prod(s)) for s in jax.tree_util.tree_leaves(
        param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))) * jnp.dtype(dtype).itemsize
    for tp in (1, args.tp):
        mesh = sh.make_mesh(1, tp)
        rt = make_runtime(mesh)
        for b in args.batches:
            rng = np.random.default_rng(0)
            prompt = rng.integers(0, cfg.vocab_size, (b, prompt_len)).astype(np.int32)
            max_len = -(-(prompt_len + steps + 1) // 64) * 64

            def run_once():
                cache = sh.init_cache_like(rt, cfg, b, max_len, dtype)
                lengths = np.full(b, prompt_len, np.int32)
                logits, cache = prefill(rt, cfg, *sh.place_batch((prompt, lengths), rt, strict=False), cache)
                first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                jax.block_until_ready(cache)
                t0 = time.perf_counter()
                out = jax.block_until_ready(decode(rt, first, cache, steps))
                return time.perf_counter() - t0, out

            t0 = time.perf_counter()
            run_once()  # compile
            compile_s = time.perf_counter() - t0
            best = min(run_once()[0] for _ in range(args.repeats))
            row = {"tp": tp, "batch": b, "prompt_len": prompt_len, "steps": steps,
                   "ms_per_step": 1e3 * best / steps, "tokens_per_s": b * steps / best,
                   "weights_GBps_per_device": param_bytes / tp / (best / steps) / 1e9, "first_run_s": compile_s}
            results["decode"].append(row)
            print(f"decode  tp={tp} batch={b:3d}: {row['ms_per_step']:8.2f} ms/step  {row['tokens_per_s']:10.1f} tok/s  "
                  f"(weights read at {row['weights_GBps_per_device']:.1f} GB/s per device)", flush=True)
        del rt

    # ------------------------------------------------------------------ scoring
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (score_b, score_t)).astype(np.int32)
    lengths = np.full(score_b, score_t, np.int32)
    starts = np.zeros(score_b, np.int32)
    c = score_t - 1
    c_pow2 = 1 << (c - 1).bit_length()  # scoring buckets the span to a power of two
    targets = np.zeros((score_b, c_pow2), np.int32)
    targets[:, :c] = tokens[:, 1:]
    chunk = min(c_pow2, max(1, (2 ** 27) // (score_b * cfg.vocab_size)))
    chunk = 1 << (chunk.bit_length() - 1)
    for dp in (1, args.dp):
        mesh = sh.make_mesh(dp, 1)
        rt = make_runtime(mesh)
        if score_b % dp:
            print(f"skip dp={dp}: --score-batch {score_b} is not a multiple of it")
            continue
        inputs = sh.place_batch((tokens, lengths, starts, targets), rt)
        run = partial(continuation_logprobs, rt, cfg, *inputs, chunk=chunk)
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        compile_s = time.perf_counter() - t0
        best = timed(run)
        row = {"dp": dp, "batch": score_b, "length": score_t, "seconds": best,
               "tokens_per_s": score_b * score_t / best, "first_run_s": compile_s}
        results["score"].append(row)
        print(f"score   dp={dp} batch={score_b} x {score_t} tokens: {best * 1e3:9.1f} ms  "
              f"{row['tokens_per_s']:12.0f} tok/s", flush=True)
        del rt
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
