"""Sampling: greedy limits, top-k / top-p support sets against numpy, frequencies against the
softmax (chi-square), per-row seeds independent of the batch, host-side validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from realm_jax.errors import RealmError
from realm_jax.sampling import SamplingParams, processed_logits, sample

sample_jit = jax.jit(sample)
processed_jit = jax.jit(processed_logits)

ALPHA = 1e-3  # false-alarm rate of each chi-square test (the draws are fixed by the seeds)


def _rows(logits_row, n):
    return jnp.asarray(np.broadcast_to(np.asarray(logits_row, np.float32), (n, len(logits_row))))


def test_temperature_to_zero_is_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 50)).astype(np.float32) * 3
    greedy = logits.argmax(-1)
    gaps = np.sort(logits, -1)[:, -1] - np.sort(logits, -1)[:, -2]
    assert gaps.min() > 1e-3  # a well-defined argmax in every row
    step = jnp.arange(16, dtype=jnp.int32)
    for t in (0.0, 1e-4, 1e-5):
        sp = SamplingParams.make(16, temperature=t, seed=list(range(16)))
        np.testing.assert_array_equal(np.asarray(sample_jit(jnp.asarray(logits), sp, step)), greedy)
    # temperature 0 rows stay argmax inside a batch where other rows sample and filter
    sp = SamplingParams.make(16, temperature=[0.0, 2.0] * 8, top_k=[0, 3] * 8, top_p=[1.0, 0.5] * 8)
    got = np.asarray(sample_jit(jnp.asarray(logits), sp, step))
    np.testing.assert_array_equal(got[::2], greedy[::2])


def _topp_reference(logits, temperature, top_k, top_p):
    """numpy, by the definition: the set kept by temperature -> top-k (every token at or above the
    k-th largest logit, ties kept, as HF's top-k warper) -> top-p over the survivors (token i
    stays iff the survivors strictly better than i hold mass < p, float64). Returns the set and
    each survivor's "mass strictly better" (to check that no case is a rounding coin toss)."""
    x = np.asarray(logits, np.float32) / np.float32(temperature)
    k = len(x) if top_k == 0 else min(top_k, len(x))
    surv = x >= np.sort(x)[::-1][k - 1]
    p = np.where(surv, np.exp(x.astype(np.float64) - x.max()), 0.0)
    p /= p.sum()
    better = np.array([p[x > xi].sum() for xi in x])
    keep = surv & np.isfinite(x) & ((better < top_p) | (top_p >= 1.0))
    return set(np.flatnonzero(keep).tolist()), better[surv]


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 1.5), (0, 0.3, 1.0), (0, 0.9, 0.7),
                                                     (7, 0.8, 1.3), (0, 1.0, 1.0), (30, 0.05, 2.0)])
def test_support_matches_numpy_reference(top_k, top_p, temperature):
    rng = np.random.default_rng(top_k * 100 + int(top_p * 10))
    v, b = 37, 12
    logits = (rng.normal(size=(b, v)) * 2).astype(np.float32)
    sp = SamplingParams.make(b, temperature=temperature, top_k=top_k, top_p=top_p)
    proc = np.asarray(processed_jit(jnp.asarray(logits), sp))
    for r in range(b):
        ref, better = _topp_reference(logits[r], temperature, top_k, top_p)
        assert np.abs(better - top_p).min() > 1e-5 or top_p == 1.0  # not a float-rounding coin toss
        got = set(np.flatnonzero(np.isfinite(proc[r])).tolist())
        assert got == ref, (r, sorted(got), sorted(ref))
        # the kept logits are the temperature-scaled ones
        idx = sorted(ref)
        np.testing.assert_allclose(proc[r, idx], logits[r, idx] / np.float32(temperature), rtol=1e-6)


@pytest.mark.parametrize("on", ["top_k and top_p", "top_k", "top_p"])
def test_support_with_ties_inf_and_mixed_rows_matches_numpy_reference(on):
    """A real vocabulary's shape: bf16-rounded logits (many exact ties, at the k-th value too),
    entries at -inf (logit bias, min_tokens), and every row with its own temperature, top-k and
    top-p, against the definition. ``on``: the filters some row of the batch uses (``warp``
    skips the threshold search no row needs)."""
    rng = np.random.default_rng(11)
    b, v = 24, 3000
    logits = np.array(jnp.asarray(rng.normal(size=(b, v)) * 3, jnp.bfloat16).astype(jnp.float32))
    logits[:, rng.choice(v, 40, replace=False)] = -np.inf
    logits[3, :] = 0.25  # one row of nothing but ties (and its -inf entries)
    logits[3, :7] = -np.inf
    temperature = rng.uniform(0.3, 2.0, b).astype(np.float32)
    top_k = rng.choice([0, 1, 5, 40, 2999, 5000] if "top_k" in on else [0], b)
    top_p = rng.choice([1.0, 0.95, 0.5, 0.1] if "top_p" in on else [1.0], b)
    sp = SamplingParams.make(b, temperature=temperature.tolist(), top_k=top_k.tolist(), top_p=top_p.tolist())
    proc = np.asarray(processed_jit(jnp.asarray(logits), sp))
    checked = 0
    for r in range(b):
        ref, better = _topp_reference(logits[r], temperature[r], top_k[r], top_p[r])
        if top_p[r] < 1.0 and np.abs(better - top_p[r]).min() < 1e-5:
            continue  # a rounding coin toss, not a behaviour
        got = set(np.flatnonzero(np.isfinite(proc[r])).tolist())
        assert got == ref, (r, len(got), len(ref), top_k[r], top_p[r])
        checked += 1
    assert checked >= b - 2
    # the all-ties row keeps every finite entry, whatever its top-k and top-p
    assert np.isfinite(proc[3]).sum() == np.isfinite(logits[3]).sum()


