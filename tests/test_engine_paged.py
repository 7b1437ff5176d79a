"""The paged KV cache: the forward over a pool of blocks equals the dense cache path on the same
inputs (both layouts, a sliding window, rows that do not advance); and the engine with
``block_size`` / ``num_blocks`` gives every request what ``generate`` gives it alone (greedy,
seeded, penalties, mixed adapters, stop ids, ``n`` samples) with a pool small enough that
requests are preempted and recomputed, admits by free blocks, frees every block after
cancellations, refuses bad settings, and compiles nothing after warm-up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax.engine import Engine
from realm_jax.engine.blocks import blocks_for
from realm_jax.errors import RealmError
from realm_jax.generation import generate
from realm_jax.kv_cache import KVCache, gather_pages, init_cache, init_paged_cache, insert_pages
from realm_jax.loading import Model
from realm_jax.model import forward_cached
from realm_jax.runtime import prepare

from compile_counter import CompileCounter
from test_engine import CFG, PROCESSORS, SAMPLED, SEQ, _prompts, host_params, make_workload, reference, submit
from test_engine import adapters, model  # noqa: F401  (the engine tests' fixtures)
from test_engine_logprobs import _same as same_logprobs

LAYOUTS = ("stacked", "per_layer")
BS = 4  # block size of the engines here: max_seq_len 64 = 16 blocks
POOL = 22  # blocks: one request at max_seq_len and a few more, so 4 slots run short


# ------------------------------------------------------------------------------ the forward over pages


def _pair(cfg, rt, batch, blocks, num_blocks, rng):
    """A dense cache [B, blocks * BS] and an empty pool whose rows hold ``blocks`` blocks each,
    drawn at random from the pool (so no row's blocks are contiguous or in order)."""
    table = rng.permutation(num_blocks)[:batch * blocks].reshape(batch, blocks)
    dense = init_cache(cfg, batch, blocks * BS, jnp.float32, per_layer=not rt.stacked)
    paged = init_paged_cache(cfg, batch, num_blocks, BS, blocks, jnp.float32, per_layer=not rt.stacked)
    return dense, paged._replace(block_table=jnp.asarray(table, jnp.int32))


def _views(cache):
    """The paged cache's k as the dense layout [L, B, S, K, H] (gathered through its table)."""
    layers = cache.k if cache.per_layer else [cache.k[i] for i in range(cache.k.shape[0])]
    return np.stack([np.asarray(gather_pages(x, None, cache.block_table)) for x in layers])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch_kw", [dict(arch="llama"), dict(arch="mistral", sliding_window=5)])
def test_paged_forward_equals_the_dense_cache(layout, arch_kw):
    """Prefill of right-padded prompts, then single-token steps in which some rows do not advance:
    the logits of real tokens, lengths and cached keys over a shuffled pool equal those of the
    dense cache. (A padding query that its window leaves no key sees a uniform mix of whatever
    the cache holds: padding keys in the dense cache, zeros in the pool, which drops padding.)"""
    cfg = realm_jax.ModelConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=6,
                                num_kv_heads=2, head_dim=8, **arch_kw)
    rt = prepare(realm_jax.init_params(cfg, jax.random.PRNGKey(0)), cfg, layout=layout)
    rng = np.random.default_rng(0)
    dense, paged = _pair(cfg, rt, 3, 4, 17, rng)
    run = jax.jit(forward_cached, static_argnums=1)
    tokens = jnp.asarray(rng.integers(3, 61, (3, 7)), jnp.int32)
    lengths = jnp.array([7, 2, 5], jnp.int32)
    for step in range(7):
        a, dense = run(rt, cfg, tokens, lengths, dense)
        b, paged = run(rt, cfg, tokens, lengths, paged)
        real = np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]  # padding's logits are unused
        np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], rtol=0, atol=1e-6, err_msg=f"step {step}")
        np.testing.assert_array_equal(np.asarray(paged.lengths), np.asarray(dense.lengths))
        tokens = jnp.asarray(rng.integers(3, 61, (3, 1)), jnp.int32)
        lengths = jnp.array([1, step % 2, 1], jnp.int32)
    n = np.asarray(dense.lengths)
    want = np.stack(dense.k) if dense.per_layer else np.asarray(dense.k)
    got = _views(paged)
    for b in range(3):  # every position written is where the table says
        np.testing.assert_array_equal(got[:, b, :n[b]], want[:, b, :n[b]])


