"""The lm-evaluation-harness adapter, offline: requests are built here as objects with ``.args``
(what the harness's ``Instance`` exposes), so the harness need not be installed; the references
are HF transformers log-probs and HF greedy generation."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

import realm_jax
from realm_jax.errors import RealmError
from realm_jax.integrations import lm_eval as adapter

from test_scoring import TEXTS, hf_continuation_logprobs, make_tiny


def req(*args):
    return SimpleNamespace(args=tuple(args))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("lm_eval") / "m")


@pytest.fixture(scope="module")
def lm(tiny):
    model, _ = tiny
    return adapter.RealmJaxLM(model=model, batch_size=4, max_length=8)


def test_loglikelihood_matches_hf(tiny, lm):
    model, hf = tiny
    pairs = [("question: what is the answer? answer:", " yes"), ("the quick brown ", "fox"),
             ("", "hello world"), ("a cat sat", " on the mat"), ("she sells", "")]
    got = lm.loglikelihood([req(c, k) for c, k in pairs])
    assert len(got) == len(pairs)
    tok = model.tokenizer
    for (c, k), (lp, greedy) in zip(pairs, got):
        assert isinstance(lp, float) and isinstance(greedy, bool)
        if k == "":
            assert (lp, greedy) == (0.0, True)
            continue
        ctx, cont = realm_jax.scoring.encode_pair(tok, c, k)
        full = (ctx + cont)[-(lm.max_length + 1):]  # the adapter's max_length=8 truncates the context
        ref, ref_greedy = hf_continuation_logprobs(hf, full[:-len(cont)], cont)
        assert lp == pytest.approx(float(ref.sum()), abs=1e-4 * len(cont))
        assert greedy == ref_greedy


def test_loglikelihood_rolling_matches_hf_disjoint_windows(tiny, lm):
    model, hf = tiny
    texts = [TEXTS[0], TEXTS[2] + " " + TEXTS[3], "hello"]
    got = lm.loglikelihood_rolling([req(t) for t in texts])
    L = lm.max_length
    for text, lp in zip(texts, got):
        # the harness's windows: the prefix token, then disjoint windows of L predictions,
        # each window's input being the L tokens before its targets
        ids = [model.tokenizer.bos_id] + model.tokenizer.encode(text)
        ref, n = 0.0, 0
        for start in range(1, len(ids), L):
            targets = ids[start:start + L]
            inp = ids[start - 1:start - 1 + len(targets)]
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([inp])).logits[0].float()
            lsm = torch.log_softmax(logits, -1)
            ref += float(lsm[torch.arange(len(targets)), torch.tensor(targets)].sum())
            n += len(targets)
        assert n == len(ids) - 1
        assert lp == pytest.approx(ref, abs=1e-4 * n)


def test_generate_until_matches_hf_greedy_cut_at_stop(tiny, lm):
    model, hf = tiny
    tok = model.tokenizer
    contexts = ["the quick brown", "she sells sea", "a cat"]
    n_new = 12
    refs = []
    for c in contexts:
        ids = tok.encode(c)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                              eos_token_id=tok.eos_id, pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        new = out[0, len(ids):].tolist()
        if new and new[-1] == tok.eos_id:
            new = new[:-1]
        refs.append(tok.decode(new))
    assert any(len(r) > 4 for r in refs)
    # stop strings taken from the reference text itself, so the cut is exercised
    untils = [[refs[0][3:5]] if len(refs[0]) > 5 else ["zzz"], "zzz", ["qq", refs[2][-2:] or "zzz"]]
    lm_long = adapter.RealmJaxLM(model=model, batch_size=2, max_length=64)
    got = lm_long.generate_until([req(c, {"until": u, "max_gen_toks": n_new, "do_sample": False})
                                  for c, u in zip(contexts, untils)])
    for r, u, g in zip(refs, untils, got):
        u = [u] if isinstance(u, str) else u
        cut = min([r.find(s) for s in u if s in r] + [len(r)])
        assert g == r[:cut]


def test_stop_strings_and_settings():
    assert adapter.cut_at_stop("abc\n\ndef", ["\n\n", "c"]) == "ab"
    assert adapter.cut_at_stop("abc", ["x", ""]) == "abc"
    until, n, s = adapter.gen_settings({"until": "\n", "max_new_tokens": 7, "temperature": 0.5}, 256)
    assert (until, n, s["temperature"]) == (["\n"], 7, 0.5)  # no do_sample, temperature > 0: sample
    until, n, s = adapter.gen_settings({"do_sample": False, "temperature": 0.7}, 32)
    assert (until, n, s["temperature"]) == ([], 32, 0.0)  # do_sample=False wins: greedy
    with pytest.raises(RealmError, match="max_gen_toks"):
        adapter.gen_settings({"max_gen_toks": "many"}, 32)


def test_construction_from_harness_arguments(tiny):
    model, _ = tiny
    # the harness passes model_args (strings parsed to ints where possible) plus its own settings
    lm = adapter.RealmJaxLM(source=model.source, dtype="float32", batch_size="auto", max_length="32",
                            device="cuda:0", max_batch_size=None)
    assert (lm.batch_size, lm.max_length) == (8, 32)
    assert lm.loglikelihood([req("the cat", " sat")])[0][0] < 0
    with pytest.raises(RealmError, match="exactly one of source"):
        adapter.RealmJaxLM()
    with pytest.raises(RealmError, match="batch_size"):
        adapter.RealmJaxLM(model=model, batch_size=0)


def test_registered_with_the_harness_when_installed():
    installed = importlib.util.find_spec("lm_eval") is not None
    assert adapter.register() is installed
    if installed:
        from lm_eval.api.registry import get_model

        assert get_model("realm_jax") is adapter.RealmJaxLM
        assert get_model("hf") is not None  # the harness's own models are still there
    else:
        assert adapter.main([]) == 2
