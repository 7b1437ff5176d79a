"""The continuous-batching engine against ``generate`` on each request alone: a workload arriving
over time with more requests than slots, varied lengths, mixed adapters, stop ids and seeded
sampling; cancellation; bad input; threads; speculative decoding; both runtime layouts (stacked
and per-layer), adapters folded or not; and no recompilation after warm-up."""

import threading

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import lora
from realm_jax.engine import Engine, RequestResult
from realm_jax.errors import RealmError
from realm_jax.generation import generate
from realm_jax.kv_cache import init_cache, insert_rows
from realm_jax.loading import Model
from realm_jax.params import param_shapes
from realm_jax.runtime import Weight
from realm_jax.speculative import speculative_generate
from compile_counter import CompileCounter

CFG = realm_jax.ModelConfig(arch="llama", vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2,
                            num_heads=6, num_kv_heads=2, head_dim=8, eos_token_ids=(2,), bos_token_id=1,
                            max_position_embeddings=512)
SEQ = 64  # the engine's max_seq_len; every prompt <= 16 tokens, so generate's references share one bucket
SAMPLED = dict(temperature=0.9, top_k=20, top_p=0.9)
LAYOUTS = ("stacked", "per_layer")


def host_params(cfg, seed=0, head_scale=4.0):
    """Random params drawn with numpy (no compilation); a scaled head gives peaked distributions."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        x = 1.0 + 0.1 * rng.standard_normal(shape) if "norm" in name else 0.08 * rng.standard_normal(shape)
        if name == "['lm_head']":
            x = x * head_scale
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def model():
    """The reference model: a stacked runtime (``generate`` on it gives every reference)."""
    m = Model(CFG, host_params(CFG), None)
    m.prepare(layout="stacked")
    return m


@pytest.fixture(scope="module")
def models(model):
    """The same params served in each runtime layout."""
    per_layer = Model(CFG, model.params, None)
    per_layer.prepare(layout="per_layer")
    return {"stacked": model, "per_layer": per_layer}


def weights_of(rt):
    """The runtime's ``Weight`` leaves of its first layer (stacked: of every layer at once)."""
    layer = rt.layers if rt.stacked else rt.layers[0]
    return [w for w in layer.values() if isinstance(w, Weight)]


@pytest.fixture(scope="module")
def adapters():
    return {"a": lora.init_adapter(CFG, 11, rank=4, b_std=0.4), "b": lora.init_adapter(CFG, 12, rank=4, b_std=0.4)}


@pytest.fixture(scope="module")
def engines(models, adapters):
    """{layout: a warm engine serving that layout's model}, built on first use."""
    built = {}

    def get(layout):
        if layout not in built:
            eng = Engine(models[layout], max_slots=4, max_seq_len=SEQ, prefill_buckets=(8, 16), prefill_batch=(1, 3),
                         decode_steps_per_call=3, max_stop_ids=4, adapters=adapters)
            eng.warmup()
            built[layout] = eng
        return built[layout]

    return get


@pytest.fixture(scope="module")
def engine(engines):
    return engines("stacked")


def reference(model, adapters, prompt, n, adapter=None, stop_ids=(), **sampling):
    """``generate`` on this request alone (a single adapter, not the engine's stack)."""
    ad = None if adapter is None else adapters[adapter]
    r = generate(model, [prompt], n, stop_ids=list(stop_ids), adapters=ad, **sampling)
    return r.tokens[0], r.finish_reasons[0]


