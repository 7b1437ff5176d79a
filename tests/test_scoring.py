"""score / perplexity against HF transformers (float32, CPU), against the plain per-window
computation, and against the harness tokenization rule; batching, compile count, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import realm_jax
from realm_jax import scoring
from realm_jax.errors import RealmError
from realm_jax.reference import forward_reference_jit

from compile_counter import CompileCounter
from hf_reference import ARCH_CASES, make_hf_model

TEXTS = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat",
         "question: what is the answer? answer: yes", "she sells sea shells by the sea shore",
         "hello world, hello there"]


def write_tiny_tokenizer(directory, add_bos: bool = True):
    """A 97-token BPE tokenizer (ids 0-3: <pad> <s> </s> <unk>, as the tiny HF configs) in an
    HF checkpoint directory, so string requests can be tested on the tiny random models."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(vocab_size=97, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    assert tok.get_vocab_size() <= 97 and tok.token_to_id("<s>") == 1
    if add_bos:  # in the tokenizer itself, so HF tokenizers add it too
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": add_bos}))
    return tok


def make_tiny(directory, case="llama_gqa_llama3_untied", seed=0):
    """(realm_jax Model with tokenizer, HF model) for a tiny random checkpoint."""
    directory, hf = make_hf_model(case, directory, seed=seed)
    write_tiny_tokenizer(directory)
    return realm_jax.load(directory, dtype="float32"), hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny model shared by most tests here (same config and batch size 4 everywhere,
    so compilations are shared)."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "m")


def hf_continuation_logprobs(hf, ctx, cont):
    """Reference: HF logits on context + continuation[:-1], log_softmax in float32, picked."""
    full = list(ctx) + list(cont)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([full[:-1]], dtype=torch.long)).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)[len(ctx) - 1:]
    target = torch.tensor(cont, dtype=torch.long)
    picked = lp.gather(-1, target[:, None])[:, 0].numpy()
    greedy = bool((lp.argmax(-1) == target).all())
    return picked, greedy


def random_requests(rng, vocab, shapes):
    return [(rng.integers(3, vocab, c).tolist(), rng.integers(3, vocab, k).tolist()) for c, k in shapes]


# varied lengths: two T buckets (16, 64), C buckets 4..32, more requests than a batch
SHAPES = [(1, 1), (5, 3), (3, 9), (40, 6), (12, 1), (2, 30), (9, 4), (6, 2)]


# scored through both runtime layouts, alternating over the cases (logits of every case in
# both layouts are compared with HF in test_model_parity)
@pytest.mark.parametrize("case,layout", [(c, ("per_layer", "stacked")[i % 2])
                                         for i, c in enumerate(sorted(ARCH_CASES))])
def test_scores_match_hf(case, layout, tmp_path):
    directory, hf = make_hf_model(case, tmp_path / case)
    model = realm_jax.load(directory, dtype="float32", layout=layout)
    assert model.runtime.stacked == (layout == "stacked")
    rng = np.random.default_rng(3)
    reqs = random_requests(rng, model.config.vocab_size, SHAPES)
    # make one continuation greedy under the reference, so True flags are exercised too
    ctx = reqs[1][0]
    greedy_cont = []
    for _ in range(3):
        with torch.no_grad():
            nxt = int(hf(input_ids=torch.tensor([ctx + greedy_cont])).logits[0, -1].argmax())
        greedy_cont.append(nxt)
    reqs.append((ctx, greedy_cont))

    got = realm_jax.score(model, reqs, batch_size=5)
    worst = 0.0
    for (c, k), s in zip(reqs, got):
        ref, ref_greedy = hf_continuation_logprobs(hf, c, k)
        assert s.token_ids == tuple(k)
        np.testing.assert_allclose(s.token_logprobs, ref, atol=1e-4, rtol=0)
        assert s.is_greedy == ref_greedy
        assert s.logprob == pytest.approx(float(np.sum(np.asarray(s.token_logprobs, np.float64))), abs=1e-9)
        worst = max(worst, float(np.abs(np.asarray(s.token_logprobs) - ref).max()))
    assert got[-1].is_greedy
    print(f"{case}: max |dlogprob| = {worst:.2e}")


