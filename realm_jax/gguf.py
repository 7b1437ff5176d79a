"""GGUF files (llama.cpp's format): metadata -> ``ModelConfig``, tensors -> params, tokenizer.

Tensors are read one at a time from the memory-mapped file, dequantized with the ``gguf``
package, converted to the target dtype and written into their slot of the stacked leaf, so the
weights are never held twice. Every tensor's name, type and shape is checked before any
dequantizing; problems are ``CheckpointError`` / ``UnsupportedModelError`` naming the tensor.

Layout notes:
- GGUF lists dimensions innermost first, so a tensor GGUF calls ``[in, out]`` is the numpy /
  HF array ``[out, in]``; our projections are ``[in, out]`` (``x @ W``), hence one transpose.
- llama.cpp's converter reorders the rows of Q and K (weights and biases) of ``llama``-arch
  models, within each head, from HF's half-split rotary layout to its interleaved one:
  HF row ``j * H/2 + i`` (half ``j``, pair ``i``) is stored at row ``2 * i + j``.
  ``unpermute_rope_rows`` undoes it. ``qwen2``/``qwen3`` (and their MoE) and ``phi3`` files are
  stored in HF order.
- ``phi3``: q|k|v fused in ``attn_qkv`` and gate|up in ``ffn_up`` (HF's ``qkv_proj`` /
  ``gate_up_proj``), split by rows into the canonical leaves (``checkpoint.part_rows``); longrope's
  factor lists are the tensors ``rope_factors_short`` / ``rope_factors_long`` (``_phi3_from_gguf``).
- Gemma (``gemma``, ``gemma2``, ``gemma3``): llama.cpp's converter stores every RMSNorm weight
  (``*_norm``, Gemma 3's ``attn_q_norm`` / ``attn_k_norm`` too) as ``1 + w``, since llama.cpp's
  norm multiplies by the stored weight; our forward scales by ``(1 + w)``, so 1 is subtracted
  (in float32, before the cast). Q/K rows are in HF order; the head is ``token_embd`` (tied)
  unless the file has ``output``. ``gemma2``/``gemma3`` add ``post_attention_norm`` /
  ``post_ffw_norm`` (``ffn_norm`` is the pre-MLP norm); ``gemma3`` adds ``attn_q_norm`` /
  ``attn_k_norm``. What the files do not record is taken as llama.cpp takes it
  (``_gemma_from_gguf``).
- Mixture of experts (Mixtral: a ``llama`` file with ``llama.expert_count``; ``qwen2moe``;
  ``qwen3moe``): each layer's experts are one tensor ``blk.N.ffn_{gate,up,down}_exps`` holding
  every expert, numpy ``[E, D_out, D_in]``; the router is ``ffn_gate_inp`` ``[E, D]``; Qwen2-MoE's
  shared expert is ``ffn_{gate,up,down}_shexp`` (our dense MLP) and its gate
  ``ffn_gate_inp_shexp`` (``[D]``). The names are rows of ``params.LEAVES``. A llama-arch GGUF has
  no sliding window, so Mixtral from GGUF runs without one (llama.cpp does the same); a phi3 file
  has ``phi3.attention.sliding_window``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .config import ModelConfig, check_even, check_float, check_int, check_token_id, head_dim_of
from .errors import CheckpointError, ConfigError, RealmError, UnsupportedModelError
from .gguf_file import GGUFFile, GGUFTensor, open_gguf
from .checkpoint import check_file_tensor_shape, file_shape, leaf_path, part_rows, tensor_names
from .params import leaf_shape

__all__ = ["GGUFFile", "GGUFTensor", "open_gguf", "config_from_gguf", "read_gguf_params", "load_gguf",
           "gguf_to_hf", "unpermute_rope_rows", "SUPPORTED_GGUF_ARCHITECTURES", "SUPPORTED_QUANT_TYPES"]

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "phi3",
                                "gemma", "gemma2", "gemma3")  # Mistral, Mixtral: "llama"
# our architecture of a GGUF one (a "llama" file with experts is Mixtral), and back
_ARCH_OF_GGUF = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                 "phi3": "phi3", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
GEMMA_GGUF_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# llama.cpp takes the layer count of Gemma 2 / 3 27B as the sign that queries are scaled by
# (D / N) ** -0.5 instead of H ** -0.5 (the files carry no key for it)
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GGUF_ARCH_OF = {**{v: k for k, v in _ARCH_OF_GGUF.items()}, "mixtral": "llama"}
SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_IGNORED_TENSORS = ("rope_freqs.weight",)  # folded into the config (llama3 rope scaling)
LONGROPE_TENSORS = ("rope_factors_short.weight", "rope_factors_long.weight")  # folded into the config (phi3)
_LLAMA3_CANDIDATE_ORIGINAL_CONTEXTS = (8192, 4096, 2048, 16384, 32768, 65536, 131072)  # when the band is empty


# ---------------------------------------------------------------------------- permutation
def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order. w [n_heads*H, ...] (rows = output features) -> same shape,
    rows in HF's half-split rotary order."""
    h = w.shape[0] // n_heads
    return w.reshape(n_heads, h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------- config
def config_from_gguf(meta: Mapping[str, Any], tensors: Mapping[str, GGUFTensor] | None = None,
                     source: str | os.PathLike = "GGUF") -> ModelConfig:
    """``ModelConfig`` from GGUF metadata (and the tensor table, for tied embeddings, biases and
    llama3 rope factors). Every key is checked for type and range before use; raises
    ``ConfigError`` / ``UnsupportedModelError`` naming ``source`` (the file) and the key."""
    tensors = tensors or {}
    source = str(source)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: GGUF general.architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (Mistral files use 'llama')")
    split = meta.get("split.count", 1)
    if split is not None and check_int(f"{source}: key 'split.count'", split, low=0) > 1:
        raise UnsupportedModelError(
            f"{source}: GGUF split.count={split}: split (multi-file) GGUFs are not supported; "
            f"merge them into one file first")

    def where(name):
        return f"{source}: key {arch + '.' + name!r}"

    def raw(name, default=None, required=False):
        k = f"{arch}.{name}"
        if meta.get(k) is None:
            if required:
                raise ConfigError(f"{source}: GGUF metadata is missing {k!r} (required)")
            return default
        return meta[k]

    def scalar(name, v):
        if isinstance(v, list):
            if not v or len(set(map(repr, v))) != 1:
                raise UnsupportedModelError(f"{where(name)} varies per layer ({v}); not supported")
            return v[0]
        return v

    def integer(name, default=None, required=False, low=1):
        v = raw(name, default, required)
        return v if v is None else check_int(where(name), scalar(name, v), low=low)

    def number(name, default):
        return _f32(check_float(where(name), scalar(name, raw(name, default))))

    moe = _moe_from_gguf(arch, raw, integer, number, tensors, source)
    if moe and arch in GEMMA_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"{source}: GGUF {arch} file with experts ({arch}.expert_count): not supported")

    num_heads = integer("attention.head_count", required=True)
    num_kv = integer("attention.head_count_kv", num_heads)
    if num_heads % num_kv:
        raise ConfigError(f"{where('attention.head_count')}: {num_heads} heads are not a multiple of "
                          f"{arch}.attention.head_count_kv={num_kv}: the metadata is inconsistent")
    hidden = integer("embedding_length", required=True)
    head_dim = head_dim_of(hidden, num_heads, integer("attention.key_length"),
                           f"{source}: keys {arch + '.embedding_length'!r} and {arch + '.attention.head_count'!r}")
    check_even(where("attention.key_length"), head_dim)
    value_dim = integer("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(
            f"{source}: GGUF {arch}.attention.value_length={value_dim} != key_length={head_dim}: not supported")
    rope_dims = integer("rope.dimension_count")
    if rope_dims is not None and rope_dims != head_dim and arch != "phi3":
        raise UnsupportedModelError(
            f"{source}: GGUF {arch}.rope.dimension_count={rope_dims} != head dim {head_dim}: "
            f"partial rotary is not supported for {arch} (phi3 has it)")

    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not isinstance(tokens, list) or not tokens:
            raise ConfigError(f"{source}: key 'tokenizer.ggml.tokens': expected a non-empty list of strings, "
                              f"got {type(tokens).__name__}")
        vocab = len(tokens)
    elif "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    else:
        vocab = integer("vocab_size", required=True)

    theta = number("rope.freq_base", 10000.0)
    rope = _rope_from_gguf(arch, raw, theta, head_dim, tensors, source)
    if arch == "phi3":
        rope.update(_phi3_from_gguf(integer, number, rope_dims or head_dim, head_dim, tensors, source))
    gemma = _gemma_from_gguf(arch, raw, integer, number, hidden, num_heads, head_dim, source) \
        if arch in GEMMA_GGUF_ARCHITECTURES else {}

    qkv_bias = "blk.0.attn_q.bias" in tensors
    o_bias = "blk.0.attn_output.bias" in tensors
    if arch in ("qwen2", "qwen2moe"):
        qkv_bias = True
    if arch != "llama" and o_bias:
        raise UnsupportedModelError(f"{source}: GGUF {arch} file has attn_output.bias, which {arch} does not use")
    if arch == "llama" and moe and (qkv_bias or o_bias):
        raise UnsupportedModelError(f"{source}: GGUF llama file with experts (Mixtral) has attention biases, "
                                    f"which Mixtral does not use: not supported")
    if arch == "llama" and qkv_bias != o_bias:
        raise UnsupportedModelError(
            f"{source}: GGUF llama file has q/k/v biases without an output bias (or the reverse): not supported")

    def token_id(key):
        v = meta.get(key)
        return None if v is None else check_token_id(f"{source}: key {key!r}", v, int(vocab))

    eos = [token_id(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    file_type = meta.get("general.file_type", -1)
    file_type = file_type if isinstance(file_type, int) else -1
    fields = dict(
        arch=_ARCH_OF_GGUF[arch] if not moe else moe.pop("arch"),
        vocab_size=check_int(f"{source}: the vocabulary size", vocab),
        hidden_size=hidden,
        intermediate_size=integer("feed_forward_length", required=True),
        num_layers=integer("block_count", required=True),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-6),
        max_position_embeddings=integer("context_length", 4096),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias=qkv_bias,
        o_bias=o_bias and arch == "llama",
        qk_norm=arch in ("qwen3", "qwen3moe", "gemma3"),
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
        pad_token_id=token_id("tokenizer.ggml.padding_token_id"),
        dtype={0: "float32", 1: "float16", 32: "bfloat16"}.get(file_type, "float32"),
        **rope,
    )
    return ModelConfig(**{**fields, **moe, **gemma})


def _gemma_from_gguf(arch, raw, integer, number, hidden: int, num_heads: int, head_dim: int, source) -> dict:
    """The Gemma family's fields from GGUF metadata, as llama.cpp reads them: GeGLU (gelu-tanh),
    sqrt(D)-scaled embeddings and (1 + w) norms for all three. ``gemma2``: post-norms, soft-caps
    ``attn_logit_softcapping`` / ``final_logit_softcapping`` (50 / 30 when absent), a window
    ``attention.sliding_window`` (4096 when absent) on every other layer from the first.
    ``gemma3``: post-norms, q/k norms, no attention soft-cap, an optional final soft-cap; with a
    window (the key present and > 0) five local layers to one global (llama.cpp's fixed pattern)
    and plain rope of base 10000 on the local layers (``rope.freq_base`` and any linear scaling
    are the global layers'); without one every layer is global. Queries are scaled by
    ``H ** -0.5``, or ``(D / N) ** -0.5`` for the layer count of the 27B models (46 for gemma2,
    62 for gemma3), as llama.cpp decides it: the files carry no ``query_pre_attn_scalar``."""
    out: dict = dict(hidden_act="gelu_tanh", embed_scale=True, norm_plus_one=True)
    if arch == "gemma":
        return out
    layers = integer("block_count", required=True)
    scalar = hidden / num_heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim
    out.update(post_norms=True, query_pre_attn_scalar=float(scalar))

    def cap(name, default):
        return default if raw(name) is None else number(name, None)  # finite and positive (check_float)

    _check_gemma_fixed(arch, raw, number, layers, source)
    if arch == "gemma2":
        window = integer("attention.sliding_window", 4096)
        out.update(attn_softcap=cap("attn_logit_softcapping", 50.0),
                   final_softcap=cap("final_logit_softcapping", 30.0), sliding_window=window,
                   sliding_layers=tuple(i % 2 == 0 for i in range(layers)))
        return out
    if raw("attn_logit_softcapping") is not None:
        raise UnsupportedModelError(f"{source}: GGUF key {'gemma3.attn_logit_softcapping'!r}: gemma3 has no "
                                    f"attention soft-cap (llama.cpp does not apply one)")
    final = raw("final_logit_softcapping")
    out["final_softcap"] = cap("final_logit_softcapping", None) if final not in (None, 0, 0.0) else None
    window = integer("attention.sliding_window", 0, low=0)
    if window:
        out.update(sliding_window=window, sliding_layers=tuple(i % 6 < 5 for i in range(layers)),
                   rope_local_theta=10000.0)
    return out


def _moe_from_gguf(arch, raw, integer, number, tensors, source) -> dict:
    """The mixture-of-experts fields of ``ModelConfig`` from GGUF metadata ({} for a dense
    file), as llama.cpp's converter writes them: ``{arch}.expert_count`` (E),
    ``expert_used_count`` (k), ``expert_feed_forward_length`` (an expert's width; Mixtral's
    files may leave it out: its experts have ``feed_forward_length``) and, for qwen2moe,
    ``expert_shared_feed_forward_length`` (the shared expert's width, our dense F).
    Renormalising the top k follows llama.cpp: Mixtral and qwen3moe always, qwen2moe never,
    unless ``expert_weights_norm`` says otherwise. A ``llama`` file with experts is Mixtral
    (a GGUF carries no sliding window, so none is applied)."""
    def key(name):
        return f"{arch}.{name}"

    count = integer("expert_count", 0, low=0)
    if not count:
        if arch in ("qwen2moe", "qwen3moe"):
            raise ConfigError(f"{source}: GGUF metadata is missing {key('expert_count')!r} (required: the number "
                              f"of experts of a {arch} model)")
        stacked = [n for n in tensors if n.endswith("_exps.weight")]
        if stacked:
            raise ConfigError(f"{source}: GGUF file has expert tensors ({stacked[0]!r}) but no "
                              f"{key('expert_count')!r} key (or it is 0): the metadata is inconsistent")
        return {}
    used = integer("expert_used_count", required=True)
    if used > count:
        raise ConfigError(f"{source}: key {key('expert_used_count')!r}: expected at most the {count} experts of "
                          f"{key('expert_count')!r}, got {used}")
    gating = raw("expert_gating_func")
    if gating is not None and gating != 1:  # gguf.ExpertGatingFuncType.SOFTMAX
        raise UnsupportedModelError(f"{source}: GGUF {key('expert_gating_func')}={gating!r} is not supported; "
                                    f"supported: 1 (softmax)")
    scale = raw("expert_weights_scale")
    if scale is not None and number("expert_weights_scale", 1.0) != 1.0:
        raise UnsupportedModelError(f"{source}: GGUF {key('expert_weights_scale')}={scale!r} is not supported; "
                                    f"supported: 1.0")
    shared_count = integer("expert_shared_count", None, low=0)
    if shared_count is not None and shared_count != (1 if arch == "qwen2moe" else 0):
        raise UnsupportedModelError(f"{source}: GGUF {key('expert_shared_count')}={shared_count} is not supported "
                                    f"for {arch}; supported: {1 if arch == 'qwen2moe' else 0}")
    norm = raw("expert_weights_norm", arch != "qwen2moe")
    if not isinstance(norm, bool):
        raise ConfigError(f"{source}: key {key('expert_weights_norm')!r}: expected a bool, got {norm!r}")
    out = dict(num_experts=count, num_experts_per_tok=used, norm_topk_prob=norm,
               moe_intermediate_size=integer("expert_feed_forward_length", required=arch != "llama"))
    if arch == "llama":
        out.update(arch="mixtral")
        if out["moe_intermediate_size"] is None:
            out["moe_intermediate_size"] = integer("feed_forward_length", required=True)
    elif arch == "qwen2moe":
        out.update(arch="qwen2_moe", shared_expert=True,
                   intermediate_size=integer("expert_shared_feed_forward_length", required=True))
    else:
        out.update(arch=_ARCH_OF_GGUF[arch])
    return out


def _phi3_from_gguf(integer, number, rope_dims: int, head_dim: int, tensors, source) -> dict:
    """Phi-3's fields from GGUF, as llama.cpp's converter writes them: partial rotary
    (``rope.dimension_count`` below the head dim), the window (``attention.sliding_window``, 0 =
    none) and longrope: the factor lists as the tensors ``rope_factors_short`` / ``_long``
    (R/2 values each), ``rope.scaling.original_context_length`` (required with them) and
    ``rope.scaling.attn_factor`` (default sqrt(1 + ln s / ln orig), s = context_length / orig).
    llama.cpp chooses the factors from the context size it runs with; we choose them as HF
    does, per sequence (``layers.rope_cos_sin``)."""
    from gguf.quants import dequantize

    out: dict = {}
    if rope_dims != head_dim:
        out["rotary_dim"] = rope_dims
    window = integer("attention.sliding_window", 0, low=0)
    out["sliding_window"] = window or None
    present = [n for n in LONGROPE_TENSORS if n in tensors]
    if not present:
        return out
    if len(present) == 1:
        missing = next(n for n in LONGROPE_TENSORS if n not in tensors)
        raise CheckpointError(f"{source}: GGUF has {present[0]!r} but not {missing!r} (longrope needs both)")
    factors = {}
    for name, field in zip(LONGROPE_TENSORS, ("rope_short_factor", "rope_long_factor")):
        t = tensors[name]
        v = np.asarray(dequantize(t.data, t.qtype), np.float32).reshape(-1)
        if v.shape != (rope_dims // 2,) or not (np.isfinite(v).all() and (v > 0).all()):
            raise CheckpointError(f"{source}: tensor {name!r} has {v.size} values (finite and positive: "
                                  f"{bool(np.isfinite(v).all() and (v > 0).all())}), expected {rope_dims // 2} "
                                  f"positive ones (one a rotated pair)")
        factors[field] = tuple(_f32(x) for x in v)
    orig = integer("rope.scaling.original_context_length", required=True)
    s = integer("context_length", 4096) / orig
    default = 1.0 if s <= 1.0 or orig == 1 else math.sqrt(1 + math.log(s) / math.log(orig))
    return {**out, **factors, "rope_type": "longrope", "rope_original_max_positions": orig,
            "rope_attention_factor": number("rope.scaling.attn_factor", default)}


def _check_gemma_fixed(arch, raw, number, layers: int, source) -> None:
    """llama.cpp fixes Gemma 2's and 3's local:global pattern (every 2nd / 6th layer global) and
    their local rope base (Gemma 2: the global one; Gemma 3: 10000) and reads no key for them; a
    file whose ``attention.sliding_window_pattern`` or ``rope.freq_base_swa`` says otherwise is
    refused rather than run one way or the other."""
    period = 2 if arch == "gemma2" else 6
    pattern = raw("attention.sliding_window_pattern")
    fixed = [i % period < period - 1 for i in range(layers)]
    if pattern is not None and pattern != period and (not isinstance(pattern, list) or
                                                      [bool(p) for p in pattern] != fixed):
        raise UnsupportedModelError(
            f"{source}: GGUF key {arch + '.attention.sliding_window_pattern'!r} = {pattern!r}: llama.cpp runs "
            f"{arch} with every {period}th layer global whatever the key says; other patterns are not supported")
    base = raw("rope.freq_base_swa")
    fixed_base = number("rope.freq_base", 10000.0) if arch == "gemma2" else 10000.0
    if base is not None and number("rope.freq_base_swa", None) != fixed_base:
        raise UnsupportedModelError(
            f"{source}: GGUF key {arch + '.rope.freq_base_swa'!r} = {base!r}: llama.cpp runs {arch}'s local layers "
            f"with " + ("the global rope base" if arch == "gemma2" else "rope base 10000") + "; not supported")


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def _rope_from_gguf(arch, key, theta, head_dim, tensors, source="GGUF") -> dict:
    out: dict = {"rope_theta": theta}
    # as llama.cpp reads it: the type defaults to linear; the factor falls back to rope.scale_linear
    stype = key("rope.scaling.type", "linear")
    name = "rope.scaling.factor" if key("rope.scaling.factor") is not None else "rope.scale_linear"
    factor = key(name, 0.0)
    factor = 0.0 if factor == 0 else _f32(check_float(f"{source}: key {arch + '.' + name!r}", factor))
    if stype not in ("none", "linear"):
        raise UnsupportedModelError(
            f"GGUF {arch}.rope.scaling.type={stype!r} is not supported; supported: none, linear "
            f"(and llama3 via rope_freqs.weight)")
    if stype == "linear" and factor not in (0.0, 1.0):
        out.update(rope_type="linear", rope_factor=factor)
    if "rope_freqs.weight" in tensors:
        if "rope_type" in out:
            raise UnsupportedModelError("GGUF has both linear rope scaling and rope_freqs.weight: not supported")
        out.update(_llama3_rope_from_factors(tensors["rope_freqs.weight"], theta, head_dim))
    return out


def _llama3_rope_from_factors(t, theta: float, head_dim: int) -> dict:
    """llama.cpp stores llama3 rope scaling as per-frequency divisors (``rope_freqs.weight``,
    [H/2]). Recover llama3 parameters that reproduce them, and refuse anything else.

    In the smooth band the llama3 rule is ``1/f = (1 - s)/factor + s`` with ``s`` linear in
    ``1/wavelength``: ``s = (orig/wavelength - low) / (high - low)``. Only ``low/orig`` and
    ``high/orig`` matter, so we fit that line with ``low = 1``. Every candidate is checked by
    recomputing the frequencies."""
    from gguf.quants import dequantize

    from .layers import rope_inv_freq

    want = np.asarray(dequantize(t.data, t.qtype), np.float64).reshape(-1)
    if want.shape != (head_dim // 2,):
        raise CheckpointError(f"tensor 'rope_freqs.weight' has {want.size} values, expected {head_dim // 2}")
    base = dict(arch="llama", vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta)
    plain = rope_inv_freq(ModelConfig(**base)).astype(np.float64)
    factor = float(want.max())
    if np.allclose(want, 1.0, rtol=0, atol=1e-6):
        return {}
    candidates = []
    if factor > 1.0:
        s = (1.0 / want - 1.0 / factor) / (1.0 - 1.0 / factor)
        band = (s > 1e-4) & (s < 1 - 1e-4)
        u = plain / (2 * np.pi)  # 1 / wavelength
        if band.sum() >= 2:
            slope, icept = np.polyfit(u[band], s[band], 1)
            if slope > 0 and icept < 0:
                orig = max(1, int(round(-slope / icept)))
                candidates.append((1.0, orig * (1.0 - icept) / slope, orig))
        if band.sum() >= 1:  # one point fixes orig once high is chosen
            i = int(np.argmax(band))
            candidates += [(1.0, hi, max(1, int(round((1 + (hi - 1) * s[i]) / u[i])))) for hi in (4.0, 2.0, 8.0)]
        candidates += [(1.0, 4.0, o) for o in _LLAMA3_CANDIDATE_ORIGINAL_CONTEXTS]
    for lo, hi, orig in candidates:
        cand = dict(rope_type="llama3", rope_factor=float(str(np.float32(factor))), rope_low_freq_factor=lo,
                    rope_high_freq_factor=float(f"{hi:.6g}"), rope_original_max_positions=orig)
        try:
            got = plain / rope_inv_freq(ModelConfig(**base, **cand)).astype(np.float64)
        except ConfigError:  # not a valid llama3 setting (e.g. high <= low): not this candidate
            continue
        if np.allclose(got, want, rtol=1e-4, atol=1e-6):
            return cand
    raise UnsupportedModelError(
        "GGUF rope_freqs.weight does not follow llama3 rope scaling; other rope frequency factors "
        "are not supported")


# ---------------------------------------------------------------------------- params
def _check_tensors(path, cfg: ModelConfig, table: Mapping[str, GGUFTensor]) -> dict[str, tuple]:
    """GGUF tensor name -> (leaf, layer index or None), once every name, type and shape is checked."""
    expected = tensor_names(cfg, "gguf")
    missing = [n for n in expected if n not in table]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    ignored = _IGNORED_TENSORS + (LONGROPE_TENSORS if cfg.rope_type == "longrope" else ())
    extra = [n for n in table if n not in expected and n not in ignored]
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} for a {cfg.arch} model")
    for name, (parts, _) in expected.items():
        t = table[name]
        qname = t.qtype.name
        if qname not in SUPPORTED_QUANT_TYPES:
            raise UnsupportedModelError(
                f"{path}: tensor {name!r} has quantization type {qname}, which is not supported; "
                f"supported: {', '.join(SUPPORTED_QUANT_TYPES)}")
        check_file_tensor_shape(str(path), name, parts, cfg, t.shape, "gguf",
                                f"key {_GGUF_ARCH_OF[cfg.arch] + '.expert_count'!r}")
    return expected


def read_gguf_params(gf: GGUFFile, cfg: ModelConfig, dtype=np.float32,
                     place: Callable[[tuple, np.ndarray], Any] | None = None) -> dict:
    """Dequantize every tensor of the GGUF file into a params pytree of ``dtype``.

    Each leaf is built in a numpy buffer of its final shape, one tensor at a time, then handed
    to ``place(leaf_path, array)`` (default: ``jax.numpy.asarray``, the default device).
    """
    from gguf.quants import dequantize

    table, path = gf.tensors, gf.path
    expected = _check_tensors(path, cfg, table)
    if place is None:
        import jax.numpy as jnp

        def place(leaf_path, a):
            return jnp.asarray(a)

    np_dtype = np.dtype(dtype)
    by_leaf: dict = {}
    for name, (parts, i) in expected.items():
        for leaf, start, stop in part_rows(parts, cfg, "gguf"):
            by_leaf.setdefault(leaf, []).append((i, name, slice(start, stop) if len(parts) > 1 else None))
    permuted = _GGUF_ARCH_OF[cfg.arch] == "llama"  # llama-arch files (Mixtral's too) reorder Q/K rows
    plus_one = cfg.norm_plus_one and _GGUF_ARCH_OF[cfg.arch] in GEMMA_GGUF_ARCHITECTURES  # stored as 1 + w
    heads_of = {"wq": cfg.num_heads, "bq": cfg.num_heads, "wk": cfg.num_kv_heads, "bk": cfg.num_kv_heads}
    params: dict = {"layers": {}}
    for leaf, items in by_leaf.items():
        buf = np.empty(leaf_shape(leaf, cfg), np_dtype)
        for i, name, rows in items:
            t = table[name]
            try:
                w = dequantize(t.data, t.qtype).reshape(t.shape)
            except Exception as e:
                raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({type(e).__name__}: {e})") from None
            if rows is not None:  # one part of a fused tensor (Phi-3's attn_qkv, ffn_up)
                w = w[rows]
            if permuted and leaf.name in heads_of:
                w = unpermute_rope_rows(w, heads_of[leaf.name])
            if plus_one and leaf.init == "norm":
                w = np.asarray(w, np.float32) - np.float32(1.0)
            if leaf.hf_transposed:  # GGUF stores matmul weights [(E,) D_out, D_in], as HF does
                w = w.reshape(file_shape(leaf, cfg, "gguf")).swapaxes(-1, -2)
            if i is None:
                buf[...] = w
            else:
                buf[i] = w
            del w
        (params["layers"] if leaf.is_layer else params)[leaf.name] = place(leaf_path(leaf), buf)
        del buf
    return params


def load_gguf(path: str | os.PathLike, dtype=np.float32, place=None):
    """Load a GGUF file: ``(ModelConfig, params, Tokenizer or None)``.

    ``dtype``: params dtype (numpy/jax dtype or name). ``place(leaf_path, array)`` may put each
    finished leaf on devices (sharding); default: the default device.
    The tokenizer is built from the file's metadata (None if the file has none).
    """
    from .tokenizer import Tokenizer

    gf = open_gguf(path)
    cfg = config_from_gguf(gf.metadata, gf.tensors, path)
    tok = Tokenizer.from_gguf(gf) if "tokenizer.ggml.model" in gf.metadata else None
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    params = read_gguf_params(gf, cfg, _np_dtype(dtype), place=place)
    return cfg, params, tok


def _np_dtype(dtype) -> np.dtype:
    """A floating dtype (name or dtype) as numpy's; anything else is a ``RealmError`` naming it."""
    import jax.numpy as jnp

    try:
        dt = jnp.dtype(dtype)
    except (TypeError, ValueError):
        dt = None
    if dt is None or isinstance(dtype, bool) or not jnp.issubdtype(dt, jnp.floating):
        raise RealmError(f"dtype: expected a floating-point dtype such as 'float32', 'bfloat16' or 'float16', "
                         f"got {dtype!r}")
    return np.dtype(dt)


def gguf_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike, dtype="float32") -> Path:
    """Convert a GGUF file to an HF checkpoint directory (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json), written atomically. Returns ``out_dir``."""
    from .checkpoint import write_hf_checkpoint

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"output directory {out_dir} already exists")
    np_dtype = _np_dtype(dtype)
    cfg, params, tok = load_gguf(path, np_dtype, place=lambda leaf, a: a)
    cfg = cfg.replace(dtype=np_dtype.name)
    extra = tok.to_hf_files() if tok is not None else {}
    return write_hf_checkpoint(out_dir, cfg, params, extra_files=extra, dtype=np_dtype)
