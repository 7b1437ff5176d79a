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

``forward``/``forward_cached``/``generate`` take ``adapters=`` (a stack, or a single adapter =
a stack of one) and ``adapter_ids [B]`` int32 (-1 = base model; ids outside ``[0, A)`` also get
the base) and add ``scale[id] * (x @ A[id]) @ B[id]`` per row (``lora_delta``), so one batch
serves many adapters. ``merge`` folds one adapter into the weights (either params layout) for
the fastest single-adapter serving.

**Serving layouts** (built once, outside the decode loop; ``forward`` takes them like a stack):
``decode_layout(adapters, cfg)`` for params in ``model.decode_layout`` (per layer, q|k|v and
gate|up fused) and ``concat_layout(adapters, cfg)`` for stacked params. Both concatenate the A
adapters on the rank axis, ``{"a_t": [(L,) A*R, D_in], "b": [(L,) A*R, D_out], "scale": [(L,) A, R]}``,
so a projection's LoRA term is two matmuls and a per-row mask, with no gather (``concat_delta``).
``fold_layout(params, adapters, cfg)`` (decode-layout params) goes one step further: it appends
the concatenated A factors to each targeted base weight (``{"t_lora": [D_out + A*R, D_in]}``)
and returns the adapters without them (``{"b", "scale"}``), so one matmul gives the base output
and all rank activations, then a per-row mask and ``@ b`` (``folded_proj``): the fastest
multi-adapter decode of these layouts, at the cost of a folded copy of the targeted weights
per adapter set.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import _LAYER_NAMES
from .config import ModelConfig
from .errors import RealmError, UnsupportedModelError
from .layers import has_lora_rows
from .model import MATMUL_WEIGHTS, PROJECTIONS, param_shapes
from .quantization import is_quantized

Adapter = dict

# PEFT / HF module name (last component) <-> our projection leaf, from the checkpoint name map.
PEFT_MODULES = {_LAYER_NAMES[p][0].split(".")[-2]: p for p in PROJECTIONS}  # "q_proj" -> "wq"
_PEFT_NAME = {v: k for k, v in PEFT_MODULES.items()}
_MODULE_PATH = {p: _LAYER_NAMES[p][0][: -len(".weight")] for p in PROJECTIONS}  # with "{i}"


# ----------------------------------------------------------------------------- adapter pytree
def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def projection_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """{projection: (D_in, D_out)} for this model."""
    return {p: param_shapes(cfg)["layers"][p][1:] for p in PROJECTIONS}


def init_adapter(cfg: ModelConfig, key, rank: int = 8, targets: Sequence[str] = PROJECTIONS,
                 alpha: float | None = None, use_rslora: bool = False, layers: Sequence[int] | None = None,
                 b_std: float = 0.02, dtype=jnp.float32) -> Adapter:
    """A random adapter (for tests, benchmarks, examples): A ~ N(0, 1/D_in), B ~ N(0, b_std²).

    Unlike a fresh PEFT adapter (B = 0) it changes the model. ``key``: a PRNG key or an int
    seed (drawn on the host with numpy: no compilation). ``layers``: the layer indices it
    touches (default all); other layers get zeros and scale 0. ``alpha`` defaults to ``rank``.
    """
    _check_targets(targets, "targets")
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
    dims = projection_dims(cfg)
    out = {}
    for p in targets:
        din, dout = dims[p]
        a = rng.standard_normal((L, din, rank), np.float32) / np.float32(math.sqrt(din))
        b = np.float32(b_std) * rng.standard_normal((L, rank, dout), np.float32)
        m = on[:, None, None]
        out[p] = {"a": jnp.asarray(a * m, dtype), "b": jnp.asarray(b * m, dtype), "scale": jnp.asarray(on * s)}
    return {"layers": out}


def _check_targets(targets, what):
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad or not len(targets):
        raise RealmError(f"{what}: expected a non-empty subset of {PROJECTIONS}, got {list(targets)!r}")


