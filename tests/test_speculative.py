"""Speculative decoding: greedy output equals greedy ``generate`` for every draft source (padded
batches of unequal prompts, stop ids, per-row budgets); sampled output follows the target's exact
distribution (chi-square against enumerated sequence probabilities); the rejection rule alone;
draft == target accepts everything; adaptive k; bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import chi2

import realm_jax
from realm_jax.drafts import DraftError, LookupDraftSpec, make_draft
from realm_jax.errors import RealmError
from realm_jax.generation import generate
from realm_jax.loading import Model
from realm_jax.reference import forward_reference_jit
from realm_jax.sampling import SamplingParams, processed_logits
from realm_jax.speculative import (StepCosts, accept_greedy, accept_tokens, choose_k, expected_tokens, measure_costs,
                                   predicted_speedup, speculative_generate)

from compile_counter import CompileCounter

FALSE_ALARM = 1e-3  # per chi-square test: a correct sampler fails it with probability 0.1%


def tiny(seed=0, vocab=61, layers=3, head_scale=1.0, **kw):
    cfg = realm_jax.ModelConfig(arch="llama", vocab_size=vocab, hidden_size=24, intermediate_size=40,
                                num_layers=layers, num_heads=6, num_kv_heads=2, head_dim=8,
                                eos_token_ids=(2,), bos_token_id=1, max_position_embeddings=512, **kw)
    params = realm_jax.init_params(cfg, jax.random.PRNGKey(seed))
    params["lm_head"] = params["lm_head"] * head_scale
    return Model(cfg, params, None)


@pytest.fixture(scope="module")
def target():
    return tiny(0, head_scale=20.0)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    out = [rng.integers(3, 61, n).tolist() for n in (6, 2, 11)]
    out[0][3:6] = out[0][:3]  # a repeat for prompt lookup to find
    return out


def _noisy_copy(model, scale, seed):
    leaves, tree = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [x + scale * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return Model(model.config, jax.tree_util.tree_unflatten(tree, noisy), None)


# ------------------------------------------------------------------------------------ greedy
def test_greedy_equals_generate_for_every_draft(target, prompts):
    """Padded batch of unequal prompts, per-row budgets, a stop id that ends one row early."""
    plain = generate(target, prompts, 13, stop_ids=[])
    stop = plain.tokens[1][4]  # a token row 1 emits mid-way: it must end row 1 there
    budgets = [13, 9, 12]
    ref = generate(target, prompts, budgets, stop_ids=[stop])
    assert ref.finish_reasons[1] == "stop"
    drafts = {
        "equal": target,  # same weights: every draft accepted
        "close": _noisy_copy(target, 0.05, 1),
        "bad": tiny(7, layers=1, head_scale=-20.0),  # smaller, reversed head: almost never right
        "self:1": "self:1",
        "lookup": "lookup",
    }
    rates = {}
    for name, d in drafts.items():
        res = speculative_generate(target, d, prompts, budgets, k=3, stop_ids=[stop])
        assert res.tokens == ref.tokens, name
        assert res.finish_reasons == ref.finish_reasons, name
        st = res.stats
        assert st.drafted == 3 * st.target_passes
        assert st.decode_tokens == sum(len(t) - 1 for t in ref.tokens)
        rates[name] = st.acceptance_rate
    assert rates["equal"] == 1.0
    assert rates["bad"] < 0.2 < rates["close"]
    print({k: round(v, 3) for k, v in rates.items()})


def test_greedy_with_per_row_adapters_equals_generate(target, prompts):
    """LoRA on the target (a stack of two adapters and a base row): speculative output equals
    ``generate`` with the same adapters, for a self-draft and prompt lookup."""
    from realm_jax import lora

    stack = lora.stack_adapters([lora.init_adapter(target.config, s, rank=4, b_std=0.4) for s in (1, 2)])
    ids = [0, -1, 1]
    ref = generate(target, prompts, 10, stop_ids=[], adapters=stack, adapter_ids=ids)
    base = generate(target, prompts, 10, stop_ids=[])
    assert ref.tokens[0] != base.tokens[0] or ref.tokens[2] != base.tokens[2]  # the adapters matter
    for d in ("self:1", "lookup"):
        res = speculative_generate(target, d, prompts, 10, k=3, stop_ids=[], adapters=stack, adapter_ids=ids)
        assert res.tokens == ref.tokens, d


def test_draft_equal_to_target_gives_k_plus_one_tokens_per_pass(target, prompts):
    k = 3
    res = speculative_generate(target, target, prompts, 1 + 3 * (k + 1), k=k, stop_ids=[])
    assert res.stats.acceptance_rate == 1.0
    assert res.stats.tokens_per_pass == k + 1
    np.testing.assert_array_equal(res.stats.passes_per_row, [3, 3, 3])


def test_greedy_smollm2_self_draft_and_lookup(smollm2):
    tok = smollm2.tokenizer
    texts = ["The capital of France is Paris. The capital of France is",
             "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return",
             "1, 2, 3, 4, 5,"]
    ids = [tok.encode(t) for t in texts]
    assert len({len(i) for i in ids}) == 3  # unequal lengths: a padded batch
    ref = generate(smollm2, ids, 20)
    # measured on these prompts: self:20 accepts ~11% (an untrained early exit rarely agrees
    # with the full model), lookup ~15%; the bound only shows that accepting happens
    for draft, least in (("self:20", 0.05), ("lookup", 0.05)):
        res = speculative_generate(smollm2, draft, ids, 20, k=4)
        assert res.tokens == ref.tokens, draft
        assert res.texts == ref.texts
        assert res.stats.acceptance_rate > least, draft  # accepting happens, not only resampling
        print(draft, res.stats.summary())


# ------------------------------------------------------------------------------------ the rule alone
def test_rejection_rule_output_follows_p():
    """One position: draft x ~ q, accept w.p. min(1, p/q), else draw from norm(max(0, p - q)).
    The emitted token must follow p exactly, for arbitrary p and q (q with zeros p lacks, and
    the reverse)."""
    v, n = 6, 200_000
    p = np.array([0.30, 0.25, 0.20, 0.15, 0.10, 0.0])
    q = np.array([0.05, 0.05, 0.0, 0.10, 0.30, 0.50])
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    drafts = jax.random.categorical(keys[0], jnp.log(jnp.asarray(q)), shape=(n,))
    uniforms = jax.random.uniform(keys[1], (n, 1))
    p_logits = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (n, 2, v))  # bonus row unused here
    q_logits = jnp.broadcast_to(jnp.log(jnp.asarray(q, jnp.float32)), (n, 1, v))
    acc, nxt = accept_tokens(p_logits, q_logits, drafts[:, None].astype(jnp.int32), uniforms,
                             jax.random.split(keys[2], n))
    acc, nxt, drafts = map(np.asarray, (acc, nxt, drafts))
    emitted = np.where(acc == 1, drafts, nxt)
    counts = np.bincount(emitted, minlength=v)
    assert counts[p == 0].sum() == 0
    _assert_chi2(counts, p * n)
    # acceptance rate is sum(min(p, q)) (Leviathan et al., eq. for alpha)
    assert abs(acc.mean() - np.minimum(p, q).sum()) < 5 * np.sqrt(0.25 / n)


def test_greedy_shortcut_equals_the_rule_on_one_hot_distributions():
    b, k, v = 64, 3, 5
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    logits = jax.random.normal(keys[0], (b, k + 1, v))
    best = jnp.argmax(logits, -1)
    # drafts right for a random prefix of positions, then anything
    drafts = jnp.where(jax.random.uniform(keys[1], (b, k)) < 0.6, best[:, :k],
                       jax.random.randint(keys[2], (b, k), 0, v)).astype(jnp.int32)
    sp = SamplingParams.make(b * (k + 1))
    p = processed_logits(logits.reshape(-1, v), sp).reshape(b, k + 1, v)
    q = jnp.where(jnp.arange(v) == drafts[..., None], 0.0, -jnp.inf)
    general = accept_tokens(p, q, drafts, jax.random.uniform(keys[3], (b, k)), jax.random.split(keys[3], b))
    short = accept_greedy(logits, drafts)
    np.testing.assert_array_equal(np.asarray(general[0]), np.asarray(short[0]))
    np.testing.assert_array_equal(np.asarray(general[1]), np.asarray(short[1]))
    assert 0 < np.asarray(short[0]).mean() < k


# ------------------------------------------------------------------------------------ sampling exactness
def _filtered_probs(logits, temperature, top_k, top_p):
    """Numpy reference of the sampler's distribution: temperature, top-k, then top-p over the
    renormalised survivors (keep a token iff the mass ranked strictly above it is < top_p)."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros_like(z, bool)
    k = len(z) if not top_k else top_k
    keep[order[:k]] = True
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    sorted_p = probs[order]
    before = np.cumsum(sorted_p) - sorted_p
    final = np.zeros_like(keep)
    final[order] = keep[order] & (before < top_p)
    out = np.where(final, np.exp(z - z.max()), 0.0)
    return out / out.sum()


