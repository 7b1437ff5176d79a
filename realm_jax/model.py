"""The transformer: ``init_params`` and a pure ``forward`` (scan over layers stacked on axis 0).

Params pytree (weights are ``[D_in, D_out]``, applied as ``x @ W``)::

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D], "wq": [L, D, N*H], "wk": [L, D, K*H], "wv": [L, D, K*H],
                "wo": [L, N*H, D], "mlp_norm": [L, D],
                "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D],
                # optional: "bq" [L, N*H], "bk"/"bv" [L, K*H] (qkv_bias), "bo" [L, D] (o_bias),
                #           "q_norm"/"k_norm" [L, H] (qk_norm)
               },
     "final_norm": [D],
     "lm_head": [D, V]}            # absent when cfg.tie_word_embeddings (embed.T is used)

``forward`` runs a right-padded batch without a cache; ``forward_cached`` appends the new tokens
to a ``KVCache`` (in place when donated) and attends over everything cached so far.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .attention import attention_mask, gqa_attention
from .config import ModelConfig
from .kv_cache import KVCache, write_layer
from .layers import apply_rope, linear, rms_norm, rope_cos_sin

Params = dict

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def param_shapes(cfg: ModelConfig) -> dict:
    """The expected shape of every leaf (the single source of truth for loaders and checks)."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    NH, KH, H = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    layers = {
        "attn_norm": (L, D), "wq": (L, D, NH), "wk": (L, D, KH), "wv": (L, D, KH), "wo": (L, NH, D),
        "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
    }
    if cfg.qkv_bias:
        layers.update(bq=(L, NH), bk=(L, KH), bv=(L, KH))
    if cfg.o_bias:
        layers["bo"] = (L, D)
    if cfg.qk_norm:
        layers.update(q_norm=(L, H), k_norm=(L, H))
    shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random params (normal, std 0.02; norms around 1) in ``dtype``."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            x = 1.0 + 0.1 * jax.random.normal(k, shape, jnp.float32)
        elif path.endswith("['bq']") or path.endswith("['bk']") or path.endswith("['bv']") or path.endswith("['bo']"):
            x = 0.1 * jax.random.normal(k, shape, jnp.float32)
        else:
            x = 0.02 * jax.random.normal(k, shape, jnp.float32) * (4.0 if path == "['embed']" else 1.0)
        out.append(x.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _proj(x, lp, name, lora_l, adapter_ids):
    """x @ W (+ bias) (+ per-row LoRA delta)."""
    y = linear(x, lp[name])
    if lora_l is not None and name in lora_l:
        from .lora import lora_delta

        y = y + lora_delta(x, lora_l[name], adapter_ids).astype(y.dtype)
    return y


def _layer(cfg: ModelConfig, x, lp, cos, sin, attend, lora_l, adapter_ids):
    """One decoder layer. x [B, T, D]; ``attend(q, k, v) -> o`` hides cache vs no cache."""
    b, t, _ = x.shape
    H = cfg.head_dim
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q = _proj(h, lp, "wq", lora_l, adapter_ids)
    k = _proj(h, lp, "wk", lora_l, adapter_ids)
    v = _proj(h, lp, "wv", lora_l, adapter_ids)
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"].astype(q.dtype), k + lp["bk"].astype(k.dtype), v + lp["bv"].astype(v.dtype)
    q = q.reshape(b, t, cfg.num_heads, H)
    k = k.reshape(b, t, cfg.num_kv_heads, H)
    v = v.reshape(b, t, cfg.num_kv_heads, H)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = attend(q, k, v).reshape(b, t, cfg.num_heads * H)
    o = _proj(o, lp, "wo", lora_l, adapter_ids)
    if cfg.o_bias:
        o = o + lp["bo"].astype(o.dtype)
    x = x + o
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    g = jax.nn.silu(_proj(h, lp, "w_gate", lora_l, adapter_ids)) * _proj(h, lp, "w_up", lora_l, adapter_ids)
    return x + _proj(g, lp, "w_down", lora_l, adapter_ids)


def _lm_head(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> float32 logits [B, T, V]."""
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:
        w = params["embed"]
        return jnp.einsum("btd,vd->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    w = params["lm_head"]
    if isinstance(w, dict):
        return linear(x, w).astype(jnp.float32)
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _embed(params: Params, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0)


def _lora_layers(adapters):
    return None if adapters is None else adapters["layers"]


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array,
            *, adapters=None, adapter_ids=None) -> jax.Array:
    """Logits for a right-padded batch, no cache.

    tokens [B, T] int32, lengths [B] int32 -> logits [B, T, V] float32 (padding slots: anything).
    ``adapters``/``adapter_ids [B]`` (-1 = base) add per-row unmerged LoRA (see ``lora.py``).
    """
    hidden = forward_hidden(params, cfg, tokens, lengths, adapters=adapters, adapter_ids=adapter_ids)
    return _lm_head(params, cfg, hidden)


def forward_hidden(params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array,
                   *, adapters=None, adapter_ids=None) -> jax.Array:
    """Final hidden states before the last norm: [B, T, D] in the params dtype."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_cos_sin(cfg, positions)
    mask = attention_mask(positions, lengths.astype(jnp.int32), t, cfg.sliding_window)

    def attend(q, k, v):
        return gqa_attention(q, k, v, mask)

    def body(x, xs):
        lp, lora_l = xs
        return _layer(cfg, x, lp, cos, sin, attend, lora_l, adapter_ids), None

    x, _ = jax.lax.scan(body, _embed(params, tokens), (params["layers"], _lora_layers(adapters)))
    return x


def forward_cached(params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array,
                   cache: KVCache, *, adapters=None, adapter_ids=None,
                   num_layers: int | None = None) -> tuple[jax.Array, KVCache]:
    """Append tokens to the cache and return their logits.

    tokens [B, T] int32 (right-padded), lengths [B] int32: how many of the T tokens are real
    (0 = the row does not advance). Token t of row b sits at position ``cache.lengths[b] + t``.
    Returns logits [B, T, V] float32 and the cache with ``lengths += lengths``.
    ``num_layers`` runs only the first layers (self-speculative draft); the cache must have
    that many layers.
    """
    b, t = tokens.shape
    lengths = lengths.astype(jnp.int32)
    start = cache.lengths
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    cos, sin = rope_cos_sin(cfg, positions)
    kv_len = start + lengths
    mask = attention_mask(positions, kv_len, cache.max_len, cfg.sliding_window)
    layers = params["layers"]
    lora_layers = _lora_layers(adapters)
    if num_layers is not None:
        layers = jax.tree_util.tree_map(lambda a: a[:num_layers], layers)
        if lora_layers is not None:
            lora_layers = jax.tree_util.tree_map(lambda a: a[:num_layers], lora_layers)

    def body(carry, xs):
        x, ck, cv, i = carry
        lp, lora_l = xs
        box = {}

        def attend(q, k, v):
            nk = write_layer(ck, i, k, start)
            nv = write_layer(cv, i, v, start)
            box["k"], box["v"] = nk, nv
            return gqa_attention(q, nk[i], nv[i], mask)

        x = _layer(cfg, x, lp, cos, sin, attend, lora_l, adapter_ids)
        return (x, box["k"], box["v"], i + 1), None

    init = (_embed(params, tokens), cache.k, cache.v, jnp.int32(0))
    (x, ck, cv, _), _ = jax.lax.scan(body, init, (layers, lora_layers))
    return _lm_head(params, cfg, x), KVCache(ck, cv, kv_len)


forward_jit = jax.jit(forward, static_argnums=1)
forward_cached_jit = jax.jit(forward_cached, static_argnums=1, static_argnames=("num_layers",), donate_argnums=4)