def check_adapter(adapter, dims: Mapping[str, tuple], num_layers: int, what: str = "adapter",
                  stacked: bool | None = None) -> int | None:
    """Validate structure and shapes (static: works on tracers), in the stacked layout or a
    serving layout (``decode_layout``, ``concat_layout``, ``fold_layout``'s adapters). Returns A
    for a stack, None for a single adapter.
    ``dims``: {projection: (D_in, D_out)}; ``stacked``: require one form."""
    layers = adapter.get("layers") if isinstance(adapter, Mapping) else None
    if not isinstance(layers, (Mapping, tuple, list)) or not layers:
        raise RealmError(f"{what}: expected {{'layers': {{projection: {{'a', 'b', 'scale'}}}}}}, "
                         f"got {type(adapter).__name__} {_keys(adapter)}")
    counts = []
    if isinstance(layers, Mapping):  # stacked: leaves [L, (A,) ...]
        order = [n for n in layers if n not in PROJECTIONS] + [p for p in PROJECTIONS if p in layers]
        for name in order:
            counts.append(_check_leaf(layers[name], f"{what}['layers'][{name!r}]", name, dims, (num_layers,)))
    else:  # decode layout: a tuple of L per-layer dicts, leaves [(A,) ...]
        if len(layers) != num_layers:
            raise RealmError(f"{what}['layers']: expected {num_layers} per-layer dicts (decode layout), "
                             f"got {len(layers)}")
        fused_dims = dict(dims)
        for f, parts in FUSED.items():
            fused_dims[f] = (dims[parts[0]][0], sum(dims[p][1] for p in parts))
        for i, layer in enumerate(layers):
            if not isinstance(layer, Mapping) or not layer:
                raise RealmError(f"{what}['layers'][{i}]: expected a dict of projections, got {type(layer).__name__}")
            for name, leaf in layer.items():
                counts.append(_check_leaf(leaf, f"{what}['layers'][{i}][{name!r}]", name, fused_dims, ()))
    count = counts[0]
    if any(c != count for c in counts):
        raise RealmError(f"{what}: projections disagree on the number of adapters: {sorted(set(map(str, counts)))}")
    if stacked is True and count is None:
        raise RealmError(f"{what}: expected a stack of adapters (see stack_adapters), got a single adapter")
    if stacked is False and count is not None:
        raise RealmError(f"{what}: expected a single adapter, got a stack of {count}")
    return count


def _check_leaf(leaf, where: str, name: str, dims: Mapping, lead: tuple) -> int | None:
    """One projection's {'a', 'b', 'scale'}: a [*lead, (A,) D_in, R], b [*lead, (A,) R, D_out],
    scale [*lead, (A,)] (or [.., R] in ``decode_layout(concat=False)``'s fused leaves); or a
    concatenated or folded leaf (see ``_check_concat_leaf``). Returns A or None."""
    if name not in dims:
        raise RealmError(f"{where}: unknown projection; expected one of {tuple(dims)}")
    if isinstance(leaf, Mapping) and ("a_t" in leaf or _is_folded(leaf)):
        return _check_concat_leaf(leaf, where, dims[name], lead)
    if not isinstance(leaf, Mapping) or set(leaf) != {"a", "b", "scale"}:
        raise RealmError(f"{where}: expected keys {{'a', 'b', 'scale'}}, got {_keys(leaf)}")
    a, b, s = (tuple(jnp.shape(leaf[k])) for k in ("a", "b", "scale"))
    din, dout = dims[name]
    n = len(lead)
    A = a[n] if len(a) == n + 3 else None
    head = lead + (() if A is None else (A,))
    r = a[-1] if len(a) in (n + 2, n + 3) else -1
    want = {"a": head + (din, r), "b": head + (r, dout), "scale": head}
    ok_scale = (head, head + (r,)) if not lead else (head,)
    for k, shape in (("a", a), ("b", b), ("scale", s)):
        if r <= 0 or (shape not in ok_scale if k == "scale" else shape != want[k]):
            form = ("[L, " if lead else "[") + ("A, " if A is not None else "") + "D_in, R]"
            raise RealmError(f"{where}['{k}']: expected shape {want[k] if r > 0 else form} "
                             f"(D_in={din}, D_out={dout}{', L=%d' % lead[0] if lead else ''}), got {shape}")
    return A


def _check_concat_leaf(leaf, where: str, dims: tuple, lead: tuple) -> int | None:
    """{'a_t': [*lead, A*R, D_in], 'b': [*lead, A*R, D_out], 'scale': [*lead, A, R]} (a stack) or
    a_t [*lead, R, D_in], b [*lead, R, D_out], scale [*lead, R] (a single adapter); or the folded
    form (``fold_layout``: the same without 'a_t')."""
    folded = _is_folded(leaf)
    if set(leaf) != {"a_t", "b", "scale"} and not folded:
        raise RealmError(f"{where}: expected keys {{'a_t', 'b', 'scale'}} (concatenated layout) or {{'b', 'scale'}} "
                         f"(folded layout), got {_keys(leaf)}")
    at, b, s = (tuple(jnp.shape(leaf[k])) if k in leaf else None for k in ("a_t", "b", "scale"))
    din, dout = dims
    n = len(lead)
    if len(s) not in (n + 1, n + 2) or s[:n] != lead or min(s[n:], default=0) <= 0:
        raise RealmError(f"{where}['scale']: expected shape {lead + ('A', 'R')} (a stack) or {lead + ('R',)} "
                         f"(one adapter), got {s}")
    A = s[n] if len(s) == n + 2 else None
    k = s[-1] * (A or 1)
    for key, shape, want in (("a_t", at, lead + (k, din)), ("b", b, lead + (k, dout))):
        if shape != want and not (folded and key == "a_t"):
            raise RealmError(f"{where}['{key}']: expected shape {want} (A*R={k}, D_in={din}, D_out={dout}), "
                             f"got {shape}")
    return A


