"""Log-probs in the engine (``Engine(max_logprobs=N)``, requests with ``logprobs=n``): computed on
the device in the decode loop, each request's ``TokenLogprob``s equal ``generate`` with the same
settings alone (which the sampling-surface tests hold to HF's logits and scores), and HF's raw
logits directly for a greedy request; streamed chunks carry the log-probs of their tokens, a
stop string cuts them with the tokens, rows with and without log-probs share a batch, and a warm
engine compiles nothing when requests change their settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import realm_jax
from realm_jax.engine import Engine
from realm_jax.errors import RealmError

from compile_counter import CompileCounter
from grammar_model import make_grammar_model
from hf_reference import make_hf_model

N_NEW = 9
SETTINGS = [
    dict(logprobs=3),
    dict(logprobs=0, temperature=0.8, seed=11),
    dict(),  # no log-probs, in the same batch
    dict(logprobs=5, temperature=1.1, top_p=0.9, top_k=20, seed=4),
    dict(logprobs=2, repetition_penalty=1.5, min_p=0.05, temperature=0.7, seed=2),
    dict(logprobs=1, frequency_penalty=0.4, logit_bias={7: 2.0}),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory, hf = make_hf_model("llama_gqa_llama3_untied", tmp_path_factory.mktemp("englp") / "m")
    return realm_jax.load(directory, dtype="float32"), hf.float().eval()


@pytest.fixture(scope="module")
def engine(tiny):
    eng = Engine(tiny[0], max_slots=3, max_seq_len=32, prefill_buckets=(8, 16), decode_steps_per_call=4,
                 max_logprobs=5)
    eng.warmup()
    yield eng
    eng.close()


def _prompts(model, n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, model.config.vocab_size, int(rng.integers(2, 12))).tolist() for _ in range(n)]


def _same(got, ref):
    """Two ``TokenLogprob`` lists: the same tokens and alternatives, values within float32 rounding."""
    assert [t.token for t in got] == [t.token for t in ref]
    np.testing.assert_allclose([t.logprob for t in got], [t.logprob for t in ref], atol=1e-5, rtol=0)
    np.testing.assert_allclose([t.sampled for t in got], [t.sampled for t in ref], atol=1e-5, rtol=0)
    for a, b in zip(got, ref):
        assert [i for i, _ in a.top] == [i for i, _ in b.top]
        np.testing.assert_allclose([v for _, v in a.top], [v for _, v in b.top], atol=1e-5, rtol=0)


def test_each_request_equals_generate_alone_without_recompiling(tiny, engine):
    model, _ = tiny
    prompts = _prompts(model, 2 * len(SETTINGS))
    reqs = [(p, SETTINGS[i % len(SETTINGS)]) for i, p in enumerate(prompts)]
    with CompileCounter() as cc:
        handles = [engine.submit(p, N_NEW, stop_ids=[], **s) for p, s in reqs]
        engine.run_until_idle()
    assert cc.count == 0  # other n, other settings, rows without log-probs: the same programs
    for h, (p, s) in zip(handles, reqs):
        r = h.result()
        ref = realm_jax.generate(model, [p], N_NEW, stop_ids=[], **s)
        assert r.tokens == ref.tokens[0]
        if "logprobs" not in s:
            assert r.logprobs is None and r.cumulative_logprob is None
            continue
        assert all(len(t.top) == s["logprobs"] for t in r.logprobs)
        _same(r.logprobs, ref.logprobs[0])
        assert r.cumulative_logprob == pytest.approx(ref.cumulative_logprobs[0], abs=1e-4)


def test_greedy_logprobs_are_hf_log_softmax_of_its_logits(tiny, engine):
    model, hf = tiny
    p = _prompts(model, 1, seed=9)[0]
    r = engine.submit(p, N_NEW, stop_ids=[], logprobs=4).result()
    with torch.no_grad():
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          max_new_tokens=N_NEW, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
                          output_logits=True)
    tokens = out.sequences[0, len(p):].tolist()
    raw = torch.log_softmax(torch.stack(out.logits, 1)[0].float(), -1).numpy()
    assert r.tokens == tokens
    np.testing.assert_allclose([t.logprob for t in r.logprobs], raw[np.arange(N_NEW), tokens], atol=2e-5)
    np.testing.assert_allclose([t.sampled for t in r.logprobs], raw[np.arange(N_NEW), tokens], atol=2e-5)
    for j, t in enumerate(r.logprobs):
        np.testing.assert_allclose([v for _, v in t.top], np.sort(raw[j])[::-1][:4], atol=2e-5)


def test_streamed_chunks_carry_their_tokens_logprobs(tiny, engine):
    model, _ = tiny
    p = _prompts(model, 1, seed=4)[0]
    h = engine.submit(p, 14, stop_ids=[], logprobs=2, temperature=0.9, seed=3)
    chunks = list(h.chunks(timeout=120))
    r = h.result()
    assert len(chunks) > 1 and all(len(c.logprobs) == len(c.tokens) for c in chunks)
    assert sum((c.logprobs for c in chunks), []) == r.logprobs
    assert [t.token for t in r.logprobs] == r.tokens


def test_a_stop_string_cuts_the_logprobs_with_the_tokens(tmp_path):
    gm = realm_jax.load(make_grammar_model(tmp_path / "m"), dtype="float32")
    plain = realm_jax.generate(gm, ["The quick"], 16, stop_ids=[]).texts[0]
    stop = plain[5:7]
    ref = realm_jax.generate(gm, ["The quick"], 16, stop_ids=[], stop=[stop], logprobs=1)
    with Engine(gm, max_slots=2, max_seq_len=48, decode_steps_per_call=3, max_logprobs=1) as eng:
        r = eng.submit("The quick", 16, stop_ids=[], stop=[stop], logprobs=1).result(timeout=120)
    assert r.finish_reason == "stop" and r.tokens == ref.tokens[0] and len(r.logprobs) == len(r.tokens)
    _same(r.logprobs, ref.logprobs[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_logprobs=21), r"max_logprobs: expected None or an integer in \[0, 20\]"),
    (dict(max_logprobs=-1), r"max_logprobs: expected None or an integer"),
    (dict(max_logprobs=True), r"max_logprobs: expected None or an integer"),
    (dict(max_logprobs=2, draft="lookup"), "max_logprobs: not available with a draft yet"),
])
def test_bad_engine_settings(tiny, kwargs, match):
    with pytest.raises(RealmError, match=match):
        Engine(tiny[0], max_slots=2, max_seq_len=32, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(logprobs=6), "logprobs: expected at most the engine's max_logprobs=5, got 6"),
    (dict(logprobs=-2), r"logprobs: expected None or an integer in \[0, 20\]"),
    (dict(logprobs=2.5), r"logprobs: expected None or an integer in \[0, 20\]"),
    (dict(prompt_logprobs=1), "prompt_logprobs: not served by the engine yet"),
])
def test_bad_requests_are_refused_before_any_device_work(tiny, engine, kwargs, match):
    before = engine.stats()
    with pytest.raises(RealmError, match=match):
        engine.submit([5, 6, 7], 4, **kwargs)
    after = engine.stats()
    assert after.submitted == before.submitted and after.rejected == before.rejected + 1
