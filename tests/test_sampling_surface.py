"""The generation output surface (``Sampling``): log-probs, penalties, min-p, logit bias,
min_tokens, stop strings, n samples and best_of, against HF transformers (greedy tokens,
``output_scores`` / ``output_logits``, its logits processors), a plain numpy re-run of the
reference forward, and the plain rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import realm_jax
from realm_jax import generation
from realm_jax.errors import RealmError
from realm_jax.reference import forward_reference_jit
from realm_jax.stop_strings import StopScan, held_back

from compile_counter import CompileCounter
from hf_reference import make_hf_model

N_NEW = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(realm_jax Model, HF model) of one tiny random llama, float32."""
    directory, hf = make_hf_model("llama_gqa_llama3_untied", tmp_path_factory.mktemp("surface") / "m")
    return realm_jax.load(directory, dtype="float32"), hf.float().eval()


def _prompts(model, lengths=(5, 9, 3), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, model.config.vocab_size, n).tolist() for n in lengths]


def _hf_generate(hf, prompt, **kw):
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=N_NEW, pad_token_id=0, eos_token_id=None,
                           return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)


# ---------------------------------------------------------------- log-probs against HF
@pytest.mark.parametrize("settings_", [dict(), dict(repetition_penalty=1.7)], ids=["plain", "repetition"])
def test_token_logprobs_match_hf_scores_and_logits(tiny, settings_):
    """logprob = log-softmax of HF's raw ``logits``; sampled = HF's ``compute_transition_scores``
    of its processed ``scores``; the top alternatives = the top of HF's raw log-softmax."""
    model, hf = tiny
    prompts = _prompts(model)
    res = realm_jax.generate(model, prompts, N_NEW, stop_ids=[], logprobs=5, **settings_)
    for i, p in enumerate(prompts):
        out = _hf_generate(hf, p, **settings_)
        tokens = out.sequences[0, len(p):].tolist()
        assert res.tokens[i] == tokens
        processed = hf.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0].numpy()
        raw = torch.log_softmax(torch.stack(out.logits, 1)[0].float(), -1).numpy()  # [N, V]
        got = res.logprobs[i]
        np.testing.assert_allclose([t.logprob for t in got], raw[np.arange(N_NEW), tokens], atol=2e-5)
        np.testing.assert_allclose([t.sampled for t in got], processed, atol=2e-5)
        for j, t in enumerate(got):
            ids, lps = zip(*t.top)
            np.testing.assert_allclose(lps, np.sort(raw[j])[::-1][:5], atol=2e-5)
            np.testing.assert_allclose(raw[j, list(ids)], lps, atol=2e-5)
        assert res.cumulative_logprobs[i] == pytest.approx(sum(t.logprob for t in got))


def test_prompt_logprobs_match_an_hf_forward_pass(tiny):
    model, hf = tiny
    prompts = _prompts(model, (7, 2, 12))
    res = realm_jax.generate(model, prompts, 2, stop_ids=[], prompt_logprobs=3)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), -1).numpy()  # [T, V]
        row = res.prompt_logprobs[i]
        assert row[0] is None and len(row) == len(p)
        np.testing.assert_allclose([t.logprob for t in row[1:]], lp[np.arange(len(p) - 1), p[1:]], atol=2e-5)
        assert [t.token for t in row[1:]] == p[1:]
        for t, ref in zip(row[1:], lp[:-1]):
            np.testing.assert_allclose([x[1] for x in t.top], np.sort(ref)[::-1][:3], atol=2e-5)


