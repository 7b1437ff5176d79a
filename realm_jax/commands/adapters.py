"""``--lora [NAME=]DIR`` / ``--adapter NAME``: parsing and checking, before anything is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

from ..errors import RealmError


class AdapterPlan(NamedTuple):
    """``--lora``/``--adapter`` choices, checked on the host: adapter dirs by name, id per prompt."""

    dirs: dict  # name -> directory (in stacking order)
    ids: list  # [B] index into dirs (-1 = base model)


def plan_adapters(specs: Sequence[str], choices: Sequence[str], num_prompts: int) -> AdapterPlan | None:
    """Parse ``--lora [NAME=]DIR`` (repeatable; NAME defaults to the directory's name) and
    ``--adapter NAME`` (one per prompt, in prompt order, or one for all; 'base' = no adapter;
    default with a single ``--lora``: it, for every prompt). None without ``--lora``."""
    dirs: dict[str, str] = {}
    for spec in specs:
        name, sep, d = spec.partition("=")
        if not sep:
            name, d = Path(spec.rstrip("/\\")).name, spec
        if not name or not d:
            raise RealmError(f"--lora: expected DIR or NAME=DIR, got {spec!r}")
        if name == "base":
            raise RealmError("--lora: the name 'base' is reserved for the base model; pick another NAME=DIR")
        if name in dirs:
            raise RealmError(f"--lora: the name {name!r} is given twice ({dirs[name]!r}, {d!r}); use NAME=DIR")
        dirs[name] = d
    if not dirs:
        if choices:
            raise RealmError(f"--adapter {choices[0]!r} given without any --lora [NAME=]DIR")
        return None
    if not choices:
        if len(dirs) > 1:
            raise RealmError(f"{len(dirs)} --lora adapters ({', '.join(dirs)}): choose one per prompt with "
                             f"--adapter NAME (or 'base'), repeated {num_prompts} times")
        choices = [next(iter(dirs))]
    if len(choices) == 1:
        choices = list(choices) * num_prompts
    if len(choices) != num_prompts:
        raise RealmError(f"--adapter: expected one per prompt ({num_prompts}) or one for all, got {len(choices)}")
    names = list(dirs)
    for c in choices:
        if c != "base" and c not in dirs:
            raise RealmError(f"--adapter: unknown name {c!r}; expected one of {names + ['base']}")
    return AdapterPlan(dirs, [-1 if c == "base" else names.index(c) for c in choices])
