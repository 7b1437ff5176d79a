"""Prefix caching in the paged engine: the prefill at an offset over cached blocks equals a full
prefill; and an engine with ``prefix_caching=True`` gives every request what ``generate`` gives
it alone while prompts share cached blocks (a shared system prompt, a second turn over the
first turn's answer, a fully cached prompt, ``n`` samples), never across adapters, through
preemptions and cancellations, with the hit counts that arithmetic predicts, no compilation
after warm-up, and every block free or cached and unreferenced at the end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax.engine import Engine
from realm_jax.engine.blocks import BlockPool, chain_keys
from realm_jax.errors import RealmError
from realm_jax.generation import generate, new_cache, prefill
from realm_jax.kv_cache import gather_pages, init_paged_cache, rows_view
from realm_jax.runtime import prepare

from compile_counter import CompileCounter
from test_engine import CFG, PROCESSORS, SAMPLED, SEQ, host_params, make_workload, reference, submit
from test_engine import adapters, model  # noqa: F401  (the engine tests' fixtures)

BS = 4
POOL = 22  # as the paged tests: 4 slots run short of blocks


# ------------------------------------------------------------------------------ prefill at an offset


@pytest.mark.parametrize("layout", ("stacked", "per_layer"))
def test_prefill_at_an_offset_equals_a_full_prefill(layout):
    """Row 0 prefills a prompt whole into its blocks; row 1 shares row 0's first two blocks and
    prefills only the rest of the same prompt at offset 8: its last-token logits and the keys it
    writes equal row 0's, and both equal the plain dense-cache prefill."""
    rt = prepare(host_params(CFG), CFG, layout=layout)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 61, 11)
    pool = init_paged_cache(CFG, 2, 12, BS, 4, jnp.float32, per_layer=not rt.stacked)
    run = jax.jit(prefill, static_argnums=1)
    table0 = jnp.array([[5, 2, 9, 12]], jnp.int32)  # 12 = no block
    full, pool1 = run(rt, CFG, jnp.asarray(prompt[None], jnp.int32), jnp.array([11]),
                      rows_view(pool, table0, jnp.array([0])))
    table1 = jnp.array([[5, 2, 7, 12]], jnp.int32)  # row 0's first two blocks, then its own
    rest, pool2 = run(rt, CFG, jnp.asarray(prompt[None, 8:], jnp.int32), jnp.array([3]),
                      rows_view(pool1, table1, jnp.array([8])))
    dense, _ = run(rt, CFG, jnp.asarray(prompt[None], jnp.int32), jnp.array([11]), new_cache(CFG, rt, 1, 16))
    np.testing.assert_allclose(np.asarray(rest), np.asarray(full), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(full), np.asarray(dense), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pool2.lengths), [11])
    layers = (lambda c: list(c.k)) if not rt.stacked else (lambda c: [c.k[i] for i in range(CFG.num_layers)])
    for a, b, before in zip(layers(pool2), layers(pool1), layers(pool1)):
        v0 = np.asarray(gather_pages(b, None, table0))[0, :11]
        v1 = np.asarray(gather_pages(a, None, table1))[0, :11]
        np.testing.assert_allclose(v1, v0, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(a)[[5, 2, 9]], np.asarray(before)[[5, 2, 9]])  # shared: unwritten


def test_block_keys_are_a_chain_over_tokens_and_adapter():
    toks = list(range(3, 15))
    a = chain_keys(toks, 4, b"-1:0;", 3)
    assert len(a) == 3 and len(set(a)) == 3 and all(len(k) == 32 for k in a)
    assert chain_keys(toks[:8] + [0] * 4, 4, b"-1:0;", 3)[:2] == a[:2]  # a block's key: its prefix
    assert chain_keys([9] + toks[1:], 4, b"-1:0;", 3)[2] != a[2]  # ... all of it
    assert not set(chain_keys(toks, 4, b"0:1;", 3)) & set(a)  # another adapter: no key in common


def test_the_pool_shares_evicts_least_recent_first_and_counts_truthfully():
    pool = BlockPool(6, 4, 2, 24, prefix_caching=True)
    keys = chain_keys(list(range(12)), 4, b"", 3)
    pool.assign(0, 12, 20)
    pool.register(0, keys)
    pool.release(0)
    assert (pool.in_use, pool.available, len(pool.cached)) == (0, 6, 3)
    hit = pool.lookup(keys[:2])
    assert hit == [0, 1]
    pool.pin(hit)
    pool.assign(1, 9, 24, hit)  # shares two blocks, takes one: a free one before any cached
    assert pool.held[1] == [0, 1, 3] and (pool.in_use, pool.available) == (3, 3)
    pool.grow(1, 12)  # 21 positions: 6 blocks; the free 4, 5, then evicts cached block 2
    assert pool.held[1] == [0, 1, 3, 4, 5, 2] and pool.lookup(keys) == [0, 1] and len(pool.cached) == 2
    pool.release(1)
    assert pool.refs.max() == 0 and sorted(pool.free + list(pool.lru)) == list(range(6))
    assert list(pool.lru) == [1, 0]  # the chain's tail is evicted first


