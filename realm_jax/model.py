"""The transformer over the runtime form: ``forward`` and ``forward_cached``.

``rt`` is a ``runtime.Runtime`` (``runtime.prepare(params, cfg, ...)``; ``load()`` gives one as
``model.runtime``): fused, transposed, int8, LoRA and sharded forms all run through the same
layer code, whose projections go through ``runtime.projections`` (the only code that looks
inside a weight). The canonical params and the plain twin of this forward are in
``params.py`` and ``reference.py``.

``forward`` runs a right-padded batch without a cache; ``forward_cached`` appends the new tokens
to a ``KVCache`` (in place when donated) and attends over everything cached so far.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .attention import attention_mask, fused_attention, gqa_attention
from .config import ModelConfig
from .errors import RealmError
from .kv_cache import KVCache, layer_io
from .layers import apply_rope, embed_tokens, gate, norm, rope_cos_sin, softcap
from .moe import expert_parallel_experts, ragged_experts, route, shared_expert_scale
from .runtime import Experts, Runtime, expert_projections, head_logits, projections


def _layer(cfg: ModelConfig, x, lp, ll, ids, cos, sin, attend, ep=None):
    """One decoder layer. x [B, T, D]; lp / ll: the layer's leaves and adapters (or None);
    cos, sin [B, T, H]: its rope; ``attend(q, k, v) -> o`` hides cache vs no cache (and the
    layer's mask); ``ep``: the mesh when the experts are split over it (``_expert_mesh``)."""
    b, t, _ = x.shape
    H = cfg.head_dim
    h = norm(cfg, x, lp["attn_norm"])
    qkv = projections(h, lp, ll, ids, ("wq", "wk", "wv"))
    q, k, v = qkv["wq"], qkv["wk"], qkv["wv"]
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"].astype(q.dtype), k + lp["bk"].astype(k.dtype), v + lp["bv"].astype(v.dtype)
    q = q.reshape(b, t, cfg.num_heads, H)
    k = k.reshape(b, t, cfg.num_kv_heads, H)
    v = v.reshape(b, t, cfg.num_kv_heads, H)
    if cfg.qk_norm:
        q, k = norm(cfg, q, lp["q_norm"]), norm(cfg, k, lp["k_norm"])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = attend(q, k, v).reshape(b, t, cfg.num_heads * H)
    o = projections(o, lp, ll, ids, ("wo",))["wo"]
    if cfg.o_bias:
        o = o + lp["bo"].astype(o.dtype)
    if cfg.post_norms:
        o = norm(cfg, o, lp["post_attn_norm"])
    x = x + o
    y = _mlp(cfg, norm(cfg, x, lp["mlp_norm"]), lp, ll, ids, ep)
    if cfg.post_norms:
        y = norm(cfg, y, lp["post_mlp_norm"])
    return x + y


def _expert_mesh(rt: Runtime):
    """The runtime's mesh when its experts are split over the ``model`` axis (expert parallel), else None."""
    opts = rt.options
    return opts.mesh if opts is not None and dict(opts.rules).get("experts") else None


def _mlp(cfg: ModelConfig, h, lp, ll, ids, ep=None):
    """One layer's MLP, h [B, T, D] -> [B, T, D]: the dense gated MLP, the routed experts
    (``cfg.moe``: routed per token, run through ``jax.lax.ragged_dot`` on each expert's tokens
    only; expert parallel over ``ep``'s ``model`` axis when given), or both (Qwen2-MoE: the dense
    MLP is the shared expert, scaled by its sigmoid gate)."""
    y = None
    if cfg.dense_mlp:
        gu = projections(h, lp, ll, ids, ("w_gate", "w_up"))
        y = projections(gate(cfg, gu["w_gate"]) * gu["w_up"], lp, ll, ids, ("w_down",))["w_down"]
        if cfg.shared_expert:
            y = shared_expert_scale(h, lp["shared_gate"]) * y
    if not cfg.moe:
        return y

    def expert_mlp(rows, sizes, which, leaves):
        gu = expert_projections(rows, leaves, ("we_gate", "we_up"), sizes, which)
        return expert_projections(gate(cfg, gu["we_gate"]) * gu["we_up"], leaves, ("we_down",), sizes, which)["we_down"]

    weights, experts = route(cfg, h, lp["router"])
    if ep is None:
        routed = ragged_experts(h, weights, experts, cfg.num_experts, lambda r, g, w: expert_mlp(r, g, w, lp))
    else:
        leaves = {k: v for k, v in lp.items() if isinstance(v, Experts)}
        routed = expert_parallel_experts(h, weights, experts, cfg.num_experts, expert_mlp, leaves, ep)
    return routed if y is None else routed + y


def _attention_core(cfg: ModelConfig, impl: str, t: int, mask, kv_len, lengths, num_keys: int, *, fresh: bool,
                    window: int | None):
    """Pick the attention for one call and one kind of layer (``window``: its sliding window):
    ``core(q, k, v, k_all, v_all) -> o``.

    q [B, T, N, H]; k, v [B, T, K, H] this call's keys; k_all, v_all [B, S, K, H] the keys the
    reference attends over (the cache, or k, v themselves without one); mask [B, T, S].
    ``impl`` (the runtime's static choice): "reference" is the einsum; otherwise the fused
    kernel (``attention.fused_attention``) replaces it where its mask is the same: a prompt pass
    over an empty cache (``fresh``: causal over this call's keys, lengths [B]) and single-token
    decode without an active sliding window (keys s < kv_len [B]). Attention-logit soft-capping
    (``cfg.attn_softcap``) always takes the reference: the fused kernel cannot do it.
    """
    win = window if window is not None and window < t else None
    scale = None if cfg.query_pre_attn_scalar is None else cfg.attention_scale
    cap = cfg.attn_softcap
    fused = impl != "reference" and cap is None
    # cuDNN's sliding-window support depends on its version and was not measured: keep windowed
    # prompt passes on the reference there (the XLA implementation, used by the tests, has it)
    if fused and fresh and t > 1 and (win is None or impl == "xla"):
        return lambda q, k, v, ka, va: fused_attention(q, k, v, lengths, causal=True, window=win,
                                                       implementation=impl, scale=scale)
    if fused and t == 1 and (window is None or window >= num_keys):
        return lambda q, k, v, ka, va: fused_attention(q, ka, va, kv_len, causal=False, window=None,
                                                       implementation=impl, scale=scale)
    return lambda q, k, v, ka, va: gqa_attention(q, ka, va, mask, scale=scale, softcap=cap)


def _kinds(cfg: ModelConfig, impl: str, positions, kv_len, lengths, num_keys: int, *, fresh: bool,
           num_layers: int | None = None) -> dict:
    """{local flag: (cos, sin, core)} for each kind of layer among the first ``num_layers``:
    global and local layers differ in their window (mask) and, with ``rope_local_theta``, rope.
    positions [B, T]; kv_len [B] (keys valid after this call); lengths [B] (this call's tokens)."""
    out = {}
    for local in sorted(set(cfg.layer_local[:num_layers])):
        window = cfg.window(local)
        cos, sin = rope_cos_sin(cfg, positions, local, kv_len)
        mask = attention_mask(positions, kv_len, num_keys, window)
        out[local] = (cos, sin, _attention_core(cfg, impl, positions.shape[1], mask, kv_len, lengths, num_keys,
                                                fresh=fresh, window=window))
    return out


def _kind_of(kinds: dict, local) -> tuple:
    """The (cos, sin, core) of one layer: static ``local`` (a bool), or traced (a scan over both
    kinds: rope selected, attention through ``lax.cond``)."""
    if len(kinds) == 1 or isinstance(local, (bool, np.bool_)):
        return kinds[bool(local)] if len(kinds) > 1 else next(iter(kinds.values()))
    (cg, sg, core_g), (cl, sl, core_l) = kinds[False], kinds[True]
    return (jnp.where(local, cl, cg), jnp.where(local, sl, sg),
            lambda *a: jax.lax.cond(local, core_l, core_g, *a))


def lm_head(rt: Runtime, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm + vocab projection (+ ``final_softcap``): x [B, T, D] -> float32 logits [B, T, V]."""
    return softcap(head_logits(norm(cfg, x, rt.final_norm), rt.head), cfg.final_softcap)


def _check(rt, cfg: ModelConfig, tokens, lengths, adapter_ids=None) -> None:
    """Static checks (shapes only: they hold under tracing too)."""
    if not isinstance(rt, Runtime):
        raise RealmError(f"forward: expected the runtime form (runtime.prepare(params, cfg), or model.runtime), "
                         f"got {type(rt).__name__}; canonical params run through reference.forward_reference")
    if rt.num_layers != cfg.num_layers or tuple(rt.embed.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise RealmError(f"forward: the runtime ({rt.num_layers} layers, embed {tuple(rt.embed.shape)}) does not match "
                         f"the config ({cfg.num_layers} layers, embed {(cfg.vocab_size, cfg.hidden_size)})")
    check_inputs(cfg, tokens, lengths)
    if rt.num_adapters > 1 and adapter_ids is None:
        raise RealmError(f"adapter_ids: required (int [B], -1 = base) with a runtime serving {rt.num_adapters} adapters")
    if jnp.ndim(tokens) != 2 or jnp.shape(lengths) != jnp.shape(tokens)[:1]:
        raise RealmError(f"forward: expected tokens [B, T] and lengths [B], got tokens {jnp.shape(tokens)}, "
                         f"lengths {jnp.shape(lengths)}")


def check_inputs(cfg: ModelConfig, tokens, lengths) -> None:
    """Value checks of concrete inputs on the host (skipped for traced values, so free inside jit):
    integer token ids in [0, V) and lengths in [0, T]."""
    if isinstance(tokens, jax.core.Tracer) or isinstance(lengths, jax.core.Tracer):
        return
    if not all(getattr(x, "is_fully_addressable", True) for x in (tokens, lengths)):
        return  # spans other processes' devices: each process checked its own part
    t, n = np.asarray(tokens), np.asarray(lengths)
    if not np.issubdtype(t.dtype, np.integer) or not np.issubdtype(n.dtype, np.integer):
        raise RealmError(f"forward: expected integer tokens and lengths, got {t.dtype} and {n.dtype}")
    if t.ndim != 2 or n.shape != t.shape[:1]:
        raise RealmError(f"forward: expected tokens [B, T] and lengths [B], got tokens {t.shape}, lengths {n.shape}")
    valid = np.arange(t.shape[1])[None] < n[:, None]
    bad = valid & ((t < 0) | (t >= cfg.vocab_size))
    if bad.any():
        b, j = map(int, np.argwhere(bad)[0])
        raise RealmError(f"forward: token id {int(t[b, j])} at row {b}, position {j} is outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    if n.size and (n.min() < 0 or n.max() > t.shape[1]):
        raise RealmError(f"forward: lengths must be in [0, T={t.shape[1]}], got {n.tolist()}")


def _layer_slices(rt: Runtime, cfg: ModelConfig, num_layers: int | None):
    """[(layer leaves, layer adapters, local flag)] per layer (per-layer runtime), or the
    stacked triple (flags [L] bool) for a scan."""
    layers, lora = rt.layers, rt.lora
    local = cfg.layer_local[:num_layers]
    if num_layers is not None:
        cut = (lambda t: t[:num_layers]) if not rt.stacked else \
            (lambda t: jax.tree_util.tree_map(lambda a: a[:num_layers], t))
        layers, lora = cut(layers), None if lora is None else cut(lora)
    if rt.stacked:
        return layers, lora, jnp.asarray(local)
    return list(zip(layers, lora if lora is not None else [None] * len(layers), local))


def forward(rt: Runtime, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, *, adapter_ids=None) -> jax.Array:
    """Logits for a right-padded batch, no cache.

    tokens [B, T] int32, lengths [B] int32 -> logits [B, T, V] float32 (padding slots: anything).
    ``adapter_ids [B]`` int32: each row's adapter among the runtime's (-1 = base).
    """
    return lm_head(rt, cfg, forward_hidden(rt, cfg, tokens, lengths, adapter_ids=adapter_ids))


def forward_hidden(rt: Runtime, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, *,
                   adapter_ids=None) -> jax.Array:
    """Final hidden states before the last norm: [B, T, D] in the runtime dtype."""
    _check(rt, cfg, tokens, lengths, adapter_ids)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    lengths = lengths.astype(jnp.int32)
    kinds = _kinds(cfg, rt.attention, positions, lengths, lengths, t, fresh=True)
    x = embed_tokens(cfg, rt.embed, tokens)
    ep = _expert_mesh(rt)

    def layer(x, lp, ll, local):
        cos, sin, core = _kind_of(kinds, local)
        return _layer(cfg, x, lp, ll, adapter_ids, cos, sin, lambda q, k, v: core(q, k, v, k, v), ep)

    if not rt.stacked:
        for lp, ll, local in _layer_slices(rt, cfg, None):
            x = layer(x, lp, ll, local)
        return x
    x, _ = jax.lax.scan(lambda x, xs: (layer(x, *xs), None), x, _layer_slices(rt, cfg, None))
    return x


def forward_cached(rt: Runtime, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, cache: KVCache, *,
                   adapter_ids=None, num_layers: int | None = None) -> tuple[jax.Array, KVCache]:
    """Append tokens to the cache and return their logits (see ``forward_cached_hidden``)."""
    x, cache = forward_cached_hidden(rt, cfg, tokens, lengths, cache, adapter_ids=adapter_ids, num_layers=num_layers)
    return lm_head(rt, cfg, x), cache


def forward_cached_hidden(rt: Runtime, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, cache: KVCache, *,
                          adapter_ids=None, num_layers: int | None = None,
                          empty_cache: bool = False) -> tuple[jax.Array, KVCache]:
    """Append tokens to the cache and return their hidden states [B, T, D] before the final norm
    (``lm_head`` turns chosen positions into logits, e.g. only each row's last prompt token).

    tokens [B, T] int32 (right-padded), lengths [B] int32: how many of the T tokens are real
    (0 = the row does not advance). Token t of row b sits at position ``cache.lengths[b] + t``.
    Returns hidden [B, T, D] and the cache with ``lengths += lengths``. The cache is per-layer
    (a tuple of [B, S, K, H]) for a per-layer runtime and stacked [L, B, S, K, H] for a stacked
    one (``generation.new_cache`` makes the right one). A ``kv_cache.PagedKVCache`` (a pool of
    blocks and a block table, same two layouts) works the same way: each layer's new keys are
    scattered into the rows' blocks and attention runs over the gathered dense view [B, M * bs]
    (``kv_cache.layer_io``), the same attention code, fused kernel included, as the dense cache.
    Local (sliding-window) layers keep every position too: their window is a mask over the full cache.
    ``num_layers`` runs only the first layers (self-speculative draft); the cache must have
    that many layers. ``empty_cache=True`` promises every ``cache.lengths`` is 0 (a prompt pass):
    where the fused kernel is available, attention then runs over this call's keys alone through it.
    """
    _check(rt, cfg, tokens, lengths, adapter_ids)
    if cache.per_layer == rt.stacked:
        raise RealmError(f"forward_cached: a {'stacked' if rt.stacked else 'per-layer'} runtime needs a "
                         f"{'stacked' if rt.stacked else 'per-layer'} KV cache (generation.new_cache(rt, ...))")
    b, t = tokens.shape
    lengths = lengths.astype(jnp.int32)
    start = cache.lengths
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    kv_len = start + lengths
    kinds = _kinds(cfg, rt.attention, positions, kv_len, lengths, cache.max_len, fresh=empty_cache,
                   num_layers=num_layers)
    x = embed_tokens(cfg, rt.embed, tokens)

    write, read = layer_io(cache, start, lengths, t)  # dense rows, or the pool through the block table
    ep = _expert_mesh(rt)

    if not rt.stacked:  # a Python loop, each layer's weights and cache its own buffers
        ks, vs = list(cache.k), list(cache.v)
        for i, (lp, ll, local) in enumerate(_layer_slices(rt, cfg, num_layers)):
            cos, sin, core = _kind_of(kinds, local)

            def attend(q, k, v, i=i, core=core):
                ks[i], vs[i] = write(ks[i], None, k), write(vs[i], None, v)
                return core(q, k, v, read(ks[i], None), read(vs[i], None))

            x = _layer(cfg, x, lp, ll, adapter_ids, cos, sin, attend, ep)
        return x, cache._replace(k=tuple(ks), v=tuple(vs), lengths=kv_len)

    def body(carry, xs):
        x, ck, cv, i = carry
        lp, ll, local = xs
        cos, sin, core = _kind_of(kinds, local)
        box = {}

        def attend(q, k, v):
            box["k"], box["v"] = write(ck, i, k), write(cv, i, v)
            return core(q, k, v, read(box["k"], i), read(box["v"], i))

        x = _layer(cfg, x, lp, ll, adapter_ids, cos, sin, attend, ep)
        return (x, box["k"], box["v"], i + 1), None

    (x, ck, cv, _), _ = jax.lax.scan(body, (x, cache.k, cache.v, jnp.int32(0)), _layer_slices(rt, cfg, num_layers))
    return x, cache._replace(k=ck, v=cv, lengths=kv_len)


_forward_jit = jax.jit(forward, static_argnums=1)
_forward_cached_jit = jax.jit(forward_cached, static_argnums=1, static_argnames=("num_layers",), donate_argnums=4)


def forward_jit(rt: Runtime, cfg: ModelConfig, tokens, lengths, *, adapter_ids=None) -> jax.Array:
    """``forward`` compiled (cfg static), after ``check_inputs`` on concrete inputs."""
    check_inputs(cfg, tokens, lengths)
    return _forward_jit(rt, cfg, tokens, lengths, adapter_ids=adapter_ids)


def forward_cached_jit(rt: Runtime, cfg: ModelConfig, tokens, lengths, cache: KVCache, *, adapter_ids=None,
                       num_layers: int | None = None) -> tuple[jax.Array, KVCache]:
    """``forward_cached`` compiled (cfg and num_layers static, the cache donated), after ``check_inputs``."""
    check_inputs(cfg, tokens, lengths)
    return _forward_cached_jit(rt, cfg, tokens, lengths, cache, adapter_ids=adapter_ids, num_layers=num_layers)


forward_jit.lower = _forward_jit.lower  # ahead-of-time lowering of the compiled programs
forward_cached_jit.lower = _forward_cached_jit.lower
