"""Scoring benchmark: scored tokens per second, realm_jax ``score`` vs HF transformers, same data.

    python benchmarks/score.py                  # the built-in SmolLM2-135M (real weights)
    python benchmarks/score.py --config llama-1b --batch-size 32 --requests 1024   # random weights
    python benchmarks/score.py --model DIR      # any HF checkpoint directory
    python benchmarks/score.py --tiny           # a tiny random model: a CPU smoke test
    python benchmarks/score.py --tiny --multiple-choice 100   # shared prefixes against the plain path

Data: ``--requests`` random (context, continuation) token-id pairs, context lengths uniform in
``--context-len A:B`` and continuation lengths in ``--continuation-len A:B`` (harness-like
multiple-choice shapes). Tokens/s counts every request token (context + continuation) per
second of wall time; "continuation tokens/s" counts only the scored ones.

realm_jax: ``realm_jax.score(model, requests, batch_size=...)`` (sorted by length, bucketed
shapes, LM head on the continuation positions only), after one untimed pass over the same data
(which compiles every bucket); the median of ``--repeats`` passes.
HF: what the evaluation harness's ``hf`` model does: requests sorted by length (longest first),
batches padded on the right to their longest row, one forward with the attention mask,
``log_softmax`` over all positions in float32, gather of the continuation tokens, greedy check;
``torch.inference_mode``, float32 on CPU and bfloat16 on CUDA, one untimed batch first.
``--multiple-choice N``: instead, a synthetic 5-shot multiple-choice workload of N questions:
subjects of ``--questions-per-subject`` questions sharing a ``--shared-len``-token few-shot
prefix (500), each question 20-60 tokens of its own, then 4 one-token choices, in the order an
evaluation sends them. realm_jax runs twice: with shared prefixes (the default) and with
``share_prefixes=False`` (every request whole), and the speed-up of the first is reported.
Both sides get the same weights (the same checkpoint directory) except for ``--config``, where
each side draws its own random weights; then the log-prob agreement is not reported.

Prints a markdown table (device, date, versions) and writes every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for the HF peer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import common  # noqa: E402


def span(text: str) -> tuple[int, int]:
    a, _, b = text.partition(":")
    lo, hi = int(a), int(b or a)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected A:B with 1 <= A <= B, got {text!r}")
    return lo, hi


def make_requests(n: int, vocab: int, ctx: tuple[int, int], cont: tuple[int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, vocab, int(rng.integers(ctx[0], ctx[1] + 1))).tolist(),
             rng.integers(3, vocab, int(rng.integers(cont[0], cont[1] + 1))).tolist()) for _ in range(n)]


def make_multiple_choice(questions: int, per_subject: int, shared: int, vocab: int, seed: int = 0):
    """5-shot multiple choice: per subject a ``shared``-token prefix; per question 20-60 tokens of
    its own and 4 one-token choices (4 requests with the same context)."""
    rng = np.random.default_rng(seed)
    out, shots = [], None
    for q in range(questions):
        if q % per_subject == 0:
            shots = rng.integers(3, vocab, shared).tolist()
        context = shots + rng.integers(3, vocab, int(rng.integers(20, 61))).tolist()
        out += [(context, [int(c)]) for c in rng.choice(np.arange(3, vocab), 4, replace=False)]
    return out


def tiny_checkpoint(directory: str) -> str:
    """A small random Llama saved as an HF checkpoint directory (both sides load it)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(directory)
    return directory


