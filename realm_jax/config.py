"""ModelConfig: a frozen, hashable description of a decoder-only model (static under jit).

Built from an HF ``config.json`` (``from_hf_dict``) for llama, mistral, qwen2, qwen3 (SmolLM2 is
llama), gemma, gemma2, gemma3_text, phi3 and the mixture-of-experts families mixtral, qwen2_moe
and qwen3_moe, in both dialects: classic ``rope_theta``/``rope_scaling``/
``torch_dtype`` and transformers-5 ``rope_parameters``/``dtype``. A family is a set of feature
fields (``hidden_act``, ``norm_plus_one``, ``post_norms``, soft-caps, per-layer sliding windows,
...), read by the one forward; ``gemma_fields`` maps the Gemma keys onto them, ``phi3_fields``
Phi-3's (longrope, partial rotary) and ``moe_fields`` the mixture-of-experts keys (expert count,
top-k, expert width, shared expert). GGUF metadata
maps onto the same fields (see ``gguf.py``). Anything we cannot honour raises ``UnsupportedModelError`` naming it.

Validation happens here, on the host, before any tensor is read: every key of a config.json is
checked for presence, type and range (``check_int`` / ``check_float`` / ``check_bool`` /
``check_token_id`` / ``check_dtype_name``), and so is every field of a ``ModelConfig`` however
it was built. A problem is a ``ConfigError`` naming the file, the key, what was expected and
what was given (e.g. a hidden size that the heads do not divide, 0 heads, a string where a
number belongs, ``sliding_window <= 0``, a special token id outside the vocabulary).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np

from .errors import CheckpointError, ConfigError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                           "mixtral", "qwen2_moe", "qwen3_moe", "phi3")
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3_text")
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
              "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM"}
ACTIVATIONS = ("silu", "gelu_tanh")  # the MLP gate: SwiGLU, GeGLU with the tanh approximation
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# older names of longrope in Phi-3 configs (transformers' Phi3Config reads them as longrope too)
ROPE_TYPE_ALIASES = {"phi3": {"su": "longrope", "yarn": "longrope"}}
INT_LIMIT = 2 ** 31  # sizes, positions and token ids are int32 on the device

_MISSING = object()


# ---------------------------------------------------------------------------- value checks
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _shown(v) -> str:
    text = repr(v)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(v).__name__})" if isinstance(v, str) else text


def check_int(where: str, v, *, low: int = 1, high: int = INT_LIMIT) -> int:
    """``v`` as an int in ``[low, high)``, else ``ConfigError`` naming ``where`` (the file and key)."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if not _is_int(v) or not low <= int(v) < high:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigError(f"{where}: expected {what}" + (f" below {high}" if high != INT_LIMIT else "")
                          + f", got {_shown(v)}")
    return int(v)


def check_float(where: str, v, *, positive: bool = True) -> float:
    """``v`` as a finite float (> 0 with ``positive``) that float32 can hold, else ``ConfigError``."""
    ok = _is_number(v) and math.isfinite(float(v)) and abs(float(v)) < 3.4e38 and (not positive or float(v) > 0)
    if not ok:
        raise ConfigError(f"{where}: expected a finite {'positive ' if positive else ''}number, got {_shown(v)}")
    return float(v)


