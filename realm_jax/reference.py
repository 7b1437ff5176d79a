"""The plain reference forward: the twin every fast form is tested against.

Canonical params (``params.py``: stacked ``[L, ...]``, weights ``[D_in, D_out]``), a
``lax.scan`` over layers, einsum attention (``attention.gqa_attention``), and LoRA as each row's
own factors gathered (``lora.lora_delta``). Nothing here is fused, transposed, quantized,
folded or sharded, and nothing is shared with ``runtime.py``'s weight application.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .attention import attention_mask, gqa_attention
from .config import ModelConfig
from .layers import apply_rope, rms_norm, rope_cos_sin
from .lora import lora_delta
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
    """
    check_params(params, cfg)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_cos_sin(cfg, positions)
    mask = attention_mask(positions, lengths.astype(jnp.int32), t, cfg.sliding_window)
    H, eps = cfg.head_dim, cfg.rms_norm_eps
    ids = None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32)
    if adapters is not None and ids is None:
        ids = jnp.zeros((b,), jnp.int32)

    def layer(x, xs):
        lp, ll = xs
        h = rms_norm(x, lp["attn_norm"], eps)
        q, k, v = (_proj(h, lp, n, ll, ids) for n in ("wq", "wk", "wv"))
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"].astype(q.dtype), k + lp["bk"].astype(k.dtype), v + lp["bv"].astype(v.dtype)
        q, k, v = (a.reshape(b, t, -1, H) for a in (q, k, v))
        if cfg.qk_norm:
            q, k = rms_norm(q, lp["q_norm"], eps), rms_norm(k, lp["k_norm"], eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = _proj(gqa_attention(q, k, v, mask).reshape(b, t, -1), lp, "wo", ll, ids)
        if cfg.o_bias:
            o = o + lp["bo"].astype(o.dtype)
        x = x + o
        h = rms_norm(x, lp["mlp_norm"], eps)
        g, u = _proj(h, lp, "w_gate", ll, ids), _proj(h, lp, "w_up", ll, ids)
        return x + _proj(jax.nn.silu(g) * u, lp, "w_down", ll, ids), None

    x = jnp.take(params["embed"], tokens, axis=0)
    x, _ = jax.lax.scan(layer, x, (params["layers"], None if adapters is None else adapters["layers"]))
    x = rms_norm(x, params["final_norm"], eps)
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32)


forward_reference_jit = jax.jit(forward_reference, static_argnums=1)
