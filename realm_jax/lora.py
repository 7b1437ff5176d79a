"""LoRA as a params-tree transform: adapters, merge / unmerge, PEFT adapters, many adapters per batch.

An **adapter** mirrors ``params["layers"]``: for each targeted projection (any of ``wq wk wv wo
w_gate w_up w_down``) low-rank factors stacked over layers, and a per-layer scale::

    {"layers": {"wq": {"a": [L, D_in, R], "b": [L, R, D_out], "scale": [L] float32}, ...}}

so that ``W' = W + scale * A @ B``. The scale is ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA),
per layer because PEFT's ``rank_pattern``/``alpha_pattern`` can differ between layers. A layer
an adapter does not touch has zero factors and scale 0. Ranks that differ between layers are
zero-padded to the largest, which is exact.

A **stack** of A adapters (``stack_adapters``) adds an adapter axis after L::

    {"layers": {"wq": {"a": [L, A, D_in, R], "b": [L, A, R, D_out], "scale": [L, A]}, ...}}

Serving: ``runtime.prepare(params, cfg, adapters=stack)`` (or ``runtime.with_adapters``) builds
the runtime form, and ``forward``/``generate`` take ``adapter_ids [B]`` int32 (-1 = base model;
ids outside ``[0, A)`` also get the base), so one batch serves many adapters;
``prepare(..., fold=True)`` folds the A factors into the base weights (one matmul fewer per
projection). ``merge`` folds one adapter into canonical weights, for the fastest
single-adapter serving. ``lora_delta`` is the plain per-row term the reference forward uses.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import RealmError
from .params import PEFT_MODULES, PROJECTIONS, projection_dims  # noqa: F401  (re-exported)

from .adapter_checks import Adapter, _keys, check_adapter, lora_scale  # noqa: F401  (re-exported)


# ----------------------------------------------------------------------------- adapter pytree
def init_adapter(cfg: ModelConfig, key, rank: int = 8, targets: Sequence[str] | None = None,
                 alpha: float | None = None, use_rslora: bool = False, layers: Sequence[int] | None = None,
                 b_std: float = 0.02, dtype=jnp.float32) -> Adapter:
    """A random adapter (for tests, benchmarks, examples): A ~ N(0, 1/D_in), B ~ N(0, b_std²).

    Unlike a fresh PEFT adapter (B = 0) it changes the model. ``key``: a PRNG key or an int
    seed (drawn on the host with numpy: no compilation). ``layers``: the layer indices it
    touches (default all); other layers get zeros and scale 0. ``alpha`` defaults to ``rank``.
    ``targets``: projections (default: every one this model has; experts are not LoRA targets).
    """
    dims = projection_dims(cfg)
    targets = tuple(dims) if targets is None else targets
    _check_targets(targets, "targets", dims)
    if not isinstance(rank, int) or rank <= 0:
        raise RealmError(f"rank must be a positive int, got {rank!r}")
    L = cfg.num_layers
    on = np.zeros((L,), np.float32)
    for i in (range(L) if layers is None else layers):
        if not 0 <= int(i) < L:
            raise RealmError(f"layers: index {i} out of range [0, {L})")
        on[int(i)] = 1.0
    seed = key if isinstance(key, int) else np.asarray(jax.random.key_data(key)).ravel().tolist()
    rng = np.random.default_rng(seed)
    s = lora_scale(rank, rank if alpha is None else alpha, use_rslora)
    out = {}
    for p in targets:
        din, dout = dims[p]
        a = rng.standard_normal((L, din, rank), np.float32) / np.float32(math.sqrt(din))
        b = np.float32(b_std) * rng.standard_normal((L, rank, dout), np.float32)
        m = on[:, None, None]
        out[p] = {"a": jnp.asarray(a * m, dtype), "b": jnp.asarray(b * m, dtype), "scale": jnp.asarray(on * s)}
    return {"layers": out}


def _check_targets(targets, what, dims):
    bad = [t for t in targets if t not in dims]
    if bad or not len(targets):
        raise RealmError(f"{what}: expected a non-empty subset of this model's projections {tuple(dims)}, "
                         f"got {list(targets)!r}")


def _params_dims(params) -> tuple[dict, int]:
    """({projection: (D_in, D_out)}, L) from canonical params."""
    layers = params["layers"]
    return {p: tuple(layers[p].shape[1:]) for p in PROJECTIONS if p in layers}, layers["attn_norm"].shape[0]


def stack_adapters(adapters: Sequence[Adapter], dtype=None) -> Adapter:
    """Stack A single adapters for the multi-adapter forward: row ``i`` of ``adapter_ids`` = ``i``.

    Targets are the union (an adapter lacking one gets zeros); ranks are zero-padded to the
    largest per projection (exact). ``dtype``: of the factors (default: their common dtype).
    """
    if isinstance(adapters, Mapping) or not len(adapters):
        raise RealmError(f"adapters: expected a non-empty list of single adapters, got {type(adapters).__name__}")
    ref_dims, L = {}, None
    for i, ad in enumerate(adapters):
        if not isinstance(ad, Mapping) or not isinstance(ad.get("layers"), Mapping):
            raise RealmError(f"adapters[{i}]: expected an adapter dict with 'layers', got {type(ad).__name__}")
        for name, leaf in ad["layers"].items():
            a, b = (jnp.shape(leaf[k]) if isinstance(leaf, Mapping) and k in leaf else () for k in ("a", "b"))
            if len(a) != 3 or len(b) != 3:
                raise RealmError(f"adapters[{i}]['layers'][{name!r}]: expected a [L, D_in, R] and b [L, R, D_out] "
                                 f"(a single adapter), got a {a}, b {b}")
            ref_dims.setdefault(name, (a[1], b[2]))
            L = a[0] if L is None else L
    for i, ad in enumerate(adapters):
        check_adapter(ad, ref_dims, L, f"adapters[{i}]", stacked=False)
    if dtype is None:
        dtype = jnp.result_type(*[leaf["a"] for ad in adapters for leaf in ad["layers"].values()])
    return _stack_jit([ad["layers"] for ad in adapters], jnp.dtype(dtype))


@partial(jax.jit, static_argnums=1)
def _stack_jit(layers: list, dtype) -> Adapter:
    names = [p for p in PROJECTIONS if any(p in ad for ad in layers)]
    out = {}
    for name in names:
        present = [ad[name] for ad in layers if name in ad]
        (L, din, _), dout = present[0]["a"].shape, present[0]["b"].shape[-1]
        R = max(leaf["a"].shape[-1] for leaf in present)
        As, Bs, Ss = [], [], []
        for ad in layers:
            leaf = ad.get(name)
            if leaf is None:
                As.append(jnp.zeros((L, din, R), dtype))
                Bs.append(jnp.zeros((L, R, dout), dtype))
                Ss.append(jnp.zeros((L,), jnp.float32))
                continue
            pad = R - leaf["a"].shape[-1]
            As.append(jnp.pad(leaf["a"].astype(dtype), ((0, 0), (0, 0), (0, pad))))
            Bs.append(jnp.pad(leaf["b"].astype(dtype), ((0, 0), (0, pad), (0, 0))))
            Ss.append(leaf["scale"].astype(jnp.float32))
        out[name] = {"a": jnp.stack(As, 1), "b": jnp.stack(Bs, 1), "scale": jnp.stack(Ss, 1)}
    return {"layers": out}


def check_adapter_ids(adapter_ids, num_adapters: int | None, batch: int) -> np.ndarray:
    """Host-side check of ``adapter_ids [B]`` (each in ``[-1, A)``); returns them as int32."""
    ids = np.asarray(adapter_ids)
    A = 1 if num_adapters is None else num_adapters
    if ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer):
        raise RealmError(f"adapter_ids: expected int [{batch}] (one per row), got {ids.dtype} {ids.shape}")
    bad = ids[(ids < -1) | (ids >= A)]
    if bad.size:
        raise RealmError(f"adapter_ids: expected values in [-1, {A}) (-1 = base model), got {bad.tolist()}")
    return ids.astype(np.int32)


# ----------------------------------------------------------------------------- per-row delta
def lora_delta(x: jax.Array, leaf: Mapping, adapter_ids: jax.Array | None = None,
               method: str | None = None) -> jax.Array:
    """The unmerged LoRA term of one projection in one layer, per row.

    x [B, T, D_in]; ``leaf`` is one layer's slice: a single adapter (a [D_in, R], b [R, D_out],
    scale [] or [R]) or a stack (a [A, D_in, R], b [A, R, D_out], scale [A] or [A, R]; a
    per-rank scale comes from ``decode_layout(..., concat=False)``'s fused projections);
    adapter_ids [B] int (-1 = none; optional for a single adapter, then applied to every row).
    Returns ``((x @ a[id]) * scale[id]) @ b[id]`` [B, T, D_out] float32 (0 for id -1).

    ``method`` (a stack only): "dense" computes all A adapters' ``x @ a`` in one matmul with
    inner size A*R and masks per row (no gathers; best when A <= B); "gather" takes each row's
    factors (best when A > B). Default: by that rule.
    """
    a, b, scale = leaf["a"], leaf["b"], jnp.asarray(leaf["scale"], jnp.float32)
    f32 = jnp.float32
    bsz = x.shape[0]
    if adapter_ids is not None and adapter_ids.shape != (bsz,):
        raise RealmError(f"adapter_ids: expected shape ({bsz},) (one per row), got {adapter_ids.shape}")
    if a.ndim == 2:  # single adapter
        s = scale.reshape(1, 1, -1)  # [1, 1, 1 or R]
        if adapter_ids is not None:
            s = jnp.where((adapter_ids == 0)[:, None, None], s, 0.0)
        xa = jnp.matmul(x, a, preferred_element_type=f32) * s
        return jnp.matmul(xa.astype(b.dtype), b, preferred_element_type=f32)
    if adapter_ids is None:
        raise RealmError("adapter_ids: required (int [B], -1 = base) with a stack of adapters")
    A = a.shape[0]
    scale = scale.reshape(A, -1)  # [A, 1 or R]
    method = method or ("dense" if A <= bsz else "gather")
    ids = adapter_ids.astype(jnp.int32)
    if method == "dense":
        hit = ids[:, None] == jnp.arange(A, dtype=jnp.int32)[None, :]  # [B, A]
        w = jnp.where(hit[:, :, None], scale[None], 0.0)  # [B, A, 1 or R]
        xa = jnp.einsum("btd,adr->btar", x, a, preferred_element_type=f32) * w[:, None]
        return jnp.einsum("btar,aro->bto", xa.astype(b.dtype), b, preferred_element_type=f32)
    if method == "gather":
        idx = jnp.clip(ids, 0, A - 1)
        s = jnp.where(((ids >= 0) & (ids < A))[:, None], scale[idx], 0.0)  # [B, 1 or R]
        xa = jnp.einsum("btd,bdr->btr", x, a[idx], preferred_element_type=f32) * s[:, None, :]
        return jnp.einsum("btr,bro->bto", xa.astype(b.dtype), b[idx], preferred_element_type=f32)
    raise RealmError(f"method: expected 'dense' or 'gather', got {method!r}")


# ----------------------------------------------------------------------------- merge / unmerge
def merge(params: dict, adapter: Adapter) -> dict:
    """``W' = W + scale * A @ B`` for every targeted projection (float32, cast back to W's dtype).

    Canonical params only (merge, then ``runtime.prepare``, e.g. with ``quantize="int8"``). Pure
    and jittable (a new adapter of the same shapes does not retrace).
    """
    return _fold(params, adapter, 1.0, "merge")


def unmerge(params: dict, adapter: Adapter) -> dict:
    """The inverse of ``merge``: ``W - scale * A @ B`` (equal to the original up to rounding)."""
    return _fold(params, adapter, -1.0, "unmerge")


def _fold(params, adapter, sign, fn):
    layers = params.get("layers") if isinstance(params, Mapping) else None
    if not isinstance(layers, Mapping):
        raise RealmError(f"{fn}: expected canonical params (a dict with stacked 'layers'), got "
                         f"{type(params).__name__}; {fn} before runtime.prepare")
    dims, L = _params_dims(params)
    check_adapter(adapter, dims, L, f"{fn}: adapter", stacked=False)
    new = _fold_jit({n: layers[n] for n in adapter["layers"]}, adapter["layers"], sign)
    return {**params, "layers": {**layers, **new}}


@partial(jax.jit, static_argnums=2)
def _fold_jit(weights: dict, leaves: dict, sign: float) -> dict:
    """W [L, D_in, D_out] +- scale[l] * a[l] @ b[l]."""
    out = {}
    for name, leaf in leaves.items():
        w = weights[name]
        delta = jnp.einsum("ldr,lro->ldo", leaf["a"].astype(jnp.float32), leaf["b"].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        delta = delta * leaf["scale"].astype(jnp.float32)[:, None, None]
        out[name] = (w.astype(jnp.float32) + sign * delta).astype(w.dtype)
    return out


# PEFT directories: read / write (kept in their own file; re-exported here)
from .lora_peft import load_peft, peft_targets, read_peft_config, save_peft  # noqa: E402,F401


def load_adapters(dirs: Mapping[str, str], model) -> Adapter:
    """Load PEFT directories for ``model`` (a ``Model``) and stack them in order, in the params dtype."""
    dtype = model.params["embed"].dtype
    return stack_adapters([load_peft(d, model.config, dtype=dtype) for d in dirs.values()])
