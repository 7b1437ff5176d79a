"""Fuzzing the validation layer with hypothesis: config dicts (HF config.json and GGUF metadata)
and the arguments of generate / sampling. Whatever comes in, the outcome is either a valid
model or run (finite logits, token ids in the vocabulary) or a ``RealmError``; never another
exception type, never NaN. Examples are few and tiny, so this stays fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import realm_jax
from realm_jax.config import ModelConfig
from realm_jax.errors import RealmError
from realm_jax.gguf import config_from_gguf
from realm_jax.loading import Model
from realm_jax.params import init_params, param_shapes
from realm_jax.sampling import SamplingParams

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# anything a JSON / metadata value could be, weighted towards the edges
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2 ** 31, 2 ** 63, 2 ** 70, -2 ** 70]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 2.0, 1e-5, 1e300]),
    st.text(max_size=4), st.sampled_from(["4", "float32", "foo", "llama", ""]),
    st.lists(st.integers(-2, 4), max_size=3), st.dictionaries(st.sampled_from(["rope_type", "factor"]),
                                                              st.sampled_from(["linear", "llama3", 2.0, 0]),
                                                              max_size=2))

BASE = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
EXTRA_KEYS = ["sliding_window", "rope_scaling", "attention_bias", "pad_token_id", "rope_parameters", "dtype",
              "mlp_bias", "hidden_act", "use_sliding_window"]
SMALL = st.integers(1, 16)  # sizes that still make a runnable model


def mostly(valid, bad=None, odds: int = 7):
    """``valid`` about ``odds`` times in ``odds + 1``, else ``bad`` (default: ``JUNK``)."""
    bad = JUNK if bad is None else bad
    return st.integers(0, odds).flatmap(lambda i: bad if i == 0 else valid)


@st.composite
def config_dicts(draw):
    """The base config with up to three keys changed: a small size, junk, or the key dropped."""
    d = dict(BASE)
    d["model_type"] = draw(mostly(st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]), st.sampled_from(
        ["gpt2", None, 3])))
    for key in draw(st.lists(st.sampled_from(list(BASE)[1:] + EXTRA_KEYS), max_size=3, unique=True)):
        action = draw(st.sampled_from(["small", "small", "junk", "drop"]))
        if action == "drop":
            d.pop(key, None)
        elif action == "small":
            d[key] = draw(SMALL)
        else:
            d[key] = draw(JUNK)
    return d


def _small_enough(cfg: ModelConfig) -> bool:
    return sum(math.prod(s) for s in _flat(param_shapes(cfg))) <= 200_000


def _flat(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _flat(v)
    else:
        yield tuple(tree)


def _run_forward(cfg: ModelConfig) -> None:
    """A valid config must give a runnable model with finite logits."""
    import jax.numpy as jnp

    from realm_jax.model import forward
    from realm_jax.runtime import prepare

    rt = prepare(init_params(cfg, 0), cfg)
    t = min(4, cfg.max_position_embeddings)
    tokens = jnp.asarray(np.arange(t)[None] % cfg.vocab_size, jnp.int32)
    logits = np.asarray(forward(rt, cfg, tokens, jnp.asarray([t], jnp.int32)))
    assert logits.shape == (1, t, cfg.vocab_size) and np.isfinite(logits).all()


@FAST
@given(config_dicts())
def test_config_dicts_give_a_model_or_a_realm_error(d):
    try:
        cfg = ModelConfig.from_hf_dict(d)
    except RealmError as e:
        assert str(e)  # a message, naming something
        event("refused")
        return
    event("valid")
    hash(cfg)  # static under jit
    assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.head_dim % 2 == 0
    if _small_enough(cfg):
        event("ran")
        _run_forward(cfg)


GGUF_BASE = {"general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": 16,
             "llama.feed_forward_length": 24, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
             "llama.context_length": 64, "llama.vocab_size": 64, "llama.attention.layer_norm_rms_epsilon": 1e-5,
             "llama.rope.freq_base": 10000.0}
GGUF_EXTRA = ["llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count",
              "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.expert_count", "split.count",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "general.file_type"]


@st.composite
def gguf_metadata(draw):
    m = dict(GGUF_BASE)
    for key in list(GGUF_BASE) + GGUF_EXTRA:
        action = draw(st.sampled_from(["keep", "keep", "junk", "drop"]))
        if action == "drop":
            m.pop(key, None)
        elif action == "junk":
            m[key] = draw(JUNK)
    return m


@settings(max_examples=150, deadline=None, derandomize=True)
@given(gguf_metadata())
def test_gguf_metadata_gives_a_config_or_a_realm_error(meta):
    try:
        cfg = config_from_gguf(meta, {}, "fuzz.gguf")
    except RealmError as e:
        assert str(e)
        return
    hash(cfg)
    assert cfg.vocab_size >= 1 and cfg.num_heads % cfg.num_kv_heads == 0


ARG = st.one_of(JUNK, st.floats(0, 2), st.integers(0, 40))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(1, 3), ARG, ARG, ARG, ARG)
def test_sampling_settings_are_numbers_in_range_or_a_realm_error(batch, temperature, top_k, top_p, seed):
    try:
        sp = SamplingParams.make_host(batch, temperature, top_k, top_p, seed)
    except RealmError:
        return
    assert all(np.isfinite(np.asarray(a, np.float64)).all() for a in sp[:4])
    assert (sp.temperature >= 0).all() and (sp.top_k >= 0).all() and ((sp.top_p > 0) & (sp.top_p <= 1)).all()


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8, max_position_embeddings=64, eos_token_ids=(2,))
    return Model(cfg, init_params(cfg, 0), None)


TOKEN = st.one_of(st.integers(0, 63), st.integers(-2, 70), st.sampled_from([2 ** 70, 1.5, True, "3", None]))
PROMPTS = mostly(st.lists(st.lists(st.integers(0, 63), min_size=1, max_size=5), min_size=1, max_size=2),
                 st.one_of(st.lists(st.lists(TOKEN, min_size=0, max_size=5), min_size=0, max_size=2), JUNK), odds=3)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(PROMPTS, mostly(st.integers(1, 3)), mostly(st.sampled_from([0.0, 0.7, 1.5])),
       mostly(st.sampled_from([None, 0, 5, 100])), mostly(st.sampled_from([None, 0.5, 1.0])),
       mostly(st.integers(0, 2 ** 32 - 1)), mostly(st.sampled_from([None, [], [2], [[2], [3, 4]]])))
def test_generate_arguments_give_tokens_or_a_realm_error(tiny, prompts, max_new, temperature, top_k, top_p, seed,
                                                          stop_ids):
    try:
        res = realm_jax.generate(tiny, prompts, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=seed, stop_ids=stop_ids)
    except RealmError as e:
        assert str(e)
        event("refused")
        return
    event("ran")
    assert len(res.tokens) == len(prompts)
    for row in res.tokens:
        assert row and all(isinstance(t, int) and 0 <= t < 64 for t in row)
