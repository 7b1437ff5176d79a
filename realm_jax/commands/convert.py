"""``realm-jax convert SOURCE OUT_DIR [--dtype]``: a GGUF file, a built-in name or an HF
directory -> an HF safetensors checkpoint directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template), written atomically."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_quiet, loading, show_defaults

HELP = "convert a GGUF file or built-in model to an HF safetensors checkpoint directory"
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a .gguf file, a built-in name (e.g. smollm2-135m-instruct) "
                                       "or an HF checkpoint directory")
    parser.add_argument("out_dir", help="output directory (must not exist)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the written weights")
    add_quiet(parser)
    show_defaults(parser)


def convert(source: str, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write ``source`` as an HF checkpoint directory ``out_dir`` in ``dtype``; returns it."""
    from .. import builtin
    from ..errors import RealmError

    if dtype not in DTYPES:
        raise RealmError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"output directory {out_dir} already exists")
    src = str(source)
    if src in builtin.BUILTIN_MODELS:
        src = str(builtin.gguf_path(src))
    path = Path(src)
    from .. import progress

    if path.is_file() and path.suffix == ".gguf":
        from ..gguf import gguf_to_hf

        with progress.status(f"converting {path.name} to {dtype} in {out_dir}"):
            return gguf_to_hf(path, out_dir, dtype=dtype)
    if path.is_dir():
        import jax.numpy as jnp

        from ..checkpoint import write_hf_checkpoint
        from ..loading import load

        with loading(str(path)):
            model = load(path, dtype="float32")
        extra = model.tokenizer.to_hf_files() if model.tokenizer is not None else {}
        cfg = model.config.replace(dtype=dtype)
        with progress.status(f"writing {dtype} weights to {out_dir}"):
            return write_hf_checkpoint(out_dir, cfg, model.params, extra_files=extra, dtype=jnp.dtype(dtype))
    raise RealmError(f"source {src!r}: not a .gguf file, an HF checkpoint directory or a built-in name "
                     f"(built-in: {', '.join(builtin.BUILTIN_MODELS)})")


def run(args) -> int:
    from .. import progress

    with progress.quieted(args.quiet):
        return _run(args)


def _run(args) -> int:
    out = convert(args.source, args.out_dir, args.dtype)
    print(f"wrote {out}")
    return 0
