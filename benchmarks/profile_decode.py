"""Where a decode step's time goes: profile the jitted decode loop and list its device kernels.

    python benchmarks/profile_decode.py --config llama-1b --batch 1      # on a GPU
    python benchmarks/profile_decode.py --tiny                           # CPU smoke test

Runs ``generation.decode_loop_jit`` for ``--new-tokens - 1`` steps on a prefilled state under
``jax.profiler.trace`` (with a Perfetto trace), then reads the trace: kernels per step, device
busy time per step, the span of the kernels (busy + idle gaps), and the kernels with the most
time per step. Timings under the profiler run slower than untraced ones; compare kernels with
each other, and with the bytes they must read (e.g. a weight of W bytes at the measured copy
bandwidth), not with untraced step times. This is the profile behind docs/benchmarks.md's
"what changed" notes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from realm_jax import generation as gen  # noqa: E402
from realm_jax.bench import SHAPES, device_events, random_params  # noqa: E402
from realm_jax.config import ModelConfig  # noqa: E402
from realm_jax.runtime import prepare  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--top", type=int, default=30, help="kernels to list")
    ap.add_argument("--logprobs", type=int, default=None, metavar="N",
                    help="rows ask for log-probs with N alternatives (default: none)")
    ap.add_argument("--stacked", action="store_true", help="profile the stacked runtime instead of the per-layer one")
    args = ap.parse_args(argv)
    cfg = ModelConfig(**SHAPES["tiny" if args.tiny else args.config])
    rt = prepare(random_params(cfg, jnp.float32 if args.tiny else jnp.bfloat16), cfg,
                 layout="stacked" if args.stacked else "per_layer")  # the runtime the loop runs
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    from realm_jax.settings import Sampling

    pad = gen.pad_request(gen.validate_request(cfg, prompts, args.new_tokens, stop_ids=[],
                                               sampling=Sampling(logprobs=args.logprobs)))
    ctl = gen.Controls.of(pad)

    def prefilled():
        cache = gen.new_cache(cfg, rt, pad.tokens.shape[0], pad.cache_len)
        return gen.start_jit(rt, cfg, jnp.asarray(pad.tokens), jnp.asarray(pad.lengths), cache, ctl,
                             out_len=pad.cache_len, top_logprobs=args.logprobs)

    jax.block_until_ready(gen.decode_loop_jit(rt, cfg, prefilled(), ctl))  # compile
    state = jax.block_until_ready(prefilled())
    steps = args.new_tokens - 1
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(gen.decode_loop_jit(rt, cfg, state, ctl))
        path = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            events = device_events(json.load(f))
    if not events:
        print("no device events in the trace")
        return 1
    busy = sum(e["dur"] for e in events) / 1e3 / steps
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1e3 / steps
    print(f"{cfg.arch} {'tiny' if args.tiny else args.config} B={args.batch}: {len(events) / steps:.0f} kernels/step, "
          f"busy {busy:.3f} ms/step, span {span:.3f} ms/step (idle {span - busy:.3f})")
    per = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        a = per[e["name"][:90]]
        a[0] += 1
        a[1] += e["dur"]
    print("   us/step  calls/step  kernel")
    for name, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{t / steps:10.1f}  {n / steps:10.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
