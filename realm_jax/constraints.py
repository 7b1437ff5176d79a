"""Constrained decoding: a per-row token mask from a grammar engine, applied before sampling.

The grammar engine is llguidance (the ``constrained`` extra). It takes JSON schemas, regular
expressions, choice lists and context-free (Lark) grammars, and answers each step's allowed
tokens as a bitmask over the vocabulary, computed on the host from the tokens so far. It has no
token-level automaton to put on the device (its lexer is lazy and its parser an Earley parser),
so the decode loop stays one jitted program and asks the host for the mask once per step
through ``jax.experimental.io_callback`` (``step_masks``); a speculative round asks once for
the masks of all its verified positions (``draft_masks``). docs/constrained.md says why this
engine and what a step costs.

Flow: ``Constraint`` (what the user asks for) -> ``compile_rows`` on the host, before any device
work (a bad schema or grammar is a ``RealmError`` naming the row) -> ``RowMatchers`` registered
under process-wide keys -> ``Controls.constraint`` [B] int32 keys (-1 = unconstrained) ->
``emit`` calls ``step_masks`` and masks the logits -> ``release`` when the call ends.

Stopping: where the grammar allows the end of its text, the row's own stop ids are allowed (the
grammar engine's end-of-sequence token stands for them). A row that has no stop ids and whose
grammar can take nothing more ends there, with finish reason "stop".
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from typing import Any, Sequence

import numpy as np

from .errors import RealmError

KINDS = ("json_schema", "regex", "choice", "grammar")
# JSON output without free whitespace between tokens unless a schema asks for it
# (``"x-guidance": {"whitespace_flexible": true}`` in the schema).
JSON_DEFAULTS = {"whitespace_flexible": False}


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What a row's output must match. ``kind``: one of ``KINDS``; ``value``: a JSON schema
    (dict or JSON text), a regex (the whole output must match it), a list of strings (the
    output is one of them) or a Lark grammar (llguidance's dialect: ``start`` is the root)."""

    kind: str
    value: Any

    @classmethod
    def json_schema(cls, schema) -> "Constraint":
        return cls("json_schema", schema)

    @classmethod
    def json_object(cls) -> "Constraint":
        """Any JSON object (OpenAI's ``response_format={"type": "json_object"}``)."""
        return cls("json_schema", {"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> "Constraint":
        return cls("choice", tuple(options) if isinstance(options, list) else options)

    @classmethod
    def grammar(cls, lark: str) -> "Constraint":
        return cls("grammar", lark)

    @classmethod
    def of(cls, x, where: str = "constraint") -> "Constraint | None":
        """None, a ``Constraint``, or a one-key dict ``{kind: value}`` -> a checked ``Constraint``."""
        if x is None:
            return None
        if isinstance(x, dict) and len(x) == 1:
            (kind, value), = x.items()
            x = cls(kind, value)
        if not isinstance(x, Constraint):
            raise RealmError(f"{where}: expected a realm_jax.Constraint, a one-key dict {{kind: value}} with kind "
                             f"in {list(KINDS)}, or None; got {type(x).__name__}")
        x.check(where)
        return x

    def check(self, where: str = "constraint") -> None:
        """Host checks of the value's type (the grammar itself is checked by ``lark_of``)."""
        k, v = self.kind, self.value
        if k not in KINDS:
            raise RealmError(f"{where}: unknown kind {k!r}; expected one of {list(KINDS)}")
        if k == "json_schema":
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except ValueError as e:
                    raise RealmError(f"{where}: the JSON schema is not valid JSON ({e})") from None
            if not isinstance(v, (dict, bool)):
                raise RealmError(f"{where}: a JSON schema must be an object (or true/false), got {type(v).__name__}")
        elif k in ("regex", "grammar"):
            if not isinstance(v, str) or not v:
                raise RealmError(f"{where}: a {k} must be a non-empty string, got {v!r:.60}")
        elif not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) and s for s in v):
            raise RealmError(f"{where}: a choice must be a non-empty list of non-empty strings, got {v!r:.80}")

    def lark_of(self) -> str:
        """The llguidance grammar text of this constraint."""
        llg = _llguidance()
        k, v = self.kind, self.value
        if k == "json_schema":
            schema = json.loads(v) if isinstance(v, str) else v
            try:
                return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
            except ValueError as e:
                raise RealmError(f"constraint: the JSON schema is not usable ({e})") from None
        if k == "regex":
            return llg.LLMatcher.grammar_from_regex(v)
        if k == "choice":
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in v))
        return llg.LLMatcher.grammar_from_lark(v)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise RealmError("constrained decoding needs llguidance: pip install 'realm-jax[constrained]'") from None
    return llguidance