def check_bool(where: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ConfigError(f"{where}: expected true or false, got {_shown(v)}")
    return bool(v)


def check_token_id(where: str, v, vocab_size: int) -> int:
    """A special token id: an integer in [0, vocab_size)."""
    if not _is_int(v) or not 0 <= int(v) < vocab_size:
        raise ConfigError(f"{where}: expected a token id in [0, {vocab_size}) (the vocabulary), got {_shown(v)}")
    return int(v)


def check_factors(where: str, v, count: int) -> tuple[float, ...]:
    """A list of ``count`` finite positive numbers (longrope's per-frequency factors) as a tuple."""
    if not isinstance(v, (list, tuple)) or len(v) != count or not all(
            _is_number(x) and math.isfinite(float(x)) and 0 < float(x) < 3.4e38 for x in v):
        got = f"{len(v)} entries" if isinstance(v, (list, tuple)) else _shown(v)
        raise ConfigError(f"{where}: expected a list of {count} positive numbers (one a rotated pair), got {got}")
    return tuple(float(x) for x in v)


def check_dtype_name(where: str, v) -> str:
    """A floating-point dtype name (float32, bfloat16, float16, ...)."""
    import jax.numpy as jnp

    try:
        ok = isinstance(v, str) and jnp.issubdtype(jnp.dtype(v), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(f"{where}: expected a floating-point dtype name such as 'float32', 'bfloat16' or "
                          f"'float16', got {_shown(v)}")
    return str(v)


class _Keys:
    """Reads the keys of one mapping (a config.json, GGUF metadata), each check naming
    ``source`` and the key."""

    def __init__(self, d: Mapping[str, Any], source: str, prefix: str = ""):
        self.d, self.source, self.prefix = d, source, prefix

    def where(self, key: str) -> str:
        return f"{self.source}: key {self.prefix + key!r}"

    def get(self, key, default=_MISSING):
        v = self.d.get(key)
        if v is None:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: missing key {self.prefix + key!r} (required)")
            return default
        return v

    def int(self, key, default=_MISSING, **kw) -> int:
        v = self.get(key, default)
        return v if v is None else check_int(self.where(key), v, **kw)

    def float(self, key, default=_MISSING, **kw) -> float:
        v = self.get(key, default)
        return v if v is None else check_float(self.where(key), v, **kw)

    def bool(self, key, default) -> bool:
        return check_bool(self.where(key), self.get(key, default))


def head_dim_of(hidden: int, num_heads: int, head_dim, where: str) -> int:
    """The head dim: ``head_dim`` if given, else ``hidden / num_heads`` (which must divide)."""
    if head_dim is not None:
        return head_dim
    if hidden % num_heads:
        raise ConfigError(f"{where}: the hidden size {hidden} is not a multiple of the {num_heads} attention "
                          f"heads, and no head dim is given: the config is inconsistent")
    return hidden // num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters. Shape letters: V vocab, D width, F MLP width, L layers,
    N query heads, K kv heads, H head dim; for a mixture of experts E experts, k of them per
    token, each an MLP of width ``moe_intermediate_size``. F is the dense MLP's width: Qwen2-MoE's
    shared expert (``shared_expert``); a model whose MLP is experts only has no dense MLP
    (``dense_mlp`` is False) and F is informational."""

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
    rope_short_factor: tuple[float, ...] | None = None  # longrope: per-frequency divisors [R/2] (short sequences)
    rope_long_factor: tuple[float, ...] | None = None  # longrope: those of a sequence past rope_original_max_positions
    rope_attention_factor: float = 1.0  # longrope: cos and sin scaled by this (sqrt(1 + ln s / ln orig) by default)
    rotary_dim: int | None = None  # R: partial rotary, only the first R of each head's H dims rotate (None: all)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2; llama attention_bias=True
    o_bias: bool = False  # llama attention_bias=True
    qk_norm: bool = False  # qwen3: RMSNorm over H on q and k before rope
    sliding_window: int | None = None  # mistral: a query sees at most this many keys (itself incl.)
    sliding_layers: tuple[bool, ...] | None = None  # gemma2/3: which layers are local (window); None = all
    hidden_act: str = "silu"  # the MLP gate (ACTIVATIONS): silu (SwiGLU) or gelu_tanh (GeGLU, gemma)
    embed_scale: bool = False  # gemma: embeddings times sqrt(D), rounded to the params dtype
    norm_plus_one: bool = False  # gemma: every RMSNorm scales by (1 + w), multiplied in float32
    post_norms: bool = False  # gemma2/3: RMSNorm on the attention and MLP outputs before each residual add
    query_pre_attn_scalar: float | None = None  # gemma2/3: scores scaled by this ** -0.5 (None: H ** -0.5)
    attn_softcap: float | None = None  # gemma2: scores -> c * tanh(scores / c), before the mask
    final_softcap: float | None = None  # gemma2: logits -> c * tanh(logits / c)
    rope_local_theta: float | None = None  # gemma3: plain rope with this base on local layers
    num_experts: int = 0  # E: routed experts in every layer's MLP (0 = a dense model)
    num_experts_per_tok: int = 0  # k: experts each token is routed to (top-k of the router's softmax)
    moe_intermediate_size: int = 0  # each expert's MLP width
    norm_topk_prob: bool = False  # the k chosen probabilities renormalised to sum to 1 (mixtral: always)
    shared_expert: bool = False  # qwen2_moe: a dense MLP (width F) beside the experts, scaled by a sigmoid gate
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"  # the checkpoint's declared dtype (informational)

    def __post_init__(self):
        """Every field checked (``ConfigError`` naming it); numpy scalars become Python values
        and ``eos_token_ids`` a tuple, so the config stays hashable (static under jit)."""
        def where(name):
            return f"ModelConfig {name}"

        def put(name, value):
            object.__setattr__(self, name, value)
            return value

        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings", "rope_original_max_positions"):
            put(name, check_int(where(name), getattr(self, name)))
        for name in ("rms_norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                     "rope_attention_factor"):
            put(name, check_float(where(name), getattr(self, name)))
        self._check_rotary(where, put)
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm", "embed_scale", "norm_plus_one",
                     "post_norms", "norm_topk_prob", "shared_expert"):
            put(name, check_bool(where(name), getattr(self, name)))
        self._check_experts(where, put)
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta"):
            if getattr(self, name) is not None:
                put(name, check_float(where(name), getattr(self, name)))
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(f"{where('hidden_act')}: {self.hidden_act!r} is not supported; "
                                        f"supported: {', '.join(ACTIVATIONS)}")
        if self.sliding_layers is not None:
            flags = self.sliding_layers
            if not isinstance(flags, (tuple, list)) or len(flags) != self.num_layers:
                raise ConfigError(f"{where('sliding_layers')}: expected {self.num_layers} flags (one a layer), "
                                  f"got {_shown(flags)}")
            put("sliding_layers", tuple(check_bool(where("sliding_layers"), f) for f in flags))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{where('head_dim')}: expected an even number (rotary embeddings rotate pairs), "
                              f"got {self.head_dim}")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ConfigError(f"{where('rope_high_freq_factor')}: expected more than rope_low_freq_factor="
                              f"{self.rope_low_freq_factor} (llama3 rope scaling), got {self.rope_high_freq_factor}")
        if self.sliding_window is not None:
            put("sliding_window", check_int(where("sliding_window"), self.sliding_window))
        v = self.vocab_size
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                put(name, check_token_id(where(name), getattr(self, name), v))
        eos = self.eos_token_ids
        if _is_int(eos):
            eos = (eos,)
        if not isinstance(eos, (tuple, list)):
            raise ConfigError(f"{where('eos_token_ids')}: expected a tuple of token ids, got {_shown(eos)}")
        put("eos_token_ids", tuple(check_token_id(where("eos_token_ids"), i, v) for i in eos))
        if not isinstance(self.dtype, str):
            raise ConfigError(f"{where('dtype')}: expected a dtype name, got {_shown(self.dtype)}")

    def _check_rotary(self, where, put) -> None:
        """Partial rotary (an even ``rotary_dim`` in [2, H]) and longrope's factor lists: one
        positive number per rotated pair (R/2) each, present exactly when the type is longrope."""
        if self.rotary_dim is not None:
            r = put("rotary_dim", check_int(where("rotary_dim"), self.rotary_dim, high=self.head_dim + 1))
            if r % 2:
                raise ConfigError(f"{where('rotary_dim')}: expected an even number (rotary embeddings rotate pairs), "
                                  f"got {r}")
        for name in ("rope_short_factor", "rope_long_factor"):
            v = getattr(self, name)
            if self.rope_type != "longrope":
                if v is not None:
                    raise ConfigError(f"{where(name)}: only longrope rope scaling has factor lists; the rope type is "
                                      f"{self.rope_type!r}, got {_shown(v)}")
                continue
            put(name, check_factors(where(name), v, self.rope_dims // 2))

    def _check_experts(self, where, put) -> None:
        """The mixture-of-experts fields: all zero / off for a dense family; for a MoE family
        E >= 1, 1 <= k <= E and a positive expert width; a shared expert only beside experts."""
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            put(name, check_int(where(name), getattr(self, name), low=0))
        moe = self.arch in MOE_ARCHITECTURES
        if not moe:
            on = [n for n in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert")
                  if getattr(self, n)]
            if on:
                raise ConfigError(f"{where(on[0])}: {self.arch} is not a mixture-of-experts architecture "
                                  f"({', '.join(MOE_ARCHITECTURES)} are); expected 0 / False, got {getattr(self, on[0])!r}")
            return
        for name in ("num_experts", "moe_intermediate_size"):
            check_int(where(name), getattr(self, name))
        if self.shared_expert and self.arch != "qwen2_moe":
            raise ConfigError(f"{where('shared_expert')}: a gated shared expert is a qwen2_moe feature, not {self.arch}'s")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"{where('num_experts_per_tok')}: expected an integer in [1, num_experts="
                              f"{self.num_experts}], got {self.num_experts_per_tok}")

    @property
    def moe(self) -> bool:
        """The MLP has routed experts (``num_experts`` of them)."""
        return self.num_experts > 0

    @property
    def dense_mlp(self) -> bool:
        """The layer has a dense MLP (``w_gate`` / ``w_up`` / ``w_down``): every dense family, and
        Qwen2-MoE's shared expert."""
        return not self.moe or self.shared_expert

    @property
    def block_sparse_moe(self) -> bool:
        """The checkpoint names the experts' block ``block_sparse_moe`` and their weights w1 / w3 /
        w2 (Mixtral), not ``mlp`` and gate_proj / up_proj / down_proj (Qwen)."""
        return self.arch == "mixtral"

    @property
    def fused_checkpoint(self) -> bool:
        """The checkpoint holds q|k|v as one ``qkv_proj`` and gate|up as one ``gate_up_proj``
        (Phi-3; GGUF ``attn_qkv`` and a fused ``ffn_up``), split into the canonical leaves at load."""
        return self.arch == "phi3"

    @property
    def rope_dims(self) -> int:
        """R: the dims of each head that rotate (``rotary_dim``, else all H)."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def groups(self) -> int:  # G = N / K
        return self.num_heads // self.num_kv_heads

    @property
    def layer_local(self) -> tuple[bool, ...]:
        """Per layer: True for a local layer (``sliding_window`` and, with ``rope_local_theta``,
        the local rope). Without ``sliding_layers`` every layer is local iff there is a window."""
        if self.sliding_layers is not None:
            return self.sliding_layers
        return (self.sliding_window is not None,) * self.num_layers

    def window(self, local: bool) -> int | None:
        """The sliding window of a local (True) or global (False) layer; None = no window."""
        return self.sliding_window if local else None

    @property
    def attention_scale(self) -> float:
        """The factor on q . k: ``query_pre_attn_scalar ** -0.5``, else ``H ** -0.5``."""
        return (self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim) ** -0.5

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str | os.PathLike = "config.json") -> "ModelConfig":
        """From an HF ``config.json``'s contents. Every key is checked (type, range, consistency)
        and a problem is a ``ConfigError`` (or ``UnsupportedModelError``) naming ``source``, the
        key, what was expected and what was given."""
        source = str(source)
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object of settings, got {type(d).__name__}")
        k = _Keys(d, source)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = d.get("architectures")
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} (architectures={archs}) is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if k.bool("mlp_bias", False):
            raise UnsupportedModelError(f"{source}: mlp_bias=True is not supported")
        gemma = model_type in GEMMA_ARCHITECTURES
        if not gemma and d.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act={d.get('hidden_act')!r} is not supported; "
                                        f"supported: silu")
        if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and k.bool("use_sliding_window", False):
            raise UnsupportedModelError(f"{source}: {model_type} use_sliding_window=True (per-layer windows) "
                                        f"is not supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedModelError(f"{source}: pretraining_tp={d['pretraining_tp']} is not supported")

        vocab = k.int("vocab_size")
        hidden = k.int("hidden_size")
        num_heads = k.int("num_attention_heads")
        num_kv = k.int("num_key_value_heads", num_heads)
        if num_heads % num_kv:
            raise ConfigError(f"{k.where('num_attention_heads')}: {num_heads} heads are not a multiple of "
                              f"num_key_value_heads={num_kv}: the config is inconsistent")
        head_dim = head_dim_of(hidden, num_heads, k.int("head_dim", None),
                               f"{source}: keys 'hidden_size' and 'num_attention_heads'")

        def token(key):
            v = d.get(key)
            return None if v is None else check_token_id(k.where(key), v, vocab)

        eos = d.get("eos_token_id")
        eos_list = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
        eos_ids = tuple(check_token_id(k.where("eos_token_id"), i, vocab) for i in eos_list)
        pad = d.get("pad_token_id")
        if _is_int(pad) and pad < 0:  # some published configs say -1 for "no padding token"
            pad = None

        # mixtral and phi3 have no biases (whatever attention_bias says)
        attention_bias = k.bool("attention_bias", False) if model_type not in ("mixtral", "phi3") else False
        sliding = k.int("sliding_window", None) if model_type in ("mistral", "mixtral", "phi3") else None
        num_layers = k.int("num_hidden_layers")
        if gemma:
            family = gemma_fields(d, k, model_type, num_layers)
        elif model_type == "phi3":
            family = phi3_fields(d, k, head_dim)
        else:
            family = {"rope": _rope_from_hf(d, source, model_type=model_type)}
        if model_type in MOE_ARCHITECTURES:
            family.update(moe_fields(d, k, model_type, num_layers))
        qkv_bias = k.bool("qkv_bias", True) if model_type == "qwen2_moe" else \
            (model_type == "qwen2") or attention_bias
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        dtype = check_dtype_name(k.where("dtype" if d.get("dtype") else "torch_dtype"), dtype)
        return cls(
            arch=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=family.pop("intermediate_size", None) or k.int("intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=check_even(k.where("head_dim") if "head_dim" in d else
                                f"{source}: keys 'hidden_size' / 'num_attention_heads'", head_dim),
            rms_norm_eps=k.float("rms_norm_eps", 1e-6),
            max_position_embeddings=k.int("max_position_embeddings", 4096),
            tie_word_embeddings=k.bool("tie_word_embeddings", gemma),
            qkv_bias=qkv_bias,
            o_bias=attention_bias and model_type in ("llama", "mistral", "qwen3", "qwen3_moe") + GEMMA_ARCHITECTURES,
            qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe"),
            sliding_window=family.pop("sliding_window", sliding),
            bos_token_id=token("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=None if pad is None else check_token_id(k.where("pad_token_id"), pad, vocab),
            dtype=dtype,
            **family.pop("rope"),
            **family,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        return cls.from_hf_dict(read_json(path, ConfigError), path)

    def to_hf_dict(self) -> dict:
        """An HF ``config.json`` (classic dialect) describing this model."""
        d = {
            "model_type": self.arch,
            "architectures": [HF_CLASSES[self.arch]],
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
        if self.arch in ("llama", "mistral", "qwen3", "qwen3_moe") + GEMMA_ARCHITECTURES:
            d["attention_bias"] = self.o_bias
        if self.arch in ("mistral", "mixtral", "phi3"):
            d["sliding_window"] = self.sliding_window
        if self.arch == "phi3":
            d["original_max_position_embeddings"] = self.rope_original_max_positions
            if self.rotary_dim is not None:
                d["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        if self.moe:
            d.update(num_experts_per_tok=self.num_experts_per_tok, moe_intermediate_size=self.moe_intermediate_size,
                     norm_topk_prob=self.norm_topk_prob)
            d["num_local_experts" if self.arch == "mixtral" else "num_experts"] = self.num_experts
        if self.arch == "mixtral":
            d["intermediate_size"] = d.pop("moe_intermediate_size")  # mixtral's experts are its MLP
            d.pop("norm_topk_prob")  # mixtral always renormalises
        elif self.moe:
            d.update(decoder_sparse_step=1, mlp_only_layers=[])
        if self.arch == "qwen2_moe":
            d.update(shared_expert_intermediate_size=self.intermediate_size, qkv_bias=self.qkv_bias)
        if self.arch in GEMMA_ARCHITECTURES:
            d.pop("hidden_act")
            d["hidden_act" if self.arch == "gemma" else "hidden_activation"] = "gelu_pytorch_tanh"
        if self.arch in ("gemma2", "gemma3_text"):
            scalar = self.query_pre_attn_scalar
            d.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                     sliding_window=self.sliding_window, attn_logit_softcapping=self.attn_softcap,
                     final_logit_softcapping=self.final_softcap,
                     layer_types=[LAYER_TYPES[0] if f else LAYER_TYPES[1] for f in self.layer_local])
        if self.arch == "gemma3_text":
            d["rope_local_base_freq"] = self.rope_local_theta
        if self.rope_type == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_factor}
        elif self.rope_type == "llama3":
            d["rope_scaling"] = {
                "rope_type": "llama3", "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor, "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_positions,
            }
        elif self.rope_type == "longrope":
            d["rope_scaling"] = {
                "rope_type": "longrope", "short_factor": list(self.rope_short_factor),
                "long_factor": list(self.rope_long_factor), "attention_factor": self.rope_attention_factor,
                "original_max_position_embeddings": self.rope_original_max_positions,
            }
        return d


def check_even(where: str, head_dim: int) -> int:
    if head_dim % 2:
        raise ConfigError(f"{where}: the head dim must be even (rotary embeddings rotate pairs), got {head_dim}")
    return head_dim


def read_json(path: str | os.PathLike, error=CheckpointError):
    """A JSON file's contents; ``error`` (a ``RealmError`` type) naming the file when it cannot be
    read, is not UTF-8 or not JSON (with the line and column)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None


LAYER_TYPES = ("sliding_attention", "full_attention")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts")  # transformers 5 writes qwen3_moe's as num_local_experts


def moe_fields(d: Mapping[str, Any], k: "_Keys", model_type: str, num_layers: int) -> dict:
    """The mixture-of-experts fields from a config.json. The expert count (``num_local_experts``
    for mixtral, ``num_experts`` for qwen2_moe / qwen3_moe; either name is read), top-k and
    expert width are required. mixtral: the expert width is ``intermediate_size`` and the top-k
    probabilities are always renormalised. qwen2_moe / qwen3_moe: ``moe_intermediate_size``,
    ``norm_topk_prob`` (default false) and every layer sparse (``decoder_sparse_step`` 1, no
    ``mlp_only_layers``: dense layers between expert layers are not supported). qwen2_moe adds the
    gated shared expert, whose width ``shared_expert_intermediate_size`` is the dense MLP width."""
    source = k.source
    given = [n for n in EXPERT_COUNT_KEYS if d.get(n) is not None]
    if not given:
        name = "num_local_experts" if model_type == "mixtral" else "num_experts"
        raise ConfigError(f"{source}: missing key {name!r} (required: the number of experts of a {model_type} model)")
    counts = {n: k.int(n) for n in given}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"{source}: keys 'num_experts' and 'num_local_experts' disagree ({counts['num_experts']} "
                          f"vs {counts['num_local_experts']}): the config is inconsistent")
    experts = counts[given[0]]
    top_k = k.int("num_experts_per_tok")
    if top_k > experts:
        raise ConfigError(f"{k.where('num_experts_per_tok')}: expected at most the {experts} experts "
                          f"({given[0]}), got {top_k}")
    out: dict = dict(num_experts=experts, num_experts_per_tok=top_k)
    if model_type == "mixtral":
        out.update(moe_intermediate_size=k.int("intermediate_size"), norm_topk_prob=True)
        return out
    out.update(moe_intermediate_size=k.int("moe_intermediate_size"), norm_topk_prob=k.bool("norm_topk_prob", False))
    step = k.int("decoder_sparse_step", 1)
    if step != 1:
        raise UnsupportedModelError(f"{k.where('decoder_sparse_step')}: {step} (dense MLP layers between the expert "
                                    f"layers) is not supported; supported: 1 (every layer has experts)")
    dense = d.get("mlp_only_layers")
    if dense not in (None, []):
        if not isinstance(dense, (list, tuple)) or not all(_is_int(i) and 0 <= i < num_layers for i in dense):
            raise ConfigError(f"{k.where('mlp_only_layers')}: expected a list of layer indices in "
                              f"[0, {num_layers}), got {_shown(dense)}")
        raise UnsupportedModelError(f"{k.where('mlp_only_layers')}: {list(dense)} (layers with a dense MLP instead "
                                    f"of experts) is not supported; supported: [] (every layer has experts)")
    if model_type == "qwen2_moe":
        out.update(shared_expert=True, intermediate_size=k.int("shared_expert_intermediate_size"))
    return out


def gemma_fields(d: Mapping[str, Any], k: "_Keys", model_type: str, num_layers: int) -> dict:
    """The Gemma family's feature fields (and ``rope``: the rope fields) from a config.json,
    with transformers' defaults for absent keys. gemma: GeGLU (gelu-tanh), sqrt(D)-scaled
    embeddings, (1 + w) norms. gemma2 adds post-norms, ``query_pre_attn_scalar``, soft-caps
    (50 / 30 when absent) and local layers (``layer_types``, else every other layer from the
    first). gemma3_text adds q/k norms (set by the caller), a local:global pattern
    (``layer_types`` or ``sliding_window_pattern``, default 6) and the local layers' own rope base
    (``rope_local_base_freq`` or ``rope_parameters.sliding_attention``)."""
    source = k.source
    if k.bool("use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{source}: use_bidirectional_attention=True (an encoder) is not supported")
    key = "hidden_activation" if d.get("hidden_activation") is not None else "hidden_act"
    act = d.get(key) or "gelu_pytorch_tanh"
    accepted = ("gelu_pytorch_tanh", "gelu") if model_type == "gemma" else ("gelu_pytorch_tanh",)
    if act not in accepted:  # gemma's "gelu" is its legacy name of the tanh approximation (as transformers reads it)
        raise UnsupportedModelError(f"{k.where(key)}: {act!r} is not supported for {model_type}; "
                                    f"supported: {', '.join(accepted)}")
    out: dict = dict(hidden_act="gelu_tanh", embed_scale=True, norm_plus_one=True)
    if model_type == "gemma":
        out["rope"] = _rope_from_hf(d, source, model_type=model_type)
        return out
    out.update(post_norms=True, query_pre_attn_scalar=k.float("query_pre_attn_scalar", 256.0),
               sliding_window=k.int("sliding_window", None) if "sliding_window" in d else 4096)
    caps = (50.0, 30.0) if model_type == "gemma2" else (None, None)
    for name, key, default in zip(("attn_softcap", "final_softcap"),
                                  ("attn_logit_softcapping", "final_logit_softcapping"), caps):
        out[name] = k.float(key, None) if key in d else default
    types = d.get("layer_types")
    if types is None:
        every = 2 if model_type == "gemma2" else k.int("sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(num_layers)]
    if not isinstance(types, (list, tuple)) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"{k.where('layer_types')}: expected {num_layers} entries (one a layer), each one of "
                          f"{', '.join(LAYER_TYPES)}, got {_shown(types)}")
    out["sliding_layers"] = tuple(t == "sliding_attention" for t in types)
    if model_type == "gemma2":
        out["rope"] = _rope_from_hf(d, source, model_type=model_type)
        return out
    out["rope"] = _rope_from_hf(d, source, default_theta=1_000_000.0, model_type=model_type)
    params = d.get("rope_parameters")
    local = params.get("sliding_attention") if isinstance(params, Mapping) else None
    if local is not None:
        if not isinstance(local, Mapping) or local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"{source}: key 'rope_parameters.sliding_attention': only plain rope is "
                                        f"supported on local layers, got {_shown(local)}")
        theta = local.get("rope_theta")
        where = f"{source}: key 'rope_parameters.sliding_attention.rope_theta'"
    else:
        theta, where = d.get("rope_local_base_freq"), k.where("rope_local_base_freq")
    out["rope_local_theta"] = 10_000.0 if theta is None else check_float(where, theta)
    return out


