"""Constrained decoding (``Sampling.constraint``): outputs validate (``jsonschema``,
``re.fullmatch``, the choice list), a greedy constrained run equals the unconstrained one
wherever the unconstrained token was allowed (HF logits and an llguidance matcher of its own
as the references), unconstrained rows in a mixed batch equal their runs alone, streams equal
``generate``, and bad constraints are refused before any device work."""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import numpy as np
import pytest
import torch

import realm_jax
from realm_jax import Constraint, generation
from realm_jax.constraints import JSON_DEFAULTS
from realm_jax.errors import RealmError

from compile_counter import CompileCounter
from grammar_model import make_grammar_model


@pytest.fixture(scope="module")
def gm(tmp_path_factory):
    """(realm_jax Model, HF model) of a tiny random llama with a real byte-level tokenizer."""
    import transformers

    d = make_grammar_model(tmp_path_factory.mktemp("grammar") / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return realm_jax.load(d, dtype="float32"), hf


def _random_schema(rng) -> dict:
    """An object schema of 1-3 required properties with bounded values."""
    def leaf(depth):
        kind = rng.integers(0, 6 if depth < 1 else 5)
        if kind == 0:
            lo = int(rng.integers(-50, 50))
            return {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(0, 500))}
        if kind == 1:
            return {"type": "boolean"}
        if kind == 2:
            return {"enum": [str(w) for w in rng.choice(["red", "green", "blue", "cat", "dog"], 3, replace=False)]}
        if kind == 3:
            return {"type": "string", "maxLength": int(rng.integers(1, 6)), "pattern": "^[a-z]*$"}
        if kind == 4:
            return {"type": "array", "items": {"type": "boolean"}, "maxItems": int(rng.integers(1, 4))}
        return obj(depth + 1)

    def obj(depth):
        names = [str(n) for n in rng.choice(["a", "b", "id", "name", "ok", "v"], int(rng.integers(1, 4)), replace=False)]
        return {"type": "object", "properties": {n: leaf(depth) for n in names}, "required": names,
                "additionalProperties": False}

    return obj(0)


def _random_regex(rng) -> str:
    parts = [r"[a-c]{1,3}", r"\d{2}", r"(yes|no)", r"-", r"[xyz]?", r"(ab)+", r"[0-9a-f]{1,4}", r"!"]
    return "".join(rng.choice(parts, int(rng.integers(1, 5))))


def test_random_schemas_and_regexes_all_validate(gm):
    """200 sampled generations, 20 constraints per batch, every row its own schema or regex."""
    model, _ = gm
    rng = np.random.default_rng(0)
    checked = 0
    for batch in range(10):
        cons, checks = [], []
        for _ in range(20):
            if batch % 2 == 0:
                schema = _random_schema(rng)
                cons.append(Constraint.json_schema(schema))
                checks.append(lambda t, s=schema: jsonschema.validate(json.loads(t), s))
            else:
                pattern = _random_regex(rng)
                cons.append(Constraint.regex(pattern))
                checks.append(lambda t, p=pattern: re.fullmatch(p, t) or pytest.fail(f"{t!r} !~ {p!r}"))
        res = realm_jax.generate(model, ["{"] * 20, 120, constraint=cons, temperature=1.0, seed=100 * batch)
        for c, check, text, reason in zip(cons, checks, res.texts, res.finish_reasons):
            assert reason == "stop", (c, text)
            check(text)
            checked += 1
    assert checked == 200


def _matcher(model, c: Constraint):
    """An llguidance matcher built here, apart from the library's (the mask reference)."""
    tok = llguidance.LLTokenizer(model.tokenizer._tok.to_str(), n_vocab=model.config.vocab_size,
                                 eos_token=[model.tokenizer.eos_id])
    if c.kind == "json_schema":
        g = llguidance.LLMatcher.grammar_from_json_schema(c.value, defaults=JSON_DEFAULTS)
    else:
        g = llguidance.LLMatcher.grammar_from_regex(c.value)
    return llguidance.LLMatcher(tok, g, log_level=0)


