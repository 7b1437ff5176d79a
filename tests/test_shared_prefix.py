"""Shared-prefix scoring (``score(..., share_prefixes=True)``, the default) against the plain path
(``share_prefixes=False``: every request whole) and against HF transformers log-probs; the
grouping rule; compile counts across groups; adapters; a mesh; resumption."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import realm_jax
from realm_jax import scoring
from realm_jax.errors import RealmError

from compile_counter import CompileCounter
from test_scoring import hf_continuation_logprobs, make_tiny

MIN = scoring.MIN_SHARED_PREFIX


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("shared") / "m")


def toks(rng, n, vocab=97):
    return rng.integers(3, vocab, int(n)).tolist()


def mixed_requests(rng, vocab=97):
    """A workload of every kind, shuffled: two few-shot subjects (a shared prefix, questions of
    their own, 4 choices each, some one-token), a question whose context is a prefix of another's,
    a duplicate, and requests sharing nothing."""
    reqs = []
    for subject in range(2):
        shots = toks(rng, 40 + 7 * subject, vocab)
        for q in range(3):
            question = shots + toks(rng, rng.integers(1, 9), vocab)
            for c in range(4):
                reqs.append((question, toks(rng, 1 if c % 2 else rng.integers(1, 5), vocab)))
    long_ctx = toks(rng, 50, vocab)
    reqs += [(long_ctx[:30], toks(rng, 3, vocab)), (long_ctx, toks(rng, 2, vocab)),
             (long_ctx[:31], long_ctx[31:35])]  # the third one's continuation is the second one's context
    reqs.append(reqs[5])
    reqs += [(toks(rng, n, vocab), toks(rng, k, vocab)) for n, k in ((1, 1), (20, 6), (9, 1), (33, 2))]
    perm = rng.permutation(len(reqs))
    return [reqs[i] for i in perm]


def count_calls(monkeypatch):
    """Spy on the three device functions: {name: number of calls}."""
    calls = {"continuation_logprobs": 0, "prefill_prefixes": 0, "shared_continuation_logprobs": 0}
    for name in calls:
        real = getattr(scoring, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(scoring, name, spy)
    return calls


def assert_same(got, ref, atol=1e-5):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
        np.testing.assert_allclose(g.token_logprobs, r.token_logprobs, atol=atol, rtol=0)
        assert g.is_greedy == r.is_greedy
        assert g.logprob == pytest.approx(r.logprob, abs=atol * len(r.token_ids))


# ----------------------------------------------------------------------------- the grouping rule
def test_grouping_rule():
    rng = np.random.default_rng(0)
    shots = toks(rng, 40)
    q1, q2 = shots + toks(rng, 5), shots + toks(rng, 7)
    inputs = [q1 + [5], q1 + [6], q2 + [7], q2 + [8], toks(rng, 30), q1 + [9]]
    caps = [len(x) - 1 for x in inputs]  # one-token continuations: everything but the last token
    groups, alone = scoring.prefix_groups(inputs, caps)
    # the two questions of the subject share the few-shot prefix (40 tokens or a few more where
    # their random question tokens happen to start alike); the unrelated request is alone
    assert len(groups) == 1 and alone == [4]
    assert sorted(groups[0].members) == [0, 1, 2, 3, 5]
    assert groups[0].prefix == scoring.common_prefix(q1, q2) >= 40
    # one question alone: its choices share its whole context
    groups, alone = scoring.prefix_groups(inputs[:2], caps[:2])
    assert [(g.prefix, g.members) for g in groups] == [(len(q1), (0, 1))] and alone == []
    # a key (the adapter) splits groups
    groups, alone = scoring.prefix_groups(inputs[:4], caps[:4], keys=[0, 1, 0, 1])
    assert sorted(g.members for g in groups) == [(0, 2), (1, 3)] and alone == []
    # caps: a request whose allowed prefix is below the minimum shares nothing
    groups, alone = scoring.prefix_groups(inputs[:2], [MIN - 1, caps[1]])
    assert groups == [] and alone == [0, 1]
    # a big group does not shrink to take in a request sharing a little less
    big = [shots + [50, 51, 52, 53, t] for t in range(10)]
    near = shots[:38] + [60, 61]
    groups, alone = scoring.prefix_groups(big + [near], [len(x) - 1 for x in big] + [len(near) - 1])
    assert [g.prefix for g in groups] == [44] and alone == [10]
    # same input, same groups (the order the requests come in does not matter)
    perm = list(rng.permutation(len(inputs)))
    g1, _ = scoring.prefix_groups([inputs[i] for i in perm], [caps[i] for i in perm])
    assert sorted(tuple(sorted(perm[m] for m in g.members)) for g in g1) == [(0, 1, 2, 3, 5)]
    assert scoring.common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2 and scoring.common_prefix([1, 2], [1, 2, 3]) == 2
    assert scoring.common_prefix([], [1]) == 0 and scoring.common_prefix([4], [5]) == 0
    with pytest.raises(ValueError, match="one cap and one key per input"):
        scoring.prefix_groups(inputs, caps[:2])
    # prefill batches: full batches, then powers of two (no padding rows)
    gs = [scoring.PrefixGroup(20 + i, (2 * i, 2 * i + 1)) for i in range(11)]
    assert [len(b) for b in scoring.prefix_batches(gs, 4)] == [4, 4, 2, 1]
    assert [len(b) for b in scoring.prefix_batches(gs, 6)] == [6, 4, 1]
    assert [g.prefix for b in scoring.prefix_batches(gs, 4) for g in b] == sorted((g.prefix for g in gs), reverse=True)


# ----------------------------------------------------------------------------- equal numbers
@pytest.mark.parametrize("case", ["llama_gqa_llama3_untied",
                                  pytest.param("qwen2_bias", marks=pytest.mark.slow)])  # bias, tied head; ~20 s
def test_shared_equals_plain_and_hf(case, tiny, tmp_path, monkeypatch):
    model, hf = tiny if case == "llama_gqa_llama3_untied" else make_tiny(tmp_path / case, case)
    rng = np.random.default_rng(1)
    reqs = mixed_requests(rng, model.config.vocab_size)
    plain = realm_jax.score(model, reqs, batch_size=4, share_prefixes=False)
    calls = count_calls(monkeypatch)
    got = realm_jax.score(model, reqs, batch_size=4)
    # 3 groups: the two subjects (12 requests each, one of them with the duplicate) and the three
    # contexts that are prefixes of each other; prefilled as batches of 2 and 1 groups, their 28
    # rows in 7 + 1 batches; only the 4 requests sharing nothing run whole, as one batch
    assert calls["prefill_prefixes"] == 2 and calls["shared_continuation_logprobs"] == 8
    assert calls["continuation_logprobs"] == 1
    assert_same(got, plain)
    worst = 0.0
    for (c, k), s in zip(reqs, got):
        ref, ref_greedy = hf_continuation_logprobs(hf, c, k)
        np.testing.assert_allclose(s.token_logprobs, ref, atol=1e-4, rtol=0)
        assert s.is_greedy == ref_greedy
        worst = max(worst, float(np.abs(np.asarray(s.token_logprobs) - ref).max()))
    print(f"{case}: max |dlogprob| shared vs HF = {worst:.2e}")


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_padded_and_odd_batches(tiny, batch_size):
    """Batch sizes that leave padding rows in suffix batches (3 -> 4 rows; 8 with groups of 5),
    one row at a time, and a prefill batch of groups not a power of two."""
    model, _ = tiny
    rng = np.random.default_rng(2)
    reqs = mixed_requests(rng)
    assert_same(realm_jax.score(model, reqs, batch_size=batch_size),
                realm_jax.score(model, reqs, batch_size=batch_size, share_prefixes=False))


def test_truncation_with_max_length(tiny):
    """max_length cuts contexts from the left before grouping: requests of one few-shot prefix
    with contexts of different lengths lose different amounts and share less (or nothing)."""
    model, hf = tiny
    rng = np.random.default_rng(3)
    shots = toks(rng, 60)
    reqs = [(shots + toks(rng, n), toks(rng, k)) for n, k in ((2, 1), (2, 3), (9, 1), (9, 2), (30, 1))]
    reqs += [(reqs[0][0], toks(rng, 1))]
    got = realm_jax.score(model, reqs, batch_size=4, max_length=48)
    assert_same(got, realm_jax.score(model, reqs, batch_size=4, max_length=48, share_prefixes=False))
    for (c, k), s in zip(reqs, got):
        full = (c + k)[-49:]
        ref, _ = hf_continuation_logprobs(hf, full[:-len(k)], full[-len(k):])
        np.testing.assert_allclose(s.token_logprobs, ref, atol=1e-4, rtol=0)


def test_per_request_adapters(tiny, monkeypatch):
    """The adapter is part of the prefix key: requests of one prefix under different adapters
    are grouped per adapter, each group's prefix computed with its adapter."""
    import jax

    from realm_jax import lora

    model, _ = tiny
    cfg = model.config
    stack = lora.stack_adapters([lora.init_adapter(cfg, jax.random.PRNGKey(s), rank=4, b_std=0.2) for s in (1, 2)])
    rng = np.random.default_rng(4)
    shots = toks(rng, 36)
    reqs = [(shots + toks(rng, 3), toks(rng, 1 + i % 3)) for i in range(9)]
    ids = [0, 1, -1, 0, 1, -1, 0, 0, 1]
    plain = realm_jax.score(model, reqs, batch_size=4, adapters=stack, adapter_ids=ids, share_prefixes=False)
    calls = count_calls(monkeypatch)
    got = realm_jax.score(model, reqs, batch_size=4, adapters=stack, adapter_ids=ids)
    assert calls["prefill_prefixes"] == 2 and calls["continuation_logprobs"] == 0  # 3 groups: a batch of 2, of 1
    assert_same(got, plain)
    base = realm_jax.score(model, reqs, batch_size=4)
    assert max(abs(g.logprob - b.logprob) for g, b in zip(got, base)) > 1e-3  # the adapters matter
    for g, b, a in zip(got, base, ids):
        if a == -1:
            np.testing.assert_allclose(g.token_logprobs, b.token_logprobs, atol=1e-5, rtol=0)