def _sequence_probs(model, prompt, m, settings):
    """Exact probability of every m-token continuation under ``settings`` (the reference forward
    on the canonical params, no cache)."""
    v = model.config.vocab_size
    seqs = np.array(list(itertools.product(range(v), repeat=m)), np.int32)  # [V^m, m]
    toks = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1).astype(np.int32)
    lengths = np.full(len(seqs), toks.shape[1], np.int32)
    logits = np.asarray(forward_reference_jit(model.params, model.config, toks, lengths))
    prob = np.ones(len(seqs))
    for j in range(m):
        pos = len(prompt) - 1 + j
        for r in range(len(seqs)):
            prob[r] *= _filtered_probs(logits[r, pos], *settings)[seqs[r, j]]
    return prob


def _assert_chi2(observed, expected, should_pass=True):
    """Pearson chi-square with cells of expected count < 5 pooled; fails (or, for a negative
    control, must fail) at the FALSE_ALARM level."""
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    assert observed[expected == 0].sum() == 0 or not should_pass, "a sample of probability 0"
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    pval = float(chi2.sf(stat, len(obs) - 1))
    if should_pass:
        assert pval > FALSE_ALARM, f"chi2={stat:.1f}, dof={len(obs) - 1}, p={pval:.2e}"
    else:
        assert pval < FALSE_ALARM, f"negative control passed: chi2={stat:.1f}, p={pval:.2e}"
    return pval