def _allowed(m, vocab: int) -> np.ndarray:
    bits = np.frombuffer(m.compute_bitmask(), np.uint32)
    return ((bits[np.arange(vocab) >> 5] >> (np.arange(vocab) & 31)) & 1).astype(bool)


@pytest.mark.parametrize("c", [Constraint.json_schema({"type": "object", "properties": {
    "n": {"type": "integer", "minimum": 0, "maximum": 999}, "w": {"enum": ["red", "dog"]}},
    "required": ["n", "w"], "additionalProperties": False}), Constraint.regex(r"(ab|a)[0-9]{1,3}x")],
    ids=["schema", "regex"])
def test_greedy_constrained_equals_unconstrained_where_allowed(gm, c):
    model, hf = gm
    prompt = model.tokenizer.encode("yes no {")
    plain = realm_jax.generate(model, [prompt], 40, stop_ids=[2]).tokens[0]
    got = realm_jax.generate(model, [prompt], 40, stop_ids=[2], constraint=c)
    toks = got.tokens[0]
    assert got.finish_reasons == ["stop"] and toks[-1] == 2
    m = _matcher(model, c)
    v = model.config.vocab_size
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + toks])).logits[0, len(prompt) - 1:].numpy()
    same_prefix = True
    for j, t in enumerate(toks):
        allowed = _allowed(m, v)
        best = int(np.argmax(logits[j]))
        assert allowed[t], (j, t)
        assert t == int(np.argmax(np.where(allowed, logits[j], -np.inf))), j  # greedy over the allowed set
        if same_prefix and j < len(plain):
            if allowed[plain[j]]:
                assert t == plain[j] == best, j  # the unconstrained token was allowed: taken
            same_prefix = t == plain[j]
        if t != 2:
            assert m.consume_token(t)
    assert m.is_accepting()
    text = got.texts[0]
    if c.kind == "regex":
        assert re.fullmatch(c.value, text)
    else:
        jsonschema.validate(json.loads(text), c.value)


def test_mixed_batch_unconstrained_rows_equal_their_runs_alone(gm):
    model, _ = gm
    prompts = ["hello", "cat dog", "blue"]
    cons = [None, Constraint.choice(["red", "green", "blue"]), None]
    res = realm_jax.generate(model, prompts, 12, constraint=cons, temperature=0.8, seed=[1, 2, 3])
    for i in (0, 2):
        alone = realm_jax.generate(model, [prompts[i]], 12, temperature=0.8, seed=[1, 2, 3][i])
        assert res.tokens[i] == alone.tokens[0]
    assert res.texts[1] in ("red", "green", "blue") and res.finish_reasons[1] == "stop"


def test_a_finished_grammar_ends_a_row_without_stop_ids(gm):
    model, _ = gm
    res = realm_jax.generate(model, ["x"], 30, stop_ids=[], constraint={"choice": ["maybe", "no"]})
    assert res.texts[0] in ("maybe", "no") and res.finish_reasons == ["stop"]
    assert model.tokenizer.decode(res.tokens[0]) == res.texts[0]  # no stop token emitted


def test_forced_tokens_have_sampled_logprob_zero_and_raw_logprob_unmasked(gm):
    model, hf = gm
    prompt = model.tokenizer.encode("cat")
    res = realm_jax.generate(model, [prompt], 20, constraint=Constraint.regex("dog-dog-dog"), logprobs=1)
    toks, lps = res.tokens[0], res.logprobs[0]
    assert res.texts[0] == "dog-dog-dog"
    with torch.no_grad():
        raw = torch.log_softmax(hf(torch.tensor([prompt + toks])).logits[0, len(prompt) - 1:], -1).numpy()
    for j, (t, lp) in enumerate(zip(toks, lps)):
        np.testing.assert_allclose(lp.logprob, raw[j, t], rtol=1e-4, atol=1e-5)  # the model's own
        assert lp.sampled <= 0.0 and lp.sampled >= lp.logprob - 1e-5  # renormalised over fewer tokens
    # a literal has one tokenization path per step only where the vocabulary leaves one: where the
    # mask left a single token, the sampled distribution gave it probability one
    m = _matcher(model, Constraint.regex("dog-dog-dog"))
    for t, lp in zip(toks, lps):
        if t != 2 and _allowed(m, model.config.vocab_size).sum() == 1:
            assert lp.sampled == 0.0
        if t != 2:
            m.consume_token(t)


