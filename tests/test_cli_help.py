"""``realm-jax SUBCOMMAND --help`` states every option's default (and --max-new-tokens has help)."""

from __future__ import annotations

import argparse
import re

import pytest

from realm_jax import cli


def _parsers():
    out = {}
    for name, mod in cli._available().items():
        p = argparse.ArgumentParser(prog=f"realm-jax {name}")
        mod.add_arguments(p)
        out[name] = p
    return out


@pytest.mark.parametrize("name", [n for n in cli.COMMANDS if n != "eval"])
def test_every_option_states_its_default(name):
    parser = _parsers()[name]
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        assert action.required or "default" in text, f"{name} {action.option_strings[0]}: {text!r}"
    shown = " ".join(parser.format_help().split())
    for action in parser._actions:  # the stated numbers are the real ones
        if action.option_strings and isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
            flag = action.option_strings[-1]
            m = re.search(re.escape(flag) + r"\b[^-]*?\(default: ([^)]*)\)", shown)
            if m and re.fullmatch(r"[\d.]+", m.group(1)):
                assert float(m.group(1)) == action.default, flag


def test_max_new_tokens_has_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--max-new-tokens N tokens to generate per prompt at most.*\(default: 64\)", text)


def test_eval_passes_every_argument_to_the_harness(monkeypatch):
    from realm_jax.commands import eval as eval_cmd

    p = argparse.ArgumentParser(prog="realm-jax")
    sub = p.add_subparsers(dest="command")
    eval_cmd.add_arguments(sub.add_parser("eval"))
    argv = ["--model", "realm_jax", "-h", "--model_args", "pretrained=x,dtype=float32", "--", "--tasks", "t"]
    assert p.parse_args(["eval", *argv]).harness_args == argv
    seen = []
    monkeypatch.setattr("realm_jax.integrations.lm_eval.main", lambda a: seen.append(a) or 0)
    assert eval_cmd.run(argparse.Namespace(harness_args=["--quiet", "--tasks", "t"])) == 0
    assert seen == [["--tasks", "t"]]
