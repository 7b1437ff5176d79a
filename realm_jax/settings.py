"""``Sampling``: every per-call generation setting in one object, taken by ``generate``,
``generate_stream``, the CLI (and, for the settings it serves, ``speculative_generate``).

Each numeric setting is a scalar or one value per prompt (None entries = the default); all are
checked on the host with a ``RealmError`` naming the setting, the row and the value, before any
device work. The device-side arrays are ``sampling.SamplingParams``; the order in which the
processors apply is in ``sampling``'s docstring.

Fields:
    temperature, top_k, top_p, min_p, seed: the draw (0 temperature = greedy).
    repetition_penalty (HF), frequency_penalty / presence_penalty (OpenAI), logit_bias
    ({token id: bias}, one map or one per prompt), min_tokens (stop ids masked until then).
    stop: strings that end a row (one list for all prompts, or one list per prompt); the text
    is cut before the first match, and the tokens end with the one that completed it.
    logprobs: None, or 0..20: each generated token's log-prob, with that many top alternatives.
    prompt_logprobs: None, or 0..20: the same for the prompt tokens (from the prefill pass).
    n: samples per prompt (sample i of a prompt uses seed + i), sharing one prefill.
    best_of: draw this many samples per prompt and keep the ``n`` with the highest cumulative
    log-prob (of the model's distribution).
    constraint: None, a ``Constraint`` (JSON schema, regex, choice list or Lark grammar; or a
    one-key dict ``{kind: value}``), or one per prompt: the output must match it
    (``constraints``; needs the ``constrained`` extra).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .errors import RealmError

MAX_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: Any = 0.0
    top_k: Any = None
    top_p: Any = None
    min_p: Any = None
    seed: Any = 0
    repetition_penalty: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    min_tokens: Any = None
    stop: Any = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    best_of: int | None = None
    constraint: Any = None

    @classmethod
    def of(cls, sampling: "Sampling | None" = None, **settings) -> "Sampling":
        """``sampling`` (default: all defaults) with ``settings`` replacing its fields; an unknown
        name is a ``RealmError`` listing the known ones."""
        base = cls() if sampling is None else sampling
        if not isinstance(base, Sampling):
            raise RealmError(f"sampling: expected a realm_jax.Sampling, got {type(base).__name__}")
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise RealmError(f"unknown sampling setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return dataclasses.replace(base, **settings)

    def non_default(self) -> list[str]:
        """The names of the fields set to something other than their default, in field order."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]

    @property
    def samples(self) -> int:
        """Rows drawn per prompt: ``best_of`` when given, else ``n``."""
        return self.n if self.best_of is None else self.best_of

    def check_counts(self) -> None:
        """The host-only settings: n, best_of, logprobs, prompt_logprobs."""
        if not _is_int(self.n) or self.n < 1:
            raise RealmError(f"n: expected an integer >= 1 (samples per prompt), got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of < self.n):
            raise RealmError(f"best_of: expected an integer >= n={self.n}, got {self.best_of!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise RealmError(f"{name}: expected None or an integer in [0, {MAX_LOGPROBS}] (top alternatives "
                                 f"per token), got {v!r}")

    def stop_strings(self, batch: int) -> list[tuple[str, ...]]:
        """``stop`` -> one tuple of non-empty strings per prompt."""
        stop = self.stop
        if stop is None:
            return [()] * batch
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise RealmError(f"stop: expected a string, a list of strings or one list per prompt, got "
                             f"{type(stop).__name__}")
        rows = [tuple(s) for s in stop] if stop and all(isinstance(s, (list, tuple)) for s in stop) else None
        if rows is not None and len(rows) != batch:
            raise RealmError(f"stop: per-prompt lists must number {batch} (one per prompt), got {len(rows)}")
        rows = rows or [tuple(stop)] * batch
        for i, r in enumerate(rows):
            for s in r:
                if not isinstance(s, str) or not s:
                    raise RealmError(f"stop: expected non-empty strings, got {s!r}" + (f" (prompt {i})" if batch > 1 else ""))
        return rows


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