def test_batch_and_order_invariance(tiny):
    model, _ = tiny
    rng = np.random.default_rng(4)
    reqs = random_requests(rng, model.config.vocab_size,
                           [(1, 1), (5, 3), (12, 2), (3, 4), (9, 1), (2, 3), (20, 5), (14, 6), (4, 2)])
    alone = [realm_jax.score(model, [r], batch_size=1)[0] for r in reqs]
    perm = rng.permutation(len(reqs))
    shuffled = realm_jax.score(model, [reqs[i] for i in perm], batch_size=4)
    for j, i in enumerate(perm):
        np.testing.assert_allclose(shuffled[j].token_logprobs, alone[i].token_logprobs, atol=1e-5, rtol=0)
        assert shuffled[j].is_greedy == alone[i].is_greedy
    # the same request three times in one call, landing in different batches and rows
    many = realm_jax.score(model, [reqs[3]] + reqs + [reqs[3]], batch_size=4)
    for s in (many[0], many[4], many[-1]):
        np.testing.assert_allclose(s.token_logprobs, alone[3].token_logprobs, atol=1e-5, rtol=0)


def test_string_requests_follow_harness_tokenization(tiny):
    model, hf = tiny
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model.source) + "/tokenizer.json")
    bos = raw.token_to_id("<s>")

    def enc(s):  # the tokenizer's own encoding (BOS in front)
        return raw.encode(s).ids

    reqs = [("question: what is the answer? answer:", " yes"),
            ("the quick brown ", "fox"),          # trailing space moves to the continuation
            ("a cat sat on the  ", "mat"),        # two of them
            ("", "hello world"),                  # empty context -> BOS as context
            ("she sells", " sea shells")]
    got = realm_jax.score(model, reqs, batch_size=4)
    for (c, k), s in zip(reqs, got):
        if c == "":
            ctx, cont = [bos], raw.encode(k, add_special_tokens=False).ids
        else:
            stripped = c.rstrip()
            moved = c[len(stripped):] + k
            whole, ctx = enc(stripped + moved), enc(stripped)
            assert whole[:len(ctx)] == ctx
            cont = whole[len(ctx):]
        assert s.token_ids == tuple(cont)
        ref, ref_greedy = hf_continuation_logprobs(hf, ctx, cont)
        np.testing.assert_allclose(s.token_logprobs, ref, atol=1e-4, rtol=0)
        assert s.is_greedy == ref_greedy
    # a trailing space on the context is the same request as a leading space on the continuation
    a, b = realm_jax.score(model, [("the quick brown ", "fox"), ("the quick brown", " fox")], batch_size=4)
    assert a.token_ids == b.token_ids and a.token_logprobs == b.token_logprobs


def test_truncation_keeps_the_continuation(tiny):
    model, hf = tiny
    rng = np.random.default_rng(5)
    ctx, cont = random_requests(rng, model.config.vocab_size, [(30, 3)])[0]
    got = realm_jax.score(model, [(ctx, cont)], max_length=12, batch_size=4)[0]
    # the model sees the last 12 tokens of context + continuation[:-1]
    full = (ctx + cont)[-13:]
    ref, _ = hf_continuation_logprobs(hf, full[:-3], full[-3:])
    np.testing.assert_allclose(got.token_logprobs, ref, atol=1e-4, rtol=0)
    with pytest.raises(RealmError, match="max_length=2"):
        realm_jax.score(model, [(ctx, cont)], max_length=2)