def test_on_a_mesh(tiny):
    """On a (data 2, model 2) mesh: the prefix cache and suffix rows placed on the mesh, the same
    numbers as the plain path on one device."""
    from realm_jax.sharding import make_mesh

    model, _ = tiny
    rng = np.random.default_rng(5)
    reqs = mixed_requests(rng)
    ref = realm_jax.score(model, reqs, batch_size=4, share_prefixes=False)
    many = realm_jax.load(model.source, dtype="float32", mesh=make_mesh(2, 2))
    assert_same(realm_jax.score(many, reqs, batch_size=4), ref)


def test_compilations_stay_fixed_across_groups(tiny):
    """A long evaluation of many groups compiles per bucket, not per group: a second workload
    of new groups in the same length ranges compiles nothing."""
    model, _ = tiny
    # a config of its own (an rms eps no other test uses): the jit caches start empty for it
    model = realm_jax.Model(model.config.replace(rms_norm_eps=1.5e-5), model.params, model.tokenizer)
    rng = np.random.default_rng(6)

    def workload():
        reqs = []
        for _ in range(6):  # subjects: a prefix of 33-60 tokens, 3 questions, 4 choices of 1-3 tokens
            shots = toks(rng, rng.integers(33, 61))
            for _ in range(3):
                question = shots + toks(rng, rng.integers(1, 6))
                reqs += [(question, toks(rng, rng.integers(1, 4))) for _ in range(4)]
        return reqs

    fns = (scoring.prefill_prefixes, scoring.shared_continuation_logprobs, scoring.continuation_logprobs)
    before = [f._cache_size() for f in fns]
    with CompileCounter() as first:
        realm_jax.score(model, workload(), batch_size=8)
    compiled = [f._cache_size() - b for f, b in zip(fns, before)]
    assert compiled[0] >= 1 and compiled[1] >= 1 and compiled[2] == 0
    assert 0 < first.count
    for _ in range(2):
        with CompileCounter() as cc:
            realm_jax.score(model, workload(), batch_size=8)
        assert cc.count == 0
    assert [f._cache_size() - b for f, b in zip(fns, before)] == compiled
    print(f"compiles: {first.count} for the first workload (6 groups), then 0 for 12 more groups")