def _keys(x):
    return sorted(map(str, x)) if isinstance(x, Mapping) else ""


def _params_dims(params) -> tuple[dict, int]:
    """({projection: (D_in, D_out)}, L) from params in either layout (plain or quantized weights)."""
    from .layers import weight_shape as shape

    layers = params["layers"]
    if isinstance(layers, (tuple, list)):  # decode layout: fused, per-layer
        nh, d = shape(layers[0]["wo"])
        f = shape(layers[0]["w_down"])[0]
        kh = (shape(layers[0]["wqkv"])[1] - nh) // 2
        return {"wq": (d, nh), "wk": (d, kh), "wv": (d, kh), "wo": (nh, d),
                "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}, len(layers)
    return {p: shape(layers[p])[1:] for p in PROJECTIONS}, shape(layers["attn_norm"])[0]


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


def concat_delta(x: jax.Array, leaf: Mapping, adapter_ids: jax.Array | None = None,
                 method: str | None = None) -> jax.Array:
    """``lora_delta`` for a leaf of the concatenated serving layout (``decode_layout``,
    ``concat_layout``), one layer's slice: a_t [A*R, D_in], b [A*R, D_out], scale [A, R] (a stack;
    rank columns adapter-major) or a_t [R, D_in], b [R, D_out], scale [R] (a single adapter).

    x [B, T, D_in], adapter_ids [B] int (-1 = none; optional for a single adapter) ->
    ``((x @ a[id]) * scale[id]) @ b[id]`` [B, T, D_out] float32 (0 for id -1), as ``lora_delta``.

    "dense" (default when A <= B): ``h = x @ a_t.T`` for all A adapters in one matmul, zeroed per
    row outside the row's own rank block (and scaled), then ``h @ b``: two matmuls, no gather.
    The first matmul is 2-D and contracts a_t's minor axis, so its dimension numbers differ from
    the base ``x @ W`` and XLA's dot merger (GPU: matmuls sharing an operand, up to 32 MB, become
    one matmul against the concatenated weights) cannot copy W into a ``[W | A]`` every step.
    "gather" (default when A > B): each row's own block.
    """
    a_t, b = leaf["a_t"], leaf["b"]
    f32 = jnp.float32
    bsz, t, din = x.shape
    scale, ids = _rows(leaf["scale"], adapter_ids, bsz)
    A, R = scale.shape
    method = method or ("dense" if A <= bsz else "gather")
    if method == "dense":
        # 2-D, contracting a_t's minor axis: not x @ W's dimension numbers (see the docstring)
        h = jax.lax.dot_general(x.reshape(bsz * t, din), a_t, (((1,), (1,)), ((), ())),
                                preferred_element_type=f32).reshape(bsz, t, A * R)
        return jnp.matmul((h * _dense_mask(scale, ids)).astype(b.dtype), b, preferred_element_type=f32)
    if method == "gather":
        idx = jnp.clip(ids, 0, A - 1)
        s = jnp.where(((ids >= 0) & (ids < A))[:, None], scale[idx], 0.0)  # [B, R]
        xa = jnp.einsum("btd,brd->btr", x, a_t.reshape(A, R, din)[idx], preferred_element_type=f32) * s[:, None, :]
        return jnp.einsum("btr,bro->bto", xa.astype(b.dtype), b.reshape(A, R, -1)[idx], preferred_element_type=f32)
    raise RealmError(f"method: expected 'dense' or 'gather', got {method!r}")


def _rows(scale, adapter_ids, bsz: int) -> tuple[jax.Array, jax.Array]:
    """A concatenated (or folded) leaf's scale and the batch's ids, normalized: scale [A, R]
    float32 (a single adapter's [R] becomes [1, R]) and ids [B] int32 (a single adapter: 0 for
    every row without ``adapter_ids``, else 0 where the id is 0 and -1 elsewhere)."""
    scale = jnp.asarray(scale, jnp.float32)
    if adapter_ids is not None and adapter_ids.shape != (bsz,):
        raise RealmError(f"adapter_ids: expected shape ({bsz},) (one per row), got {adapter_ids.shape}")
    if scale.ndim == 1:  # a single adapter: every row, or the rows with id 0
        ids = jnp.zeros((bsz,), jnp.int32) if adapter_ids is None else \
            jnp.where(adapter_ids == 0, 0, -1).astype(jnp.int32)
        return scale[None], ids
    if adapter_ids is None:
        raise RealmError("adapter_ids: required (int [B], -1 = base) with a stack of adapters")
    return scale, adapter_ids.astype(jnp.int32)


def _dense_mask(scale: jax.Array, ids: jax.Array) -> jax.Array:
    """The per-row mask of the dense method: scale [A, R], ids [B] -> [B, 1, A*R] float32, row b's
    own rank block ``ids[b]`` scaled, every other column 0 (all 0 for an id outside [0, A))."""
    A, R = scale.shape
    hit = ids[:, None] == jnp.arange(A, dtype=jnp.int32)[None, :]  # [B, A]
    return jnp.where(hit[:, :, None], scale[None], 0.0).reshape(ids.shape[0], 1, A * R)


def lora_add(y: jax.Array, x: jax.Array, leaf: Mapping, adapter_ids: jax.Array | None = None) -> jax.Array:
    """``y + `` the per-row LoRA term of one projection (``concat_delta`` for a concatenated
    leaf, ``lora_delta`` otherwise), in y's dtype. y [B, T, D_out], x [B, T, D_in]."""
    if _is_folded(leaf):
        raise RealmError("adapters: folded adapters (lora.fold_layout's, no 'a' / 'a_t' factors) need the "
                         "params fold_layout returned with them; this projection's weight has no folded "
                         "factors ('t_lora'). Pass both from the same fold_layout call, or serve "
                         "lora.decode_layout's adapters with the unfolded params")
    delta = concat_delta if "a_t" in leaf else lora_delta
    return y + delta(x, leaf, adapter_ids).astype(y.dtype)


def _is_folded(leaf) -> bool:
    """A folded adapter leaf (``fold_layout``): {'b', 'scale'}, the A factors live in the weight."""
    return isinstance(leaf, Mapping) and set(leaf) == {"b", "scale"}


def folded_proj(x: jax.Array, w: Mapping, leaf: Mapping | None, adapter_ids: jax.Array | None = None,
                name: str = "projection") -> jax.Array:
    """One projection with its LoRA factors folded in (``fold_layout``): base output and LoRA
    term, per row, from one matmul against the base weight with the A factors appended.

    x [B, T, D_in]; w {"t_lora": [D_out + A*R, D_in]} (rows ``:D_out`` the base weight, the rest
    the concatenated a_t); leaf {"b": [A*R, D_out], "scale": [A, R]} (a stack, rank columns
    adapter-major) or {"b": [R, D_out], "scale": [R]} (a single adapter); adapter_ids [B] int
    (-1 = base; optional for a single adapter). Returns [B, T, D_out] in x's dtype:
    ``y_all = x @ t_lora.T`` (float32), ``y = y_all[..., :D_out]`` cast to x's dtype,
    ``h = y_all[..., D_out:]`` (float32) masked per row as ``concat_delta``'s dense method, then
    ``y + ((h * mask) @ b)``. Equal to ``linear`` + ``concat_delta`` up to float rounding.
    """
    if leaf is None:
        raise RealmError(f"params: the {name!r} weight has LoRA factors folded in (lora.fold_layout) and needs "
                         f"its adapters: pass the adapters fold_layout returned (adapters=, adapter_ids=)")
    if not _is_folded(leaf):
        raise RealmError(f"adapters[{name!r}]: the weight has LoRA factors folded in (lora.fold_layout), so it "
                         f"needs the folded adapters ({{'b', 'scale'}}) fold_layout returned with it, got keys "
                         f"{_keys(leaf)}")
    t, b = w["t_lora"], leaf["b"]
    k, dout = b.shape
    if t.shape[0] != dout + k or t.shape[1] != x.shape[-1]:
        raise RealmError(f"adapters[{name!r}]: the folded weight {tuple(t.shape)} does not fit the adapter's "
                         f"b {tuple(b.shape)} (expected [{dout} + {k}, {x.shape[-1]}]); pass the params and "
                         f"adapters of the same fold_layout call")
    scale, ids = _rows(leaf["scale"], adapter_ids, x.shape[0])
    y_all = jnp.einsum("...i,oi->...o", x, t, preferred_element_type=jnp.float32)
    y, h = y_all[..., :dout].astype(x.dtype), y_all[..., dout:]
    delta = jnp.matmul((h * _dense_mask(scale, ids)).astype(b.dtype), b, preferred_element_type=jnp.float32)
    return y + delta.astype(y.dtype)


# ----------------------------------------------------------------------------- serving layouts
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}  # as in model.decode_layout