def constraints_per_prompt(x, batch: int) -> list[Constraint | None]:
    """``Sampling.constraint``: None, one constraint for all prompts, or one (or None) per prompt."""
    if isinstance(x, (list, tuple)):
        if len(x) != batch:
            raise RealmError(f"constraint: expected one constraint or {batch} (one per prompt), got {len(x)}")
        return [Constraint.of(c, f"constraint (prompt {i})") for i, c in enumerate(x)]
    return [Constraint.of(x)] * batch


# ---------------------------------------------------------------------------------- host side
_TOKENIZERS: dict = {}


def grammar_tokenizer(tokenizer, vocab_size: int, eos_ids: Sequence[int]):
    """The llguidance tokenizer of a realm_jax ``Tokenizer`` over the model's vocabulary
    (``vocab_size`` >= the tokenizer's); built once per (tokenizer, vocab, eos ids), ~1 s."""
    if tokenizer is None:
        raise RealmError("constraint: constrained decoding needs the model's tokenizer (this model has none)")
    if not eos_ids:
        raise RealmError("constraint: constrained decoding needs an end-of-sequence id (the model has none)")
    key = (id(tokenizer), vocab_size, tuple(eos_ids))
    hit = _TOKENIZERS.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    llg = _llguidance()
    ends = [int(e) for e in eos_ids if int(e) < tokenizer.vocab_size]  # ids the tokenizer itself has
    if not ends:
        raise RealmError(f"constraint: none of the end-of-sequence ids {list(eos_ids)} is in the tokenizer's "
                         f"{tokenizer.vocab_size} tokens")
    try:
        lt = llg.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size, eos_token=ends)
    except ValueError as e:
        raise RealmError(f"constraint: the grammar engine cannot read this model's tokenizer ({e})") from None
    _TOKENIZERS[key] = (tokenizer, lt)
    return lt


class _Row:
    """One row's matcher: tokens consumed so far, its stop ids (allowed where the grammar may end)."""

    __slots__ = ("matcher", "consumed", "stops", "eos", "error")

    def __init__(self, matcher, stops: Sequence[int], eos: Sequence[int]):
        self.matcher, self.consumed, self.error = matcher, 0, None
        self.stops, self.eos = [int(s) for s in stops], [int(e) for e in eos]


def compile_rows(model, constraints: Sequence[Constraint | None], stop_ids: Sequence[Sequence[int]],
                 eos_ids: Sequence[int]) -> list:
    """Per row: None or a fresh matcher (``_Row``) of its constraint, built on the host
    (``eos_ids``: the model's own end ids, ``generation.default_stop_ids``).
    A grammar llguidance refuses is a ``RealmError`` naming the row and llguidance's message."""
    if all(c is None for c in constraints):
        return [None] * len(constraints)
    llg = _llguidance()
    lt = grammar_tokenizer(getattr(model, "tokenizer", None), model.config.vocab_size, eos_ids)
    grammars: dict = {}
    rows = []
    for i, (c, stops) in enumerate(zip(constraints, stop_ids)):
        if c is None:
            rows.append(None)
            continue
        text = grammars.get(id(c))
        if text is None:
            text = grammars[id(c)] = c.lark_of()
        m = llg.LLMatcher(lt, text, log_level=0)
        if m.is_error():
            raise RealmError(f"constraint (row {i}, {c.kind}): {m.get_error()}")
        rows.append(_Row(m, stops, lt.eos_tokens))
    return rows


_LOCK = threading.Lock()
_ROWS: dict[int, _Row] = {}
_KEYS = itertools.count()
_EXECUTOR = None


def register(rows: Sequence) -> np.ndarray:
    """Matchers -> their keys [R] int32 (-1 for None), valid until ``release``."""
    keys = np.full((len(rows),), -1, np.int32)
    with _LOCK:
        for i, r in enumerate(rows):
            if r is not None:
                k = next(_KEYS) % (2**31 - 1)
                _ROWS[k] = r
                keys[i] = k
    return keys