# ------------------------------------------------------------------------------ the engine


def _engine(model, adapters, pool=None, chunk=None):
    eng = Engine(model, max_slots=4, max_seq_len=SEQ, prefill_buckets=(16, 32), prefill_batch=2,
                 decode_steps_per_call=3, max_stop_ids=4, adapters=adapters, block_size=BS,
                 num_blocks=pool, prefix_caching=True, prefill_chunk=chunk)
    eng.warmup()
    return eng


@pytest.fixture(scope="module")
def engine(model, adapters):
    """A warm engine whose pool is enough for every slot at max_seq_len (nothing is preempted):
    its hit counts follow from the prompts alone."""
    return _engine(model, adapters)


@pytest.fixture(scope="module")
def small(model, adapters):
    """A warm engine whose pool runs short: requests are preempted and blocks evicted."""
    return _engine(model, adapters, POOL)


CHUNK = 5  # tokens per chunk of the chunked engine's prefills (not a whole number of blocks)


@pytest.fixture(scope="module")
def chunked(model, adapters):
    """``small`` with chunked prefill: a context longer than CHUNK is prefilled CHUNK tokens per step."""
    return _engine(model, adapters, POOL, CHUNK)


def _no_leaks(engine, pool):
    """Every block free or cached and held by no slot; the cache consistent."""
    pages = engine._sched.pages
    assert not any(pages.held) and pages.refs.max() == 0
    assert sorted(pages.free + list(pages.lru)) == list(range(pool))
    assert set(pages.lru) == set(pages.key_of) == set(pages.cached.values())
    st = engine.stats()
    assert (st.blocks_in_use, st.blocks_free, st.blocks_cached) == (0, pool, len(pages.lru))


def _run(engine, reqs):
    with CompileCounter() as cc:
        hs = [submit(engine, r) for r in reqs]
        engine.run_until_idle()
    assert cc.count == 0, f"{cc.count} compilations after warm-up"
    return hs


def _delta(engine, before):
    st = engine.stats()
    return st.prompt_tokens - before.prompt_tokens, st.cached_prompt_tokens - before.cached_prompt_tokens


def test_a_shared_system_prompt_is_prefilled_once_and_each_request_equals_generate(model, adapters, engine):
    """One request with a 10-token system prompt runs first; five more with that prompt and
    suffixes of their own (greedy, seeded, penalties) then share its first two blocks: 8 cached
    tokens each (the third block mixes the suffix in), each output equal to ``generate`` alone."""
    rng = np.random.default_rng(21)
    system = rng.integers(3, 61, 10).tolist()
    settings = [dict(), dict(SAMPLED, seed=3), PROCESSORS[0], PROCESSORS[1], dict(temperature=0.7, seed=11), dict()]
    reqs = []
    for i, st in enumerate(settings):
        prompt = system + [3 + i] + rng.integers(3, 61, int(rng.integers(0, 5))).tolist()  # suffixes differ at once
        reqs.append(dict(prompt=prompt, max_new_tokens=12, stop_ids=[], **st))
    refs = [reference(model, adapters, r["prompt"], 12, **{k: v for k, v in r.items()
                                                          if k not in ("prompt", "max_new_tokens", "stop_ids")})
            for r in reqs]
    before = engine.stats()
    first = _run(engine, reqs[:1])
    assert _delta(engine, before) == (len(reqs[0]["prompt"]), 0)
    hs = first + _run(engine, reqs[1:])
    for i, (h, ref) in enumerate(zip(hs, refs)):
        assert (h.result().tokens, h.result().finish_reason) == ref, f"request {i}"
    assert _delta(engine, before) == (sum(len(r["prompt"]) for r in reqs), 8 * 5)
    assert engine.stats().preemptions == before.preemptions
    _no_leaks(engine, engine.num_blocks)