def decode_layout(adapters: Adapter, cfg: ModelConfig, concat: bool = True) -> Adapter:
    """The adapter (or stack) for params in ``model.decode_layout``: a tuple of L per-layer dicts
    (each layer's factors their own buffers) with q|k|v fused into ``wqkv`` and gate|up into
    ``w_gate_up``; ``wo``/``w_down`` are just sliced per layer. A fused projection concatenates
    its parts' factors on the rank axis (Rq+Rk+Rv) with b block-diagonal over the q|k|v output
    columns (zeros elsewhere: exact), so it costs two small matmuls instead of six.

    ``concat=True`` (the serving form): the A adapters also concatenated on the rank axis, as in
    ``concat_layout``: a_t [A*(Rq+Rk+Rv), D], b [A*(Rq+Rk+Rv), (N+2K)*H], scale [A, Rq+Rk+Rv]
    (rank columns adapter-major), served by ``concat_delta``: no gather. ``concat=False``: the
    per-adapter form a [(A,) D, Rq+Rk+Rv], b [(A,) Rq+Rk+Rv, (N+2K)*H], scale per rank column
    [(A,) Rq+Rk+Rv], served by ``lora_delta`` (the plain reference).

    Build it once per adapter set, outside the decode loop (it copies the factors; a new set of
    the same shapes reuses the compiled program). Serve with ``forward``/``generate`` on
    decode-layout params; ``merge`` takes the stacked form.
    """
    layers = adapters.get("layers") if isinstance(adapters, Mapping) else None
    dims = projection_dims(cfg)
    check_adapter(adapters, dims, cfg.num_layers)
    if any(_is_folded(leaf) for leaf in _leaves(layers)):
        raise RealmError("decode_layout: the adapters are folded (fold_layout's, their A factors live in the "
                         "folded params); pass the stack (as stack_adapters returns it) instead")
    if isinstance(layers, (tuple, list)):  # already per layer: at most concatenate
        done = [("a_t" in leaf) for layer in layers for leaf in layer.values()]
        if not concat and any(done):
            raise RealmError("decode_layout(concat=False): the adapters are already concatenated; "
                             "pass the stack (as stack_adapters returns it) instead")
        return adapters if all(done) or not concat else {"layers": _concat_jit(tuple(layers), 0)}
    if any("a_t" in leaf for leaf in layers.values()):
        raise RealmError("decode_layout: the adapters are in concat_layout's form; pass them as "
                         "stack_adapters / load_peft return them")
    fused = _fused_layers_jit(layers, tuple(sorted(dims.items())), cfg.num_layers)
    return {"layers": _concat_jit(fused, 0) if concat else fused}


