"""The ``realm-jax`` command. Each subcommand lives in ``realm_jax/commands/<name>.py`` and
exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.

Errors: bad arguments, every ``RealmError`` and every ``OSError`` (a file that cannot be read or
written, a directory where a file belongs, a full disk) end the command with exit code 2 and
one line on stderr, ``realm-jax <command>: error: <message>``, no traceback. Anything else is a
bug and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("generate", "convert", "score", "perplexity", "bench", "eval", "serve")


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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message) -> str:
    """A message on one line (newlines and runs of blanks become single spaces)."""
    return " ".join(str(message).split())


def describe(e: BaseException) -> str:
    """The one-line text of a ``RealmError`` or ``OSError`` (an OSError names its path)."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return one_line(f"{e.filename}: {e.strerror}")
    return one_line(e) or type(e).__name__


def main(argv=None) -> int:
    mods = _available()
    parser = _Parser(prog="realm-jax", description="JAX inference for Llama-family LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in mods.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
    args = parser.parse_args(argv)
    from .errors import RealmError

    try:
        return int(mods[args.command].run(args) or 0)
    except (RealmError, OSError) as e:
        print(f"realm-jax {args.command}: error: {describe(e)}", file=sys.stderr)
        return 2


def initialize_from_args(args) -> bool:
    """``sharding.initialize_distributed`` from the options of ``add_distributed_arguments``."""
    from .sharding import initialize_distributed

    return initialize_distributed(getattr(args, "coordinator_address", None),
                                  getattr(args, "num_processes", None), getattr(args, "process_id", None))


if __name__ == "__main__":
    sys.exit(main())