def test_a_second_turn_reuses_the_first_turns_prompt_and_answer(model, adapters, engine):
    """Turn 2's prompt is turn 1's prompt, its answer and new text: every full block of what turn 1
    wrote (its prompt and its answer but the last token) is cached, and turn 2 prefills only
    the rest; its output equals ``generate`` on its prompt alone."""
    rng = np.random.default_rng(22)
    p1 = rng.integers(3, 61, 7).tolist()
    ans, _ = reference(model, adapters, p1, 15)
    p2 = p1 + ans + rng.integers(3, 61, 5).tolist()
    before = engine.stats()
    h1, = _run(engine, [dict(prompt=p1, max_new_tokens=15, stop_ids=[])])
    assert h1.result().tokens == ans
    h2, = _run(engine, [dict(prompt=p2, max_new_tokens=10, stop_ids=[])])
    assert (h2.result().tokens, h2.result().finish_reason) == reference(model, adapters, p2, 10)
    written = len(p1) + len(ans) - 1
    assert _delta(engine, before) == (len(p1) + len(p2), BS * (written // BS))
    _no_leaks(engine, engine.num_blocks)


def test_a_fully_cached_prompt_recomputes_its_last_block(model, adapters, engine):
    """A 12-token prompt (three full blocks) asked twice: the second time the first two blocks
    are shared and the third is prefilled again (so the first token's logits exist)."""
    prompt = np.random.default_rng(23).integers(3, 61, 12).tolist()
    ref = reference(model, adapters, prompt, 6)
    before = engine.stats()
    hs = _run(engine, [dict(prompt=prompt, max_new_tokens=6, stop_ids=[])])
    hs += _run(engine, [dict(prompt=prompt, max_new_tokens=6, stop_ids=[])])
    assert [(h.result().tokens, h.result().finish_reason) for h in hs] == [ref, ref]
    assert _delta(engine, before) == (24, 8)
    _no_leaks(engine, engine.num_blocks)


def test_adapters_never_share_blocks(model, adapters, engine):
    """One prompt under adapter a, the base model, adapter b, then a again: only the second a
    hits (what the first a wrote), and every output equals ``generate`` with its adapter."""
    prompt = np.random.default_rng(24).integers(3, 61, 13).tolist()
    before = engine.stats()
    counts = []
    for adapter in ("a", None, "b", "a"):
        h, = _run(engine, [dict(prompt=prompt, max_new_tokens=8, stop_ids=[], adapter=adapter)])
        assert (h.result().tokens, h.result().finish_reason) == reference(model, adapters, prompt, 8, adapter)
        counts.append(_delta(engine, before)[1])
    assert counts == [0, 0, 0, BS * ((13 - 1) // BS)]
    _no_leaks(engine, engine.num_blocks)


def test_samples_of_a_cached_prompt_equal_generate_n(model, engine):
    """``n`` samples of a prompt whose first blocks are cached: the group shares them, one row of
    each prefill call prefills the rest and the others copy its blocks; the samples equal
    ``generate(n=...)``."""
    prompt = np.random.default_rng(25).integers(3, 61, 11).tolist()
    ref = generate(model, [prompt], 10, stop_ids=[], n=3, **SAMPLED, seed=5)
    before = engine.stats()
    _run(engine, [dict(prompt=prompt, max_new_tokens=4, stop_ids=[])])
    with CompileCounter() as cc:
        g = engine.submit(prompt, 10, stop_ids=[], n=3, **SAMPLED, seed=5)
        engine.run_until_idle()
    assert cc.count == 0
    assert [h.result().tokens for h in g] == ref.tokens
    # 3 samples, 2 rows per prefill call: two calls, each prefilling the prompt once (the second
    # call's sample alone), 8 of its 11 tokens read from the cache each time
    assert _delta(engine, before) == (11 + 2 * 11, 2 * 8)
    _no_leaks(engine, engine.num_blocks)


@pytest.mark.parametrize("which", [pytest.param("small", marks=pytest.mark.slow), "chunked"])
def test_preemptions_and_cancellations_with_shared_prefixes(model, adapters, which, request):
    """A small pool, a workload whose prompts share prefixes (and one adapter's prompts the same
    text as the base model's): requests are preempted (and may hit their own cached blocks when
    they come back), some cancelled; the others equal ``generate`` alone, the cache was hit,
    nothing compiles, and at the end no block is referenced. Also with chunked prefill."""
    small = request.getfixturevalue(which)
    work = make_workload(model, adapters, 10, seed=5)
    rng = np.random.default_rng(26)
    system = rng.integers(3, 61, 9).tolist()
    reqs = []
    for i, (req, _) in enumerate(work):
        req = dict(req, prompt=(system + req["prompt"])[:16], max_new_tokens=max(req["max_new_tokens"], 20))
        req.pop("stop_ids", None)
        req["stop_ids"] = []
        sampling = {k: req[k] for k in ("temperature", "top_k", "top_p", "seed") if k in req}
        reqs.append((req, reference(model, adapters, req["prompt"], req["max_new_tokens"], req["adapter"],
                                    **sampling)))
    before = small.stats()
    with CompileCounter() as cc:
        hs = [submit(small, r) for r, _ in reqs]
        small.step()
        hs[1].cancel()
        hs[-1].cancel()  # still queued
        preempted = None
        while preempted is None and small.step():
            with small._lock:
                preempted = next((h for h in small._queue if h.tokens and not h.done), None)
        assert preempted is not None, "the pool was meant to run short"
        small.run_until_idle()
    assert cc.count == 0
    st = small.stats()
    assert st.preemptions > before.preemptions and st.cached_prompt_tokens > before.cached_prompt_tokens
    for i, (h, (req, ref)) in enumerate(zip(hs, reqs)):
        r = h.result()
        if i in (1, len(hs) - 1):
            assert r.finish_reason == "cancelled" and r.tokens == ref[0][:len(r.tokens)]
        else:
            assert (r.tokens, r.finish_reason) == ref, f"request {i} ({req})"
    _no_leaks(small, POOL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prefix_caching=True), r"prefix_caching: needs the paged KV cache \(set block_size"),
    (dict(prefill_chunk=8), r"prefill_chunk: needs the paged KV cache \(set block_size"),
    (dict(prefill_chunk=0, block_size=4), "prefill_chunk: expected an integer >= 1, got 0"),
    (dict(prefix_caching="yes", block_size=4), "prefix_caching: expected True or False, got 'yes'"),
    (dict(prefix_caching=1, block_size=4), "prefix_caching: expected True or False, got 1"),
])
def test_bad_prefix_settings_are_refused(model, kwargs, match):
    with pytest.raises(RealmError, match=match):
        Engine(model, max_slots=2, max_seq_len=SEQ, **kwargs)


def test_dense_and_uncached_engines_report_no_hits(model):
    st = Engine(model, max_slots=2, max_seq_len=SEQ, prefill_buckets=(16,), block_size=4).stats()
    assert (st.blocks_cached, st.cached_prompt_tokens, st.prefix_hit_rate) == (0, 0, None)


# ------------------------------------------------------------------------------ chunked prefill


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_calls(model, adapters, chunked):
    """A 14-token prompt on the chunked engine takes ceil(14 / 5) = 3 prefill calls, one per step;
    a request already running gets tokens from the decode calls of those steps; both equal
    ``generate`` alone."""
    rng = np.random.default_rng(31)
    short, long_ = rng.integers(3, 61, 3).tolist(), rng.integers(3, 61, 14).tolist()
    refs = [reference(model, adapters, p, 20) for p in (short, long_)]
    before = chunked.stats()
    with CompileCounter() as cc:
        a = chunked.submit(short, 20, stop_ids=[])
        chunked.step()
        b = chunked.submit(long_, 20, stop_ids=[])
        seen = []
        while chunked.step():
            seen.append((len(a.tokens), len(b.tokens)))
    assert cc.count == 0
    assert [(h.result().tokens, h.result().finish_reason) for h in (a, b)] == refs
    assert chunked.stats().prefill_calls - before.prefill_calls == 1 + 3
    first = next(i for i, (_, nb) in enumerate(seen) if nb)  # the long request's first token
    assert first >= 2 and seen[first - 1][0] > seen[0][0], f"no decode between the chunks: {seen}"
    _no_leaks(chunked, POOL)


def test_chunks_continue_after_a_cached_prefix(model, adapters, chunked):
    """The chunks of a prompt start after its cached blocks: a 16-token prompt whose first 8
    tokens are cached is prefilled in 2 calls (5 + 3), not 4, and equals ``generate``."""
    rng = np.random.default_rng(32)
    head = rng.integers(3, 61, 9).tolist()
    p1, p2 = head + [3], head + [4] + rng.integers(3, 61, 6).tolist()
    before = chunked.stats()
    h1, = _run(chunked, [dict(prompt=p1, max_new_tokens=3, stop_ids=[])])
    mid = chunked.stats()
    h2, = _run(chunked, [dict(prompt=p2, max_new_tokens=12, stop_ids=[])])
    assert (h2.result().tokens, h2.result().finish_reason) == reference(model, adapters, p2, 12)
    assert mid.prefill_calls - before.prefill_calls == 2  # 10 tokens: 5 + 5
    assert chunked.stats().prefill_calls - mid.prefill_calls == 2
    assert _delta(chunked, mid) == (16, 8)
    _no_leaks(chunked, POOL)