def _leaves(layers) -> list:
    """The projection leaves of an adapter's 'layers' (stacked dict or per-layer tuple)."""
    if isinstance(layers, (tuple, list)):
        return [leaf for layer in layers for leaf in layer.values()]
    return list(layers.values())


def concat_layout(adapters: Adapter, cfg: ModelConfig) -> Adapter:
    """The adapter (or stack) for stacked params, concatenated over adapters on the rank axis::

        {"layers": {proj: {"a_t": [L, A*R, D_in], "b": [L, A*R, D_out], "scale": [L, A, R]}}}

    (a single adapter: a_t [L, R, D_in], b [L, R, D_out], scale [L, R]); rank column ``a*R + r``
    is rank r of adapter a. ``forward`` then adds each projection's LoRA term with two matmuls
    and a per-row mask (``concat_delta``), no gather. Build it once per adapter set. For params
    in ``model.decode_layout`` use ``decode_layout``.
    """
    layers = adapters.get("layers") if isinstance(adapters, Mapping) else None
    if isinstance(layers, (tuple, list)):
        raise RealmError("concat_layout: the adapters are in the decode layout (per layer); concat_layout "
                         "takes them as stack_adapters / load_peft return them (use decode_layout for "
                         "decode-layout params)")
    check_adapter(adapters, projection_dims(cfg), cfg.num_layers)
    return {"layers": _concat_jit(layers, 1)}


@partial(jax.jit, static_argnums=1)
def _concat_jit(layers, lead: int):
    """Every {'a', 'b', 'scale'} leaf to {'a_t', 'b', 'scale'} (see ``_to_concat``)."""
    if isinstance(layers, tuple):
        return tuple({n: _to_concat(leaf, lead) for n, leaf in layer.items()} for layer in layers)
    return {n: _to_concat(leaf, lead) for n, leaf in layers.items()}


def _to_concat(leaf, lead: int):
    """a [*L, (A,) D_in, R], b [*L, (A,) R, D_out], scale [*L, (A,)] or [*L, (A,) R] (``lead`` = len(L))
    -> a_t [*L, A*R, D_in], b [*L, A*R, D_out], scale [*L, A, R] (no A axis for a single adapter)."""
    if "a_t" in leaf:
        return leaf
    a, b, scale = leaf["a"], leaf["b"], jnp.asarray(leaf["scale"], jnp.float32)
    r = a.shape[-1]
    if scale.ndim == a.ndim - 2:  # one scale per adapter: per rank column
        scale = jnp.broadcast_to(scale[..., None], scale.shape + (r,))
    a_t = jnp.swapaxes(a, -1, -2)
    if a.ndim == lead + 3:  # a stack: merge the adapter axis into the rank axis
        head = a.shape[:lead]
        a_t = a_t.reshape(head + (-1, a.shape[-2]))
        b = b.reshape(head + (-1, b.shape[-1]))
    return {"a_t": a_t, "b": b, "scale": scale}