SETTINGS = [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.5, 0, 0.7), (1.0, 5, 0.9)]  # temperature, top_k, top_p


@pytest.mark.parametrize("source,k", [("very_different", 1), ("lookup", 2)])
def test_sampling_follows_target_distribution(source, k):
    """First m=3 tokens of 4 x 4096 seeded rows (one batch; each quarter with its own
    temperature / top-k / top-p) vs the enumerated exact distribution. k=1 exercises accept,
    reject-and-resample and the bonus token within 3 tokens."""
    v, m, per = 8, 3, 4096
    target = tiny(0, vocab=v, layers=2, head_scale=60.0)
    draft = tiny(5, vocab=v, layers=1, head_scale=-60.0) if source == "very_different" else "lookup"
    prompt = [3, 5, 3, 5, 3]
    rows = len(SETTINGS) * per
    col = lambda i: [s[i] for s in SETTINGS for _ in range(per)]  # noqa: E731
    res = speculative_generate(target, draft, [prompt] * rows, m, k=k, temperature=col(0), top_k=col(1),
                               top_p=col(2), seed=list(range(rows)), stop_ids=[])
    got = np.array(res.tokens)
    assert got.shape == (rows, m)
    assert 0.0 < res.stats.acceptance_rate < 1.0
    codes = (got * v ** np.arange(m - 1, -1, -1)).sum(1)
    for g, settings in enumerate(SETTINGS):
        counts = np.bincount(codes[g * per:(g + 1) * per], minlength=v ** m)
        exact = _sequence_probs(target, prompt, m, settings)
        _assert_chi2(counts, exact * per)
        if source == "very_different" and g == 0:  # the test can fail: q's distribution is rejected
            wrong = _sequence_probs(draft, prompt, m, settings)
            _assert_chi2(counts, np.maximum(wrong, 1e-12) * per, should_pass=False)
    print(source, res.stats.summary())


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch(target, prompts):
    """A mixed batch (row 1 greedy, rows 0 and 2 sampled): row 2 keeps its tokens when row 0
    gets another prompt and seed (same shapes, and nothing is compiled again); the greedy row
    equals greedy ``generate``."""
    kw = dict(k=3, temperature=[1.0, 0.0, 1.0], top_p=0.9, stop_ids=[])
    a = speculative_generate(target, target, prompts, 8, seed=[11, 12, 13], **kw)
    others = [list(reversed(prompts[0])), prompts[1], prompts[2]]
    with CompileCounter() as cc:
        b = speculative_generate(target, target, others, 8, seed=[21, 12, 13], **kw)
    assert cc.count == 0  # new prompts, seeds and settings of the same shapes: no retrace
    assert a.tokens[2] == b.tokens[2] and a.tokens[1] == b.tokens[1]
    assert a.tokens[0] != b.tokens[0]
    assert a.tokens[1] == generate(target, prompts, 8, stop_ids=[]).tokens[1]


