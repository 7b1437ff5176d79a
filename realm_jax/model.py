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


import jax
import jax.numpy as jnp

from .attention import attention_mask, fused_attention, fused_attention_impl, gqa_attention
from .config import ModelConfig
from .errors import RealmError
from .kv_cache import KVCache, write_layer, write_rows
from .layers import apply_rope, has_lora_rows, linear, rms_norm, rope_cos_sin, transpose_weight

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


def _lora_add(y, x, name, lora_l, adapter_ids):
    """y + the per-row LoRA delta of projection ``name`` (if an adapter targets it)."""
    if lora_l is not None and name in lora_l:
        from .lora import lora_add

        y = lora_add(y, x, lora_l[name], adapter_ids)
    return y


def _proj(x, lp, name, lora_l, adapter_ids):
    """x @ W (+ per-row LoRA delta of projection ``name``). A weight with the LoRA A factors
    folded in (``{"t_lora"}``, see ``lora.fold_layout``) gives both in one matmul
    (``lora.folded_proj``, which needs the folded adapter leaf)."""
    w = lp[name]
    if has_lora_rows(w):
        from .lora import folded_proj

        return folded_proj(x, w, None if lora_l is None else lora_l.get(name), adapter_ids, name)
    return _lora_add(linear(x, w), x, name, lora_l, adapter_ids)


def _qkv(cfg: ModelConfig, h, lp, lora_l, adapter_ids):
    """Projections q [.., N*H], k, v [.., K*H] (+ biases), from separate or fused weights."""
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if "wqkv" in lp:  # decode layout: one matmul (+ fused or folded adapters)
        qkv = _proj(h, lp, "wqkv", lora_l, adapter_ids)
        if cfg.qkv_bias:
            qkv = qkv + lp["bqkv"].astype(qkv.dtype)
        q, k, v = jnp.split(qkv, [nh, nh + kh], axis=-1)
        return (_lora_add(q, h, "wq", lora_l, adapter_ids), _lora_add(k, h, "wk", lora_l, adapter_ids),
                _lora_add(v, h, "wv", lora_l, adapter_ids))
    q, k, v = (_proj(h, lp, n, lora_l, adapter_ids) for n in ("wq", "wk", "wv"))
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"].astype(q.dtype), k + lp["bk"].astype(k.dtype), v + lp["bv"].astype(v.dtype)
    return q, k, v


def _gate_up(h, lp, lora_l, adapter_ids):
    if "w_gate_up" in lp:  # decode layout: one matmul (+ fused or folded adapters)
        g, u = jnp.split(_proj(h, lp, "w_gate_up", lora_l, adapter_ids), 2, axis=-1)
        return _lora_add(g, h, "w_gate", lora_l, adapter_ids), _lora_add(u, h, "w_up", lora_l, adapter_ids)
    return _proj(h, lp, "w_gate", lora_l, adapter_ids), _proj(h, lp, "w_up", lora_l, adapter_ids)


def _layer(cfg: ModelConfig, x, lp, cos, sin, attend, lora_l, adapter_ids):
    """One decoder layer. x [B, T, D]; ``attend(q, k, v) -> o`` hides cache vs no cache."""
    b, t, _ = x.shape
    H = cfg.head_dim
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = _qkv(cfg, h, lp, lora_l, adapter_ids)
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
    g, u = _gate_up(h, lp, lora_l, adapter_ids)
    return x + _proj(jax.nn.silu(g) * u, lp, "w_down", lora_l, adapter_ids)


def _attention_core(cfg: ModelConfig, dtype, t: int, mask, kv_len, lengths, num_keys: int, *, fresh: bool):
    """Pick the attention for one call: ``core(q, k, v, k_all, v_all) -> o``.

    q [B, T, N, H]; k, v [B, T, K, H] this call's keys; k_all, v_all [B, S, K, H] the keys the
    reference attends over (the cache, or k, v themselves without one); mask [B, T, S].
    The fused kernel (``attention.fused_attention``) replaces the reference where its mask is the
    same: a prompt pass over an empty cache (``fresh``: causal over this call's keys, lengths [B])
    and single-token decode without an active sliding window (keys s < kv_len [B]).
    """
    impl = fused_attention_impl(dtype, cfg.head_dim)
    window = cfg.sliding_window
    win = window if window is not None and window < t else None
    # cuDNN's sliding-window support depends on its version and was not measured: keep windowed
    # prompt passes on the reference there (the XLA implementation, used by the tests, has it)
    if impl is not None and fresh and t > 1 and (win is None or impl == "xla"):
        return lambda q, k, v, ka, va: fused_attention(q, k, v, lengths, causal=True, window=win,
                                                       implementation=impl)
    if impl is not None and t == 1 and (window is None or window >= num_keys):
        return lambda q, k, v, ka, va: fused_attention(q, ka, va, kv_len, causal=False, window=None,
                                                       implementation=impl)
    return lambda q, k, v, ka, va: gqa_attention(q, ka, va, mask)


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


