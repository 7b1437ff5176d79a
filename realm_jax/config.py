"""ModelConfig: a frozen, hashable description of a Llama-family model (static under jit).

Built from an HF ``config.json`` (``from_hf_dict``) for llama, mistral, qwen2, qwen3 (SmolLM2 is
llama), in both dialects: classic ``rope_theta``/``rope_scaling``/``torch_dtype`` and
transformers-5 ``rope_parameters``/``dtype``. GGUF metadata maps onto the same fields
(see ``gguf.py``). Anything we cannot honour raises ``UnsupportedModelError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from .errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters. Shape letters: V vocab, D width, F MLP width, L layers,
    N query heads, K kv heads, H head dim."""

    arch: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2; llama attention_bias=True
    o_bias: bool = False  # llama attention_bias=True
    qk_norm: bool = False  # qwen3: RMSNorm over H on q and k before rope
    sliding_window: int | None = None  # mistral: a query sees at most this many keys (itself incl.)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"  # the checkpoint's declared dtype (informational)

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def groups(self) -> int:  # G = N / K
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = d.get("architectures")
            raise UnsupportedModelError(
                f"config.json model_type {model_type!r} (architectures={archs}) is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if d.get("mlp_bias"):
            raise UnsupportedModelError("config.json mlp_bias=True is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"config.json hidden_act={d.get('hidden_act')!r} is not supported; supported: silu")
        if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
            raise UnsupportedModelError(f"{model_type} use_sliding_window=True (per-layer windows) is not supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedModelError(f"pretraining_tp={d['pretraining_tp']} is not supported")

        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // num_heads

        rope = _rope_from_hf(d)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))

        attention_bias = bool(d.get("attention_bias", False))
        sliding = d.get("sliding_window") if model_type == "mistral" else None
        return cls(
            arch=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=(model_type == "qwen2") or attention_bias,
            o_bias=attention_bias and model_type in ("llama", "mistral"),
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
            **rope,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise UnsupportedModelError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict:
        """An HF ``config.json`` (classic dialect) describing this model."""
        d = {
            "model_type": self.arch,
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.arch]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.dtype,
        }
        if self.arch in ("llama", "mistral"):
            d["attention_bias"] = self.o_bias
        if self.arch == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.rope_type == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_factor}
        elif self.rope_type == "llama3":
            d["rope_scaling"] = {
                "rope_type": "llama3", "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor, "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_positions,
            }
        return d


def _rope_from_hf(d: Mapping[str, Any]) -> dict:
    """Rope settings from either dialect: classic (rope_theta + rope_scaling) or
    transformers 5 (rope_parameters holding rope_theta and the scaling keys)."""
    params = d.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:  # per-layer-type dict
        params = params["full_attention"]
    scaling = d.get("rope_scaling")
    theta = d.get("rope_theta")
    if isinstance(params, Mapping):
        theta = params.get("rope_theta", theta)
        scaling = params if scaling is None else scaling
    theta = float(theta if theta is not None else 10000.0)
    out: dict = {"rope_theta": theta}
    if not scaling:
        return out
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rtype!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    out["rope_type"] = rtype
    if rtype in ("linear", "llama3"):
        out["rope_factor"] = float(scaling["factor"])
    if rtype == "llama3":
        out["rope_low_freq_factor"] = float(scaling["low_freq_factor"])
        out["rope_high_freq_factor"] = float(scaling["high_freq_factor"])
        out["rope_original_max_positions"] = int(scaling["original_max_position_embeddings"])
    return out