# ------------------------------------------------------------------------------------ adaptive k
def test_expected_tokens_and_formula():
    for a in (0.0, 0.3, 0.8, 0.999):
        for k in range(6):
            series = sum(a ** i for i in range(k + 1))  # 1 + a + ... + a^k
            assert abs(expected_tokens(a, k) - series) < 1e-9
            assert abs(predicted_speedup(a, k, 0.1) - series / (k * 0.1 + 1)) < 1e-9
    assert expected_tokens(1.0, 4) == 5


def test_choose_k_maximizes_tokens_per_second():
    small_batch = StepCosts(draft=0.1, verify=tuple(1.0 + 0.02 * k for k in range(9)), plain=1.0)
    big_batch = StepCosts(draft=0.1, verify=tuple(1.0 + 1.0 * k for k in range(9)), plain=1.0)
    for costs in (small_batch, big_batch):
        for a in (0.0, 0.2, 0.6, 0.9, 1.0):
            k, rates = choose_k(a, costs)
            brute = [1.0] + [expected_tokens(a, j) / (j * 0.1 + costs.verify[j]) for j in range(1, 9)]
            np.testing.assert_allclose(rates, brute)
            assert k == int(np.argmax(brute))
    assert choose_k(0.0, small_batch)[0] == 0  # nothing accepted: plain decoding
    assert choose_k(0.9, small_batch)[0] >= 4
    assert choose_k(0.9, big_batch)[0] == 0  # verifying k+1 tokens costs k+1 steps: never pays


def test_auto_k_falls_back_to_plain_decoding(target, prompts):
    costs = StepCosts(draft=0.5, verify=(1.0, 2.0, 3.0), plain=1.0)
    ref = generate(target, prompts, 6, stop_ids=[])
    res = speculative_generate(target, "self:1", prompts, 6, k="auto", k_max=2, costs=costs, acceptance=0.5,
                               stop_ids=[])
    assert res.stats.k == 0 and res.stats.drafted == 0 and res.stats.predicted_speedup == 1.0
    assert res.tokens == ref.tokens


def test_measure_costs(target):
    draft = make_draft(target, "self:1")
    costs = measure_costs(target, draft, 4, 64, 3, ks=(0, 3), repeats=2)
    # resolved step times (the floor is 1e-9 s), interpolated between the measured k = 0 and 3
    assert min(costs.verify) > 1e-7 and costs.draft > 1e-7
    assert costs.plain == costs.verify[0]
    np.testing.assert_allclose(np.diff(costs.verify), (costs.verify[3] - costs.verify[0]) / 3, rtol=1e-6)
    assert measure_costs(target, draft, 4, 64, 3, ks=(0, 3), repeats=2) is costs  # memoized per shape


def test_auto_k_uses_the_running_acceptance(target, prompts):
    draft = make_draft(target, target)
    fast = StepCosts(draft=0.01, verify=(1.0, 1.0, 1.0, 1.0), plain=1.0)
    res = speculative_generate(target, draft, prompts, 7, k="auto", k_max=3, costs=fast, stop_ids=[])
    assert res.stats.k == 3 and res.stats.alpha_used == draft.prior_acceptance
    assert draft.acceptance == 1.0  # the running rate now holds this call's acceptance
    again = speculative_generate(target, draft, prompts, 7, k="auto", k_max=3, costs=fast, stop_ids=[])
    assert again.stats.alpha_used == 1.0
    slow_draft = StepCosts(draft=2.0, verify=(1.0, 1.0, 1.0, 1.0), plain=1.0)
    assert speculative_generate(target, draft, prompts, 7, k="auto", k_max=3, costs=slow_draft,
                                stop_ids=[]).stats.k == 0


