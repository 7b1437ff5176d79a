"""``realm-jax eval ARGS``: lm-evaluation-harness's own command line (``lm_eval ARGS``, unchanged)
with the ``realm_jax`` model registered first (the harness has no plugin hook that would find it).

    realm-jax eval --model realm_jax --model_args pretrained=smollm2-135m-instruct \\
        --tasks realm_tiny --include_path examples/lm_eval --batch_size auto

Every argument goes to the harness (``realm-jax eval --help`` is the harness's help); only a
``--quiet`` is taken out (no realm_jax progress; the harness's own logging is ``--verbosity``).
See ``realm_jax/integrations/lm_eval.py`` for the model's arguments (``--model_args``).
"""

from __future__ import annotations

import argparse

HELP = "run lm-evaluation-harness (its own arguments, e.g. --model realm_jax --tasks ...) with realm_jax registered"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("harness_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="lm_eval's arguments, unchanged (see realm-jax eval --help)")
    # Nothing here is an option of ours: every "-..." word is the harness's (argparse would
    # otherwise claim --help or reject the harness's options as unknown).
    p.prefix_chars = "\x00"


def run(args) -> int:
    from .. import progress
    from ..integrations.lm_eval import main

    harness_args = [a for a in args.harness_args if a != "--quiet"]
    with progress.quieted(len(harness_args) < len(args.harness_args)):
        return main(harness_args)
