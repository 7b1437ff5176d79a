"""The canonical params tree and its one table of per-leaf facts.

Canonical params (what files, PEFT, merge, save, quantize and the reference forward see)::

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D], "wq": [L, D, N*H], "wk": [L, D, K*H], "wv": [L, D, K*H],
                "wo": [L, N*H, D], "mlp_norm": [L, D],
                "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D],
                # optional: "bq" [L, N*H], "bk"/"bv" [L, K*H] (qkv_bias), "bo" [L, D] (o_bias),
                #           "q_norm"/"k_norm" [L, H] (qk_norm),
                #           "post_attn_norm"/"post_mlp_norm" [L, D] (post_norms: gemma2/3)
                # mixture of experts (cfg.moe): "router" [L, D, E], "we_gate"/"we_up" [L, E, D, Fe],
                #           "we_down" [L, E, Fe, D]; "shared_gate" [L, D, 1] (shared_expert: qwen2_moe,
                #           whose shared expert is the dense w_gate/w_up/w_down of width F); without
                #           a dense MLP (mixtral, qwen3_moe) w_gate/w_up/w_down are absent
               },
     "final_norm": [D],
     "lm_head": [D, V]}            # absent when cfg.tie_word_embeddings (embed.T is used)

Matmul weights are ``[D_in, D_out]`` (applied as ``x @ W``); layer leaves carry L first, and
expert leaves E second (an HF checkpoint holds one tensor per layer and expert: ``{i}`` / ``{e}``
in the names; a GGUF file one tensor per layer holding every expert, ``[E, D_out, D_in]``; they
are stacked at load time). Several leaves may name one file tensor (Phi-3's ``qkv_proj`` holds
wq | wk | wv and ``gate_up_proj`` w_gate | w_up): the tensor is their parts side by side on its
output axis, in table order, split at load time and joined when written.

``LEAVES`` holds, for every leaf, everything the rest of the package needs to know about it:
its logical axes (which give its shape and its sharding), its HF and GGUF tensor names, and
whether it is a matmul weight, int8-quantizable and a LoRA target (with its PEFT module name).
A new architecture adds rows here; loaders, sharding rules, PEFT and the runtime form read them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig

Params = dict


@dataclasses.dataclass(frozen=True)
class Leaf:
    """Facts about one canonical params leaf.

    axes: logical axis names (see ``axis_sizes``); a layer leaf starts with ``"layers"``.
    hf / gguf: tensor name in an HF checkpoint / a GGUF file (``{i}`` = layer index).
    hf_transposed: the file stores the weight ``[D_out, D_in]`` (torch ``nn.Linear``).
    matmul: a projection weight ``[.., D_in, D_out]``; quantizable: int8 weight-only applies.
    peft: the PEFT / HF module name when the leaf is a LoRA target (e.g. ``"q_proj"``).
    when: the config flag that adds the leaf (``qkv_bias``, ``o_bias``, ``qk_norm``, ``moe``,
    ``dense_mlp``, ``shared_expert``) or ``"untied"`` (present unless ``tie_word_embeddings``);
    None = always present.
    init: how ``init_params`` draws it: ``normal`` (std 0.02), ``embed`` (std 0.08),
    ``norm`` (around 1, or around 0 for ``norm_plus_one`` models), ``bias`` (std 0.1).
    hf_if: (config flag, HF name) pairs: the first whose flag the config has names the tensor
    instead of ``hf`` (gemma2's ``post_attention_layernorm`` is not the pre-MLP norm; Qwen2-MoE's
    dense MLP is its ``shared_expert``; Mixtral's experts live in ``block_sparse_moe``).
    gguf_if: the same for the GGUF name (Qwen2-MoE's dense MLP is its ``*_shexp`` tensors).
    A per-expert leaf whose GGUF name has no ``{e}`` is one tensor per layer, every expert stacked.
    """

    name: str
    axes: tuple[str, ...]
    hf: str
    gguf: str | None = None
    hf_transposed: bool = False
    matmul: bool = False
    quantizable: bool = False
    peft: str | None = None
    when: str | None = None
    init: str = "normal"
    hf_if: tuple[tuple[str, str], ...] = ()
    gguf_if: tuple[tuple[str, str], ...] = ()

    @property
    def is_layer(self) -> bool:
        return self.axes[0] == "layers"

    @property
    def per_expert(self) -> bool:
        """A leaf ``[L, E, ...]`` stored in files one tensor per layer and expert."""
        return self.axes[:2] == ("layers", "experts")

    @property
    def lora_target(self) -> bool:
        return self.peft is not None


def _proj(name, axes, module, gguf, hf_block="self_attn", when=None, hf_if=(), gguf_if=(), fused=None):
    """A layer projection; ``fused``: (HF module, GGUF name) of the fused tensor holding it in a
    ``fused_checkpoint`` (Phi-3)."""
    fused_hf = (("fused_checkpoint", f"model.layers.{{i}}.{hf_block}.{fused[0]}.weight"),) if fused else ()
    fused_gguf = (("fused_checkpoint", f"blk.{{i}}.{fused[1]}.weight"),) if fused else ()
    return Leaf(name, ("layers",) + axes, f"model.layers.{{i}}.{hf_block}.{module}.weight", f"blk.{{i}}.{gguf}.weight",
                hf_transposed=True, matmul=True, quantizable=True, peft=module, when=when,
                hf_if=fused_hf + tuple((flag, f"model.layers.{{i}}.{n}.{module}.weight") for flag, n in hf_if),
                gguf_if=fused_gguf + tuple((flag, f"blk.{{i}}.{n}.weight") for flag, n in gguf_if))


def _expert(name, axes, module, mixtral_module, gguf):
    """One of the experts' matmul weights [L, E, D_in, D_out]: Qwen names, Mixtral's beside them;
    in GGUF one tensor per layer, [E, D_out, D_in] (``blk.{i}.{gguf}.weight``)."""
    return Leaf(name, ("layers", "experts") + axes, f"model.layers.{{i}}.mlp.experts.{{e}}.{module}.weight",
                f"blk.{{i}}.{gguf}.weight", hf_transposed=True, matmul=True, quantizable=True, when="moe",
                hf_if=(("block_sparse_moe", f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{mixtral_module}.weight"),))


def _vec(name, axes, hf, gguf, when=None, init="norm", hf_if=()):
    return Leaf(name, ("layers",) + axes, f"model.layers.{{i}}.{hf}", f"blk.{{i}}.{gguf}", when=when, init=init,
                hf_if=tuple((flag, f"model.layers.{{i}}.{n}") for flag, n in hf_if))


_SHARED = (("shared_expert", "mlp.shared_expert"),)  # qwen2_moe: the dense MLP is the shared expert


def _shexp(gguf):
    return (("shared_expert", f"{gguf}_shexp"),)  # ... named ffn_*_shexp in GGUF


# Phi-3 stores q|k|v and gate|up fused, each as one tensor (HF module, GGUF name): the leaves naming
# one tensor are its parts, in table order, side by side on its output axis
_QKV, _GATE_UP = ("qkv_proj", "attn_qkv"), ("gate_up_proj", "ffn_up")

LEAVES: dict[str, Leaf] = {leaf.name: leaf for leaf in (
    Leaf("embed", ("vocab", "embed"), "model.embed_tokens.weight", "token_embd.weight", init="embed"),
    Leaf("final_norm", ("embed",), "model.norm.weight", "output_norm.weight", init="norm"),
    Leaf("lm_head", ("embed", "vocab"), "lm_head.weight", "output.weight", hf_transposed=True, matmul=True,
         quantizable=True, when="untied"),
    _vec("attn_norm", ("embed",), "input_layernorm.weight", "attn_norm.weight"),
    _proj("wq", ("embed", "q_heads"), "q_proj", "attn_q", fused=_QKV),
    _proj("wk", ("embed", "kv_heads"), "k_proj", "attn_k", fused=_QKV),
    _proj("wv", ("embed", "kv_heads"), "v_proj", "attn_v", fused=_QKV),
    _proj("wo", ("q_heads", "embed"), "o_proj", "attn_output"),
    _vec("bq", ("q_heads",), "self_attn.q_proj.bias", "attn_q.bias", "qkv_bias", "bias"),
    _vec("bk", ("kv_heads",), "self_attn.k_proj.bias", "attn_k.bias", "qkv_bias", "bias"),
    _vec("bv", ("kv_heads",), "self_attn.v_proj.bias", "attn_v.bias", "qkv_bias", "bias"),
    _vec("bo", ("embed",), "self_attn.o_proj.bias", "attn_output.bias", "o_bias", "bias"),
    _vec("q_norm", ("head_dim",), "self_attn.q_norm.weight", "attn_q_norm.weight", "qk_norm"),
    _vec("k_norm", ("head_dim",), "self_attn.k_norm.weight", "attn_k_norm.weight", "qk_norm"),
    _vec("post_attn_norm", ("embed",), "post_attention_layernorm.weight", "post_attention_norm.weight",
         "post_norms"),
    _vec("mlp_norm", ("embed",), "post_attention_layernorm.weight", "ffn_norm.weight",
         hf_if=(("post_norms", "pre_feedforward_layernorm.weight"),)),
    _vec("post_mlp_norm", ("embed",), "post_feedforward_layernorm.weight", "post_ffw_norm.weight", "post_norms"),
    _proj("w_gate", ("embed", "mlp"), "gate_proj", "ffn_gate", "mlp", "dense_mlp", _SHARED, _shexp("ffn_gate"),
          _GATE_UP),
    _proj("w_up", ("embed", "mlp"), "up_proj", "ffn_up", "mlp", "dense_mlp", _SHARED, _shexp("ffn_up"), _GATE_UP),
    _proj("w_down", ("mlp", "embed"), "down_proj", "ffn_down", "mlp", "dense_mlp", _SHARED, _shexp("ffn_down")),
    # GGUF stores the shared-expert gate [1, D] squeezed to [D] (``file_shape`` accepts both)
    Leaf("shared_gate", ("layers", "embed", "one"), "model.layers.{i}.mlp.shared_expert_gate.weight",
         "blk.{i}.ffn_gate_inp_shexp.weight", hf_transposed=True, matmul=True, when="shared_expert"),
    Leaf("router", ("layers", "embed", "experts"), "model.layers.{i}.mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight",
         hf_transposed=True, matmul=True, when="moe",
         hf_if=(("block_sparse_moe", "model.layers.{i}.block_sparse_moe.gate.weight"),)),
    _expert("we_gate", ("embed", "expert_mlp"), "gate_proj", "w1", "ffn_gate_exps"),
    _expert("we_up", ("embed", "expert_mlp"), "up_proj", "w3", "ffn_up_exps"),
    _expert("we_down", ("expert_mlp", "embed"), "down_proj", "w2", "ffn_down_exps"),
)}
# The routed experts' weights (the leaves with an E axis after L), in table order.
EXPERT_LEAVES: tuple[str, ...] = tuple(n for n, leaf in LEAVES.items() if leaf.per_expert)

# The LoRA targets (the layer projections), in their canonical order.
PROJECTIONS: tuple[str, ...] = tuple(n for n, leaf in LEAVES.items() if leaf.lora_target)
# PEFT module name <-> projection leaf ("q_proj" <-> "wq").
PEFT_MODULES: dict[str, str] = {LEAVES[p].peft: p for p in PROJECTIONS}


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Logical axis -> its size for this model (in elements: ``q_heads`` is N*H columns)."""
    H = cfg.head_dim
    return {"layers": cfg.num_layers, "embed": cfg.hidden_size, "q_heads": cfg.num_heads * H,
            "kv_heads": cfg.num_kv_heads * H, "mlp": cfg.intermediate_size, "vocab": cfg.vocab_size,
            "head_dim": H, "experts": cfg.num_experts, "expert_mlp": cfg.moe_intermediate_size, "one": 1}


def present(leaf: Leaf, cfg: ModelConfig) -> bool:
    """Whether this config has the leaf."""
    if leaf.when is None:
        return True
    if leaf.when == "untied":
        return not cfg.tie_word_embeddings
    return bool(getattr(cfg, leaf.when))


def file_name(leaf: Leaf, cfg: ModelConfig, fmt: str = "hf") -> str:
    """The leaf's tensor name pattern (``{i}`` = layer, ``{e}`` = expert) in an HF (``fmt="hf"``)
    or GGUF (``fmt="gguf"``) file."""
    for flag, name in getattr(leaf, f"{fmt}_if"):
        if getattr(cfg, flag):
            return name
    return getattr(leaf, fmt)


def fused_parts(leaf: Leaf, cfg: ModelConfig, fmt: str = "hf") -> tuple[str, ...]:
    """The leaves of the file tensor that holds ``leaf``, in table order (their rows' order):
    the leaf alone, or every part of a fused tensor (Phi-3's wq, wk, wv in ``qkv_proj``)."""
    name = file_name(leaf, cfg, fmt)
    return tuple(other.name for other in model_leaves(cfg) if file_name(other, cfg, fmt) == name)


def experts_stacked(leaf: Leaf, cfg: ModelConfig, fmt: str = "hf") -> bool:
    """A per-expert leaf that the file holds as one tensor per layer, every expert stacked on
    its first axis (GGUF's ``*_exps`` tensors), not one tensor per layer and expert."""
    return leaf.per_expert and "{e}" not in file_name(leaf, cfg, fmt)


def model_leaves(cfg: ModelConfig) -> list[Leaf]:
    """The leaves this config has, in table order."""
    return [leaf for leaf in LEAVES.values() if present(leaf, cfg)]


def leaf_shape(leaf: Leaf, cfg: ModelConfig) -> tuple[int, ...]:
    sizes = axis_sizes(cfg)
    return tuple(sizes[a] for a in leaf.axes)


def param_shapes(cfg: ModelConfig) -> dict:
    """The expected shape of every leaf, as the params tree (the single source for loaders and checks)."""
    top, layers = {}, {}
    for leaf in model_leaves(cfg):
        (layers if leaf.is_layer else top)[leaf.name] = leaf_shape(leaf, cfg)
    return {"embed": top["embed"], "layers": layers, **{k: v for k, v in top.items() if k != "embed"}}


def projection_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """{projection: (D_in, D_out)} for the LoRA targets this model has (a model whose MLP is
    experts only has no w_gate / w_up / w_down)."""
    shapes = param_shapes(cfg)["layers"]
    return {p: shapes[p][1:] for p in PROJECTIONS if p in shapes}


def init_params(cfg: ModelConfig, key, dtype=jnp.float32) -> Params:
    """Random canonical params in ``dtype``: weights N(0, 0.02²) (embedding 0.08), norms around 1,
    biases N(0, 0.1²). ``key``: a PRNG key, or an int seed (drawn on the host with numpy: no
    compilation, as tests and benchmarks of large shapes want)."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    host = isinstance(key, (int, np.integer))
    rng = np.random.default_rng(int(key)) if host else None
    keys = None if host else jax.random.split(key, len(flat))
    out = []
    one = 0.0 if cfg.norm_plus_one else 1.0  # a (1 + w) norm's neutral weight is 0
    for j, (path, shape) in enumerate(flat):
        kind = LEAVES[str(path[-1].key)].init
        z = rng.standard_normal(shape, np.float32) if host else jax.random.normal(keys[j], shape, jnp.float32)
        x = one + 0.1 * z if kind == "norm" else {"bias": 0.1, "embed": 0.08}.get(kind, 0.02) * z
        out.append(jnp.asarray(x, dtype) if host else x.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def param_bytes(tree) -> int:
    """Bytes of the array leaves of a pytree (int8 counted as 1 byte; a buffer that appears twice,
    like a tied embedding serving as the head, counted once): what a decode step reads at least."""
    leaves = {id(x): x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")}
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves.values()))