def release(keys) -> list[str]:
    """Forget the matchers under ``keys``; returns the errors any of them met."""
    errors = []
    with _LOCK:
        for k in np.asarray(keys).tolist():
            r = _ROWS.pop(int(k), None)
            if r is not None and r.error:
                errors.append(r.error)
    return errors


def _executor():
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _llguidance().LLExecutor()
    return _EXECUTOR


def host_masks(keys: np.ndarray, last: np.ndarray, num_new: np.ndarray, done: np.ndarray, width: int):
    """The host half of a step: keys / last / num_new [B] int32, done [B] bool -> (bits [B, W]
    int32, bit v % 32 of word v // 32 = token v allowed; finish [B] bool).

    A live constrained row first consumes its latest token if it has one more token than its
    matcher has seen, then gets the grammar's mask, with the grammar's end standing for the
    row's stop ids. Other rows get all ones."""
    b = keys.shape[0]
    bits = np.full((b, width), -1, np.int32)
    finish = np.zeros((b,), bool)
    rows = _live_rows(keys, done)
    todo = [(rows[i].matcher, i) for i in _catch_up_rows(rows, num_new, last[:, None], finish)]
    finish[[i for _, i in todo]] = _fill_masks(rows, todo, bits)
    return bits, finish


def host_draft_masks(keys: np.ndarray, window: np.ndarray, num_new: np.ndarray, drafts: np.ndarray,
                     done: np.ndarray, width: int):
    """The host half of a speculative round: keys / num_new [B] int32, window [B, k + 1] int32 (the
    row's last k + 1 committed tokens), drafts [B, k] int32, done [B] bool -> (bits [B, k + 1, W]
    int32, finish [B, k + 1] bool): the mask of each verified position.

    A live constrained row first consumes the tokens committed since its matcher last saw it
    (the window's tail), then gets the mask after 0, 1, ..., k of the drafts, consuming each
    draft while the grammar allows it; past a refused draft or a stop id the masks are all ones
    (those positions cannot be accepted). The drafts are rolled back afterwards: the matcher
    keeps only committed tokens. Other rows get all ones."""
    b, k = drafts.shape
    bits = np.full((b, k + 1, width), -1, np.int32)
    finish = np.zeros((b, k + 1), bool)
    rows = _live_rows(keys, done)
    going = _catch_up_rows(rows, num_new, window, finish)
    drafted = dict.fromkeys(going, 0)
    for j in range(k + 1):
        if not going:
            break
        todo = [(rows[i].matcher, i) for i in going]
        layer = np.full((b, width), -1, np.int32)
        ends = _fill_masks(rows, todo, layer)
        going = []
        for (m, i), end in zip(todo, ends):
            bits[i, j], finish[i, j] = layer[i], end
            d = int(drafts[i, j]) if j < k else -1
            if (not end and 0 <= d < 32 * width and (int(layer[i, d >> 5]) >> (d & 31)) & 1
                    and d not in rows[i].stops and m.consume_token(d)):
                drafted[i] += 1
                going.append(i)
    for i, n in drafted.items():
        if n:
            rows[i].matcher.rollback(n)
    return bits, finish


def _live_rows(keys: np.ndarray, done: np.ndarray) -> list:
    """Each row's ``_Row`` (None: unconstrained or done)."""
    with _LOCK:
        return [(_ROWS.get(int(k)) if k >= 0 and not d else None) for k, d in zip(keys, done)]


def _catch_up_rows(rows: list, num_new: np.ndarray, tails: np.ndarray, finish: np.ndarray) -> list[int]:
    """The live constrained rows, each matcher brought to its row's ``num_new`` committed tokens
    (``tails`` [B, T]: the last T of them); a row in error is marked ended in ``finish``."""
    going = []
    for i, r in enumerate(rows):
        if r is None:
            continue
        if _catch_up(r, int(num_new[i]), tails[i]):
            going.append(i)
        else:
            finish[i] = True
    return going


