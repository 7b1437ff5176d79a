"""Adapters loaded and unloaded while the engine serves: every request equals ``generate`` with
its adapter alone (a single adapter, not the engine's stack), before and after each change, and
no change recompiles anything; an adapter that does not fit is refused with a clear error."""

import numpy as np
import pytest

import realm_jax
from realm_jax import lora
from realm_jax.engine import Engine
from realm_jax.errors import RealmError
from realm_jax.generation import generate
from realm_jax.loading import Model

from compile_counter import CompileCounter
from test_engine import CFG, host_params

OTHER = realm_jax.ModelConfig(arch="llama", vocab_size=61, hidden_size=32, intermediate_size=40, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(2,), bos_token_id=1,
                              max_position_embeddings=512)


@pytest.fixture(scope="module")
def model():
    m = Model(CFG, host_params(CFG, seed=3), None)
    m.prepare(layout="stacked")
    return m


def alone(model, prompt, adapter=None, **sampling):
    return generate(model, [prompt], 10, stop_ids=[], adapters=adapter, **sampling).tokens[0]


def test_load_and_unload_while_serving_equal_generate_without_recompiling(model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, CFG.vocab_size, int(n)).tolist() for n in rng.integers(2, 15, 6)]
    ads = {"a": lora.init_adapter(CFG, 1, rank=4, b_std=0.5),  # a rank and targets under the slots'
           "b": lora.init_adapter(CFG, 2, rank=8, targets=("wq", "wv", "w_down"), b_std=0.5),
           "c": lora.init_adapter(CFG, 3, rank=2, b_std=0.5)}
    eng = Engine(model, max_slots=3, max_seq_len=48, prefill_buckets=(16,), prefill_batch=(1, 3),
                 decode_steps_per_call=3, adapter_slots=2, adapter_rank=8)
    eng.warmup()
    assert eng.adapter_names == ()

    def sampling(j):
        return {} if j % 2 else dict(temperature=0.8, seed=j)

    want = {(j, name): alone(model, p, None if name is None else ads[name], **sampling(j))
            for j, p in enumerate(prompts) for name in (None, "a", "b", "c")}

    def check(names):
        hs = [(j, name, eng.submit(p, 10, stop_ids=[], adapter=name, **sampling(j)))
              for j, p in enumerate(prompts) for name in names]
        eng.run_until_idle(timeout=300)
        for j, name, h in hs:
            assert h.result().tokens == want[j, name], (name, j)

    with CompileCounter() as cc:
        check([None])
        assert eng.load_adapter("a", ads["a"]) == 0
        check([None, "a"])
        assert eng.load_adapter("b", ads["b"]) == 1
        assert eng.adapter_names == ("a", "b")
        with pytest.raises(RealmError, match="all 2 adapter slots are in use"):
            eng.load_adapter("c", ads["c"])
        h = eng.submit(prompts[0], 10, stop_ids=[], adapter="a", **sampling(0))
        with pytest.raises(RealmError, match="'a' is in use by 1 queued or running request"):
            eng.unload_adapter("a")
        eng.run_until_idle(timeout=300)
        assert h.result().tokens == want[0, "a"]
        assert eng.unload_adapter("a") == 0
        with pytest.raises(RealmError, match="unknown name 'a'"):
            eng.submit(prompts[0], 4, adapter="a")
        assert eng.load_adapter("c", ads["c"]) == 0
        check(["c", "b", None])
    assert cc.count == 0
    assert all(want[j, "c"] != want[j, None] for j in range(len(prompts)))  # the adapters matter


def test_adapters_that_do_not_fit_are_refused(model):
    eng = Engine(model, max_slots=1, max_seq_len=32, adapter_slots=2, adapter_rank=4, adapter_targets=("wq", "wv"))
    with pytest.raises(RealmError, match="rank 8 at wq is over the slots' rank 4"):
        eng.load_adapter("big", lora.init_adapter(CFG, 1, rank=8, targets=("wq",)))
    with pytest.raises(RealmError, match="targets wk, which the engine's adapter slots do not serve"):
        eng.load_adapter("wk", lora.init_adapter(CFG, 1, rank=4, targets=("wk",)))
    with pytest.raises(RealmError, match=r"expected shape \(2, 24, 4\) \(D_in=24, D_out=48, L=2\), got \(2, 32, 4\)"):
        eng.load_adapter("other", lora.init_adapter(OTHER, 1, rank=4, targets=("wq",)))
    with pytest.raises(RealmError, match="names must be non-empty strings"):
        eng.load_adapter("", lora.init_adapter(CFG, 1, rank=4, targets=("wq",)))
    eng.load_adapter("ok", lora.init_adapter(CFG, 1, rank=2, targets=("wv",)))
    with pytest.raises(RealmError, match="'ok' is already loaded"):
        eng.load_adapter("ok", lora.init_adapter(CFG, 1, rank=2, targets=("wv",)))
    with pytest.raises(RealmError, match="unknown name 'nope'"):
        eng.unload_adapter("nope")
    plain = Engine(model, max_slots=1, max_seq_len=32)
    with pytest.raises(RealmError, match="serves no adapter slots"):
        plain.load_adapter("x", lora.init_adapter(CFG, 1, rank=2))
    with pytest.raises(RealmError, match="adapter_rank: expected an integer >= the given adapters' largest rank 4"):
        Engine(model, max_slots=1, max_seq_len=32, adapters={"a": lora.init_adapter(CFG, 1, rank=4)}, adapter_rank=2)
