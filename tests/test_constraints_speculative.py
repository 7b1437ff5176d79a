"""Constrained decoding with speculative decoding: the target verifies every drafted position
under its grammar mask, so a draft that breaks the grammar is rejected. References: greedy
tokens equal ``generate`` with the same constraint (and differ from the unconstrained
speculative run, so the mask is what makes them equal); sampled choices have ``generate``'s
distribution (a chi-square test of homogeneity); the engine with a draft serves constrained and
plain requests, each equal to ``generate`` alone."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from scipy import stats

import realm_jax
from realm_jax import Constraint, constraints
from realm_jax.speculative import speculative_generate

from compile_counter import CompileCounter
from grammar_model import make_grammar_model
from test_constraints import _random_regex, _random_schema


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target, draft): two tiny random llamas (different weights) over one byte-level tokenizer."""
    root = tmp_path_factory.mktemp("spec_grammar")
    target = realm_jax.load(make_grammar_model(root / "t", seed=0), dtype="float32")
    draft = realm_jax.load(make_grammar_model(root / "d", seed=1), dtype="float32")
    return target, draft


def _check(c, text):
    if c.kind == "regex":
        assert re.fullmatch(c.value, text), text
    elif c.kind == "choice":
        assert text in c.value, text
    else:
        jsonschema.validate(json.loads(text), c.value)


@pytest.mark.parametrize("k, which", [(2, "model"), (4, "self:1")])
def test_greedy_speculative_with_constraints_equals_generate(models, k, which):
    target, draft = models
    d = draft if which == "model" else which
    rng = np.random.default_rng(k)
    cons = [Constraint.json_schema(_random_schema(rng)), Constraint.regex(_random_regex(rng)),
            Constraint.choice(["red", "green", "blue cat"]), None, Constraint.json_schema(_random_schema(rng))]
    prompts = ["{", "a b", "x", "yes no", "[1,"]
    spec = speculative_generate(target, d, prompts, 48, k=k, stop_ids=[2], constraint=cons)
    plain = realm_jax.generate(target, prompts, 48, stop_ids=[2], constraint=cons)
    assert spec.tokens == plain.tokens
    assert spec.finish_reasons == plain.finish_reasons
    assert spec.stats.accepted < spec.stats.drafted  # some drafts were rejected
    for c, text, why in zip(cons, spec.texts, spec.finish_reasons):
        if c is not None and why == "stop":
            _check(c, text)
    free = speculative_generate(target, d, prompts, 48, k=k, stop_ids=[2])
    assert free.tokens != spec.tokens  # without the masks the drafts' output is another text
    assert not constraints._ROWS  # every matcher released


def test_a_finished_grammar_ends_a_speculative_row_without_stop_ids(models):
    target, draft = models
    c = Constraint.choice(["maybe", "no", "blue bird"])
    spec = speculative_generate(target, draft, ["x", "cat"], 30, k=2, stop_ids=[], constraint=c)
    plain = realm_jax.generate(target, ["x", "cat"], 30, stop_ids=[], constraint=c)
    assert spec.tokens == plain.tokens and spec.finish_reasons == ["stop", "stop"]
    assert all(t in c.value for t in spec.texts)


def test_sampled_speculative_choices_have_generates_distribution(models):
    target, draft = models
    options = ["red", "green", "blue", "cat dog"]
    c = Constraint.choice(options)
    n = 400
    prompts = ["yes no"] * n
    seeds = list(range(n))
    spec = speculative_generate(target, draft, prompts, 16, k=3, stop_ids=[2], constraint=c, temperature=1.0,
                                seed=seeds)
    plain = realm_jax.generate(target, prompts, 16, stop_ids=[2], constraint=c, temperature=1.0,
                               seed=[s + 10_000 for s in seeds])
    counts = np.array([[texts.count(o) for o in options] for texts in (spec.texts, plain.texts)])
    assert counts.sum() == 2 * n  # every output is one of the options
    seen = counts.sum(axis=0) > 0
    assert seen.sum() >= 2  # a distribution with more than one outcome
    _, p, _, _ = stats.chi2_contingency(counts[:, seen])
    assert p > 1e-3, counts


def test_engine_with_a_draft_serves_constrained_and_plain_requests(models):
    from realm_jax.engine import Engine

    target, draft = models
    eng = Engine(target, max_slots=3, max_seq_len=128, prefill_buckets=(16,), prefill_batch=2,
                 decode_steps_per_call=4, draft=draft, k=3, constrained=True)
    rng = np.random.default_rng(11)
    reqs = []
    for i in range(7):
        c = [None, Constraint.json_schema(_random_schema(rng)), Constraint.regex(_random_regex(rng)),
             Constraint.choice(["red", "green"])][i % 4]
        reqs.append((["{", "a b", "x"][i % 3], c))
    eng.warmup()
    with CompileCounter() as cc:
        handles = [eng.submit(p, 60, constraint=c, stop_ids=[2]) for p, c in reqs]
        sampled = eng.submit("{", 60, constraint=reqs[1][1], stop_ids=[2], temperature=1.0, seed=5)
        eng.run_until_idle()
    assert cc.count == 0
    for (p, c), h in zip(reqs, handles):
        r = h.result()
        alone = realm_jax.generate(target, [p], 60, max_len=128, constraint=c, stop_ids=[2])
        assert r.tokens == alone.tokens[0], (p, c)
        assert r.finish_reason == alone.finish_reasons[0]
    r = sampled.result()
    if r.finish_reason == "stop":
        _check(reqs[1][1], r.text)
    assert eng.stats().drafted > eng.stats().accepted > 0
    assert not constraints._ROWS
