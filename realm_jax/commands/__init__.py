"""Subcommands of ``realm-jax`` (see ``realm_jax/cli.py``)."""

from __future__ import annotations

import argparse


def _shown(default) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None or default == []:
        return "not set"
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    return str(default)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's help ends with its default: options whose help does not already state it
    get ``(default: X)`` appended (``--help`` then shows every default)."""
    for a in parser._actions:
        if not a.option_strings or isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue
        if a.required or "default" in (a.help or ""):
            continue
        a.help = ((a.help + " ") if a.help else "") + f"(default: {_shown(a.default)})".replace("%", "%%")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (progress is shown only when stderr is a terminal; default: off)")


def loading(source: str):
    """The status line around loading a model (``loading SOURCE ... done (N s)``)."""
    from .. import progress

    return progress.status(f"loading {source}")