# ----------------------------------------------------------------------------- resumption
def test_iter_scores_batches_are_deterministic(tiny):
    model, _ = tiny
    rng = np.random.default_rng(7)
    reqs = mixed_requests(rng)
    a = list(scoring.iter_scores(model, reqs, batch_size=4))
    b = list(scoring.iter_scores(model, reqs, batch_size=4))
    assert [idx for idx, _ in a] == [idx for idx, _ in b]
    assert sorted(i for idx, _ in a for i in idx) == list(range(len(reqs)))
    assert [s for _, ss in a for s in ss] == [s for _, ss in b for s in ss]


def test_cli_resume_with_shared_prefixes(tiny, tmp_path, monkeypatch):
    """``realm-jax score`` interrupted mid-run and resumed gives the file of an uninterrupted run,
    and that file holds the plain path's numbers."""
    import json

    from realm_jax import cli

    model, _ = tiny
    rng = np.random.default_rng(8)
    reqs = mixed_requests(rng)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"context_ids": c, "continuation_ids": k}) + "\n" for c, k in reqs))

    def run(out, *extra):
        return cli.main(["score", "--model", str(model.source), "--data", str(data), "--batch-size", "4",
                         "--chunk-size", "12", "--dtype", "float32", "--quiet", "--out", str(out), *extra])

    assert run(tmp_path / "full.jsonl") == 0
    expected = (tmp_path / "full.jsonl").read_bytes()
    assert run(tmp_path / "plain.jsonl", "--no-share-prefixes") == 0
    plain = [json.loads(x) for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    for g, p in zip((json.loads(x) for x in expected.decode().splitlines()), plain):
        np.testing.assert_allclose(g["token_logprobs"], p["token_logprobs"], atol=1e-5, rtol=0)
        assert g["is_greedy"] == p["is_greedy"]

    class Interrupted(Exception):
        pass

    real = scoring.iter_scores

    def flaky(*a, **k):
        for n, item in enumerate(real(*a, **k)):
            if n == 2 and flaky.calls == 2:  # inside the second chunk
                raise Interrupted()
            yield item
        flaky.calls += 1

    flaky.calls = 1
    monkeypatch.setattr(scoring, "iter_scores", flaky)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Interrupted):
        run(out)
    assert out.read_text().count("\n") == 12 and out.read_bytes() == expected[:len(out.read_bytes())]
    monkeypatch.setattr(scoring, "iter_scores", real)
    assert run(out) == 0
    assert out.read_bytes() == expected