def test_sampled_logprobs_are_of_the_warped_distribution(tiny):
    """For a sampled row, ``sampled`` is the log-prob under temperature + top-k (the distribution
    drawn from): HF's TemperatureLogitsWarper and TopKLogitsWarper on the same raw logits."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    model, _ = tiny
    res = realm_jax.generate(model, _prompts(model), N_NEW, stop_ids=[], temperature=0.7, top_k=5, seed=3,
                             logprobs=model.config.vocab_size if model.config.vocab_size <= 20 else 20)
    assert res.tokens == realm_jax.generate(model, _prompts(model), N_NEW, stop_ids=[], temperature=0.7, top_k=5,
                                            seed=3).tokens  # recording log-probs changes no draw
    for row in res.logprobs:
        for t in row:
            raw = np.full((1, model.config.vocab_size), -np.inf, np.float32)
            ids, lps = zip(*t.top)
            raw[0, list(ids)] = lps  # the top 20 hold the top 5 the warper keeps
            scores = TopKLogitsWarper(5)(None, TemperatureLogitsWarper(0.7)(None, torch.tensor(raw)))
            ref = torch.log_softmax(scores, -1)[0, t.token].item()
            assert t.sampled == pytest.approx(ref, abs=2e-5)


# ---------------------------------------------------------------- penalties, bias, min_tokens
@pytest.mark.parametrize("hf_kw,ours", [
    (dict(repetition_penalty=1.9), dict(repetition_penalty=1.9)),
    (dict(repetition_penalty=0.6), dict(repetition_penalty=0.6)),
    (dict(sequence_bias={(7,): 4.0, (11,): -3.0}), dict(logit_bias={7: 4.0, 11: -3.0})),
    (dict(min_new_tokens=6, eos_token_id=[15, 43]), dict(min_tokens=6, stop_ids=[15, 43])),
], ids=["repetition-1.9", "repetition-0.6", "logit_bias", "min_tokens"])
def test_greedy_processors_equal_hf_generate(tiny, hf_kw, ours):
    model, hf = tiny
    prompts = _prompts(model, (6, 4, 11), seed=2)
    stop = ours.pop("stop_ids", [])
    res = realm_jax.generate(model, prompts, N_NEW, stop_ids=stop, **ours)
    plain = realm_jax.generate(model, prompts, N_NEW, stop_ids=stop)
    for i, p in enumerate(prompts):
        kw = dict(hf_kw)
        eos = kw.pop("eos_token_id", None)
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                              max_new_tokens=N_NEW, pad_token_id=0, eos_token_id=eos, **kw)
        ref = out[0, len(p):].tolist()
        if eos is not None and ref[-1] in eos:
            ref = ref[:ref.index(next(t for t in ref if t in eos)) + 1]
        assert res.tokens[i] == ref, f"row {i}"
    assert res.tokens != plain.tokens  # the setting changed something


def _greedy_numpy(model, prompt, n_new, frequency, presence, width=32):
    """Plain reference: the uncached reference forward each step, OpenAI's penalties in numpy."""
    seq, counts = list(prompt), np.zeros(model.config.vocab_size)
    for _ in range(n_new):
        toks = np.zeros((1, width), np.int32)
        toks[0, :len(seq)] = seq
        logits = np.asarray(forward_reference_jit(model.params, model.config, toks, np.array([len(seq)], np.int32)))
        x = logits[0, len(seq) - 1].astype(np.float64) - frequency * counts - presence * (counts > 0)
        t = int(np.argmax(x))
        counts[t] += 1
        seq.append(t)
    return seq[len(prompt):]


def test_frequency_and_presence_penalties_match_numpy(tiny):
    model, _ = tiny
    prompts = _prompts(model, (4, 8), seed=5)
    freq, pres = [1.5, 0.4], [0.3, 1.2]
    res = realm_jax.generate(model, prompts, N_NEW, stop_ids=[], frequency_penalty=freq, presence_penalty=pres)
    for i, p in enumerate(prompts):
        assert res.tokens[i] == _greedy_numpy(model, p, N_NEW, freq[i], pres[i])


