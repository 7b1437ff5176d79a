"""The ``realm-jax`` command. Each subcommand lives in ``realm_jax/commands/<name>.py`` and
exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("generate", "convert", "score", "perplexity", "bench")


def _available():
    out = {}
    for name in COMMANDS:
        try:
            out[name] = importlib.import_module(f"realm_jax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"realm_jax.commands.{name}":
                raise
    return out


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """The usual ``jax.distributed.initialize`` settings (multi-host runs)."""
    g = parser.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def main(argv=None) -> int:
    mods = _available()
    parser = argparse.ArgumentParser(prog="realm-jax", description="JAX inference for Llama-family LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in mods.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
    args = parser.parse_args(argv)
    from .errors import RealmError

    try:
        return int(mods[args.command].run(args) or 0)
    except (RealmError, FileNotFoundError, FileExistsError) as e:
        print(f"realm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


def initialize_from_args(args) -> bool:
    """``sharding.initialize_distributed`` from the options of ``add_distributed_arguments``."""
    from .sharding import initialize_distributed

    return initialize_distributed(getattr(args, "coordinator_address", None),
                                  getattr(args, "num_processes", None), getattr(args, "process_id", None))