def setup(args):
    """(realm_jax Model, HF model or None, device name for HF, same_weights)."""
    import torch
    import transformers

    import realm_jax

    hf_dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf_dtype = torch.bfloat16 if hf_dev == "cuda" else torch.float32
    if args.config:
        from decode import SHAPES, random_params
        from realm_jax.config import ModelConfig
        from realm_jax.loading import resolve_dtype

        cfg = ModelConfig(**SHAPES[args.config])
        model = realm_jax.Model(cfg, random_params(cfg, resolve_dtype(args.dtype)), None, args.config)
        hf = None
        if not args.no_hf:
            d = cfg.to_hf_dict()
            d.pop("architectures", None)
            hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
            with torch.device(hf_dev):
                hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=hf_dtype).eval()
        return model, hf, hf_dev, False
    if args.tiny:
        directory = tiny_checkpoint(tempfile.mkdtemp(prefix="score-bench-"))
    elif args.model:
        directory = args.model
    else:
        from realm_jax import builtin

        directory = str(builtin.ensure_builtin("smollm2-135m-instruct"))
    model = realm_jax.load(directory, dtype=args.dtype)
    hf = None
    if not args.no_hf:
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=hf_dtype).to(hf_dev).eval()
    return model, hf, hf_dev, True


def bench_realm(model, requests, batch_size: int, repeats: int, share_prefixes: bool = True):
    import realm_jax
    from realm_jax import scoring

    fns = (scoring.continuation_logprobs, scoring.prefill_prefixes, scoring.shared_continuation_logprobs)
    before = sum(f._cache_size() for f in fns)
    t0 = time.perf_counter()
    realm_jax.score(model, requests, batch_size=batch_size, share_prefixes=share_prefixes, progress=False)
    first = time.perf_counter() - t0
    compiles = sum(f._cache_size() for f in fns) - before
    times, scores = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = realm_jax.score(model, requests, batch_size=batch_size, share_prefixes=share_prefixes,
                                 progress=False)  # host floats: synchronised
        times.append(time.perf_counter() - t0)
    return scores, {"median_s": statistics.median(times), "all_s": times, "first_pass_s": first,
                    "compiles": compiles}