def test_min_p_equals_hf_warper(tiny):
    """The distribution sampled from, with temperature and min-p, against HF's warpers."""
    import jax.numpy as jnp
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper

    from realm_jax.sampling import SamplingParams, processed_logits

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 97)).astype(np.float32) * 3
    mins = [0.05, 0.2, 0.5, 0.0]
    sp = SamplingParams.make(4, temperature=0.8, min_p=mins)
    ours = np.asarray(processed_logits(jnp.asarray(logits), sp))
    for i, mp in enumerate(mins):
        ref = TemperatureLogitsWarper(0.8)(None, torch.tensor(logits[i:i + 1]))
        if mp:
            ref = MinPLogitsWarper(mp)(None, ref)
        ref = ref.numpy()[0]
        np.testing.assert_array_equal(np.isfinite(ours[i]), np.isfinite(ref))
        np.testing.assert_allclose(ours[i][np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6)


def test_settings_change_without_recompiling(tiny):
    model, _ = tiny
    prompts = _prompts(model)
    kw = dict(stop_ids=[], logprobs=2, repetition_penalty=1.2, frequency_penalty=0.1, min_p=0.1,
              logit_bias={5: 1.0}, min_tokens=2, temperature=0.5)
    realm_jax.generate(model, prompts, N_NEW, **kw)
    with CompileCounter() as c:
        realm_jax.generate(model, prompts, N_NEW, **{**kw, "repetition_penalty": [1.5, 1.0, 0.9],
                                                     "frequency_penalty": 0.7, "min_p": [0.3, 0.0, 0.05],
                                                     "logit_bias": [{9: -2.0}, None, {3: 5.0}], "min_tokens": 4,
                                                     "temperature": [0.0, 1.0, 0.3], "seed": 9})
    assert c.count == 0


# ---------------------------------------------------------------- n samples, best_of
def test_n_samples_share_one_prefill_and_equal_single_runs(tiny, monkeypatch):
    model, _ = tiny
    prompts = _prompts(model)
    calls = []
    real = generation.forward_cached_hidden

    def counting(rt, cfg, tokens, *a, **k):
        calls.append(tokens.shape)
        return real(rt, cfg, tokens, *a, **k)

    monkeypatch.setattr(generation, "forward_cached_hidden", counting)
    generation.generate_jit.clear_cache()
    res = realm_jax.generate(model, prompts, N_NEW, stop_ids=[], temperature=0.9, seed=[10, 20, 30], n=3)
    assert calls == [(4, 16)]  # one prefill of the 3 prompts (batch bucket 4), traced once
    monkeypatch.undo()
    assert len(res.tokens) == 9
    for i, p in enumerate(prompts):
        for j in range(3):
            alone = realm_jax.generate(model, [p], N_NEW, stop_ids=[], temperature=0.9, seed=[10, 20, 30][i] + j)
            assert res.tokens[3 * i + j] == alone.tokens[0]
    assert len({tuple(t) for t in res.tokens[:3]}) > 1  # the samples differ


def test_best_of_keeps_the_highest_cumulative_logprob(tiny):
    model, _ = tiny
    prompts = _prompts(model, (5, 6))
    kw = dict(stop_ids=[], temperature=1.0, seed=4)
    best = realm_jax.generate(model, prompts, N_NEW, n=2, best_of=5, logprobs=0, **kw)
    every = realm_jax.generate(model, prompts, N_NEW, n=5, logprobs=0, **kw)
    for i in range(2):
        rows = sorted(range(5 * i, 5 * i + 5), key=lambda r: -every.cumulative_logprobs[r])[:2]
        assert best.tokens[2 * i:2 * i + 2] == [every.tokens[r] for r in rows]
        assert best.cumulative_logprobs[2 * i] >= best.cumulative_logprobs[2 * i + 1]


# ---------------------------------------------------------------- stop strings
def _plain_stop_rule(pieces, stops):
    """Token by token: the first prefix whose text holds a stop string; cut at the first match."""
    for k in range(1, len(pieces) + 1):
        text = "".join(pieces[:k])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return k, text[:min(hits)]
    return len(pieces), "".join(pieces)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("ab\n:", min_size=0, max_size=3), min_size=1, max_size=12),
       st.lists(st.text("ab\n:", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_scan_equals_the_plain_rule(pieces, stops):
    scan = StopScan(lambda ids: "".join(pieces[i] for i in ids), stops)
    found = None
    for end in range(1, len(pieces) + 1, 3):  # checked in chunks, as a stream does
        found = scan.scan(list(range(min(end + 2, len(pieces)))))
        if found:
            break
    k, text = _plain_stop_rule(pieces, stops)
    if found is None:
        assert not any(s in "".join(pieces) for s in stops)
    else:
        assert found[0] == k and "".join(pieces[:k])[:found[1]] == text
        # whatever a stream showed before the match (text minus the held-back tail) is a prefix
        for j in range(1, k):
            t = "".join(pieces[:j])
            assert text.startswith(t[:len(t) - held_back(t, stops)])


def test_stop_strings_cut_text_and_stream_nothing_after(smollm2):
    prompts = ["The capital of France is", "Count: one, two,"]
    plain = realm_jax.generate(smollm2, prompts, 24)
    stops = [[plain.texts[0][8:11]], [plain.texts[1][5:7], "zzz"]]
    res = realm_jax.generate(smollm2, prompts, 24, stop=stops)
    chunks = list(realm_jax.generate_stream(smollm2, prompts, 24, stop=stops, chunk=3))
    for i in range(2):
        full = plain.texts[i]
        k = next(k for k in range(1, len(plain.tokens[i]) + 1)
                 if any(s in smollm2.tokenizer.decode(plain.tokens[i][:k]) for s in stops[i]))
        text = smollm2.tokenizer.decode(plain.tokens[i][:k])
        want = text[:min(text.find(s) for s in stops[i] if s in text)]
        assert full.startswith(want)
        assert res.texts[i] == want and res.tokens[i] == plain.tokens[i][:k] and res.finish_reasons[i] == "stop"
        streamed = "".join(c.texts[i] for c in chunks)
        assert streamed == want
        assert sum((c.tokens[i] for c in chunks), []) == res.tokens[i]
        assert chunks[-1].finish_reasons[i] == "stop"


# ---------------------------------------------------------------- bad settings
@pytest.mark.parametrize("kw,match", [
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be finite and > 0"),
    (dict(frequency_penalty=3), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(presence_penalty="1"), r"presence_penalty: expected numbers"),
    (dict(logit_bias={500: 1.0}), r"logit_bias: key 500 is not a token id in \[0, 97\)"),
    (dict(logit_bias={5: 200}), r"logit_bias\[5\]: expected a number in \[-100, 100\]"),
    (dict(logit_bias=[{5: 1}]), r"logit_bias: expected one map or 3 maps"),
    (dict(min_tokens=-1), r"min_tokens must be a non-negative integer"),
    (dict(n=0), r"n: expected an integer >= 1"),
    (dict(n=3, best_of=2), r"best_of: expected an integer >= n=3"),
    (dict(logprobs=21), r"logprobs: expected None or an integer in \[0, 20\]"),
    (dict(prompt_logprobs=-1), r"prompt_logprobs: expected None or an integer"),
    (dict(stop=[""]), r"stop: expected non-empty strings"),
    (dict(stop=5), r"stop: expected a string, a list of strings"),
    (dict(stop=["x"]), r"stop strings need the model's tokenizer"),
    (dict(temprature=0.5), r"unknown sampling setting\(s\) temprature"),
])
def test_bad_settings_are_refused_before_device_work(tiny, kw, match, monkeypatch):
    model, _ = tiny
    if "stop" in kw and kw["stop"] == ["x"]:
        model = realm_jax.loading.Model(model.config, model.params, None)
    monkeypatch.setattr(generation, "generate_jit", None)  # any device call would fail differently
    with pytest.raises(RealmError, match=match):
        realm_jax.generate(model, _prompts(model), 4, **kw)


def test_speculative_takes_the_draw_settings_and_refuses_the_rest(tiny):
    model, _ = tiny
    prompts = _prompts(model)
    draw = realm_jax.Sampling(temperature=0.8, top_k=7, seed=3)
    ref = realm_jax.speculative_generate(model, "lookup", prompts, 6, k=2, stop_ids=[], temperature=0.8, top_k=7, seed=3)
    got = realm_jax.speculative_generate(model, "lookup", prompts, 6, k=2, stop_ids=[], sampling=draw)
    assert got.tokens == ref.tokens
    with pytest.raises(RealmError, match=r"speculative_generate: min_p, n not supported yet"):
        realm_jax.speculative_generate(model, "lookup", prompts, 6, sampling=realm_jax.Sampling(min_p=0.1, n=2))