def test_rows_write_only_their_own_blocks():
    """A row that does not advance writes nothing, even when its (stale) table names blocks
    that now belong to another row; positions past a row's blocks are dropped."""
    rt = prepare(host_params(CFG), CFG, layout="stacked")
    pool = init_paged_cache(CFG, 2, 6, BS, 2, jnp.float32)
    pool = pool._replace(block_table=jnp.array([[3, 6], [3, 6]], jnp.int32))  # row 1 still names block 3
    tokens = jnp.asarray(np.arange(3, 3 + 2 * 6).reshape(2, 6), jnp.int32)
    _, out = forward_cached(rt, CFG, tokens, jnp.array([6, 0], jnp.int32), pool)
    k = np.asarray(out.k)
    assert np.abs(k[:, 3]).min() > 0  # row 0's first block, all of it
    assert not np.any(k[:, [0, 1, 2, 4, 5]])  # nothing elsewhere: row 0's positions 4, 5 have no block
    np.testing.assert_array_equal(np.asarray(out.lengths), [6, 0])


@pytest.mark.parametrize("per_layer", [False, True])
def test_insert_pages_writes_rows_into_their_blocks(per_layer):
    rng = np.random.default_rng(1)
    pool = init_paged_cache(CFG, 3, 9, BS, 3, jnp.float32, per_layer=per_layer)
    rows = init_cache(CFG, 2, 8, jnp.float32, per_layer=per_layer)
    fill = lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32)  # noqa: E731
    rows = KVCache(jax.tree.map(fill, rows.k), jax.tree.map(fill, rows.v), jnp.array([6, 3], jnp.int32))
    tables = jnp.array([[5, 2, 9], [7, 9, 9]], jnp.int32)  # 9: no block
    out = insert_pages(pool, rows, jnp.array([2, 0]), tables)
    stack = (lambda t: np.stack(t)) if per_layer else np.asarray
    k, rk = stack(out.k), stack(rows.k)
    want = np.zeros_like(k)
    want[:, 5] = rk[:, 0, 0:4]
    want[:, 2, :2] = rk[:, 0, 4:6]
    want[:, 7, :3] = rk[:, 1, 0:3]
    np.testing.assert_array_equal(k, want)
    np.testing.assert_array_equal(np.asarray(out.block_table), [[7, 9, 9], [9, 9, 9], [5, 2, 9]])
    np.testing.assert_array_equal(np.asarray(out.lengths), [3, 0, 6])


# ------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def engine(model, adapters):
    """A warm paged engine: 4 slots over a pool of POOL blocks (a dense engine would hold 64)."""
    eng = Engine(model, max_slots=4, max_seq_len=SEQ, prefill_buckets=(16,), prefill_batch=2,
                 decode_steps_per_call=3, max_stop_ids=4, adapters=adapters, max_logprobs=2, block_size=BS,
                 num_blocks=POOL)
    eng.warmup()
    return eng


def _all_free(engine):
    st = engine.stats()
    assert (st.blocks_in_use, st.blocks_free) == (0, POOL)
    assert sorted(engine._sched.pages.free) == list(range(POOL))


def test_a_workload_with_preemptions_equals_generate_alone_without_recompiling(model, adapters, engine):
    """More requests than slots, greedy and seeded, mixed adapters, stop ids: the pool runs out,
    requests are preempted and recomputed, and each still gets exactly its tokens from
    ``generate`` alone, streamed once each."""
    work = make_workload(model, adapters, 12, seed=0)
    before = engine.stats()
    with CompileCounter() as cc:
        handles = [submit(engine, req) for req, _ in work[:6]]
        engine.step()
        handles += [submit(engine, req) for req, _ in work[6:]]
        streamed = {i: list(handles[i].stream()) for i in (1, 5)}  # drives the engine
        engine.run_until_idle()
    assert cc.count == 0, f"{cc.count} compilations after warm-up"
    st = engine.stats()
    assert st.preemptions > before.preemptions, "the pool was meant to run short"
    assert sum(h.preemptions for h in handles) == st.preemptions - before.preemptions
    for i, (h, (req, ref)) in enumerate(zip(handles, work)):
        assert (h.result().tokens, h.result().finish_reason) == ref, f"request {i} ({req})"
    for i, toks in streamed.items():
        assert toks == handles[i].result().tokens
    assert st.generated_tokens - before.generated_tokens == sum(len(t) for _, (t, _) in work)
    assert st.completed - before.completed == len(work)
    _all_free(engine)


