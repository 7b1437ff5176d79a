"""``n`` samples per prompt (and ``best_of``) in the engine: one prefill per group, its cache and
first-token logits copied into the samples' slots. Each group's results equal ``generate(model,
[prompt], ..., n=...)`` alone (greedy, seeded sampling, penalties, log-probs, stop strings,
best_of's pick), a group takes one prefill call and no new compilation once warm, it is admitted
all or none, cancelling it frees every slot, and bad counts are refused before any device work."""

from __future__ import annotations

import numpy as np
import pytest

import realm_jax
from realm_jax.engine import Engine, RequestGroup, RequestHandle
from realm_jax.errors import RealmError

from compile_counter import CompileCounter
from grammar_model import make_grammar_model

N_NEW = 8
SAMPLED = dict(temperature=0.9, top_p=0.95, top_k=40, seed=5)


@pytest.fixture(scope="module")
def gm(tmp_path_factory):
    return realm_jax.load(make_grammar_model(tmp_path_factory.mktemp("engn") / "m"), dtype="float32")


@pytest.fixture(scope="module")
def engine(gm):
    eng = Engine(gm, max_slots=4, max_seq_len=32, prefill_buckets=(16,), prefill_batch=4, decode_steps_per_call=4,
                 max_logprobs=3)
    eng.warmup()
    yield eng
    eng.close()


def _same_logprobs(got, ref):
    assert [t.token for t in got] == [t.token for t in ref]
    np.testing.assert_allclose([t.logprob for t in got], [t.logprob for t in ref], atol=1e-5, rtol=0)
    for a, b in zip(got, ref):
        assert [i for i, _ in a.top] == [i for i, _ in b.top]


def _check(results, ref, logprobs: bool):
    """A group's results against ``generate``'s rows (tokens, text, finish reason, log-probs)."""
    assert len(results) == len(ref)
    for j, r in enumerate(results):
        assert (r.tokens, r.text, r.finish_reason) == (ref.tokens[j], ref.texts[j], ref.finish_reasons[j])
        if logprobs:
            _same_logprobs(r.logprobs, ref.logprobs[j])
            assert r.cumulative_logprob == pytest.approx(ref.cumulative_logprobs[j], abs=1e-4)
        else:
            assert r.logprobs is None and r.cumulative_logprob is None


@pytest.mark.parametrize("settings", [
    dict(n=3),
    dict(n=3, **SAMPLED),
    dict(n=3, logprobs=2, repetition_penalty=1.4, temperature=0.8, seed=2**32 - 2),  # seed + j wraps
    dict(n=2, best_of=3, **SAMPLED),
    dict(n=1, best_of=3, logprobs=2, repetition_penalty=1.2, temperature=1.2, seed=9),
], ids=["greedy", "sampled", "penalties-logprobs", "best_of", "best_of-logprobs"])
def test_a_group_equals_generate_n_from_one_prefill_without_compiling(gm, engine, settings):
    prompt = "The quick"
    ref = realm_jax.generate(gm, [prompt], N_NEW, stop_ids=[], **settings)
    before = engine.stats().prefill_calls
    with CompileCounter() as cc:
        g = engine.submit(prompt, N_NEW, stop_ids=[], **settings)
        engine.run_until_idle()
    assert cc.count == 0  # any n: the warm engine's programs
    assert engine.stats().prefill_calls == before + 1  # one prefill for all the samples
    assert isinstance(g, RequestGroup) and len(g) == settings.get("best_of", settings["n"])
    assert all(isinstance(h, RequestHandle) and h.group is g for h in g)
    _check(g.results(), ref, "logprobs" in settings)
    if "best_of" not in settings:  # each handle is its own sample
        assert [h.result().tokens for h in g] == ref.tokens


def test_groups_share_the_engine_with_other_requests(gm, engine):
    """Two groups and single requests queued together (more samples than slots): each equals its
    own ``generate`` call; the samples stream on their own handles."""
    reqs = [("yes no", dict(n=3, **SAMPLED)), ("0123", {}), ("red green", dict(n=3)),
            ('{"name": "', dict(temperature=0.7, seed=3))]
    out = [engine.submit(p, N_NEW, stop_ids=[], **s) for p, s in reqs]
    streamed = [[list(h.stream(timeout=120)) for h in g] for g in out if isinstance(g, RequestGroup)]
    engine.run_until_idle()
    for (p, s), o in zip(reqs, out):
        ref = realm_jax.generate(gm, [p], N_NEW, stop_ids=[], **s)
        _check(o.results() if isinstance(o, RequestGroup) else [o.result()], ref, False)
    assert streamed[0] == [h.result().tokens for h in out[0]]
    assert streamed[1] == [h.result().tokens for h in out[2]]
    res = engine.generate_many([{"prompt": "red green", "n": 3, **SAMPLED}, "0123"], max_new_tokens=N_NEW,
                               stop_ids=[])
    assert res.tokens == (realm_jax.generate(gm, ["red green"], N_NEW, stop_ids=[], n=3, **SAMPLED).tokens
                          + realm_jax.generate(gm, ["0123"], N_NEW, stop_ids=[]).tokens)