def test_compilations_are_bounded_by_buckets(tiny, monkeypatch):
    model, _ = tiny
    # a config of its own (an rms eps no other test uses): the jit cache starts empty for it
    model = realm_jax.Model(model.config.replace(rms_norm_eps=1.25e-5), model.params, model.tokenizer)
    rng = np.random.default_rng(6)
    fn = scoring.continuation_logprobs
    dispatched = []

    def spy(rt, cfg, tokens, lengths, starts, targets, *a, **k):
        dispatched.append((tokens.shape[0], tokens.shape[1], targets.shape[1]))
        return fn(rt, cfg, tokens, lengths, starts, targets, *a, **k)

    monkeypatch.setattr(scoring, "continuation_logprobs", spy)

    def run(extra):
        dispatched.clear()
        shapes = [(int(c), int(k)) for c, k in zip(rng.integers(1, 60, 20), rng.integers(1, 5, 20))]
        realm_jax.score(model, random_requests(rng, model.config.vocab_size, shapes + extra), batch_size=7)
        return set(dispatched)

    before = fn._cache_size()
    first = run([(59, 4), (25, 1), (2, 1)])  # one request in each T bucket; 23 = 3 x 7 + 2
    # rows: 7, and 2 for the last batch of 2 requests (not padded to 7); model inputs of
    # 1..62 tokens fall in T buckets {16, 32, 64}; spans of 1..4 in C=4
    assert {r for r, _, _ in first} == {7, 2} and {t for _, t, _ in first} == {16, 32, 64}
    assert {c for _, _, c in first} == {4} and dispatched[-1][0] == 2
    assert fn._cache_size() - before == len(first)  # one compilation per (rows, T, C) bucket
    with CompileCounter() as cc:
        second = run([(58, 3)] + [(1, 1)] * 8)  # new lengths in the same ranges; 29 = 4 x 7 + 1
    new = second - first
    assert {r for r, _, _ in second} <= {7, 1} and fn._cache_size() - before == len(first | second)
    assert cc.count == len(new) <= 2  # at most the last batch's one-row shape is new
    with CompileCounter() as cc:
        assert run([(58, 3)] + [(1, 1)] * 8) <= first | second
    assert cc.count == 0


def test_a_lone_window_is_not_padded_to_a_full_batch(tiny, monkeypatch):
    """A batch's rows are its requests rounded up to a power of two, at most batch_size: the one
    window of a short text runs as one row (it ran as batch_size rows, 8x the work)."""
    model, _ = tiny
    rows = []
    real = scoring.continuation_logprobs

    def spy(rt, cfg, tokens, *a, **k):
        rows.append(np.shape(tokens)[0])
        return real(rt, cfg, tokens, *a, **k)

    monkeypatch.setattr(scoring, "continuation_logprobs", spy)
    realm_jax.perplexity(model, TEXTS[1], max_length=64, batch_size=8)
    assert rows == [1]
    rows.clear()
    realm_jax.perplexity(model, " ".join(TEXTS) * 2, max_length=16, stride=8, batch_size=4)
    assert rows[0] == 4 and all(r in (1, 2, 4) for r in rows)
    assert [scoring.batch_rows(n, 8) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]
    assert [scoring.batch_rows(n, 6) for n in (1, 3, 5, 6)] == [1, 4, 6, 6]


def test_lm_head_chunking_matches_one_chunk(tiny, monkeypatch):
    model, _ = tiny
    rng = np.random.default_rng(7)
    reqs = random_requests(rng, model.config.vocab_size, [(3, 14), (10, 9), (2, 3)])
    whole = realm_jax.score(model, reqs, batch_size=4)
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 4 * 2 * model.config.vocab_size)  # chunks of 2 positions
    assert scoring._logits_chunk(4, 16, model.config.vocab_size) == 2
    chunked = realm_jax.score(model, reqs, batch_size=4)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-6, rtol=0)
        assert a.is_greedy == b.is_greedy