@pytest.mark.slow
def test_penalties_min_tokens_and_logprobs_survive_a_preemption(model, adapters, engine):
    """A recomputed request continues its penalties' history (counts of the tokens it made, the
    prompt seen), its min_tokens count and its log-probs: each equals ``generate`` alone."""
    rng = np.random.default_rng(3)
    reqs = []
    for i, settings in enumerate(PROCESSORS):
        settings = dict(settings, logprobs=2) if i % 2 == 0 else settings
        prompt = rng.integers(3, CFG.vocab_size, int(rng.integers(8, 17))).tolist()
        adapter = [None, "a"][i % 2]
        stop = [reference(model, adapters, prompt, 40, adapter)[0][1]] if "min_tokens" in settings else []
        ref = generate(model, [prompt], 40, stop_ids=stop, adapters=None if adapter is None else adapters[adapter],
                       **settings)
        reqs.append((dict(prompt=prompt, max_new_tokens=40, adapter=adapter, stop_ids=stop, **settings),
                     (ref.tokens[0], ref.finish_reasons[0], ref.logprobs[0] if ref.logprobs else None)))
    before = engine.stats().preemptions
    with CompileCounter() as cc:
        handles = [submit(engine, r) for r, _ in reqs]
        engine.run_until_idle()
    assert cc.count == 0
    assert engine.stats().preemptions > before
    penalized = [h.preemptions for h, (req, _) in zip(handles, reqs)
                 if {"frequency_penalty", "repetition_penalty"} & set(req)]
    assert any(penalized), "a request with penalties was meant to be preempted"
    for i, (h, (req, ref)) in enumerate(zip(handles, reqs)):
        r = h.result()
        assert (r.tokens, r.finish_reason) == ref[:2], f"request {i} ({req})"
        if "logprobs" in req:
            assert len(r.logprobs) == len(ref[2]) and all(len(t.top) == 2 for t in r.logprobs)
            same_logprobs(r.logprobs, ref[2])
        else:
            assert r.logprobs is None
    _all_free(engine)


def test_samples_of_a_prompt_equal_generate_n_through_preemptions(model, engine):
    """``n`` groups (one prefill each, its rows written into every sample's own blocks) whose
    samples are preempted and come back alone, prefilling their own tokens: each group equals
    ``generate(..., n=...)`` alone."""
    prompts = _prompts(7, 3)
    settings = [dict(n=3), dict(n=2, **SAMPLED, seed=4), dict(n=3, temperature=0.8, seed=2**32 - 2)]
    refs = [generate(model, [p], 40, stop_ids=[], **st) for p, st in zip(prompts, settings)]
    with CompileCounter() as cc:
        groups = [engine.submit(p, 40, stop_ids=[], **st) for p, st in zip(prompts, settings)]
        engine.run_until_idle()
    assert cc.count == 0
    assert any(h.preemptions for g in groups for h in g), "a sample was meant to be preempted"
    for i, (g, ref) in enumerate(zip(groups, refs)):
        assert [h.result().tokens for h in g] == ref.tokens, f"group {i}"
    _all_free(engine)


def test_admission_is_limited_by_free_blocks(model):
    """Four slots but a pool of 16 blocks: a 16-token prompt needs 5 blocks for its prefill and
    first decode call (19 positions), so three are admitted and the fourth waits for blocks."""
    eng = Engine(model, max_slots=4, max_seq_len=SEQ, prefill_buckets=(16,), prefill_batch=1,
                 decode_steps_per_call=3, block_size=BS, num_blocks=16)
    hs = [eng.submit(list(range(3, 19)), 30, stop_ids=[]) for _ in range(4)]
    with eng._lock:
        groups, _ = eng._plan()
    assert sum(len(g) for _, _, g in groups) == 3 and list(eng._queue) == hs[3:]
    with pytest.raises(RealmError, match="n: 4 samples of this prompt need 20 blocks to start together, over the "
                                         "engine's num_blocks=16"):
        eng.submit(list(range(3, 19)), 30, stop_ids=[], n=4)
    assert eng._sched.pages.in_use == 3 * blocks_for(16, BS)
    with eng._lock:  # the decode call's blocks: 19 positions each
        assert eng._sched.reserve(np.zeros(4, bool)) == []
    assert eng._sched.pages.in_use == 3 * blocks_for(19, BS)


