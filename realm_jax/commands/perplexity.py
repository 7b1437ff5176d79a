"""``realm-jax perplexity``: rolling-window perplexity of a text file (one document)."""

from __future__ import annotations

import argparse
import json

from . import add_quiet, loading, show_defaults

HELP = "perplexity of a UTF-8 text file, in rolling windows (each token scored once)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory, .gguf file or built-in name (default: smollm2-135m-instruct)")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text, scored as one document (required)")
    p.add_argument("--max-length", type=int, default=None, metavar="T",
                   help="window length in tokens (default: the model's max_position_embeddings, at most 1024)")
    p.add_argument("--stride", type=int, default=None, metavar="N",
                   help="how far each window moves, < max length (default: half the window)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="windows per device batch at most; fewer windows run as a smaller batch (default: 8)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="params dtype (default: auto = float32 on CPU, bfloat16 on GPU/TPU)")
    add_quiet(p)
    show_defaults(p)


def read_text(path: str) -> str:
    from ..errors import RealmError

    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise RealmError(f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col})") from None
    if not text.strip():
        raise RealmError(f"{path}: the text is empty (nothing to score)")
    return text


def run(args) -> int:
    from .. import progress

    with progress.quieted(args.quiet):
        return _run(args)


def _run(args) -> int:
    from ..errors import RealmError
    from ..loading import DEFAULT_MODEL, load
    from ..scoring import perplexity

    for name in ("max_length", "stride", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise RealmError(f"--{name.replace('_', '-')}: expected a positive int, got {v}")
    if args.max_length is not None and args.stride is not None and args.stride >= args.max_length:
        raise RealmError(f"--stride: expected < --max-length={args.max_length} (so every token is scored), "
                         f"got {args.stride}")
    text = read_text(args.text)
    with loading(args.model or DEFAULT_MODEL):
        model = load(args.model or DEFAULT_MODEL, dtype=args.dtype)
    max_length = args.max_length or min(int(model.config.max_position_embeddings), 1024)
    res = perplexity(model, text, max_length=max_length, stride=args.stride, batch_size=args.batch_size)
    print(json.dumps({"ppl": res.ppl, "nll": res.nll, "num_tokens": res.num_tokens, "max_length": max_length,
                      "stride": args.stride or max(1, max_length // 2)}))
    return 0