@partial(jax.jit, static_argnums=(1, 2))
def _fused_layers_jit(leaves: dict, dims: tuple, num_layers: int) -> tuple:
    """Stacked leaves -> per-layer leaves, q|k|v and gate|up fused (``decode_layout(concat=False)``)."""
    dims = dict(dims)
    out = []
    for i in range(num_layers):
        layer = {}
        for name in ("wo", "w_down"):
            if name in leaves:
                layer[name] = {k: v[i] for k, v in leaves[name].items()}
        for fused, parts in FUSED.items():
            present = [p for p in parts if p in leaves]
            if not present:
                continue
            width = sum(dims[p][1] for p in parts)
            As, Bs, Ss = [], [], []
            for p in present:
                a, b, sc = (leaves[p][k][i] for k in ("a", "b", "scale"))
                col = sum(dims[q][1] for q in parts[:parts.index(p)])
                pad = [(0, 0)] * (b.ndim - 1) + [(col, width - col - b.shape[-1])]
                As.append(a)
                Bs.append(jnp.pad(b, pad))
                Ss.append(jnp.broadcast_to(sc[..., None], sc.shape + (a.shape[-1],)))
            layer[fused] = {"a": jnp.concatenate(As, -1), "b": jnp.concatenate(Bs, -2),
                            "scale": jnp.concatenate(Ss, -1)}
        out.append(layer)
    return tuple(out)


# ----------------------------------------------------------------------------- folded layout
def fold_layout(params: dict, adapters: Adapter, cfg: ModelConfig) -> tuple[dict, Adapter]:
    """Fold the adapters' A factors into the base weights: ``(params_folded, adapters_folded)``,
    for multi-adapter decode with one matmul fewer per targeted projection and layer.

    ``params`` in ``model.decode_layout`` (transposed float weights ``{"t": [D_out, D_in]}``);
    ``adapters``: a stack (as ``stack_adapters`` returns it), a single adapter, or either in
    ``decode_layout``'s concatenated form. For each targeted (fused) projection of each layer the
    weight becomes ``{"t_lora": [D_out + A*R, D_in]}`` (the base rows, then the concatenated
    ``a_t``, cast to the weight's dtype) and the adapter leaf ``{"b": [A*R, D_out], "scale":
    [A, R]}`` (a single adapter: ``[R, D_out]``, ``[R]``). ``forward``/``generate`` then compute
    ``x @ t_lora.T`` once: the first D_out columns are the base output, the rest the rank
    activations of all A adapters, masked per row and multiplied by b (``folded_proj``). Equal
    to the ``decode_layout`` adapters on the unfolded params up to float rounding (the A factors
    are rounded to the weight dtype).

    Serve the two results together, with ``adapter_ids`` as for the stack: a folded weight
    refuses to run without its folded adapters, and folded adapters without folded weights.
    Untargeted projections and every other leaf are the same arrays as in ``params``.

    Memory: the targeted weights are new buffers (base + A*R rows each); drop the original
    params after folding, or both are held. A new adapter set needs a new fold of the original
    params (the same shapes reuse the compiled program). When: multi-adapter decode, where the
    per-projection matmul count dominates; for one adapter, ``merge`` is faster still. An int8
    base cannot hold float A factors: serve ``decode_layout``'s (unfolded) adapters there.
    """
    from .model import is_unstacked

    layers = params.get("layers") if isinstance(params, Mapping) else None
    if not is_unstacked(layers) or not layers:
        raise RealmError("fold_layout: params must be in model.decode_layout (a tuple of per-layer dicts with "
                         "fused 'wqkv' / 'w_gate_up'); call model.decode_layout(params) first")
    for i, lp in enumerate(layers):
        for name in MATMUL_WEIGHTS:
            w = lp.get(name)
            if has_lora_rows(w):
                raise RealmError(f"fold_layout: params['layers'][{i}][{name!r}] is already folded; fold the "
                                 f"original (unfolded) params")
    dims, L = _params_dims(params)
    if dims != projection_dims(cfg) or L != cfg.num_layers:
        raise RealmError(f"fold_layout: params do not match the config: projections {dims}, {L} layers; "
                         f"config {projection_dims(cfg)}, {cfg.num_layers} layers")
    check_adapter(adapters, projection_dims(cfg), cfg.num_layers, "fold_layout: adapters")
    if any(_is_folded(leaf) for leaf in _leaves(adapters["layers"])):
        raise RealmError("fold_layout: the adapters are already folded; pass the stack (as stack_adapters "
                         "returns it) and the original params")
    ad_layers = decode_layout(adapters, cfg)["layers"]  # per layer, fused, concatenated: {a_t, b, scale}
    bad = sorted({n for layer in ad_layers for n in layer if n not in MATMUL_WEIGHTS})
    if bad:
        raise RealmError(f"fold_layout: adapters in the decode layout must name the fused projections "
                         f"{MATMUL_WEIGHTS}, got {bad}; pass the stack (as stack_adapters returns it)")
    for i, (lp, layer) in enumerate(zip(layers, ad_layers)):
        for name in (n for n in MATMUL_WEIGHTS if n in layer):
            w = lp[name]
            if is_quantized(w):
                raise UnsupportedModelError(
                    f"fold_layout: params['layers'][{i}][{name!r}] is int8-quantized ({_keys(w)}); float A factors "
                    f"cannot be folded into int8 weights. Serve the unfolded form instead: "
                    f"forward(params, ..., adapters=lora.decode_layout(stack, cfg), adapter_ids=...), which "
                    f"supports int8")
            if not (isinstance(w, Mapping) and set(w) == {"t"}):
                raise RealmError(f"fold_layout: params['layers'][{i}][{name!r}]: expected a transposed float weight "
                                 f"{{'t': [D_out, D_in]}} (model.decode_layout(params) with transposed=True), got "
                                 f"{_keys(w) or type(w).__name__}")
    new_w = _fold_layout_jit(tuple({n: lp[n]["t"] for n in layer} for lp, layer in zip(layers, ad_layers)),
                             tuple({n: leaf["a_t"] for n, leaf in layer.items()} for layer in ad_layers))
    out = {**params, "layers": tuple({**lp, **{n: {"t_lora": t} for n, t in nw.items()}}
                                     for lp, nw in zip(layers, new_w))}
    folded = tuple({n: {"b": leaf["b"], "scale": leaf["scale"]} for n, leaf in layer.items()} for layer in ad_layers)
    return out, {"layers": folded}