def hf_score(hf, requests, batch_size: int, dev: str):
    """The harness's way: sort, pad right per batch, full log_softmax, gather."""
    import torch

    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out = [None] * len(requests)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            inps = [(requests[i][0] + requests[i][1])[:-1] for i in idx]
            t = max(len(x) for x in inps)
            ids = torch.zeros((len(idx), t), dtype=torch.long)
            mask = torch.zeros((len(idx), t), dtype=torch.long)
            for r, x in enumerate(inps):
                ids[r, :len(x)] = torch.tensor(x)
                mask[r, :len(x)] = 1
            logits = hf(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            lsm = torch.log_softmax(logits.float(), dim=-1)
            for r, i in enumerate(idx):
                cont = requests[i][1]
                n = len(inps[r])
                part = lsm[r, n - len(cont):n]
                target = torch.tensor(cont, device=part.device)
                lp = part.gather(-1, target[:, None])[:, 0]
                out[i] = (lp.cpu().numpy(), bool((part.argmax(-1) == target).all()))
    if dev == "cuda":
        torch.cuda.synchronize()
    return out


def bench_hf(hf, requests, batch_size: int, dev: str, repeats: int):
    hf_score(hf, requests[:batch_size], batch_size, dev)  # warm-up
    times, res = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = hf_score(hf, requests, batch_size, dev)
        times.append(time.perf_counter() - t0)
    return res, {"median_s": statistics.median(times), "all_s": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tiny", action="store_true", help="a tiny random model (CPU smoke test)")
    g.add_argument("--model", default=None, help="an HF checkpoint directory (default: the built-in SmolLM2)")
    g.add_argument("--config", default=None, choices=["llama-1b", "llama-8b"], help="random weights of this shape")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--context-len", type=span, default=(32, 480), metavar="A:B")
    p.add_argument("--continuation-len", type=span, default=(1, 16), metavar="A:B")
    p.add_argument("--multiple-choice", type=int, default=None, metavar="N",
                   help="N questions of a synthetic 5-shot multiple-choice workload (see above)")
    p.add_argument("--questions-per-subject", type=int, default=25, metavar="Q")
    p.add_argument("--shared-len", type=int, default=500, metavar="P", help="few-shot prefix tokens per subject")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-repeats", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="realm_jax params dtype (auto: f32 on CPU, bf16 on GPU)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF peer")
    p.add_argument("--out", default=None, help="write all numbers here (JSON)")
    args = p.parse_args(argv)
    if args.tiny and args.requests == 256:
        args.requests, args.context_len, args.batch_size, args.repeats = 48, (8, 120), 8, 2

    model, hf, hf_dev, same_weights = setup(args)
    if args.multiple_choice is not None:
        if args.multiple_choice < 1 or args.questions_per_subject < 1 or args.shared_len < 1:
            p.error("--multiple-choice, --questions-per-subject and --shared-len must be positive")
        requests = make_multiple_choice(args.multiple_choice, args.questions_per_subject, args.shared_len,
                                        model.config.vocab_size)
    else:
        requests = make_requests(args.requests, model.config.vocab_size, args.context_len, args.continuation_len)
    tokens = sum(len(c) + len(k) for c, k in requests)
    scored = sum(len(k) for _, k in requests)
    env = common.environment()
    rows = []
    ours, t = bench_realm(model, requests, args.batch_size, args.repeats)
    label = "realm_jax score (shared prefixes)" if args.multiple_choice is not None else "realm_jax score"
    rows.append({"impl": label, "device": env["device"], "dtype": str(model.dtype),
                 "seconds": t["median_s"], "tokens_per_s": tokens / t["median_s"],
                 "scored_per_s": scored / t["median_s"], "compiles": t["compiles"], **t})
    if args.multiple_choice is not None:  # the plain path: every request whole
        plain, tp = bench_realm(model, requests, args.batch_size, args.repeats, share_prefixes=False)
        rows.append({"impl": "realm_jax score (plain, share_prefixes=False)", "device": env["device"],
                     "dtype": str(model.dtype), "seconds": tp["median_s"], "tokens_per_s": tokens / tp["median_s"],
                     "scored_per_s": scored / tp["median_s"], "compiles": tp["compiles"], **tp})
        plain_diff = max(float(np.abs(np.asarray(a.token_logprobs) - np.asarray(b.token_logprobs)).max())
                         for a, b in zip(ours, plain))
    agreement = None
    if hf is not None:
        ref, th = bench_hf(hf, requests, args.batch_size, hf_dev, args.hf_repeats)
        rows.append({"impl": "HF transformers", "device": hf_dev, "dtype": str(next(hf.parameters()).dtype),
                     "seconds": th["median_s"], "tokens_per_s": tokens / th["median_s"],
                     "scored_per_s": scored / th["median_s"], **th})
        if same_weights:
            diffs = [float(np.abs(np.asarray(s.token_logprobs) - r[0]).max()) for s, r in zip(ours, ref)]
            agreement = {"max_abs_dlogprob": max(diffs),
                         "greedy_flags_equal": sum(s.is_greedy == r[1] for s, r in zip(ours, ref)) / len(ref)}
    print(f"{len(requests)} requests, {tokens} tokens ({scored} scored), batch {args.batch_size}; "
          f"{common.environment_line(env)}")
    print(common.markdown_table(rows, [("impl", "implementation"), ("device", "device"), ("dtype", "dtype"),
                                       ("seconds", "s / pass"), ("tokens_per_s", "tokens/s"),
                                       ("scored_per_s", "continuation tokens/s"), ("compiles", "compiles")]))
    if args.multiple_choice is not None:
        print(f"shared prefixes over the plain path: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x "
              f"(max |d logprob| between them {plain_diff:.1e})")
    if rows[-1]["impl"] == "HF transformers":
        print(f"speed-up over HF: {rows[0]['tokens_per_s'] / rows[-1]['tokens_per_s']:.2f}x")
    if agreement:
        print(f"agreement: max |d logprob| = {agreement['max_abs_dlogprob']:.2e}, "
              f"greedy flags equal on {100 * agreement['greedy_flags_equal']:.0f}% of requests")
    if args.out:
        common.write_json(args.out, {"env": env, "args": {k: v for k, v in vars(args).items()}, "rows": rows,
                                     "tokens": tokens, "scored_tokens": scored, "agreement": agreement})
    return 0


if __name__ == "__main__":
    sys.exit(main())