def test_stream_and_samples_with_a_constraint(gm):
    model, _ = gm
    c = Constraint.json_schema({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                "additionalProperties": False})
    kw = dict(constraint=c, temperature=1.0, seed=5, n=3)
    full = realm_jax.generate(model, ["a", "b"], 30, **kw)
    chunks = list(realm_jax.generate_stream(model, ["a", "b"], 30, chunk=3, **kw))
    for i in range(6):
        assert sum((ch.tokens[i] for ch in chunks), []) == full.tokens[i]
        assert "".join(ch.texts[i] for ch in chunks) == full.texts[i]
        assert json.loads(full.texts[i]) in ({"ok": True}, {"ok": False})
    for j in range(3):  # sample j equals its single-seed run
        alone = realm_jax.generate(model, ["b"], 30, constraint=c, temperature=1.0, seed=5 + j)
        assert alone.tokens[0] == full.tokens[3 + j]


def test_constraints_change_without_recompiling(gm):
    model, _ = gm
    realm_jax.generate(model, ["a", "b"], 8, constraint=Constraint.regex("[ab]+"))
    with CompileCounter() as cc:
        res = realm_jax.generate(model, ["a", "b"], 8, constraint=[Constraint.choice(["yes", "no"]),
                                                                   Constraint.json_object()])
    assert cc.count == 0
    assert res.texts[0] in ("yes", "no")


@pytest.mark.parametrize("kw, match", [
    (dict(constraint=Constraint.regex("(")), r"constraint \(row 0, regex\)"),
    (dict(constraint=Constraint.json_schema("{not json")), r"the JSON schema is not valid JSON"),
    (dict(constraint=Constraint.json_schema([1])), r"a JSON schema must be an object"),
    (dict(constraint=Constraint("xml", "<a/>")), r"unknown kind 'xml'"),
    (dict(constraint=Constraint.choice([])), r"a choice must be a non-empty list"),
    (dict(constraint={"regex": "a", "choice": ["b"]}), r"a one-key dict"),
    (dict(constraint=[None]), r"expected one constraint or 2"),
    (dict(constraint=Constraint.grammar("start: nosuchrule")), r"constraint \(row 0, grammar\)"),
    (dict(constraint=Constraint.regex("a+"), min_tokens=2), r"min_tokens: not available with a constraint"),
])
def test_bad_constraints_are_refused_before_device_work(gm, kw, match, monkeypatch):
    model, _ = gm
    monkeypatch.setattr(generation, "generate_jit", None)  # any device call would fail differently
    with pytest.raises(RealmError, match=match):
        realm_jax.generate(model, ["a", "b"], 4, **kw)


def test_a_model_without_tokenizer_is_refused(gm):
    model, _ = gm
    bare = realm_jax.loading.Model(model.config, model.params, None)
    with pytest.raises(RealmError, match=r"needs the model's tokenizer"):
        realm_jax.generate(bare, [[3, 4]], 4, constraint=Constraint.regex("a"))