# ----------------------------------------------------------------------------- perplexity
def hf_doc_windows(n, max_length, stride):
    """The loop of HF's perplexity guide, written out: (begin, end, number of target tokens)."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


def test_perplexity_matches_per_window_numpy_and_hf(tiny):
    model, hf = tiny
    rng = np.random.default_rng(8)
    docs = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (53, 9, 16)]
    max_length, stride = 16, 5
    got = realm_jax.perplexity(model, docs, max_length=max_length, stride=stride, batch_size=4)

    plain_total, hf_total, count = 0.0, 0.0, 0
    for d, ids in enumerate(docs):
        plain_doc, n_doc = 0.0, 0
        for begin, end, trg_len in hf_doc_windows(len(ids), max_length, stride):
            window = np.asarray(ids[begin:end], np.int32)
            # plain: the reference forward on the window (padded to max_length: one compile),
            # numpy log_softmax, targets = the last trg_len tokens of the window
            padded = np.zeros((1, max_length), np.int32)
            padded[0, :len(window)] = window
            logits = np.asarray(forward_reference_jit(model.params, model.config, padded,
                                                      np.array([len(window)], np.int32)))[0]
            logits = logits[:len(window)].astype(np.float64)
            lsm = logits - logits.max(-1, keepdims=True)
            lsm = lsm - np.log(np.exp(lsm).sum(-1, keepdims=True))
            first = max(len(window) - trg_len, 1)
            plain_doc -= sum(lsm[t - 1, window[t]] for t in range(first, len(window)))
            n_doc += len(window) - first
            # HF: the guide's labels with -100 on the context; loss is the mean over shifted targets
            labels = torch.tensor(window[None], dtype=torch.long).clone()
            labels[:, :-trg_len] = -100
            with torch.no_grad():
                loss = hf(input_ids=torch.tensor(window[None], dtype=torch.long), labels=labels).loss
            hf_total += float(loss) * (len(window) - first)
        assert got.documents[d][1] == n_doc == len(ids) - 1  # every token but the first, once
        np.testing.assert_allclose(got.documents[d][0], plain_doc, rtol=1e-5)
        plain_total += plain_doc
        count += n_doc
    assert got.num_tokens == count
    np.testing.assert_allclose(got.nll, plain_total, rtol=1e-5)
    np.testing.assert_allclose(got.nll, hf_total, rtol=1e-5)
    assert got.ppl == pytest.approx(math.exp(plain_total / count), rel=1e-5)
    print(f"ppl {got.ppl:.4f} over {count} tokens; |dnll| vs HF {abs(got.nll - hf_total):.2e}")


def test_rolling_windows_cover_every_token_once():
    for n in (2, 3, 17, 40):
        for max_length in (2, 3, 8, 16):
            for stride in range(1, max_length):
                wins = scoring.rolling_windows(n, max_length, stride)
                scored = [t for _, s, e in wins for t in range(s, e)]
                assert scored == list(range(1, n))
                assert all(e - b <= max_length and b < s for b, s, e in wins)


def test_perplexity_of_text_scores_every_token(tiny):
    model, _ = tiny
    text = " ".join(TEXTS)
    ids = model.tokenizer.encode(text)
    assert ids[0] == model.tokenizer.bos_id
    got = realm_jax.perplexity(model, text, max_length=16, stride=5, batch_size=4)
    same = realm_jax.perplexity(model, [ids], max_length=16, stride=5, batch_size=4)
    assert got.num_tokens == len(ids) - 1 == same.num_tokens
    assert got.nll == same.nll


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_reported_before_device_work(tiny, monkeypatch):
    model, _ = tiny

    def no_device_work(*a, **k):
        raise AssertionError("device work before validation")

    monkeypatch.setattr(scoring, "continuation_logprobs", no_device_work)
    ok = ([5, 6], [7])
    cases = [
        ([ok, ([5], [])], r"requests\[1\]: continuation is empty"),
        ([("the cat", "")], r"requests\[0\]: continuation is empty"),
        ([([], [7])], r"requests\[0\]: context ids are empty"),
        ([ok, ([5, 500], [7])], r"requests\[1\] context: token ids must be in \[0, 97\).*500"),
        ([("the", [7])], r"requests\[0\]: context and continuation must both be strings"),
        ([ok, "the cat"], r"requests\[1\]: expected a \(context, continuation\) pair"),
        ("the cat", "requests: expected a list"),
    ]
    for reqs, msg in cases:
        with pytest.raises(RealmError, match=msg):
            realm_jax.score(model, reqs)
    with pytest.raises(RealmError, match="batch_size"):
        realm_jax.score(model, [ok], batch_size=0)
    with pytest.raises(RealmError, match="adapter_ids"):
        realm_jax.score(model, [ok], adapter_ids=[0])
    with pytest.raises(RealmError, match=r"stride: .*1 <= stride < max_length=8.*got 8"):
        realm_jax.perplexity(model, [[1, 2, 3]], max_length=8, stride=8)
    with pytest.raises(RealmError, match=r"texts_or_ids\[1\]: needs at least 2 tokens"):
        realm_jax.perplexity(model, [[1, 2, 3], [4]], max_length=8)
    no_tok = realm_jax.Model(model.config, model.params, None)
    with pytest.raises(RealmError, match="need a tokenizer"):
        realm_jax.score(no_tok, [("the", " cat")])


def test_per_request_adapters_match_merged_weights(tiny):
    import jax

    from realm_jax import lora

    model, _ = tiny
    cfg = model.config
    adapters = [lora.init_adapter(cfg, jax.random.PRNGKey(s), rank=4, b_std=0.2) for s in (1, 2)]
    stack = lora.stack_adapters(adapters)
    rng = np.random.default_rng(9)
    reqs = random_requests(rng, cfg.vocab_size, [(5, 3), (12, 2), (3, 4), (9, 1), (6, 3)])
    ids = [0, -1, 1, 1, 0]
    got = realm_jax.score(model, reqs, batch_size=4, adapters=stack, adapter_ids=ids)
    for a in (-1, 0, 1):
        params = model.params if a < 0 else lora.merge(model.params, adapters[a])
        merged = realm_jax.Model(cfg, params, model.tokenizer)
        rows = [i for i, x in enumerate(ids) if x == a]
        ref = realm_jax.score(merged, [reqs[i] for i in rows], batch_size=4)
        for i, r in zip(rows, ref):
            np.testing.assert_allclose(got[i].token_logprobs, r.token_logprobs, atol=1e-4, rtol=0)
    base = realm_jax.score(model, reqs, batch_size=4)
    assert max(abs(g.logprob - b.logprob) for g, b in zip(got, base)) > 1e-3  # the adapters matter
    # the same stack prepared into the model's runtime: only adapter_ids per call
    served = realm_jax.Model(cfg, model.params, model.tokenizer)
    served.prepare(adapters=stack)
    for g, s in zip(got, realm_jax.score(served, reqs, batch_size=4, adapter_ids=ids)):
        np.testing.assert_allclose(s.token_logprobs, g.token_logprobs, atol=1e-5, rtol=0)
    with pytest.raises(RealmError, match="adapter_ids"):
        realm_jax.score(served, reqs, batch_size=4)
    # perplexity: one adapter id per document
    docs = [c + k for c, k in reqs[:3]]
    ppl = realm_jax.perplexity(model, docs, max_length=16, stride=5, batch_size=4, adapters=stack,
                               adapter_ids=[1, -1, 0])
    for doc, a, (nll, _) in zip(docs, [1, -1, 0], ppl.documents):
        params = model.params if a < 0 else lora.merge(model.params, adapters[a])
        ref = realm_jax.perplexity(realm_jax.Model(cfg, params, None), [doc], max_length=16, stride=5, batch_size=4)
        assert nll == pytest.approx(ref.nll, abs=1e-4)
    with pytest.raises(RealmError, match="adapter_ids"):
        realm_jax.score(model, reqs, adapters=stack)


def test_smollm2_scores_match_hf(smollm2, smollm2_hf, smollm2_hf_tokenizer):
    reqs = [("The capital of France is", " Paris"), ("The capital of France is ", "Berlin"),
            ("", "Hello world"), ("Question: What is 2 + 2?\nAnswer:", " 4"),
            ("def add(a, b):\n    return", " a + b"), ("Once upon a time, there was a", " little girl who lived")]
    got = realm_jax.score(smollm2, reqs, batch_size=4)
    hf_tok = smollm2_hf_tokenizer
    worst = 0.0
    for (c, k), s in zip(reqs, got):
        # the harness's split, done with the HF tokenizer (no special tokens added by this one)
        if c == "":
            ctx, cont = [hf_tok.bos_token_id], hf_tok(k, add_special_tokens=False).input_ids
        else:
            stripped = c.rstrip()
            whole = hf_tok(stripped + c[len(stripped):] + k).input_ids
            ctx = hf_tok(stripped).input_ids
            cont = whole[len(ctx):]
        assert s.token_ids == tuple(cont)
        ref, ref_greedy = hf_continuation_logprobs(smollm2_hf, ctx, cont)
        np.testing.assert_allclose(s.token_logprobs, ref, atol=1e-4, rtol=0)
        assert s.is_greedy == ref_greedy
        worst = max(worst, float(np.abs(np.asarray(s.token_logprobs) - ref).max()))
    assert got[0].logprob > got[1].logprob  # Paris over Berlin
    assert any(s.is_greedy for s in got)
    print(f"SmolLM2: max |dlogprob| = {worst:.2e}")