def test_topk_never_emits_outside_k_best():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=64).astype(np.float32)
    n, k = 4000, 4
    sp = SamplingParams.make(n, temperature=3.0, top_k=k, seed=np.arange(n))  # flat: tail would show up
    toks = np.asarray(sample_jit(_rows(logits, n), sp, jnp.zeros(n, jnp.int32)))
    best = set(np.argsort(-logits)[:k].tolist())
    assert set(toks.tolist()) == best  # never outside, and each of the k is reachable


def _chi_square_pvalue(toks, probs):
    counts = np.bincount(toks, minlength=len(probs))
    support = probs > 0
    assert counts[~support].sum() == 0
    return stats.chisquare(counts[support], probs[support] * len(toks)).pvalue


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.7, 4, 1.0), (1.0, 0, 0.7),
                                                     (1.2, 5, 0.8)])
def test_frequencies_match_softmax(temperature, top_k, top_p):
    """Empirical frequencies on V=7 against the filtered softmax; Pearson chi-square at ALPHA."""
    logits = np.array([1.3, -0.2, 0.4, 2.0, 0.9, -1.1, 0.05], np.float32)
    n = 20000
    # seeds and steps both vary, so both parts of the per-row key derivation are exercised
    sp = SamplingParams.make(n, temperature=temperature, top_k=top_k, top_p=top_p, seed=np.arange(n) // 4)
    step = jnp.asarray(np.arange(n) % 4, jnp.int32)
    toks = np.asarray(sample_jit(_rows(logits, n), sp, step))
    ref, _ = _topp_reference(logits, temperature, top_k, top_p)
    x = logits.astype(np.float64) / temperature
    probs = np.where(np.isin(np.arange(7), sorted(ref)), np.exp(x - x.max()), 0.0)
    probs /= probs.sum()
    p = _chi_square_pvalue(toks, probs)
    assert p > ALPHA, f"chi-square p-value {p:.2e}"


def test_rows_depend_only_on_their_seed_and_step():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 23)).astype(np.float32)
    sp = SamplingParams.make(6, temperature=[1.0, 0.5, 2.0, 1.0, 0.0, 1.3], top_k=[0, 5, 0, 3, 0, 0],
                             top_p=[1.0, 1.0, 0.8, 0.9, 1.0, 0.95], seed=[11, 12, 13, 14, 15, 16])
    step = jnp.asarray([3, 0, 7, 1, 2, 9], jnp.int32)
    batch = np.asarray(sample_jit(jnp.asarray(logits), sp, step))
    for r in range(6):
        one = jax.tree.map(lambda a: a[r:r + 1], sp)
        alone = np.asarray(sample_jit(jnp.asarray(logits[r:r + 1]), one, step[r:r + 1]))
        assert alone[0] == batch[r]
    # a different step or seed gives independent draws: over many steps they are not all equal
    n = 64
    sp = SamplingParams.make(n, temperature=1.0, seed=7)
    toks = np.asarray(sample_jit(_rows(np.zeros(23), n), sp, jnp.arange(n, dtype=jnp.int32)))
    assert len(set(toks.tolist())) > 10


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-0.5), r"temperature must be finite and >= 0.*-0.5"),
    (dict(temperature=[0.0, float("nan")]), r"temperature.*nan \(row 1\)"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\].*got 0"),
    (dict(top_p=[1.0, 1.5]), r"top_p must be in \(0, 1\].*1.5 \(row 1\)"),
    (dict(top_k=-1), r"top_k must be a non-negative integer.*-1"),
    (dict(top_k=2.5), r"top_k must be a non-negative integer.*2.5"),
    (dict(seed=-3), r"seed must be an integer in \[0, 2\*\*32\).*-3"),
    (dict(temperature=[1.0, 1.0, 1.0]), r"temperature: expected a scalar or 2 values.*got 3"),
    (dict(top_k="five"), r"top_k: expected numbers"),
])
def test_bad_settings_raise_on_host(kw, match):
    with pytest.raises(RealmError, match=match):
        SamplingParams.make_host(2, **kw)


def test_none_entries_and_padding():
    sp = SamplingParams.make_host(2, temperature=[0.5, None], top_k=[None, 3], top_p=None, seed=[1, 2], pad_to=4)
    np.testing.assert_allclose(sp.temperature, [0.5, 0, 0, 0])
    np.testing.assert_array_equal(sp.top_k, [0, 3, 0, 0])
    np.testing.assert_allclose(sp.top_p, [1, 1, 1, 1])
    np.testing.assert_array_equal(sp.seed, [1, 2, 0, 0])