def make_workload(model, adapters, count, seed):
    """Requests with prompts of 1..16 tokens, 1..40 new tokens, mixed adapters, some sampled, some
    with a stop id that their reference emits mid-way; with their references."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(count):
        prompt = rng.integers(3, CFG.vocab_size, int(rng.integers(1, 17))).tolist()
        kw = dict(max_new_tokens=int(rng.integers(1, 41)), adapter=[None, "a", "b"][i % 3])
        if i % 4 == 1:
            kw.update(SAMPLED, seed=int(rng.integers(0, 2**31)))
        toks, _ = reference(model, adapters, prompt, kw["max_new_tokens"], kw["adapter"],
                            **{k: kw[k] for k in ("temperature", "top_k", "top_p", "seed") if k in kw})
        if i % 3 == 2 and len(toks) > 3:
            j = len(toks) // 2
            kw["stop_ids"] = [toks[j], 0]
        else:
            kw["stop_ids"] = []
        ref = reference(model, adapters, prompt, kw["max_new_tokens"], kw["adapter"], kw["stop_ids"],
                        **{k: kw[k] for k in ("temperature", "top_k", "top_p", "seed") if k in kw})
        reqs.append((dict(prompt=prompt, **kw), ref))
    return reqs


def submit(engine, req):
    req = dict(req)
    return engine.submit(req.pop("prompt"), req.pop("max_new_tokens"), **req)


# ------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("layout", LAYOUTS)
def test_workload_over_time_equals_generate_alone_without_recompiling(model, adapters, engines, layout):
    engine = engines(layout)
    assert engine._params.stacked == (layout == "stacked")
    work = make_workload(model, adapters, 12, seed=0)
    assert {r[1][1] for r in work} == {"stop", "length"}
    assert any(r[0].get("temperature") for r in work)
    before = engine.stats()
    handles = []
    with CompileCounter() as cc:
        for req, _ in work[:5]:  # more than the 4 slots
            handles.append(submit(engine, req))
        engine.step()
        engine.step()
        assert engine.stats().active_slots > 0
        for req, _ in work[5:9]:
            handles.append(submit(engine, req))
        engine.step()
        for req, _ in work[9:]:
            handles.append(submit(engine, req))
        streamed = list(handles[-1].stream())  # drives the engine until the last one ends
        engine.run_until_idle()
    assert cc.count == 0, f"{cc.count} compilations after warm-up"
    for i, (h, (req, (toks, reason))) in enumerate(zip(handles, work)):
        r = h.result()
        assert isinstance(r, RequestResult)
        assert r.tokens == toks, f"request {i} ({req})"
        assert r.finish_reason == reason, f"request {i}"
        assert r.prompt_length == len(req["prompt"]) and r.text is None
    assert streamed == handles[-1].result().tokens
    st = engine.stats()
    assert st.completed - before.completed == len(work)  # each answered once
    assert st.queue_length == 0 and st.active_slots == 0
    assert st.generated_tokens - before.generated_tokens == sum(len(t) for _, (t, _) in work)
    assert st.prefill_calls - before.prefill_calls >= len(work) / 3  # at most 3 prompts per prefill call
    assert 0 < st.mean_occupancy <= 1 and st.tokens_per_s > 0
    assert all(h.ttft is not None and 0 < h.ttft <= h.latency for h in handles)
    assert st.ttft_p50_s is not None and st.latency_p90_s >= st.latency_p50_s
    assert 0 < st.dispatch_s and 0 <= st.wait_s and st.dispatch_s + st.wait_s <= st.busy_s  # parts of the loop's time


PROCESSORS = [
    dict(repetition_penalty=1.8),
    dict(frequency_penalty=1.2, presence_penalty=0.5),
    dict(logit_bias={7: 3.0, 11: -2.0}),
    dict(min_tokens=5),
    dict(temperature=0.9, min_p=0.2, seed=5),
    dict(repetition_penalty=0.7, temperature=0.8, top_k=10, seed=9, logit_bias={3: 1.5}),
    dict(),
]


def test_per_request_processors_equal_generate_alone_without_recompiling(model, adapters, engine):
    """Rows with penalties, logit bias, min_tokens and min-p share slots with plain rows; each
    request equals ``generate`` on it alone, and the warm engine compiles nothing."""
    rng = np.random.default_rng(3)
    reqs = []
    for i, settings in enumerate(PROCESSORS * 2):
        prompt = rng.integers(3, CFG.vocab_size, int(rng.integers(2, 15))).tolist()
        adapter = [None, "a"][i % 2]
        plain, _ = reference(model, adapters, prompt, 12, adapter)
        stop = [plain[1]] if "min_tokens" in settings else []  # a stop id min_tokens must hold back
        ref = reference(model, adapters, prompt, 12, adapter, stop, **settings)
        reqs.append((dict(prompt=prompt, max_new_tokens=12, adapter=adapter, stop_ids=stop, **settings), ref))
    with CompileCounter() as cc:
        handles = [submit(engine, r) for r, _ in reqs]
        engine.run_until_idle()
    assert cc.count == 0
    for h, (_, ref) in zip(handles, reqs):
        assert (h.result().tokens, h.result().finish_reason) == ref
    assert reqs[3][1][0] != reference(model, adapters, reqs[3][0]["prompt"], 12, None, reqs[3][0]["stop_ids"])[0]


def test_stream_yields_the_result_tokens_in_order(model, adapters, engine):
    req, (toks, _) = make_workload(model, adapters, 1, seed=5)[0]
    h = submit(engine, dict(req, max_new_tokens=25, stop_ids=[]))
    got = []
    for t in h.stream():
        got.append(t)
        if len(got) == 1:
            assert not h.done  # tokens arrive before the request ends (3 decode steps per call)
    assert got == h.result().tokens and len(got) == 25


def test_generate_many_returns_a_generation_result(model, adapters, engine):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 61, n).tolist() for n in (3, 15, 8, 1, 12, 6)]
    res = engine.generate_many([{"prompt": p, "adapter": "b"} if i % 2 else p for i, p in enumerate(prompts)],
                               max_new_tokens=9, stop_ids=[])
    assert isinstance(res, realm_jax.GenerationResult) and len(res) == 6
    for i, p in enumerate(prompts):
        toks, reason = reference(model, adapters, p, 9, "b" if i % 2 else None)
        assert res.tokens[i] == toks and res.finish_reasons[i] == reason
    assert res.prompt_lengths == [len(p) for p in prompts]


# ------------------------------------------------------------------------------ pipelining


def _prompts(seed, n):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 61, int(k)).tolist() for k in rng.integers(1, 17, n)]


def test_a_slot_whose_budget_ends_in_the_call_in_flight_is_refilled_without_idling(model):
    """One slot, 3 steps per call: the host dispatches call N + 1 before it has call N's tokens,
    yet a request whose budget runs out within call N hands its slot to the next one in time, so
    every decode call runs a live row; each request still gets exactly its own tokens."""
    eng = Engine(model, max_slots=1, max_seq_len=SEQ, prefill_buckets=(16,), prefill_batch=1, decode_steps_per_call=3)
    news = [7, 1, 3, 4, 2, 9, 5]
    prompts = _prompts(11, len(news))
    refs = [reference(model, None, p, n) for p, n in zip(prompts, news)]
    hs = [eng.submit(p, n, stop_ids=[]) for p, n in zip(prompts, news)]
    eng.run_until_idle()
    for i, (h, ref) in enumerate(zip(hs, refs)):
        assert (h.result().tokens, h.result().finish_reason) == ref, f"request {i}"
    st = eng.stats()
    # the first token comes from the prefill; the other n - 1 take ceil((n - 1) / 3) calls
    assert st.decode_calls == sum(-(-(n - 1) // 3) for n in news)
    assert st.mean_occupancy == 1.0
    assert st.generated_tokens == sum(news) and st.completed == len(news)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_n_samples_with_an_adapter_equal_generate_n(model, adapters, engines, layout):
    """A group of 4 on an engine of at most 3 prefill rows spans two calls (the prompt prefilled
    once in each); each layout's cache copies, with the group's adapter: ``generate(..., n=4)``."""
    engine = engines(layout)
    prompt = [7, 30, 12, 5, 9]
    ref = generate(model, [prompt], 10, stop_ids=[], adapters=adapters["b"], n=4, seed=3, **SAMPLED)
    calls = engine.stats().prefill_calls
    with CompileCounter() as cc:
        g = engine.submit(prompt, 10, stop_ids=[], adapter="b", n=4, seed=3, **SAMPLED)
        engine.run_until_idle()
    assert cc.count == 0
    assert engine.stats().prefill_calls == calls + 2
    assert [r.tokens for r in g.results()] == ref.tokens
    assert len(set(map(tuple, ref.tokens))) > 1  # the samples differ


def test_admission_is_first_come_first_served_and_groups_similar_lengths(model):
    """Four slots, six waiting prompts: the four that came first are admitted (not the shortest),
    and they share prefill calls by length, so the short pair takes the small bucket."""
    eng = Engine(model, max_slots=4, max_seq_len=SEQ, prefill_buckets=(8, 16), prefill_batch=2)
    lengths = [15, 3, 14, 2, 1, 1]
    hs = [eng.submit(list(range(3, 3 + n)), 2, stop_ids=[]) for n in lengths]
    with eng._lock:
        groups, _ = eng._plan()
    assert [[h.prompt_length for h in g] for _, _, g in groups] == [[2, 3], [14, 15]]
    assert [eng._admission(rows, slots, g)[0].shape for rows, slots, g in groups] == [
        (2, 8 + eng.stop_width + eng.bias_width + 9), (2, 16 + eng.stop_width + eng.bias_width + 9)]
    assert list(eng._queue) == hs[4:]


def test_a_slot_that_ends_by_a_stop_id_idles_for_one_call_only(model):
    """A stop id is seen one call late: the slot idles through that one call, no more, and the
    stopped request gets no token past its stop id."""
    eng = Engine(model, max_slots=1, max_seq_len=SEQ, prefill_buckets=(16,), prefill_batch=1, decode_steps_per_call=3)
    p1, p2 = _prompts(12, 2)
    free = reference(model, None, p1, 30)[0]
    j = next(i for i in range(4, 30) if free[i] not in free[:i])  # a token first emitted at index j >= 4
    ref1 = reference(model, None, p1, 30, stop_ids=[free[j]])
    ref2 = reference(model, None, p2, 8)
    assert ref1 == (free[:j + 1], "stop")
    h1 = eng.submit(p1, 30, stop_ids=[free[j]])
    h2 = eng.submit(p2, 8, stop_ids=[])
    eng.run_until_idle()
    assert (h1.result().tokens, h1.result().finish_reason) == ref1
    assert (h2.result().tokens, h2.result().finish_reason) == ref2
    st = eng.stats()
    busy = -(-j // 3) + -(-7 // 3)  # calls with a live row: tokens 1..j of request 1, 1..7 of request 2
    assert st.decode_calls == busy + 1
    assert st.mean_occupancy == pytest.approx(busy / (busy + 1))


def test_seeds_above_int32_survive_the_admission_table(model, adapters, engine):
    """Settings travel to the device in an int32 table: a uint32 seed >= 2**31 keeps its bits."""
    prompt = [7, 30, 12]
    hs = [engine.submit(prompt, 12, stop_ids=[], seed=s, **SAMPLED) for s in (2**32 - 3, 2**31 + 5)]
    engine.run_until_idle()
    for h, s in zip(hs, (2**32 - 3, 2**31 + 5)):
        assert h.result().tokens == reference(model, adapters, prompt, 12, seed=s, **SAMPLED)[0]
    assert hs[0].result().tokens != hs[1].result().tokens


# ------------------------------------------------------------------------------ cancellation


def test_cancel_frees_the_slot_and_loses_no_other_request(model, adapters, engine):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 61, int(n)).tolist() for n in rng.integers(1, 17, 7)]
    refs = [reference(model, adapters, p, 30) for p in prompts]
    with CompileCounter() as cc:
        hs = [engine.submit(p, 30, stop_ids=[]) for p in prompts]
        engine.step()
        st = engine.stats()
        assert st.active_slots == 4 and st.queue_length == 3 == engine.queue_length
        running, queued = hs[1], hs[6]
        assert running.cancel() and queued.cancel()
        assert not running.cancel()  # already ended
        st = engine.stats()
        assert st.active_slots == 3 and st.queue_length == 2  # the slot is free at once
        engine.step()
        st = engine.stats()
        assert st.queue_length == 1 == engine.queue_length and st.active_slots == 4  # refilled from the queue
        engine.run_until_idle()
    assert cc.count == 0
    for i, h in enumerate(hs):
        r = h.result()
        if h in (running, queued):
            assert r.finish_reason == "cancelled"
            assert r.tokens == refs[i][0][:len(r.tokens)]
        else:
            assert (r.tokens, r.finish_reason) == refs[i], f"request {i}"
    assert queued.result().tokens == [] and 1 <= len(running.result().tokens) < 30
    assert list(running.stream()) == running.result().tokens


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[5] * 16, max_new_tokens=49), "over the cache length max_len=64"),
    (dict(prompt=[5] * 17, max_new_tokens=4), "longest prompt bucket 16"),
    (dict(prompt=[5, 61, 7], max_new_tokens=4), "token id 61 at position 1 is outside the vocabulary"),
    (dict(prompt=[5, -1], max_new_tokens=4), "token id -1"),
    (dict(prompt=[], max_new_tokens=4), "empty"),
    (dict(prompt="text", max_new_tokens=4), "no tokenizer"),
    (dict(prompt=[5, 6], max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(prompt=[5, 6], max_new_tokens=4, adapter="c"), "adapter: unknown name 'c'"),
    (dict(prompt=[5, 6], max_new_tokens=4, temperature=-0.5), "temperature"),
    (dict(prompt=[5, 6], max_new_tokens=4, top_p=0.0), "top_p"),
    (dict(prompt=[5, 6], max_new_tokens=4, top_k=2.5), "top_k"),
    (dict(prompt=[5, 6], max_new_tokens=4, seed=-3), "seed"),
    (dict(prompt=[5, 6], max_new_tokens=4, stop_ids=[61]), "stop_ids"),
    (dict(prompt=[5, 6], max_new_tokens=4, stop_ids=[3, 4, 5, 6, 7]), "max_stop_ids=4"),
    (dict(prompt=[5, 6], max_new_tokens=4, min_p=-1), "min_p"),
    (dict(prompt=[5, 6], max_new_tokens=4, logit_bias={i: 1.0 for i in range(3, 12)}), "max_logit_bias=8"),
    (dict(prompt=[5, 6], max_new_tokens=4, logprobs=2), "logprobs: this engine was built without max_logprobs"),
    (dict(prompt=[5, 6], max_new_tokens=4, n=2, best_of=3), "best_of: needs an engine built with max_logprobs"),
    (dict(prompt=[5, 6], max_new_tokens=4, n=5), "n: expected at most the engine's max_slots=4"),
])
def test_bad_input_is_rejected_for_that_request_only(model, adapters, engine, kwargs, match):
    good = [3, 9, 27, 4]
    ref = reference(model, adapters, good, 6, "a")
    before = engine.stats()
    with CompileCounter() as cc:
        h1 = engine.submit(good, 6, stop_ids=[], adapter="a")
        with pytest.raises(RealmError, match=match):
            submit(engine, kwargs)
        h2 = engine.submit(good, 6, stop_ids=[], adapter="a")
        engine.run_until_idle()
    assert cc.count == 0
    assert (h1.result().tokens, h1.result().finish_reason) == ref == (h2.result().tokens, h2.result().finish_reason)
    st = engine.stats()
    assert st.rejected == before.rejected + 1 and st.submitted == before.submitted + 2


def test_bad_engine_settings_are_rejected(model, adapters):
    with pytest.raises(RealmError, match="max_slots"):
        Engine(model, max_slots=0)
    with pytest.raises(RealmError, match="max_seq_len"):
        Engine(model, max_seq_len=1000)  # over max_position_embeddings=512
    with pytest.raises(RealmError, match="prefill_buckets"):
        Engine(model, max_seq_len=64, prefill_buckets=(8, 128))
    with pytest.raises(RealmError, match="adapters\\['x'\\]"):
        Engine(model, max_seq_len=64, adapters={"x": {"layers": {}}})
    with pytest.raises(RealmError, match="k: expected"):
        Engine(model, max_seq_len=64, adapters=adapters, draft="lookup", k=0)
    with pytest.raises(RealmError, match="requests\\[1\\]"):
        Engine(model, max_seq_len=64).generate_many([[3, 4], {"prompt": [3], "max_new_tokens": 0}],
                                                    max_new_tokens=2)


# ------------------------------------------------------------------------------ threads


def test_background_loop_serves_submissions_from_many_threads(model, adapters, engine):
    work = make_workload(model, adapters, 9, seed=1)
    handles = [None] * len(work)

    def client(idx):
        for i in idx:
            handles[i] = submit(engine, work[i][0])

    with CompileCounter() as cc:
        engine.start()
        try:
            threads = [threading.Thread(target=client, args=(range(j, len(work), 3),)) for j in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            results = [h.result(timeout=120) for h in handles]
            engine.run_until_idle(timeout=120)
        finally:
            engine.stop()
    assert cc.count == 0
    for i, (r, (_, ref)) in enumerate(zip(results, work)):
        assert (r.tokens, r.finish_reason) == ref, f"request {i}"
    with pytest.raises(RealmError, match="background"):
        engine.start()
        try:
            engine.step()
        finally:
            engine.stop()


# ------------------------------------------------------------------------------ other layouts, drafts


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_serves_generate_alone_with_its_cache(models, model, adapters, layout):
    served = models[layout]
    eng = Engine(served, max_slots=3, max_seq_len=SEQ, prefill_buckets=(16,), decode_steps_per_call=4,
                 adapters=adapters)
    assert eng._params.stacked == (layout == "stacked") and eng._params.num_adapters == 2
    assert eng._state.dec.cache.per_layer == (layout == "per_layer")
    work = make_workload(model, adapters, 5, seed=2)
    handles = [submit(eng, req) for req, _ in work]
    eng.run_until_idle()
    for i, (h, (_, ref)) in enumerate(zip(handles, work)):
        assert (h.result().tokens, h.result().finish_reason) == ref, f"request {i}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_folded_adapters_serve_the_same_tokens(models, model, adapters, layout):
    """``fold_adapters=True`` (``runtime.prepare(..., fold=True)``) gives every request what
    ``generate`` gives it alone with its own adapter on the unfolded params, and holds folded
    weights (the model's own runtime stays unfolded)."""
    served = models[layout]
    eng = Engine(served, max_slots=3, max_seq_len=SEQ, prefill_buckets=(16,), decode_steps_per_call=4,
                 adapters=adapters, fold_adapters=True)
    rt = eng._params
    assert rt.folded and rt.num_adapters == 2 and rt.stacked == (layout == "stacked")
    assert any(w.rank for w in weights_of(rt)) and not any(w.rank for w in weights_of(served.runtime))
    assert not served.runtime.folded and served.runtime.num_adapters == 0
    work = make_workload(model, adapters, 6, seed=3)
    handles = [submit(eng, req) for req, _ in work]
    eng.run_until_idle()
    for i, (h, (_, ref)) in enumerate(zip(handles, work)):
        assert (h.result().tokens, h.result().finish_reason) == ref, f"request {i}"
    with pytest.raises(RealmError, match="fold_adapters: needs adapters, no draft"):
        Engine(served, max_slots=2, max_seq_len=SEQ, adapters=adapters, fold_adapters=True, draft="lookup")
    with pytest.raises(RealmError, match="fold_adapters: needs adapters, no draft"):
        Engine(served, max_slots=2, max_seq_len=SEQ, fold_adapters=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_speculative_engine_equals_generate_and_speculative_alone(models, model, layout):
    eng = Engine(models[layout], max_slots=3, max_seq_len=SEQ, prefill_buckets=(16,), decode_steps_per_call=2,
                 draft="self:1", k=3)
    eng.warmup()
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 61, int(n)).tolist() for n in rng.integers(1, 17, 5)]
    news = [int(n) for n in rng.integers(5, 40, 5)]
    refs = [reference(model, None, p, n) for p, n in zip(prompts, news)]
    sampled_ref = speculative_generate(model, "self:1", [prompts[0]], 20, k=3, stop_ids=[], seed=77, **SAMPLED)
    with CompileCounter() as cc:
        hs = [eng.submit(p, n, stop_ids=[]) for p, n in zip(prompts, news)]
        hs.append(eng.submit(prompts[0], 20, stop_ids=[], seed=77, **SAMPLED))
        eng.run_until_idle()
    assert cc.count == 0
    for i, (h, ref) in enumerate(zip(hs, refs)):
        assert (h.result().tokens, h.result().finish_reason) == ref, f"request {i}"
    assert hs[-1].result().tokens == sampled_ref.tokens[0]
    st = eng.stats()
    assert st.drafted > 0 and 0 <= st.accepted <= st.drafted
    # a pass commits 1..accepted + 1 tokens (fewer at a budget's end); the first token of a
    # request comes from its prefill
    assert st.target_passes + len(hs) <= st.generated_tokens <= st.target_passes + st.accepted + len(hs)
    with pytest.raises(RealmError, match=r"repetition_penalty: not served by the engine with a draft yet"):
        eng.submit(prompts[0], 4, repetition_penalty=1.2)