def test_stop_strings_end_each_sample_as_generate_does(gm, engine):
    prompt = "The quick"
    free = realm_jax.generate(gm, [prompt], 16, stop_ids=[], n=3, **SAMPLED).texts
    stops = [t[3:5] for t in free if len(t) > 5][:2] or ["e"]
    ref = realm_jax.generate(gm, [prompt], 16, stop_ids=[], n=3, stop=stops, **SAMPLED)
    assert "stop" in ref.finish_reasons
    g = engine.submit(prompt, 16, stop_ids=[], n=3, stop=stops, **SAMPLED)
    _check(g.results(timeout=120), ref, False)
    engine.run_until_idle()
    assert engine.stats().active_slots == 0


def test_a_group_is_admitted_all_or_none(gm, engine):
    """One slot free: a group of three waits, and the request queued behind it too (first come,
    first served), until three are free; then it takes one prefill call."""
    long = engine.submit("yes no", 20, stop_ids=[])
    short = engine.submit("0123", 2, stop_ids=[], n=2)
    g = engine.submit("red green", N_NEW, stop_ids=[], n=3, **SAMPLED)
    after = engine.submit("0123", N_NEW, stop_ids=[])
    engine.step()
    assert set(engine._sched.slots) == {long, *short, None}
    assert list(engine._queue) == list(g) + [after]
    calls = engine.stats().prefill_calls
    while any(h in engine._queue for h in g):
        engine.step()
    assert short.done and not long.done
    assert engine.stats().prefill_calls == calls + 1  # the group, once the short pair had ended
    assert set(engine._sched.slots) == {long, *g} and list(engine._queue) == [after]
    engine.run_until_idle()
    _check(g.results(), realm_jax.generate(gm, ["red green"], N_NEW, stop_ids=[], n=3, **SAMPLED), False)
    assert after.result().tokens == realm_jax.generate(gm, ["0123"], N_NEW, stop_ids=[]).tokens[0]


def test_cancelling_a_group_frees_all_its_slots(gm, engine):
    before = engine.stats().cancelled
    g = engine.submit("The quick", 24, stop_ids=[], n=3, **SAMPLED)
    engine.step()
    engine.step()
    assert all(h in engine._sched.slots for h in g)
    assert g.cancel() and not g.cancel()
    assert all(s is None for s in engine._sched.slots)
    res = g.results()
    assert [r.finish_reason for r in res] == ["cancelled"] * 3 and all(0 < len(r.tokens) < 24 for r in res)
    ref = realm_jax.generate(gm, ["The quick"], 24, stop_ids=[], n=3, **SAMPLED)
    assert all(r.tokens == ref.tokens[j][:len(r.tokens)] for j, r in enumerate(res))
    queued = engine.submit("yes no", N_NEW, stop_ids=[], n=2)  # cancelled while queued: never admitted
    assert queued.cancel() and not engine._queue
    engine.run_until_idle()
    assert engine.stats().cancelled == before + 5 and engine.stats().active_slots == 0


@pytest.mark.parametrize("settings,match", [
    (dict(n=0), "n: expected an integer >= 1"),
    (dict(n=2.0), "n: expected an integer >= 1"),
    (dict(n=True), "n: expected an integer >= 1"),
    (dict(n=5), "n: expected at most the engine's max_slots=4"),
    (dict(n=3, best_of=2), "best_of: expected an integer >= n=3"),
    (dict(n=1, best_of=0), "best_of: expected an integer >= n=1"),
    (dict(n=2, best_of=6), "best_of: expected at most the engine's max_slots=4"),
])
def test_bad_counts_are_refused_before_any_device_work(gm, engine, settings, match):
    before = engine.stats()
    with CompileCounter() as cc, pytest.raises(RealmError, match=match):
        engine.submit("yes no", N_NEW, **settings)
    assert cc.count == 0 and not engine._queue
    assert engine.stats().rejected == before.rejected + 1


def test_best_of_needs_max_logprobs(gm):
    eng = Engine(gm, max_slots=4, max_seq_len=32, prefill_buckets=(16,))
    with pytest.raises(RealmError, match=r"best_of: needs an engine built with max_logprobs"):
        eng.submit("yes no", N_NEW, n=2, best_of=3)
    assert not eng._queue
    eng.close()