def test_lm_eval_adapter_shares_prefixes(tiny, monkeypatch):
    """The harness adapter's loglikelihood: string requests of a few-shot prompt with 4 choices
    share it (and equal HF on the harness's split); share_prefixes=False gives the same numbers."""
    from types import SimpleNamespace

    from realm_jax.integrations import lm_eval as adapter
    from test_scoring import TEXTS

    model, hf = tiny
    shots = " ".join(TEXTS[:3]) + "\n"
    reqs = [SimpleNamespace(args=(shots + q, c)) for q in ("a cat sat on the", "she sells sea")
            for c in (" mat", " shells", " dog", " fox")]
    calls = count_calls(monkeypatch)
    shared = adapter.RealmJaxLM(model=model, batch_size=4).loglikelihood(reqs, disable_tqdm=True)
    assert calls["prefill_prefixes"] == 1 and calls["continuation_logprobs"] == 0
    lm = adapter.RealmJaxLM(model=model, batch_size=4, share_prefixes=False)
    plain = lm.loglikelihood(reqs, disable_tqdm=True)
    assert calls["continuation_logprobs"] == 2 and calls["prefill_prefixes"] == 1
    for r, (a, ga), (b, gb) in zip(reqs, shared, plain):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
        ref, ref_greedy = hf_continuation_logprobs(hf, *lm.encode_pair(*r.args))
        assert a == pytest.approx(float(np.sum(ref)), abs=1e-4) and ga == ref_greedy
    with pytest.raises(RealmError, match="share_prefixes: expected True or False"):
        adapter.RealmJaxLM(model=model, share_prefixes="no")


# ----------------------------------------------------------------------------- property
@st.composite
def request_sets(draw):
    """A few random prefixes; each request: one of them (cut to a random length), a few tokens
    of its own, a continuation of 1-4 tokens; or a request of its own."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    prefixes = [toks(rng, rng.integers(MIN, 50)) for _ in range(draw(st.integers(1, 3)))]
    reqs = []
    for _ in range(draw(st.integers(2, 14))):
        if draw(st.booleans()) or len(reqs) == 0:
            p = prefixes[draw(st.integers(0, len(prefixes) - 1))]
            ctx = p[:draw(st.integers(1, len(p)))] + toks(rng, draw(st.integers(0, 6)))
        else:
            ctx = toks(rng, draw(st.integers(1, 40)))
        reqs.append((ctx or [1], toks(rng, draw(st.integers(1, 4)))))
    return reqs, draw(st.sampled_from([2, 4])), draw(st.sampled_from([None, 40]))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(case=request_sets())
def test_property_shared_equals_plain(tiny, case):
    model, _ = tiny
    reqs, batch_size, max_length = case
    assert_same(realm_jax.score(model, reqs, batch_size=batch_size, max_length=max_length, progress=False),
                realm_jax.score(model, reqs, batch_size=batch_size, max_length=max_length, share_prefixes=False,
                                progress=False))


def test_bad_share_prefixes(tiny):
    model, _ = tiny
    with pytest.raises(RealmError, match="share_prefixes: expected True or False, got 'yes'"):
        realm_jax.score(model, [([5, 6], [7])], share_prefixes="yes")