@jax.jit
def _fold_layout_jit(weights: tuple, a_t: tuple) -> tuple:
    """Per layer {name: t [D_out, D_in]} and {name: a_t [A*R, D_in]} -> {name: [D_out + A*R, D_in]}
    (a_t cast to the weight's dtype)."""
    return tuple({n: jnp.concatenate([w_l[n], a_l[n].astype(w_l[n].dtype)], axis=0) for n in w_l}
                 for w_l, a_l in zip(weights, a_t))


# ----------------------------------------------------------------------------- merge / unmerge
def merge(params: dict, adapter: Adapter) -> dict:
    """``W' = W + scale * A @ B`` for every targeted projection (float32, cast back to W's dtype).

    Pure and jittable (a new adapter of the same shapes does not retrace). A quantized base
    weight is refused: serve the adapter unmerged instead.
    """
    return _fold(params, adapter, 1.0, "merge")


def unmerge(params: dict, adapter: Adapter) -> dict:
    """The inverse of ``merge``: ``W - scale * A @ B`` (equal to the original up to rounding)."""
    return _fold(params, adapter, -1.0, "unmerge")


def _fold(params, adapter, sign, fn):
    layers = params["layers"]
    unstacked = isinstance(layers, (tuple, list))
    if unstacked and any(has_lora_rows(w) for lp in layers for w in lp.values()):
        raise RealmError(f"{fn}: the params have LoRA factors folded in (lora.fold_layout); {fn} the adapter "
                         f"into the original (unfolded) params")
    if isinstance(adapter, Mapping) and isinstance(adapter.get("layers"), (tuple, list)):
        raise RealmError(f"{fn}: the adapter is in the decode layout; {fn} takes the stacked adapter "
                         f"(as load_peft / init_adapter return it), for params in either layout")
    names = list(adapter["layers"]) if isinstance(adapter, Mapping) and isinstance(adapter.get("layers"), Mapping) else []
    if unstacked:
        names = [f for f, parts in FUSED.items() if any(p in names for p in parts)] + \
            [n for n in names if n in ("wo", "w_down")]
    for name in names:
        w = (layers[0] if unstacked else layers).get(name)
        if is_quantized(w):
            raise UnsupportedModelError(
                f"{fn}: params['layers'][{name!r}] is quantized ({_keys(w)}); merging into a quantized base "
                f"is not supported. Serve the adapter unmerged (forward(..., adapters=, adapter_ids=)) "
                f"or merge before quantizing")
    dims, L = _params_dims(params)
    check_adapter(adapter, dims, L, f"{fn}: adapter", stacked=False)
    if any("a_t" in leaf for leaf in adapter["layers"].values()):
        raise RealmError(f"{fn}: the adapter is in concat_layout's serving form; {fn} takes the adapter "
                         f"as load_peft / init_adapter return it")
    if unstacked:
        fused = _fused_layers_jit(adapter["layers"], tuple(sorted(dims.items())), L)
        new = _fold_layers_jit(tuple({n: lp[n] for n in fl} for lp, fl in zip(layers, fused)), fused, sign)
        return {**params, "layers": tuple({**lp, **nl} for lp, nl in zip(layers, new))}
    new = _fold_jit({n: layers[n] for n in adapter["layers"]}, adapter["layers"], sign)
    return {**params, "layers": {**layers, **new}}


