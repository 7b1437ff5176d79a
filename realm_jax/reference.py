"""The plain reference forward: the twin every fast form is tested against.

Canonical params (``params.py``: stacked ``[L, ...]``, weights ``[D_in, D_out]``), a
``lax.scan`` over layers, einsum attention (``attention.gqa_attention``), and LoRA as each row's
own factors gathered (``lora.lora_delta``), every family feature (``config.ModelConfig``'s
fields) written out plainly; a mixture of experts runs every expert on every token
(``moe.dense_experts``). Nothing here is fused, transposed, quantized,
folded or sharded, and nothing is shared with ``runtime.py``'s weight application.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .attention import attention_mask, gqa_attention
from .config import ModelConfig
from .layers import apply_rope, embed_tokens, gate, norm, rope_cos_sin, softcap
from .lora import lora_delta
from .moe import dense_experts, route, shared_expert_scale
from .runtime import check_params


def _proj(x, lp, name, lora_l, ids):
    y = jnp.matmul(x, lp[name], preferred_element_type=jnp.float32).astype(x.dtype)
    if lora_l is not None and name in lora_l:
        y = y + lora_delta(x, lora_l[name], ids, method="gather").astype(y.dtype)
    return y


def forward_reference(params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, *, adapters=None,
                      adapter_ids=None) -> jax.Array:
    """tokens [B, T] int32, lengths [B] -> float32 logits [B, T, V] (padding slots: anything).

    ``adapters``: a canonical adapter or stack (``lora.py``); ``adapter_ids [B]`` (-1 = base).
    Local and global layers (``cfg.layer_local``) differ only in their mask and rope, both
    chosen per layer inside the scan.
    """
    check_params(params, cfg)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    lengths = lengths.astype(jnp.int32)
    rope = {local: rope_cos_sin(cfg, positions, local, lengths) for local in (False, True)}
    masks = {local: attention_mask(positions, lengths, t, cfg.window(local)) for local in (False, True)}
    H = cfg.head_dim
    ids = None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32)
    if adapters is not None and ids is None:
        ids = jnp.zeros((b,), jnp.int32)

    def layer(x, xs):
        lp, ll, local = xs
        cos, sin = (jnp.where(local, a, g) for a, g in zip(rope[True], rope[False]))
        mask = jnp.where(local, masks[True], masks[False])
        h = norm(cfg, x, lp["attn_norm"])
        q, k, v = (_proj(h, lp, n, ll, ids) for n in ("wq", "wk", "wv"))
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"].astype(q.dtype), k + lp["bk"].astype(k.dtype), v + lp["bv"].astype(v.dtype)
        q, k, v = (a.reshape(b, t, -1, H) for a in (q, k, v))
        if cfg.qk_norm:
            q, k = norm(cfg, q, lp["q_norm"]), norm(cfg, k, lp["k_norm"])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = gqa_attention(q, k, v, mask, scale=cfg.attention_scale, softcap=cfg.attn_softcap)
        o = _proj(o.reshape(b, t, -1), lp, "wo", ll, ids)
        if cfg.o_bias:
            o = o + lp["bo"].astype(o.dtype)
        x = x + (norm(cfg, o, lp["post_attn_norm"]) if cfg.post_norms else o)
        h = norm(cfg, x, lp["mlp_norm"])
        y = 0
        if cfg.dense_mlp:  # a dense model's MLP, or Qwen2-MoE's shared expert (gated)
            g, u = _proj(h, lp, "w_gate", ll, ids), _proj(h, lp, "w_up", ll, ids)
            y = _proj(gate(cfg, g) * u, lp, "w_down", ll, ids)
            y = shared_expert_scale(h, lp["shared_gate"]) * y if cfg.shared_expert else y
        if cfg.moe:  # every expert on every token, weighted by the routing (zero off the chosen k)
            weights, experts = route(cfg, h, lp["router"])
            y = dense_experts(cfg, h, weights, experts, lp["we_gate"], lp["we_up"], lp["we_down"]) + y
        return x + (norm(cfg, y, lp["post_mlp_norm"]) if cfg.post_norms else y), None

    x = embed_tokens(cfg, params["embed"], tokens)
    xs = (params["layers"], None if adapters is None else adapters["layers"], jnp.asarray(cfg.layer_local))
    x, _ = jax.lax.scan(layer, x, xs)
    x = norm(cfg, x, params["final_norm"])
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return softcap(jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32), cfg.final_softcap)


forward_reference_jit = jax.jit(forward_reference, static_argnums=1)