def phi3_fields(d: Mapping[str, Any], k: "_Keys", head_dim: int) -> dict:
    """Phi-3's feature fields (and ``rope``) from a config.json: partial rotary
    (``partial_rotary_factor``, in ``rope_parameters`` or beside it: the first
    ``int(H * factor)`` dims of each head rotate) and longrope scaling (``rope_scaling`` of type
    ``longrope``, or its older names ``su`` / ``yarn``, as transformers reads them), whose factor
    lists must have one entry a rotated pair. The fused ``qkv_proj`` / ``gate_up_proj`` tensors
    are a checkpoint matter (``ModelConfig.fused_checkpoint``)."""
    key, factor = "partial_rotary_factor", d.get("partial_rotary_factor")
    for name in ("rope_scaling", "rope_parameters"):  # the rope dict's value first, as transformers reads it
        inner = d.get(name)
        if isinstance(inner, Mapping) and inner.get("partial_rotary_factor") is not None:
            key, factor = f"{name}.partial_rotary_factor", inner["partial_rotary_factor"]
            break
    factor = 1.0 if factor is None else check_float(f"{k.source}: key {key!r}", factor)
    rotary = int(head_dim * factor)
    if factor > 1.0 or rotary < 2 or rotary % 2:
        raise ConfigError(f"{k.source}: key {key!r}: expected a factor in (0, 1] giving an even number of rotated "
                          f"dims (of the head dim {head_dim}), got {factor} ({rotary} dims)")
    out: dict = {"rope": _rope_from_hf(d, k.source, model_type="phi3", rotary_dim=rotary)}
    if d.get("original_max_position_embeddings") is not None:  # kept (and written back) without longrope too
        out["rope"].setdefault("rope_original_max_positions", k.int("original_max_position_embeddings"))
    if rotary != head_dim:
        out["rotary_dim"] = rotary
    return out