@partial(jax.jit, static_argnums=2)
def _fold_jit(weights: dict, leaves: dict, sign: float) -> dict:
    """Stacked layout: W [L, D_in, D_out] +- scale[l] * a[l] @ b[l]."""
    out = {}
    for name, leaf in leaves.items():
        w = weights[name]
        delta = jnp.einsum("ldr,lro->ldo", leaf["a"].astype(jnp.float32), leaf["b"].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        delta = delta * leaf["scale"].astype(jnp.float32)[:, None, None]
        out[name] = (w.astype(jnp.float32) + sign * delta).astype(w.dtype)
    return out


@partial(jax.jit, static_argnums=2)
def _fold_layers_jit(weights: tuple, fused: tuple, sign: float) -> tuple:
    """Decode layout: per layer, W [D_in, D_out] (or its transposed form) +- (a * scale) @ b
    (scale scalar or per rank)."""
    out = []
    for w_l, f_l in zip(weights, fused):
        new = {}
        for name, leaf in f_l.items():
            a = leaf["a"].astype(jnp.float32) * leaf["scale"].astype(jnp.float32)
            delta = jnp.matmul(a, leaf["b"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
            w = w_l[name]
            if isinstance(w, Mapping):  # transposed [D_out, D_in] (model.decode_layout)
                new[name] = {"t": (w["t"].astype(jnp.float32) + sign * delta.T).astype(w["t"].dtype)}
            else:
                new[name] = (w.astype(jnp.float32) + sign * delta).astype(w.dtype)
        out.append(new)
    return tuple(out)


# PEFT directories: read / write (kept in their own file; re-exported here)
from .lora_peft import load_peft, peft_targets, read_peft_config, save_peft  # noqa: E402,F401


# ----------------------------------------------------------------------------- command line
class AdapterPlan(NamedTuple):
    """``--lora``/``--adapter`` choices, checked on the host: adapter dirs by name, id per prompt."""

    dirs: dict  # name -> directory (in stacking order)
    ids: list  # [B] index into dirs (-1 = base model)


def plan_adapters(specs: Sequence[str], choices: Sequence[str], num_prompts: int) -> AdapterPlan | None:
    """Parse ``--lora [NAME=]DIR`` (repeatable; NAME defaults to the directory's name) and
    ``--adapter NAME`` (one per prompt, in prompt order, or one for all; 'base' = no adapter;
    default with a single ``--lora``: it, for every prompt). None without ``--lora``."""
    dirs: dict[str, str] = {}
    for spec in specs:
        name, sep, d = spec.partition("=")
        if not sep:
            name, d = Path(spec.rstrip("/\\")).name, spec
        if not name or not d:
            raise RealmError(f"--lora: expected DIR or NAME=DIR, got {spec!r}")
        if name == "base":
            raise RealmError("--lora: the name 'base' is reserved for the base model; pick another NAME=DIR")
        if name in dirs:
            raise RealmError(f"--lora: the name {name!r} is given twice ({dirs[name]!r}, {d!r}); use NAME=DIR")
        dirs[name] = d
    if not dirs:
        if choices:
            raise RealmError(f"--adapter {choices[0]!r} given without any --lora [NAME=]DIR")
        return None
    if not choices:
        if len(dirs) > 1:
            raise RealmError(f"{len(dirs)} --lora adapters ({', '.join(dirs)}): choose one per prompt with "
                             f"--adapter NAME (or 'base'), repeated {num_prompts} times")
        choices = [next(iter(dirs))]
    if len(choices) == 1:
        choices = list(choices) * num_prompts
    if len(choices) != num_prompts:
        raise RealmError(f"--adapter: expected one per prompt ({num_prompts}) or one for all, got {len(choices)}")
    names = list(dirs)
    for c in choices:
        if c != "base" and c not in dirs:
            raise RealmError(f"--adapter: unknown name {c!r}; expected one of {names + ['base']}")
    return AdapterPlan(dirs, [-1 if c == "base" else names.index(c) for c in choices])


def load_adapters(dirs: Mapping[str, str], model) -> Adapter:
    """Load PEFT directories for ``model`` (a ``Model``) and stack them in order, in the params
    dtype and layout (``decode_layout`` when the params are in the decode layout)."""
    dtype = model.params["embed"].dtype
    stack = stack_adapters([load_peft(d, model.config, dtype=dtype) for d in dirs.values()])
    return decode_layout(stack, model.config) if isinstance(model.params["layers"], (tuple, list)) else stack