def test_speculative_engine_with_adapters_equals_generate_alone(model, adapters):
    """A draft and per-request LoRA adapters together: each greedy request equals ``generate``
    with its single adapter (the draft proposes from the base model; verification is exact)."""
    eng = Engine(model, max_slots=3, max_seq_len=SEQ, prefill_buckets=(16,), decode_steps_per_call=2,
                 adapters=adapters, draft="self:1", k=2)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 61, int(n)).tolist() for n in rng.integers(1, 17, 5)]
    names = [None, "a", "b", "a", "b"]
    news = [int(n) for n in rng.integers(5, 30, 5)]
    hs = [eng.submit(p, n, stop_ids=[], adapter=a) for p, n, a in zip(prompts, news, names)]
    eng.run_until_idle()
    for i, (h, p, n, a) in enumerate(zip(hs, prompts, news, names)):
        assert (h.result().tokens, h.result().finish_reason) == reference(model, adapters, p, n, a), f"request {i}"


# ------------------------------------------------------------------------------ insert_rows


@pytest.mark.parametrize("per_layer", [False, True])
def test_insert_rows_writes_rows_into_slots(per_layer):
    rng = np.random.default_rng(0)
    cache = init_cache(CFG, 4, 8, jnp.float32, per_layer=per_layer)
    rows = init_cache(CFG, 3, 5, jnp.float32, per_layer=per_layer)
    fill = lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32)  # noqa: E731
    cache = jax.tree_util.tree_map(fill, cache._replace(lengths=None))._replace(lengths=jnp.array([7, 6, 5, 4]))
    rows = jax.tree_util.tree_map(fill, rows._replace(lengths=None))._replace(lengths=jnp.array([5, 2, 3]))
    out = insert_rows(cache, rows, jnp.array([2, 4, 0]))  # 4: out of range, dropped
    stack = (lambda t: np.stack(t)) if per_layer else np.asarray
    ck, rk, ok = stack(cache.k), stack(rows.k), stack(out.k)
    want = ck.copy()
    want[:, 2, :5] = rk[:, 0]
    want[:, 0, :5] = rk[:, 2]
    np.testing.assert_array_equal(ok, want)
    np.testing.assert_array_equal(np.asarray(out.lengths), [3, 6, 5, 4])