def test_cancellations_free_every_block(model, adapters, engine):
    """Requests cancelled while queued, while running and while waiting after a preemption: the
    others equal ``generate`` alone and, at the end, every block is free again."""
    prompts = _prompts(5, 8)
    refs = [reference(model, adapters, p, 40) for p in prompts]
    with CompileCounter() as cc:
        hs = [engine.submit(p, 40, stop_ids=[]) for p in prompts]
        engine.step()
        assert engine.stats().blocks_in_use > 0
        running, queued = hs[0], hs[7]
        assert running.cancel() and queued.cancel()
        preempted = None
        while preempted is None and engine.step():
            with engine._lock:
                preempted = next((h for h in engine._queue if h.tokens), None)
        assert preempted is not None, "the pool was meant to run short"
        assert preempted.cancel()
        engine.run_until_idle()
    assert cc.count == 0
    gone = (running, queued, preempted)
    for i, h in enumerate(hs):
        r = h.result()
        if h in gone:
            assert r.finish_reason == "cancelled" and r.tokens == refs[i][0][:len(r.tokens)]
        else:
            assert (r.tokens, r.finish_reason) == refs[i], f"request {i}"
    _all_free(engine)


def test_the_background_loop_serves_with_preemptions(model, adapters, engine):
    work = make_workload(model, adapters, 8, seed=4)
    before = engine.stats().preemptions
    with CompileCounter() as cc:
        engine.start()
        try:
            handles = [submit(engine, req) for req, _ in work]
            results = [h.result(timeout=120) for h in handles]
            engine.run_until_idle(timeout=120)
        finally:
            engine.stop()
    assert cc.count == 0 and engine.stats().preemptions > before
    for i, (r, (_, ref)) in enumerate(zip(results, work)):
        assert (r.tokens, r.finish_reason) == ref, f"request {i}"
    _all_free(engine)


@pytest.mark.slow
def test_per_layer_layout_with_preemptions_equals_generate_alone(model, adapters):
    served = Model(CFG, model.params, None)
    served.prepare(layout="per_layer")
    eng = Engine(served, max_slots=4, max_seq_len=SEQ, prefill_buckets=(16,), prefill_batch=1,
                 decode_steps_per_call=4, adapters=adapters, block_size=8, num_blocks=10)
    assert eng._state.dec.cache.per_layer
    work = make_workload(model, adapters, 8, seed=2)
    handles = [submit(eng, req) for req, _ in work]
    eng.run_until_idle()
    assert eng.stats().preemptions > 0
    for i, (h, (_, ref)) in enumerate(zip(handles, work)):
        assert (h.result().tokens, h.result().finish_reason) == ref, f"request {i}"
    assert eng.stats().blocks_free == 10


def test_dense_engines_report_no_blocks(model):
    st = Engine(model, max_slots=2, max_seq_len=SEQ, prefill_buckets=(16,)).stats()
    assert (st.blocks_in_use, st.blocks_free, st.preemptions) == (0, 0, 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=0), "block_size: expected an integer >= 1, got 0"),
    (dict(block_size=-4), "block_size: expected an integer >= 1"),
    (dict(block_size=2.5), "block_size: expected an integer >= 1"),
    (dict(block_size=128), "block_size: expected at most max_seq_len=64, got 128"),
    (dict(num_blocks=8), "num_blocks: needs block_size"),
    (dict(block_size=4, num_blocks=0), "num_blocks: expected an integer >= 1, got 0"),
    (dict(block_size=4, num_blocks=15),
     r"num_blocks: the pool must hold at least one request of max_seq_len=64 \(16 blocks of block_size=4\), got 15"),
    (dict(block_size=4, draft="lookup"), "block_size: the paged KV cache does not serve a draft yet"),
])
def test_bad_paging_settings_are_refused(model, kwargs, match):
    with pytest.raises(RealmError, match=match):
        Engine(model, max_slots=2, max_seq_len=SEQ, **kwargs)