# ---------------------------------------------------------------- the engine
def _mixed_engine_batch(model, **paging):
    """Constrained and plain requests, greedy and sampled, in one batch of an engine (``paging``:
    its block_size / num_blocks), each checked against ``generate(..., constraint=...)`` alone,
    nothing compiled after warm-up and every matcher released; (engine, requests, handles)."""
    from realm_jax import constraints
    from realm_jax.engine import Engine

    eng = Engine(model, max_slots=3, max_seq_len=128, prefill_buckets=(16,), prefill_batch=2,
                 decode_steps_per_call=4, constrained=True, **paging)
    rng = np.random.default_rng(7)
    reqs = []
    for i in range(8):
        c = [None, Constraint.json_schema(_random_schema(rng)), Constraint.regex(_random_regex(rng)),
             Constraint.choice(["red", "green"])][i % 4]
        kw = dict(temperature=[0.0, 1.0][i % 2], seed=i)
        reqs.append((["{", "a b", "x"][i % 3], kw, c))
    eng.warmup()
    with CompileCounter() as cc:
        handles = [eng.submit(p, 80, constraint=c, **kw) for p, kw, c in reqs]
        eng.run_until_idle()
    assert cc.count == 0
    for (p, kw, c), h in zip(reqs, handles):
        r = h.result()
        alone = realm_jax.generate(model, [p], 80, max_len=128, constraint=c, **kw)
        assert r.tokens == alone.tokens[0], (p, kw, c)
        assert r.text == alone.texts[0] and r.finish_reason == alone.finish_reasons[0]
    assert not constraints._ROWS  # every matcher released
    return eng, reqs, handles


def test_engine_serves_constrained_and_plain_requests_each_equal_to_generate(gm):
    _mixed_engine_batch(gm[0])


def test_engine_n_samples_of_a_constrained_prompt_equal_generate_n(gm):
    """n samples of one constrained prompt are one engine group, each sample with its own
    matcher: every sample equals ``generate(..., n=3, constraint=...)``'s row and validates."""
    from realm_jax.engine import Engine

    model, _ = gm
    eng = Engine(model, max_slots=3, max_seq_len=128, prefill_buckets=(16,), prefill_batch=2,
                 decode_steps_per_call=4, constrained=True)
    pattern = _random_regex(np.random.default_rng(3))
    c = Constraint.regex(pattern)
    g = eng.submit("x", 60, constraint=c, temperature=1.0, seed=9, n=3)
    eng.run_until_idle()
    alone = realm_jax.generate(model, ["x"], 60, max_len=128, constraint=c, temperature=1.0, seed=9, n=3)
    got = g.results()
    assert [r.tokens for r in got] == alone.tokens and [r.text for r in got] == alone.texts
    assert all(r.finish_reason == "stop" and re.fullmatch(pattern, r.text) for r in got)
    assert len(set(r.text for r in got)) > 1  # the samples draw with their own seeds
    from realm_jax import constraints

    assert not constraints._ROWS


def test_engine_refuses_a_constraint_unless_built_for_it(gm):
    from realm_jax.engine import Engine

    model, _ = gm
    eng = Engine(model, max_slots=1, max_seq_len=64, prefill_buckets=(16,))
    with pytest.raises(RealmError, match=r"built without constrained=True"):
        eng.submit("a", 4, constraint=Constraint.regex("a+"))
    drafted = Engine(model, max_slots=1, max_seq_len=64, prefill_buckets=(16,), draft="lookup")
    with pytest.raises(RealmError, match=r"built without constrained=True"):
        drafted.submit("a", 4, constraint=Constraint.regex("a+"))


def test_a_paged_engine_serves_constraints_through_preemptions(gm):
    """Paged (``block_size``) with a pool small enough that requests are preempted: constrained
    and plain requests in one batch each equal ``generate(..., constraint=...)`` alone. A
    request back from a preemption discards its admission's draw without asking its grammar
    matcher (which has consumed the tokens it made), so its matcher stays in step."""
    eng, reqs, handles = _mixed_engine_batch(gm[0], block_size=8, num_blocks=20)
    assert any(h.preemptions for h, (_, _, c) in zip(handles, reqs) if c is not None), \
        "a constrained request was meant to be preempted"
    assert eng.stats().blocks_free == 20