def _catch_up(r: "_Row", n: int, tail: np.ndarray) -> bool:
    """Bring a row's matcher to its ``n`` committed tokens (``tail``: the last of them, at least
    the ones it has not seen); False if the row is in error (it ends)."""
    behind = n - r.consumed
    if 0 < behind <= len(tail):
        for t in (int(x) for x in tail[len(tail) - behind:]):
            if not r.matcher.consume_token(t):
                r.error = r.error or f"token {t} refused: {r.matcher.get_error()}"
                break
        r.consumed = n
    elif behind != 0:
        r.error = r.error or f"matcher out of step: it saw {r.consumed} tokens, the row has {n}"
    if r.error or r.matcher.is_error():
        r.error = r.error or r.matcher.get_error()
        return False
    return True


def _fill_masks(rows: list, todo: list, bits: np.ndarray) -> list[bool]:
    """Write the grammar's masks of ``todo`` ((matcher, row) pairs) into rows of ``bits`` [B, W],
    with the grammar's end standing for each row's stop ids; per pair, whether nothing may
    follow (the row ends: its grammar is done and it has no stop id)."""
    if not todo:
        return []
    from llguidance.numpy import fill_next_token_bitmask_par

    for _, i in todo:  # the ids past the grammar tokenizer's own stay refused
        bits[i] = 0
    fill_next_token_bitmask_par(_executor(), todo, bits)
    words = bits.view(np.uint32)
    ends = []
    for m, i in todo:
        r, w = rows[i], words[i]
        can_end = any((w[e >> 5] >> np.uint32(e & 31)) & 1 for e in r.eos)
        for e in r.eos:  # the grammar's end of sequence stands for the row's stop ids
            w[e >> 5] &= ~np.uint32(1 << (e & 31))
        if can_end:
            for s in r.stops:
                w[s >> 5] |= np.uint32(1 << (int(s) & 31))
        ends.append(not w.any())  # nothing may follow and the row has no stop id
    return ends


# -------------------------------------------------------------------------------- device side
_CALLBACKS: dict = {}


def _callback(width: int, host=None):
    """One host function per (mask width, host half), so that a traced program always names the
    same one. host: ``host_masks`` (default) or ``host_draft_masks``."""
    host = host or host_masks
    fn = _CALLBACKS.get((width, host))
    if fn is None:
        def fn(*args):
            return host(*(np.asarray(a) for a in args), width)

        _CALLBACKS[(width, host)] = fn
    return fn


def _unpack(bits, vocab: int):
    """bits [..., W] int32 -> allowed [..., V] bool (bit v % 32 of word v // 32)."""
    import jax.numpy as jnp

    v = jnp.arange(vocab, dtype=jnp.int32)
    return (jnp.right_shift(bits[..., v >> 5], v & 31) & 1) == 1


def step_masks(keys, last, num_new, done, vocab: int):
    """Device half of a step: keys / last / num_new [B] int32, done [B] bool -> (allowed [B, V]
    bool, finish [B] bool), through one host callback (skipped when no live row is constrained)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import io_callback

    b, w = keys.shape[0], (vocab + 31) // 32
    shapes = (jax.ShapeDtypeStruct((b, w), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.bool_))

    def ask(_):
        return io_callback(_callback(w), shapes, keys, last, num_new, done)

    def skip(_):
        return jnp.full((b, w), -1, jnp.int32), jnp.zeros((b,), bool)

    bits, finish = jax.lax.cond(jnp.any((keys >= 0) & ~done), ask, skip, None)
    return _unpack(bits, vocab), finish


def draft_masks(keys, window, num_new, drafts, done, vocab: int):
    """Device half of a speculative round: keys / num_new [B] int32, window [B, k + 1] int32 (the
    last k + 1 committed tokens), drafts [B, k] int32, done [B] bool -> (allowed [B, k + 1, V]
    bool, finish [B, k + 1] bool), the mask of each position the target verifies, through one
    host callback (``host_draft_masks``; skipped when no live row is constrained)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import io_callback

    (b, k), w = drafts.shape, (vocab + 31) // 32
    shapes = (jax.ShapeDtypeStruct((b, k + 1, w), jnp.int32), jax.ShapeDtypeStruct((b, k + 1), jnp.bool_))

    def ask(_):
        return io_callback(_callback(w, host_draft_masks), shapes, keys, window, num_new, drafts, done)

    def skip(_):
        return jnp.full((b, k + 1, w), -1, jnp.int32), jnp.zeros((b, k + 1), bool)

    bits, finish = jax.lax.cond(jnp.any((keys >= 0) & ~done), ask, skip, None)
    return _unpack(bits, vocab), finish
