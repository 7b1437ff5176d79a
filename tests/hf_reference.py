"""Tiny random HF transformers models of each supported architecture, saved with
``save_pretrained`` — the outside reference for numerics tests.

Sizes are mutually prime where possible (V=97, D=30, F=56, N=6, K=2, H=8 ...) so transposed
axes cannot line up by accident.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

ARCH_CASES = {
    # name: (model_type, config overrides)
    "llama_gqa_llama3_untied": ("llama", dict(
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "llama_tied_linear": ("llama", dict(
        num_attention_heads=5, num_key_value_heads=5, head_dim=8, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral_window": ("mistral", dict(
        num_attention_heads=6, num_key_value_heads=3, head_dim=8, sliding_window=5)),
    "qwen2_bias": ("qwen2", dict(num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3_qknorm": ("qwen3", dict(num_attention_heads=6, num_key_value_heads=3, head_dim=16)),
    # Gemma: multi-query attention with a head dim that is not D / N, GeGLU, tied head
    "gemma_mqa": ("gemma", dict(num_attention_heads=6, num_key_value_heads=1, head_dim=8)),
    # Gemma 2: soft-caps small enough to be active, a window (5) below the prompt lengths,
    # local/global layers alternating, a query_pre_attn_scalar that is not H
    "gemma2_softcap_window": ("gemma2", dict(
        num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, head_dim=8, sliding_window=5,
        attn_logit_softcapping=3.0, final_logit_softcapping=4.0, query_pre_attn_scalar=12)),
    # Gemma 3 text: q/k norms, local:global 2:1, local rope base 100, linear rope scaling (x4)
    # on global layers only
    "gemma3_pattern_rope": ("gemma3_text", dict(
        num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=2, head_dim=8, sliding_window=4,
        sliding_window_pattern=3, query_pre_attn_scalar=12,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}})),
    # Mixtral: 5 experts, top 2 (always renormalised), a window (5) below the prompt lengths
    "mixtral_top2_window": ("mixtral", dict(
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, intermediate_size=14, num_local_experts=5,
        num_experts_per_tok=2, sliding_window=5)),
    # Qwen2-MoE: 6 experts, top 2 not renormalised, q/k/v biases, a gated shared expert of width 22
    "qwen2_moe_shared": ("qwen2_moe", dict(
        num_attention_heads=3, num_key_value_heads=1, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12,
        shared_expert_intermediate_size=22, norm_topk_prob=False)),
    # Qwen3-MoE: 7 experts, top 3 renormalised, q/k norms, a head dim that is not D / N
    "qwen3_moe_norm_topk": ("qwen3_moe", dict(
        num_attention_heads=6, num_key_value_heads=3, head_dim=16, num_experts=7, num_experts_per_tok=3,
        moe_intermediate_size=10, norm_topk_prob=True)),
    # Phi-3: fused qkv_proj / gate_up_proj; longrope with an original context (8) that the longer
    # prompts cross (long factors) and the short one does not, partial rotary (6 of 8 dims), a
    # window (5) below the prompt lengths
    "phi3_longrope_window": ("phi3", dict(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=2, sliding_window=5,
        original_max_position_embeddings=8, partial_rotary_factor=0.75,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.7, 2.9], "long_factor": [3.0, 9.0, 23.0]})),
    # Phi-3 mini's shape: multi-head attention (H=6), longrope whose original context (32) no
    # prompt reaches (short factors, attention factor sqrt(1 + ln 8 / ln 32)), no window
    "phi3_mha_short": ("phi3", dict(
        num_attention_heads=5, num_key_value_heads=5, original_max_position_embeddings=32,
        rope_scaling={"type": "longrope", "short_factor": [1.3, 2.1, 4.0], "long_factor": [5.0, 11.0, 17.0]})),
}
GEMMA_CASES = ("gemma_mqa", "gemma2_softcap_window", "gemma3_pattern_rope")
PHI3_CASES = ("phi3_longrope_window", "phi3_mha_short")
MOE_CASES = ("mixtral_top2_window", "qwen2_moe_shared", "qwen3_moe_norm_topk")

BASE = dict(vocab_size=97, hidden_size=30, intermediate_size=56, num_hidden_layers=3,
            max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_config(model_type: str, **overrides):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
           "gemma3_text": transformers.Gemma3TextConfig, "mixtral": transformers.MixtralConfig,
           "qwen2_moe": transformers.Qwen2MoeConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
           "phi3": transformers.Phi3Config}[model_type]
    kw = dict(BASE)
    kw.update(overrides)
    return cls(**kw)


def hf_load_kwargs(model_type: str) -> dict:
    """Keyword arguments for transformers' model constructors: mixture-of-experts models run
    their experts eagerly (HF's expert loop; the grouped-matmul kernel needs 16-byte aligned
    strides, which the tiny sizes do not have)."""
    return dict(experts_implementation="eager") if model_type in ("mixtral", "qwen2_moe", "qwen3_moe") else {}


def make_hf_model(case: str, directory: Path, seed: int = 0, classic_dialect: bool = False, **overrides):
    """Build the case's HF model with large-ish random weights, save it, return (dir, model).
    ``overrides``: config values replacing the case's (e.g. ``vocab_size``).

    ``classic_dialect`` rewrites config.json with the pre-v5 keys (rope_theta / rope_scaling /
    torch_dtype), the form most published checkpoints have.
    """
    import transformers

    model_type, over = ARCH_CASES[case]
    cfg = hf_config(model_type, **{**over, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, **hf_load_kwargs(model_type)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    directory = Path(directory)
    model.save_pretrained(directory)
    if classic_dialect:
        d = json.loads((directory / "config.json").read_text())
        rp = d.pop("rope_parameters", None) or {}
        d["rope_theta"] = rp.pop("rope_theta", 10000.0)
        if rp.get("rope_type", "default") != "default":
            d["rope_scaling"] = rp
        d["torch_dtype"] = d.pop("dtype", "float32")
        (directory / "config.json").write_text(json.dumps(d))
    return directory, model


def hf_logits(model, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """HF logits for a right-padded batch [B, T] (attention_mask from lengths), float32 numpy."""
    t = tokens.shape[1]
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask)).logits
    return out.float().numpy()


def randomize_lora(peft_model, seed=0, std=0.3):
    """PEFT initialises B = 0 (a no-op adapter): give A and B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))


