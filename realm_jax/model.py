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
from .kv_cache import KVCache, write_layer, write_rows
from .layers import apply_rope, rms_norm, rope_cos_sin
from .runtime import Runtime, head_logits, projections


def _layer(cfg: ModelConfig, x, lp, ll, ids, cos, sin, attend):
    """One decoder layer. x [B, T, D]; lp / ll: the layer's leaves and adapters (or None);
    ``attend(q, k, v) -> o`` hides cache vs no cache."""
    b, t, _ = x.shape
    H = cfg.head_dim
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    qkv = projections(h, lp, ll, ids, ("wq", "wk", "wv"))
    q, k, v = qkv["wq"], qkv["wk"], qkv["wv"]
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
    o = projections(o, lp, ll, ids, ("wo",))["wo"]
    if cfg.o_bias:
        o = o + lp["bo"].astype(o.dtype)
    x = x + o
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    gu = projections(h, lp, ll, ids, ("w_gate", "w_up"))
    return x + projections(jax.nn.silu(gu["w_gate"]) * gu["w_up"], lp, ll, ids, ("w_down",))["w_down"]


def _attention_core(cfg: ModelConfig, impl: str, t: int, mask, kv_len, lengths, num_keys: int, *, fresh: bool):
    """Pick the attention for one call: ``core(q, k, v, k_all, v_all) -> o``.

    q [B, T, N, H]; k, v [B, T, K, H] this call's keys; k_all, v_all [B, S, K, H] the keys the
    reference attends over (the cache, or k, v themselves without one); mask [B, T, S].
    ``impl`` (the runtime's static choice): "reference" is the einsum; otherwise the fused
    kernel (``attention.fused_attention``) replaces it where its mask is the same: a prompt pass
    over an empty cache (``fresh``: causal over this call's keys, lengths [B]) and single-token
    decode without an active sliding window (keys s < kv_len [B]).
    """
    window = cfg.sliding_window
    win = window if window is not None and window < t else None
    fused = impl != "reference"
    # cuDNN's sliding-window support depends on its version and was not measured: keep windowed
    # prompt passes on the reference there (the XLA implementation, used by the tests, has it)
    if fused and fresh and t > 1 and (win is None or impl == "xla"):
        return lambda q, k, v, ka, va: fused_attention(q, k, v, lengths, causal=True, window=win,
                                                       implementation=impl)
    if fused and t == 1 and (window is None or window >= num_keys):
        return lambda q, k, v, ka, va: fused_attention(q, ka, va, kv_len, causal=False, window=None,
                                                       implementation=impl)
    return lambda q, k, v, ka, va: gqa_attention(q, ka, va, mask)


def lm_head(rt: Runtime, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm + vocab projection: x [B, T, D] -> float32 logits [B, T, V]."""
    return head_logits(rms_norm(x, rt.final_norm, cfg.rms_norm_eps), rt.head)


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


def _layer_slices(rt: Runtime, num_layers: int | None):
    """[(layer leaves, layer adapters)] per layer (per-layer runtime), or the stacked pair."""
    layers, lora = rt.layers, rt.lora
    if num_layers is not None:
        cut = (lambda t: t[:num_layers]) if not rt.stacked else \
            (lambda t: jax.tree_util.tree_map(lambda a: a[:num_layers], t))
        layers, lora = cut(layers), None if lora is None else cut(lora)
    if rt.stacked:
        return layers, lora
    return list(zip(layers, lora if lora is not None else [None] * len(layers)))


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
    cos, sin = rope_cos_sin(cfg, positions)
    lengths = lengths.astype(jnp.int32)
    mask = attention_mask(positions, lengths, t, cfg.sliding_window)
    x = jnp.take(rt.embed, tokens, axis=0)
    core = _attention_core(cfg, rt.attention, t, mask, lengths, lengths, t, fresh=True)

    def attend(q, k, v):
        return core(q, k, v, k, v)

    if not rt.stacked:
        for lp, ll in _layer_slices(rt, None):
            x = _layer(cfg, x, lp, ll, adapter_ids, cos, sin, attend)
        return x

    def body(x, xs):
        return _layer(cfg, x, xs[0], xs[1], adapter_ids, cos, sin, attend), None

    x, _ = jax.lax.scan(body, x, _layer_slices(rt, None))
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
    one (``generation.new_cache`` makes the right one).
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
    cos, sin = rope_cos_sin(cfg, positions)
    kv_len = start + lengths
    mask = attention_mask(positions, kv_len, cache.max_len, cfg.sliding_window)
    x = jnp.take(rt.embed, tokens, axis=0)
    core = _attention_core(cfg, rt.attention, t, mask, kv_len, lengths, cache.max_len, fresh=empty_cache)

    if not rt.stacked:  # a Python loop, each layer's weights and cache its own buffers
        ks, vs = list(cache.k), list(cache.v)
        for i, (lp, ll) in enumerate(_layer_slices(rt, num_layers)):
            def attend(q, k, v, i=i):
                ks[i], vs[i] = write_rows(ks[i], k, start), write_rows(vs[i], v, start)
                return core(q, k, v, ks[i], vs[i])

            x = _layer(cfg, x, lp, ll, adapter_ids, cos, sin, attend)
        return x, KVCache(tuple(ks), tuple(vs), kv_len)

    def body(carry, xs):
        x, ck, cv, i = carry
        box = {}

        def attend(q, k, v):
            box["k"], box["v"] = write_layer(ck, i, k, start), write_layer(cv, i, v, start)
            return core(q, k, v, box["k"][i], box["v"][i])

        x = _layer(cfg, x, xs[0], xs[1], adapter_ids, cos, sin, attend)
        return (x, box["k"], box["v"], i + 1), None

    (x, ck, cv, _), _ = jax.lax.scan(body, (x, cache.k, cache.v, jnp.int32(0)), _layer_slices(rt, num_layers))
    return x, KVCache(ck, cv, kv_len)


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
