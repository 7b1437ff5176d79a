"""The paged KV cache on a mesh: an engine with ``block_size`` over a model sharded on a (1, 4)
mesh (tensor parallel) and on a (2, 2) one (data-parallel slots too) gives every request what
``generate`` gives it alone on the unsharded model (greedy, seeded, ``n`` samples, prefix
caching), with a pool small enough that requests are preempted, the pool really split over
``model`` (its K axis; the block axis never split) and the block table over ``data``, every
block free at the end, and nothing compiled after warm-up."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import realm_jax
from realm_jax import sharding as sh
from realm_jax.engine import Engine
from realm_jax.generation import generate
from realm_jax.loading import Model

from compile_counter import CompileCounter
from test_engine import SAMPLED, host_params

# K = 4 kv heads, so a model axis of 2 or 4 splits the pool; N = 8, F = 40 divide too
CFG = realm_jax.ModelConfig(arch="llama", vocab_size=61, hidden_size=32, intermediate_size=40, num_layers=2,
                            num_heads=8, num_kv_heads=4, head_dim=8, eos_token_ids=(2,), bos_token_id=1,
                            max_position_embeddings=512)
SEQ, BS, POOL = 64, 4, 20  # 16 blocks per request at SEQ: 4 slots run short of 20
NEW = 32  # new tokens per request


@pytest.fixture(scope="module")
def reference():
    """The unsharded model: ``generate`` on it gives every reference."""
    m = Model(CFG, host_params(CFG), None)
    m.prepare(layout="stacked")
    return m


def _workload(model, count, seed):
    """Prompts of 4..16 tokens, NEW new tokens each, every other request seeded sampling; with
    their references."""
    rng = np.random.default_rng(seed)
    work = []
    for i in range(count):
        prompt = rng.integers(3, CFG.vocab_size, int(rng.integers(4, 17))).tolist()
        kw = dict(SAMPLED, seed=int(rng.integers(0, 2**31))) if i % 2 else {}
        ref = generate(model, [prompt], NEW, stop_ids=[], **kw)
        work.append((prompt, kw, (ref.tokens[0], ref.finish_reasons[0])))
    return work


def _check_layout(eng, shape):
    """The pool's K axis is split over ``model`` (each device holds K / model heads of every block:
    the block axis is not split), the block table's B over ``data``."""
    cache = eng._state.dec.cache
    data, model = shape
    pools = (list(cache.k) + list(cache.v)) if cache.per_layer else [cache.k, cache.v]
    lead = () if cache.per_layer else (None,)
    for pool in pools:
        assert pool.sharding.spec == P(*lead, None, None, "model"), pool.sharding.spec
        full = pool.shape
        for shard in pool.addressable_shards:
            assert shard.data.shape == full[:-2] + (full[-2] // model, full[-1])
    assert len({d for p in pools for d in p.sharding.device_set}) == data * model
    assert cache.block_table.sharding.spec == (P("data") if data > 1 else P(None, None))
    if data > 1:
        assert {s.data.shape for s in cache.block_table.addressable_shards} == {(eng.max_slots // data,
                                                                                cache.block_table.shape[1])}


def _serve(eng, work, groups=()):
    """Submit ``work`` (and ``groups``: (prompt, n, settings)) and run the engine until idle, counting
    compilations."""
    with CompileCounter() as cc:
        hs = [eng.submit(p, NEW, stop_ids=[], **kw) for p, kw, _ in work]
        eng.step()
        gs = [eng.submit(p, NEW, stop_ids=[], n=n, **kw) for p, n, kw in groups]
        eng.run_until_idle()
    return hs, gs, cc.count


def _all_free(eng):
    st = eng.stats()
    assert (st.blocks_in_use, st.blocks_free) == (0, POOL)


@pytest.mark.parametrize("shape, layout", [((1, 4), "stacked"), ((2, 2), "per_layer")])
def test_a_paged_engine_on_a_mesh_equals_generate_alone(reference, shape, layout):
    """Greedy and seeded requests (and, on the (2, 2) mesh, ``n`` samples with prefix caching,
    whose samples copy the prompt's blocks) through preemptions: each equals ``generate`` on the
    unsharded model alone."""
    served = Model(CFG, reference.params, None)
    served.prepare(layout=layout, mesh=sh.make_mesh(*shape))
    prefix = shape[0] > 1
    eng = Engine(served, max_slots=4, max_seq_len=SEQ, prefill_buckets=(16,), prefill_batch=2,
                 decode_steps_per_call=3, block_size=BS, num_blocks=POOL, prefix_caching=prefix)
    eng.warmup()
    _check_layout(eng, shape)
    work = _workload(reference, 6, seed=sum(shape))
    groups = []
    if prefix:  # a repeated prompt (its cached blocks shared) and a group of samples
        work.append((work[0][0], {}, work[0][2]))
        groups = [(work[1][0], 2, dict(SAMPLED, seed=5))]
    hs, gs, compiles = _serve(eng, work, groups)
    assert compiles == 0, f"{compiles} compilations after warm-up"
    assert eng.stats().preemptions > 0, "the pool was meant to run short"
    for i, (h, (p, kw, ref)) in enumerate(zip(hs, work)):
        assert (h.result().tokens, h.result().finish_reason) == ref, f"request {i} ({kw})"
    for g, (p, n, kw) in zip(gs, groups):
        assert [h.result().tokens for h in g] == generate(reference, [p], NEW, stop_ids=[], n=n, **kw).tokens
    if prefix:
        assert eng.stats().cached_prompt_tokens > 0
    _check_layout(eng, shape)  # the programs handed the layout back
    _all_free(eng)


def test_the_pool_is_replicated_over_model_when_it_does_not_divide_k():
    """K = 3 kv heads on a model axis of 2: the pool is replicated (as the dense cache is); the
    block axis is never split, the table's B follows ``data``."""
    import jax

    from realm_jax.kv_cache import init_paged_cache

    cfg = realm_jax.ModelConfig(arch="llama", vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2,
                                num_heads=6, num_kv_heads=3, head_dim=8)
    shapes = jax.eval_shape(lambda: init_paged_cache(cfg, 4, 10, BS, 16, per_layer=False))
    specs = sh.paged_cache_specs(shapes, sh.make_mesh(2, 2))
    assert specs.k == specs.v == P(None, None, None, None, None)
    assert specs.block_table == P("data", None) and specs.lengths == P("data")
    specs = sh.paged_cache_specs(shapes, sh.make_mesh(1, 2))
    assert specs.block_table == P(None, None)


def test_a_dense_engine_on_a_data_parallel_mesh_compiles_nothing_after_warm_up(reference):
    """The dense engine keeps its state's layout across its programs too (B on ``data``): after
    warm-up no admission or decode call meets a sharding it was not compiled for."""
    served = Model(CFG, reference.params, None)
    served.prepare(layout="stacked", mesh=sh.make_mesh(2, 2))
    eng = Engine(served, max_slots=4, max_seq_len=SEQ, prefill_buckets=(16,), prefill_batch=2,
                 decode_steps_per_call=3)
    eng.warmup()
    work = _workload(reference, 4, seed=9)
    hs, _, compiles = _serve(eng, work)
    assert compiles == 0, f"{compiles} compilations after warm-up"
    for i, (h, (p, kw, ref)) in enumerate(zip(hs, work)):
        assert (h.result().tokens, h.result().finish_reason) == ref, f"request {i} ({kw})"
    assert eng._state.dec.cache.k.sharding.spec == P(None, "data", None, "model")