def hf_logits_alone(model, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """HF logits of each row of a right-padded batch run alone, as [B, T, V] (zeros past each
    length)."""
    out = np.zeros(tokens.shape + (model.config.vocab_size,), np.float32)
    for b, n in enumerate(lengths):
        out[b, :n] = hf_logits(model, tokens[b:b + 1, :n], lengths[b:b + 1])[0]
    return out


def random_batch(rng: np.random.Generator, vocab: int, lengths, pad_id: int = 0):
    """Right-padded int32 tokens [B, max(lengths)] and lengths [B]."""
    lengths = np.asarray(lengths, np.int32)
    tokens = np.full((len(lengths), lengths.max()), pad_id, np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(3, vocab, n)
    return tokens, lengths


# ------------------------------------------------------------------ our forms of a model, for parity tests
# The fast runtime in both layouts, and the plain reference twin on the canonical params.
FORMS = ("per_layer", "stacked", "reference")


def realm_logits(params, cfg, tokens, lengths, forms=FORMS) -> dict:
    """{form: float32 numpy logits [B, T, V]} of realm_jax on canonical ``params``: ``forward`` on
    ``runtime.prepare(params, cfg, layout=form)`` for "per_layer" / "stacked", and
    ``reference.forward_reference`` for "reference"."""
    from realm_jax.model import forward_jit
    from realm_jax.reference import forward_reference_jit
    from realm_jax.runtime import prepare

    out = {}
    for form in forms:
        if form == "reference":
            out[form] = np.asarray(forward_reference_jit(params, cfg, tokens, lengths))
        else:
            out[form] = np.asarray(forward_jit(prepare(params, cfg, layout=form), cfg, tokens, lengths))
    return out


def dequantized(params):
    """Canonical params with every int8-quantizable matmul weight replaced by its int8 round trip
    (``dequantize_columns(*quantize_columns(w))``): the reference twin of ``prepare(quantize="int8")``."""
    from realm_jax.params import LEAVES
    from realm_jax.quantization import dequantize_columns, quantize_columns

    def rt(w):
        return dequantize_columns(*quantize_columns(w), dtype=w.dtype)

    out = {k: (rt(v) if k in LEAVES and LEAVES[k].quantizable else v) for k, v in params.items() if k != "layers"}
    out["layers"] = {k: (rt(v) if LEAVES[k].quantizable else v) for k, v in params["layers"].items()}
    return out