def _lora_layers(adapters, layers=None):
    if adapters is not None and is_unstacked(adapters["layers"]) and not is_unstacked(layers):
        raise RealmError("adapters in the decode layout (lora.decode_layout / fold_layout) need params in the "
                         "decode layout (model.decode_layout)")
    return None if adapters is None else adapters["layers"]


def _lora_slice(lora_layers, i: int):
    if lora_layers is None or is_unstacked(lora_layers):
        return None if lora_layers is None else lora_layers[i]
    return jax.tree_util.tree_map(lambda a: a[i], lora_layers)


def is_unstacked(layers) -> bool:
    """True for the decode layout (a tuple of per-layer dicts), False for stacked [L, ...] leaves."""
    return isinstance(layers, (tuple, list))


def _concat_last(leaves):
    """Concatenate weights on the output axis; quantized weights concatenate q and scale alike."""
    if isinstance(leaves[0], dict):
        return {k: jnp.concatenate([w[k] for w in leaves], axis=-1) for k in leaves[0]}
    return jnp.concatenate(leaves, axis=-1)


MATMUL_WEIGHTS = ("wqkv", "wo", "w_gate_up", "w_down")  # the decode layout's projections


def decode_layout(params: Params, *, transposed: bool = True) -> Params:
    """The fast layout for small-batch decoding on GPU: q|k|v fused into ``wqkv`` [D, (N+2K)*H]
    (biases into ``bqkv``), gate|up into ``w_gate_up`` [D, 2F], and the layers unstacked into a
    tuple of L dicts, so each layer's weights are their own buffers (a scan over stacked weights
    makes XLA copy weight slices every step). With ``transposed`` (default) the four projections
    are stored [Dout, Din] (``{"t": ..}`` / ``{"qt": .., "scale": ..}``, see ``layers.linear``):
    batch-1 decode of the 1B shape on an H100 runs 1.93 -> 1.33 ms/step, because XLA's
    matrix-vector kernels then read the contracted axis contiguously.
    ``forward``/``forward_cached`` run every layout and give the same numbers; LoRA adapters
    (unmerged, or merged with ``lora.merge``) and int8 weights work in all. Use
    ``init_cache(..., per_layer=True)`` with it so each layer's KV cache is its own buffer too.
    """
    layers = params["layers"]
    if is_unstacked(layers):
        return params
    fused = {k: v for k, v in layers.items() if k not in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up")}
    fused["wqkv"] = _concat_last([layers["wq"], layers["wk"], layers["wv"]])
    if "bq" in layers:
        fused["bqkv"] = jnp.concatenate([layers["bq"], layers["bk"], layers["bv"]], axis=-1)
    fused["w_gate_up"] = _concat_last([layers["w_gate"], layers["w_up"]])
    if transposed:
        fused.update({k: transpose_weight(fused[k]) for k in MATMUL_WEIGHTS})
    n = layers["attn_norm"].shape[0]
    out = dict(params)
    out["layers"] = tuple(jax.tree_util.tree_map(lambda a: a[i], fused) for i in range(n))
    return out


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
    lengths = lengths.astype(jnp.int32)
    mask = attention_mask(positions, lengths, t, cfg.sliding_window)
    layers = params["layers"]
    lora_layers = _lora_layers(adapters, layers)
    x = _embed(params, tokens)
    core = _attention_core(cfg, x.dtype, t, mask, lengths, lengths, t, fresh=True)

    def attend(q, k, v):
        return core(q, k, v, k, v)

    if is_unstacked(layers):
        for i, lp in enumerate(layers):
            x = _layer(cfg, x, lp, cos, sin, attend, _lora_slice(lora_layers, i), adapter_ids)
        return x

    def body(x, xs):
        lp, lora_l = xs
        return _layer(cfg, x, lp, cos, sin, attend, lora_l, adapter_ids), None

    x, _ = jax.lax.scan(body, x, (layers, lora_layers))
    return x


def forward_cached(params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array,
                   cache: KVCache, *, adapters=None, adapter_ids=None,
                   num_layers: int | None = None) -> tuple[jax.Array, KVCache]:
    """Append tokens to the cache and return their logits (see ``forward_cached_hidden``)."""
    x, cache = forward_cached_hidden(params, cfg, tokens, lengths, cache, adapters=adapters,
                                     adapter_ids=adapter_ids, num_layers=num_layers)
    return _lm_head(params, cfg, x), cache


def forward_cached_hidden(params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array,
                          cache: KVCache, *, adapters=None, adapter_ids=None,
                          num_layers: int | None = None, empty_cache: bool = False) -> tuple[jax.Array, KVCache]:
    """Append tokens to the cache and return their hidden states [B, T, D] before the final norm
    (``lm_head`` turns chosen positions into logits, e.g. only each row's last prompt token).

    tokens [B, T] int32 (right-padded), lengths [B] int32: how many of the T tokens are real
    (0 = the row does not advance). Token t of row b sits at position ``cache.lengths[b] + t``.
    Returns hidden [B, T, D] and the cache with ``lengths += lengths``.
    ``num_layers`` runs only the first layers (self-speculative draft); the cache must have
    that many layers. ``empty_cache=True`` promises every ``cache.lengths`` is 0 (a prompt pass):
    where the fused kernel is available, attention then runs over this call's keys alone through it.
    """
    b, t = tokens.shape
    lengths = lengths.astype(jnp.int32)
    start = cache.lengths
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    cos, sin = rope_cos_sin(cfg, positions)
    kv_len = start + lengths
    mask = attention_mask(positions, kv_len, cache.max_len, cfg.sliding_window)
    layers = params["layers"]
    lora_layers = _lora_layers(adapters, layers)
    if num_layers is not None:
        layers = layers[:num_layers] if is_unstacked(layers) else jax.tree_util.tree_map(lambda a: a[:num_layers], layers)
        if lora_layers is not None:
            lora_layers = lora_layers[:num_layers] if is_unstacked(lora_layers) else \
                jax.tree_util.tree_map(lambda a: a[:num_layers], lora_layers)
    x = _embed(params, tokens)
    core = _attention_core(cfg, x.dtype, t, mask, kv_len, lengths, cache.max_len, fresh=empty_cache)

    if is_unstacked(layers):  # decode layout: a Python loop, each layer's weights its own buffer
        ks, vs = cache.k, cache.v
        per_layer = isinstance(ks, (tuple, list))
        ks, vs = (list(ks), list(vs)) if per_layer else (ks, vs)
        for i, lp in enumerate(layers):
            box = {}

            def attend(q, k, v, i=i):
                if per_layer:
                    ks[i], vs[i] = write_rows(ks[i], k, start), write_rows(vs[i], v, start)
                    return core(q, k, v, ks[i], vs[i])
                box["k"], box["v"] = write_layer(ks, i, k, start), write_layer(vs, i, v, start)
                return core(q, k, v, box["k"][i], box["v"][i])

            x = _layer(cfg, x, lp, cos, sin, attend, _lora_slice(lora_layers, i), adapter_ids)
            if not per_layer:
                ks, vs = box["k"], box["v"]
        if per_layer:
            ks, vs = tuple(ks), tuple(vs)
        return x, KVCache(ks, vs, kv_len)

    if isinstance(cache.k, (tuple, list)):
        raise ValueError("a per-layer KV cache needs params in the decode layout (model.decode_layout); "
                         "stacked params need a stacked cache (init_cache(..., per_layer=False))")

    def body(carry, xs):
        x, ck, cv, i = carry
        lp, lora_l = xs
        box = {}

        def attend(q, k, v):
            nk = write_layer(ck, i, k, start)
            nv = write_layer(cv, i, v, start)
            box["k"], box["v"] = nk, nv
            return core(q, k, v, nk[i], nv[i])

        x = _layer(cfg, x, lp, cos, sin, attend, lora_l, adapter_ids)
        return (x, box["k"], box["v"], i + 1), None

    (x, ck, cv, _), _ = jax.lax.scan(body, (x, cache.k, cache.v, jnp.int32(0)), (layers, lora_layers))
    return x, KVCache(ck, cv, kv_len)


lm_head = _lm_head  # public: final norm + vocab projection, [B, T, D] -> f32 [B, T, V]

forward_jit = jax.jit(forward, static_argnums=1)
forward_cached_jit = jax.jit(forward_cached, static_argnums=1, static_argnames=("num_layers",), donate_argnums=4)
