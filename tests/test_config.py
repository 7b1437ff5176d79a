"""ModelConfig from HF config.json: both dialects agree, head_dim, hashing / static jit use."""

import dataclasses
from functools import partial

import jax
import pytest

from realm_jax.config import ModelConfig
from realm_jax.errors import ConfigError

from hf_reference import ARCH_CASES, hf_config


def _transformers5(case) -> dict:
    """config.json as transformers 5 writes it: rope_parameters (holding rope_theta) and dtype."""
    model_type, over = ARCH_CASES[case]
    d = hf_config(model_type, **over).to_dict()
    assert "rope_parameters" in d and d.get("rope_theta") is None and d.get("rope_scaling") is None
    d["dtype"] = "bfloat16"
    return d


def _classic(d5: dict) -> dict:
    """The same config in the pre-v5 dialect most published checkpoints use:
    top-level rope_theta, rope_scaling (absent for plain rope) and torch_dtype."""
    d = {k: v for k, v in d5.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(_global_rope(d5))
    if "sliding_attention" in d5["rope_parameters"]:  # gemma3: per layer type; local rope is plain
        d["rope_local_base_freq"] = d5["rope_parameters"]["sliding_attention"]["rope_theta"]
    d["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        d["rope_scaling"] = rope
    d["torch_dtype"] = d5["dtype"]
    return d


def _global_rope(d5: dict) -> dict:
    """The rope parameters of the global (full-attention) layers."""
    return d5["rope_parameters"].get("full_attention", d5["rope_parameters"])


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_both_dialects_give_the_same_config(case):
    d5 = _transformers5(case)
    cfg = ModelConfig.from_hf_dict(d5)
    assert ModelConfig.from_hf_dict(_classic(d5)) == cfg
    # and the fields say what the HF config says
    assert (cfg.arch, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size) == \
        (d5["model_type"], d5["num_attention_heads"], d5["num_key_value_heads"], d5["hidden_size"])
    rope = _global_rope(d5)
    assert cfg.dtype == "bfloat16" and cfg.rope_theta == rope["rope_theta"]
    assert cfg.rope_type == rope.get("rope_type", "default")
    if cfg.rope_type in ("linear", "llama3"):
        assert cfg.rope_factor == rope["factor"]
    if cfg.rope_type == "longrope":
        assert (cfg.rope_short_factor, cfg.rope_long_factor, cfg.rope_original_max_positions) == \
            (tuple(rope["short_factor"]), tuple(rope["long_factor"]), rope["original_max_position_embeddings"])
    if cfg.rope_type == "llama3":
        assert (cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_positions) == \
            (rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"])
    windowed = d5["model_type"] in ("mistral", "gemma2", "gemma3_text", "mixtral", "phi3")
    assert cfg.sliding_window == (d5["sliding_window"] if windowed else None)
    if d5.get("layer_types"):
        assert cfg.layer_local == tuple(t == "sliding_attention" for t in d5["layer_types"])
    assert cfg.qkv_bias == (d5["model_type"] in ("qwen2", "qwen2_moe"))
    assert cfg.qk_norm == (d5["model_type"] in ("qwen3", "gemma3_text", "qwen3_moe"))
    experts = d5.get("num_local_experts") or d5.get("num_experts") or 0
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (experts, d5.get("num_experts_per_tok", 0) if experts else 0)
    assert cfg.shared_expert == (d5["model_type"] == "qwen2_moe")
    assert cfg.tie_word_embeddings == d5["tie_word_embeddings"]


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_to_hf_dict_round_trips_through_transformers(case):
    """to_hf_dict() is read back by transformers and by us to the same config."""
    import transformers

    cfg = ModelConfig.from_hf_dict(_transformers5(case))
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    d = cfg.to_hf_dict()
    hf = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    assert ModelConfig.from_hf_dict(hf.to_dict()).replace(dtype=cfg.dtype) == cfg


def test_explicit_head_dim():
    """head_dim given in config.json wins over hidden_size / num_heads; absent, it is their ratio."""
    d = _transformers5("qwen3_qknorm")  # D=30, N=6, head_dim=16
    assert ModelConfig.from_hf_dict(d).head_dim == 16
    three = {**d, "head_dim": None, "num_attention_heads": 3, "num_key_value_heads": 3}
    assert ModelConfig.from_hf_dict(three).head_dim == 10
    with pytest.raises(ConfigError, match=r"head dim must be even.*got 5"):  # 30 / 6: rotary needs pairs
        ModelConfig.from_hf_dict({**d, "head_dim": None})
    d = _transformers5("qwen2_bias")  # no head_dim key: D=30 / N=3
    assert "head_dim" not in d or d["head_dim"] is None
    assert ModelConfig.from_hf_dict(d).head_dim == 10


def test_hashable_static_jit_argument():
    """Equal configs built separately hash equal, so a jitted function traces once for both;
    a different config retraces. The config is frozen."""
    d = _transformers5("llama_gqa_llama3_untied")
    a, b = ModelConfig.from_hf_dict(d), ModelConfig.from_hf_dict(dict(d))
    assert a is not b and a == b and hash(a) == hash(b)
    traces = []

    @partial(jax.jit, static_argnums=1)
    def scale(x, cfg):
        traces.append(cfg)
        return x * cfg.head_dim

    assert float(scale(1.0, a)) == 8.0 and float(scale(2.0, b)) == 16.0
    assert len(traces) == 1
    assert float(scale(1.0, a.replace(head_dim=4))) == 4.0 and len(traces) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.head_dim = 3
    assert len({a, b, a.replace(rope_theta=5.0)}) == 2