# ------------------------------------------------------------------------------------ lookup proposer
def test_prompt_lookup_proposes_the_continuation_of_the_latest_match():
    spec = LookupDraftSpec(vocab_size=50, max_ngram=3)
    seq = jnp.asarray([[7, 8, 9, 4, 7, 8, 9, 5, 7, 8, 0, 0, 0, 0],
                       [1, 2, 3, 1, 2, 3, 1, 2, 0, 0, 0, 0, 0, 0],
                       [5, 6, 7, 8, 9, 10, 11, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    n = jnp.asarray([10, 8, 7])
    d, q, _ = spec.propose(None, None, seq, n, jnp.ones(3, bool), None, SamplingParams.make(3), 4)
    # row 0: "7 8" last seen at 4 -> 9 5 7 8; row 1: period 3 runs into its own proposals;
    # row 2: no match -> the last token repeated
    assert np.asarray(d).tolist() == [[9, 5, 7, 8], [3, 1, 2, 3], [11, 11, 11, 11]]
    np.testing.assert_array_equal(np.asarray(jax.nn.softmax(q, -1)).argmax(-1), np.asarray(d))
    assert np.asarray(jax.nn.softmax(q, -1)).max(-1).min() == 1.0


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_clear_errors(target, prompts):
    other_vocab = tiny(1, vocab=67)
    with pytest.raises(DraftError, match="vocab_size: expected 61.*got 67"):
        speculative_generate(target, other_vocab, prompts, 4)
    other_eos = Model(target.config.replace(eos_token_ids=(5,)), target.params, None)
    with pytest.raises(DraftError, match="eos_token_ids"):
        speculative_generate(target, other_eos, prompts, 4)
    for bad in ("self:0", "self:3", "self:-1", "self:x", "medusa"):
        with pytest.raises(DraftError, match="draft"):
            speculative_generate(target, bad, prompts, 4)
    for k in (-1, 2.5, True, "4"):
        with pytest.raises(RealmError, match="k: expected"):
            speculative_generate(target, "lookup", prompts, 4, k=k)
    with pytest.raises(RealmError, match="k_max"):
        speculative_generate(target, "lookup", prompts, 4, k="auto", k_max=-2)
    with pytest.raises(RealmError, match="acceptance"):
        speculative_generate(target, "lookup", prompts, 4, k="auto", acceptance=1.5)
    with pytest.raises(RealmError, match="max_new_tokens"):
        speculative_generate(target, "lookup", prompts, 0)
    with pytest.raises(RealmError, match="prompt 1"):
        speculative_generate(target, "lookup", [[3], [99]], 4)


# ------------------------------------------------------------------------------------ CLI
def test_cli_generate_with_draft(tmp_path, capsys):
    import json

    from realm_jax import cli

    from hf_reference import make_hf_model

    directory, _ = make_hf_model("llama_gqa_llama3_untied", tmp_path / "tiny")
    model = realm_jax.load(directory, dtype="float32")
    prompts = [[5, 17, 33, 8, 5, 17], [60, 61]]
    ref = speculative_generate(model, "self:2", prompts, 9, k=3)  # (greedy == generate: tested above)
    base = ["generate", "--model", str(directory), "--max-new-tokens", "9", "--json", "--dtype", "float32"]
    base += [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    assert cli.main(base + ["--draft", "self:2", "--k", "3"]) == 0
    out = capsys.readouterr()
    assert [json.loads(line)["tokens"] for line in out.out.splitlines()] == ref.tokens
    assert f"speculative: {ref.stats.summary()}" in out.err
    # a target with no pairing in configs/drafts.json, and a bad k: clean errors, exit code 2
    assert cli.main(base + ["--draft", "paired"]) == 2
    assert "pairing for target" in capsys.readouterr().err
    assert cli.main(base + ["--draft", "lookup", "--k", "many"]) == 2
    assert "--k: expected" in capsys.readouterr().err


def test_pairings_config_lists_valid_drafts():
    from realm_jax.drafts import load_pairings, pairing_for

    pairs = load_pairings()
    assert pairs and all(isinstance(p.get("k", 4), int) or p.get("k") == "auto" for p in pairs)
    assert pairing_for("smollm2-135m-instruct")["draft"] in ("lookup",) or \
        pairing_for("smollm2-135m-instruct")["draft"].startswith("self:")
    with pytest.raises(DraftError, match="pairing for target"):
        pairing_for("no-such-model")