def _longrope_from_hf(d: Mapping[str, Any], sk: "_Keys", rotary_dim: int) -> dict:
    """longrope's fields: the short / long factor lists (R/2 numbers each), the original context
    (transformers prefers the top-level ``original_max_position_embeddings`` of Phi-3 configs
    over the one in the scaling dict, else ``max_position_embeddings``) and the attention factor:
    ``attention_factor`` if given, else sqrt(1 + ln s / ln orig) with s = ``factor`` or
    max_position_embeddings / orig (1 when s <= 1)."""
    k = _Keys(d, sk.source)
    if d.get("original_max_position_embeddings") is not None:
        orig = k.int("original_max_position_embeddings")
    else:
        orig = sk.int("original_max_position_embeddings", None) or k.int("max_position_embeddings", 4096)
    out = {name: check_factors(sk.where(key), sk.get(key), rotary_dim // 2)
           for name, key in (("rope_short_factor", "short_factor"), ("rope_long_factor", "long_factor"))}
    s = sk.float("factor", None)
    s = k.int("max_position_embeddings", 4096) / orig if s is None else s
    att = sk.float("attention_factor", None)
    if att is None:
        att = 1.0 if s <= 1.0 or orig == 1 else math.sqrt(1 + math.log(s) / math.log(orig))
    out.update(rope_original_max_positions=orig, rope_attention_factor=att)
    return out


def _rope_from_hf(d: Mapping[str, Any], source: str = "config.json", default_theta: float = 10000.0,
                  model_type: str | None = None, rotary_dim: int | None = None) -> dict:
    """Rope settings from either dialect: classic (rope_theta + rope_scaling) or
    transformers 5 (rope_parameters holding rope_theta and the scaling keys; for a per-layer-type
    dict, its ``full_attention`` entry). ``default_theta``: the base when none is given."""
    params = d.get("rope_parameters")
    key = "rope_parameters"
    if isinstance(params, Mapping) and "full_attention" in params:  # per-layer-type dict
        params, key = params["full_attention"], "rope_parameters.full_attention"
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(f"{source}: key {key!r}: expected an object, got {_shown(params)}")
    scaling = d.get("rope_scaling")
    theta, theta_key = d.get("rope_theta"), "rope_theta"
    if isinstance(params, Mapping):
        if params.get("rope_theta") is not None:
            theta, theta_key = params["rope_theta"], f"{key}.rope_theta"
        if scaling is None:
            scaling = params
        else:
            key = "rope_scaling"
    else:
        key = "rope_scaling"
    theta = default_theta if theta is None else check_float(f"{source}: key {theta_key!r}", theta)
    out: dict = {"rope_theta": theta}
    if not scaling:
        return out
    if not isinstance(scaling, Mapping):
        raise ConfigError(f"{source}: key {key!r}: expected an object, got {_shown(scaling)}")
    sk = _Keys(scaling, source, key + ".")
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    rtype = ROPE_TYPE_ALIASES.get(model_type, {}).get(rtype, rtype)
    if rtype not in SUPPORTED_ROPE_TYPES or (rtype == "longrope" and model_type != "phi3"):
        supported = [t for t in SUPPORTED_ROPE_TYPES if t != "longrope" or model_type == "phi3"]
        raise UnsupportedModelError(
            f"{source}: key {key + '.rope_type'!r}: rope scaling type {rtype!r} is not supported for "
            f"{model_type or 'this model'}; supported: {', '.join(supported)}"
            + ("" if model_type == "phi3" else " (longrope: phi3)")
        )
    out["rope_type"] = rtype
    if rtype == "longrope":
        out.update(_longrope_from_hf(d, sk, rotary_dim))
    if rtype in ("linear", "llama3"):
        out["rope_factor"] = sk.float("factor")
    if rtype == "llama3":
        out["rope_low_freq_factor"] = sk.float("low_freq_factor")
        out["rope_high_freq_factor"] = sk.float("high_freq_factor")
        out["rope_original_max_positions"] = sk.int("original_max_position_embeddings")
        if not out["rope_high_freq_factor"] > out["rope_low_freq_factor"]:
            raise ConfigError(f"{sk.where('high_freq_factor')}: expected more than low_freq_factor="
                              f"{out['rope_low_freq_factor']}, got {out['rope_high_freq_factor']}")
    return out
