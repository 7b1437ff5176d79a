"""Many devices: one ``jax.sharding.Mesh`` with axes ``("data", "model")`` and partition rules.

Data parallel: the batch axis B of tokens, lengths and the KV cache is split over ``data``.
Tensor parallel: attention heads and the MLP width are split over ``model`` (Megatron style:
wq/wk/wv and w_gate/w_up by output columns, wo and w_down by input rows), so each device holds
whole heads and the only communication per layer is one all-reduce after wo and one after w_down.
XLA's SPMD partitioner inserts the collectives: ``forward``, ``forward_cached`` and everything
built on them run unchanged on sharded inputs.
Expert parallel (mixture of experts): the stacked expert weights (we_gate, we_up [L, E, D, Fe],
we_down [L, E, Fe, D]) are split on their E axis (logical ``"experts"``) over ``model``, each
device holding E / m whole experts. The router stays whole (its E columns are the logical
``"router_experts"``, never split): every device routes every token over all E experts, runs the
(token, expert) pairs routed to its own experts in a ``shard_map`` (``moe.expert_parallel_experts``)
and one all-reduce (``psum``) over ``model`` per MoE layer adds the devices' partial sums.

The rules are data, in two tables:

- ``PARAM_AXES`` / ``CACHE_AXES``: each leaf's dimensions, named by *logical* axis
  (``"q_heads"`` is the N*H column axis of wq, ``"mlp"`` the F axis, ...).
- ``AXIS_RULES``: logical axis -> mesh axis, and what happens when the mesh axis does not divide
  the dimension (``"error"`` or ``"replicate"``).

Policy when a mesh does not fit the model:

- N (query heads), F (MLP width) not divisible by the ``model`` axis: ``ShardingError`` naming
  ``num_heads`` / ``intermediate_size``.
- K (KV heads) not divisible by the ``model`` axis: wk, wv, bk, bv and the cache's K axis are
  replicated on ``model`` (each device keeps all KV heads; GQA usually has few).
- V (vocab) not divisible by the ``model`` axis: embed and lm_head are replicated.
- E (``num_experts``) not divisible by the ``model`` axis: the expert stacks are replicated on
  ``model`` (each device runs every expert, as on one device); the attention and a shared expert
  are still split as above. The router is always replicated.
- B (batch) not divisible by the ``data`` axis: ``ShardingError`` naming the batch; no padding
  (choose a batch size that is a multiple of the data axis).

Multi-host: ``initialize_distributed`` wraps ``jax.distributed.initialize``; for evaluation each
process takes its share of the items (``process_shard``), runs on a mesh of its own devices, and
``gather_in_order`` collects every process's results in the original item order.

The API: ``make_mesh``; ``param_specs`` / ``shard_params`` / ``param_placer`` (loading);
``adapter_specs`` / ``shard_adapters`` (LoRA); ``cache_specs`` / ``shard_cache``;
``paged_cache_specs`` (the engine's paged pool); ``shard_batch``; for code that builds arrays
next to sharded params, ``init_cache_like`` / ``init_paged_cache_like`` and ``place_batch``;
``keep_cache`` (inside a program); ``initialize_distributed`` / ``process_shard`` / ``gather_in_order``.
See docs/sharding.md.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .config import ModelConfig
from .errors import RealmError
from .kv_cache import KVCache, PagedKVCache
from .params import LEAVES, model_leaves, param_shapes

DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)


class ShardingError(RealmError):
    """A mesh that does not fit the model, the batch or the machine."""


# ---------------------------------------------------------------------------------- rule tables
# Logical axes of every params leaf (from the leaf table, params.LEAVES; layer leaves carry L first).
# The router's E output columns are named apart from the expert stacks' E axis ("experts", split
# for expert parallelism): the router stays whole, so every device routes every token over all E.
ROUTER_EXPERTS = "router_experts"
PARAM_AXES: dict[str, tuple[str, ...]] = {
    name: tuple(ROUTER_EXPERTS if name == "router" and a == "experts" else a for a in leaf.axes)
    for name, leaf in LEAVES.items()}

# Logical axes of the KV cache leaves.
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("layers", "batch", "cache_len", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_len", "kv_heads", "head_dim"),
    "lengths": ("batch",),
}

# Logical axes of the paged KV cache leaves (``kv_cache.PagedKVCache``): the pool's block axis is
# never split (blocks are shared across sequences: any row may hold any block, so they cannot
# follow the batch's ``data`` split), its K axis is split like the dense cache's; the block table
# and lengths are per row, B on ``data`` like the dense cache's lengths.
PAGED_CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("layers", "blocks", "block_pos", "kv_heads", "head_dim"),
    "v": ("layers", "blocks", "block_pos", "kv_heads", "head_dim"),
    "block_table": ("batch", "table_blocks"),
    "lengths": ("batch",),
}

# Logical axis -> (mesh axis, what to do when the mesh axis does not divide it).
# Logical axes not listed are replicated.
AXIS_RULES: dict[str, tuple[str, str]] = {
    "batch": (DATA, "error"),
    "q_heads": (MODEL, "error"),
    "mlp": (MODEL, "error"),
    "kv_heads": (MODEL, "replicate"),
    "vocab": (MODEL, "replicate"),
    "experts": (MODEL, "replicate"),
}

# The config field that counts each sharded logical axis (in whole units: heads, not columns).
_AXIS_FIELDS = {"q_heads": "num_heads", "kv_heads": "num_kv_heads", "mlp": "intermediate_size",
                "vocab": "vocab_size", "experts": "num_experts"}


# ---------------------------------------------------------------------------------- mesh
def make_mesh(data: int | None = None, model: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``Mesh`` of shape (data, model) with axes ``("data", "model")``.

    devices: defaults to ``jax.devices()`` (all processes' devices); the first ``data * model``
    are used. ``data=None`` takes every device not used by ``model``. For per-process
    evaluation on several hosts pass ``devices=jax.local_devices()``.
    Axes are ``AxisType.Auto``: shardings of inputs propagate through ``jit``.
    """
    given = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ShardingError("devices: expected at least one device, got none")
    if not isinstance(model, (int, np.integer)) or model < 1:
        raise ShardingError(f"model: expected a positive integer, got {model!r}")
    if data is None:
        if len(devices) % model:
            raise ShardingError(f"model={model} does not divide the number of devices ({len(devices)})")
        data = len(devices) // model
    if not isinstance(data, (int, np.integer)) or data < 1:
        raise ShardingError(f"data: expected a positive integer, got {data!r}")
    n = int(data) * int(model)
    if n > len(devices) or (given and n != len(devices)):
        raise ShardingError(f"mesh data={data} x model={model} needs {n} devices, "
                            f"{'given' if given else 'available'}: {len(devices)}")
    shape, types = (int(data), int(model)), (AxisType.Auto, AxisType.Auto)
    if n == len(devices):
        try:  # topology-aware device order (TPU slices, multi-GPU hosts)
            return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
        except Exception:
            pass
    return Mesh(np.array(devices[:n], dtype=object).reshape(shape), MESH_AXES, axis_types=types)


def _axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape.get(axis, 1))


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise ShardingError(f"mesh: expected a jax.sharding.Mesh (see make_mesh), got {type(mesh).__name__}")
    missing = [a for a in MESH_AXES if a not in mesh.axis_names]
    if missing:
        raise ShardingError(f"mesh: expected axes {MESH_AXES}, got {tuple(mesh.axis_names)}")


def resolve_axes(cfg: ModelConfig, mesh: Mesh) -> dict[str, str | None]:
    """Logical axis -> mesh axis (or None: replicated) for this model on this mesh.

    Raises ``ShardingError`` naming the config field when a dimension must split evenly and
    does not (query heads, MLP width).
    """
    _check_mesh(mesh)
    out: dict[str, str | None] = {}
    used = {a for leaf in model_leaves(cfg) for a in leaf.axes}
    for logical, (axis, uneven) in AXIS_RULES.items():
        if logical == "batch":
            out[logical] = axis
            continue
        if logical not in used:  # e.g. "mlp" of a model whose MLP is experts only
            out[logical] = None
            continue
        field = _AXIS_FIELDS[logical]
        size, parts = getattr(cfg, field), _axis_size(mesh, axis)
        if size % parts == 0:
            out[logical] = axis if parts > 1 else None
        elif uneven == "replicate":
            out[logical] = None
        else:
            raise ShardingError(f"{field}={size} is not divisible by the mesh '{axis}' axis ({parts}); "
                                f"use a '{axis}' axis size that divides {size}")
    return out


def _spec(axes: Sequence[str], rules: Mapping[str, str | None]) -> P:
    return P(*(rules.get(a) for a in axes))


# ---------------------------------------------------------------------------------- params
def _leaf_axes(path: Sequence, ndim: int) -> tuple[str, ...] | None:
    """Logical axes of a params leaf at ``path`` (tuple of keys) with ``ndim`` dims, or None.

    A quantized weight ``{"q": [..., Din, Dout], "scale": [..., Dout]}`` takes its weight's
    rule: ``q`` as the weight, ``scale`` without the Din axis.
    """
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    rule = next((n for n in reversed(names) if n in PARAM_AXES), None)
    if rule is None:
        return None
    axes = PARAM_AXES[rule]
    if ndim == len(axes):
        return axes
    if ndim == len(axes) - 1 and len(axes) >= 2:  # per-output-column vector (quantization scale)
        return axes[:-2] + axes[-1:]
    return None


def _tree_specs(tree, rules, what: str):
    def one(path, leaf):
        axes = _leaf_axes(path, np.ndim(leaf) if not hasattr(leaf, "ndim") else leaf.ndim)
        if axes is None:
            raise ShardingError(f"{what} leaf {jax.tree_util.keystr(path)} with shape {np.shape(leaf)} "
                                f"has no partition rule (see PARAM_AXES)")
        return _spec(axes, rules)

    return jax.tree_util.tree_map_with_path(one, tree)


def param_specs(cfg: ModelConfig, mesh: Mesh, params=None):
    """PartitionSpecs for every params leaf (the tree of ``param_shapes(cfg)``, or of ``params``
    when given, e.g. with quantized weights)."""
    rules = resolve_axes(cfg, mesh)
    if params is None:
        shapes = param_shapes(cfg)
        params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, np.float32), shapes,
                                        is_leaf=lambda x: isinstance(x, tuple))
    return _tree_specs(params, rules, "params")


def _put(x, sharding: NamedSharding):
    """Place ``x`` (host or device array) into ``sharding``; each device receives only its shard."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    # multi-process mesh: every process holds the same full value; each builds its own shards
    return jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x[idx]))


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
    """Params placed per the rules: tensor parallel over ``model``, replicated over ``data``."""
    specs = param_specs(cfg, mesh, params)
    return jax.tree_util.tree_map(lambda x, s: _put(x, NamedSharding(mesh, s)), params, specs)


def param_placer(mesh: Mesh, cfg: ModelConfig | None = None):
    """``place(path, array) -> array`` for the checkpoint readers: puts each finished leaf
    straight into its sharded layout (``path`` is e.g. ``("layers", "wq")`` or ``("embed",)``),
    so each device receives only its shards and the whole model never sits in one place
    (at most the one leaf being read).

    With ``cfg`` the mesh is checked against the model before any tensor is read. Without it
    (a reader that learns the config while reading), dimensions are judged by their sizes, and
    KV projections, whose split must fall between whole heads, are left replicated: follow
    with ``shard_params(params, cfg, mesh)``, which moves only the leaves not yet in place.
    """
    _check_mesh(mesh)
    rules = resolve_axes(cfg, mesh) if cfg is not None else None

    def place(path, array):
        if isinstance(array, Mapping):  # a quantized weight dict
            return {k: place(tuple(path) + (k,), v) for k, v in array.items()}
        axes = _leaf_axes(tuple(path), np.ndim(array))
        if axes is None:
            raise ShardingError(f"params leaf {path} with shape {np.shape(array)} has no partition rule")
        r = rules if rules is not None else _size_rules(axes, np.shape(array), mesh, path)
        return _put(array, NamedSharding(mesh, _spec(axes, r)))

    return place


def _size_rules(axes, shape, mesh: Mesh, path) -> dict:
    """Rules for one leaf judged by its dimension sizes alone (no config)."""
    out = {}
    for logical, size in zip(axes, shape):
        if logical not in AXIS_RULES or logical in ("batch", "kv_heads"):
            continue
        axis, uneven = AXIS_RULES[logical]
        parts = _axis_size(mesh, axis)
        if parts > 1 and size % parts == 0:
            out[logical] = axis
        elif parts > 1 and uneven == "error":
            raise ShardingError(f"params leaf {path}: {_AXIS_FIELDS[logical]} dimension {size} is not divisible "
                                f"by the mesh '{axis}' axis ({parts})")
    return out


# LoRA factors of projection W [L, D_in, D_out] (see lora.py): a [L, (A,) D_in, R] splits like
# W's rows, b [L, (A,) R, D_out] like W's columns, scale [L, (A,)] is replicated.
def _adapter_axes(name: str, part: str, ndim: int) -> tuple[str, ...] | None:
    if name not in PARAM_AXES or len(PARAM_AXES[name]) != 3:
        return None
    _, din, dout = PARAM_AXES[name]
    lead = ("layers",) + ("adapters",) * (ndim - (1 if part == "scale" else 3))
    return {"a": lead + (din, "lora_rank"), "b": lead + ("lora_rank", dout), "scale": lead}.get(part)


def adapter_specs(adapters, cfg: ModelConfig, mesh: Mesh):
    """PartitionSpecs for a LoRA adapter or stack (``{"layers": {proj: {"a", "b", "scale"}}}``)."""
    rules = resolve_axes(cfg, mesh)

    def one(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        axes = _adapter_axes(names[-2], names[-1], np.ndim(leaf)) if len(names) >= 2 else None
        if axes is None or len(axes) != np.ndim(leaf):
            raise ShardingError(f"adapter leaf {jax.tree_util.keystr(path)} with shape {np.shape(leaf)} "
                                f"has no partition rule (expected layers/<projection>/a|b|scale)")
        return _spec(axes, rules)

    return jax.tree_util.tree_map_with_path(one, adapters)


def shard_adapters(adapters, cfg: ModelConfig, mesh: Mesh):
    """LoRA adapters placed to match the sharded weights they modify."""
    specs = adapter_specs(adapters, cfg, mesh)
    return jax.tree_util.tree_map(lambda x, s: _put(x, NamedSharding(mesh, s)), adapters, specs)


# ---------------------------------------------------------------------------------- cache / batch
def _check_batch(batch: int, mesh: Mesh, what: str) -> None:
    parts = _axis_size(mesh, DATA)
    if batch % parts:
        raise ShardingError(f"{what}: batch size {batch} is not divisible by the mesh 'data' axis ({parts}); "
                            f"use a batch that is a multiple of {parts}")


def cache_specs(cache: KVCache, mesh: Mesh, strict: bool = True) -> KVCache:
    """PartitionSpecs for a ``KVCache`` (arrays or ``jax.ShapeDtypeStruct``s; stacked, or per
    layer): B on ``data``, K on ``model`` when the model axis divides K, else replicated.

    ``strict``: a B not divisible by the data axis is a ``ShardingError``; else B is replicated.
    """
    _check_mesh(mesh)
    per_layer = isinstance(cache.k, (tuple, list))
    k0 = cache.k[0] if per_layer else cache.k
    b, kv, data = cache.lengths.shape[0], k0.shape[-2], _axis_size(mesh, DATA)
    if strict:
        _check_batch(b, mesh, "cache")
    rules = {"batch": DATA if data > 1 and b % data == 0 else None,
             "kv_heads": MODEL if _axis_size(mesh, MODEL) > 1 and kv % _axis_size(mesh, MODEL) == 0 else None}
    k = _spec(CACHE_AXES["k"][1:] if per_layer else CACHE_AXES["k"], rules)
    n = len(cache.k) if per_layer else None
    return KVCache(k if n is None else (k,) * n, k if n is None else (k,) * n, _spec(CACHE_AXES["lengths"], rules))


def paged_cache_specs(cache: PagedKVCache, mesh: Mesh) -> PagedKVCache:
    """PartitionSpecs for a ``PagedKVCache`` (arrays or ``jax.ShapeDtypeStruct``s; stacked, or per
    layer): the pool's K on ``model`` when the model axis divides K, else replicated; its block
    axis NB never split (every row may hold any block); the block table [B, M] and lengths [B]
    with B on ``data`` when the data axis divides B, else replicated."""
    _check_mesh(mesh)
    per_layer = isinstance(cache.k, (tuple, list))
    k0 = cache.k[0] if per_layer else cache.k
    b, kv, data, model = cache.lengths.shape[0], k0.shape[-2], _axis_size(mesh, DATA), _axis_size(mesh, MODEL)
    rules = {"batch": DATA if data > 1 and b % data == 0 else None,
             "kv_heads": MODEL if model > 1 and kv % model == 0 else None}
    k = _spec(PAGED_CACHE_AXES["k"][1:] if per_layer else PAGED_CACHE_AXES["k"], rules)
    n = len(cache.k) if per_layer else None
    pool = k if n is None else (k,) * n
    return PagedKVCache(pool, pool, _spec(PAGED_CACHE_AXES["block_table"], rules),
                        _spec(PAGED_CACHE_AXES["lengths"], rules))


def cache_shardings(cache, mesh: Mesh):
    """``NamedSharding``s of a ``KVCache`` (``cache_specs``, B replicated when the data axis does
    not divide it) or a ``PagedKVCache`` (``paged_cache_specs``) on ``mesh``."""
    paged = isinstance(cache, PagedKVCache)
    specs = paged_cache_specs(cache, mesh) if paged else cache_specs(cache, mesh, strict=False)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def keep_cache(cache, rt):
    """Inside a jitted program: the cache constrained to its sharding on the runtime ``rt``'s mesh
    (``cache_shardings``), so a program that takes the cache and hands it back keeps its layout
    (the next call then finds the sharding it was compiled for); unchanged without a mesh."""
    if rt.mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, rt.mesh))


def shard_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    """The cache placed per ``cache_specs``."""
    specs = cache_specs(cache, mesh)
    return jax.tree_util.tree_map(lambda a, s: _put(a, NamedSharding(mesh, s)), cache, specs,
                                  is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim: int, mesh: Mesh) -> P:
    """Leading (batch) axis on ``data``, the rest replicated."""
    return P(DATA if _axis_size(mesh, DATA) > 1 else None, *([None] * (ndim - 1))) if ndim else P()


def shard_batch(x, mesh: Mesh):
    """Tokens [B, T], lengths [B], per-row settings [B] (any pytree of them) with B on ``data``.

    With a mesh spanning several processes, ``x`` is this process's part of the batch and the
    result is the global batch (the processes' parts in process order).
    Raises ``ShardingError`` if B is not a multiple of the ``data`` axis.
    """
    _check_mesh(mesh)
    # processes holding different rows: the global B is the local B times their count
    along = np.moveaxis(mesh.devices, mesh.axis_names.index(DATA), 0).reshape(_axis_size(mesh, DATA), -1)[:, 0]
    parts = len({d.process_index for d in along})
    for a in jax.tree_util.tree_leaves(x):
        if np.ndim(a):
            _check_batch(np.shape(a)[0] * parts, mesh, "shard_batch")

    def one(a):
        sharding = NamedSharding(mesh, batch_spec(np.ndim(a), mesh))
        if sharding.is_fully_addressable:
            return _put(a, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(a))

    return jax.tree_util.tree_map(one, x)


# ---------------------------------------------------------------------------------- placed like params
def mesh_of(tree) -> Mesh | None:
    """The mesh a pytree's arrays are sharded on (its first ``NamedSharding`` leaf), or None."""
    for a in jax.tree_util.tree_leaves(tree):
        s = getattr(a, "sharding", None)
        if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh):
            return s.mesh
    return None


def init_cache_like(rt, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """A zeroed cache laid out for the runtime ``rt``: per layer or stacked as it needs, in its
    dtype, and on its mesh B on ``data`` (when the data axis divides B, else replicated) and K on
    ``model`` per ``cache_specs``, each device allocating only its shard.

    A cache made on one device for a sharded runtime would be replicated onto every device of
    the mesh, and so would all attention work.
    """
    from .kv_cache import init_cache

    dtype = dtype if dtype is not None else rt.dtype
    make = partial(init_cache, cfg, batch, max_len, dtype, per_layer=not rt.stacked)
    if rt.mesh is None:
        return make()
    specs = cache_specs(jax.eval_shape(make), rt.mesh, strict=False)
    out = jax.tree_util.tree_map(lambda s: NamedSharding(rt.mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    return jax.jit(make, out_shardings=out)()


def init_paged_cache_like(rt, cfg: ModelConfig, batch: int, num_blocks: int, block_size: int, max_blocks: int,
                          dtype=None) -> PagedKVCache:
    """``init_cache_like`` for a paged cache (``kv_cache.init_paged_cache``): on the runtime's
    mesh laid out per ``paged_cache_specs``, each device allocating only its shard of the pool."""
    from .kv_cache import init_paged_cache

    dtype = dtype if dtype is not None else rt.dtype
    make = partial(init_paged_cache, cfg, batch, num_blocks, block_size, max_blocks, dtype, per_layer=not rt.stacked)
    if rt.mesh is None:
        return make()
    return jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), rt.mesh))()


def place_batch(x, params, strict: bool = True):
    """Host arrays with a leading batch axis (any pytree) placed for ``params``: B on the
    ``data`` axis of their mesh. Params not on a mesh: ``x`` unchanged.

    Without this, inputs of a jitted call over sharded params are replicated and every data
    replica computes the whole batch. ``strict``: a B not divisible by the data axis is a
    ``ShardingError``; else such arrays are replicated.
    """
    mesh = mesh_of(params)
    if mesh is None:
        return x
    parts = _axis_size(mesh, DATA)

    def one(a):
        if np.ndim(a) and np.shape(a)[0] % parts:
            if strict:
                _check_batch(np.shape(a)[0], mesh, "batch")
            return _put(a, NamedSharding(mesh, P()))
        return _put(a, NamedSharding(mesh, batch_spec(np.ndim(a), mesh)))

    return jax.tree_util.tree_map(one, x)


# ---------------------------------------------------------------------------------- multi-host
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a multi-process run (``jax.distributed.initialize``); call before any other JAX work.

    All three None: a single-process run, nothing to do (returns False).
    ``coordinator_address="auto"``: let JAX detect the cluster (Cloud TPU pods, SLURM, Open MPI,
    Kubernetes). Otherwise give all three: ``host:port`` of process 0, the process count, and
    this process's id in [0, num_processes). Returns True once initialized.
    """
    if coordinator_address is None and num_processes is None and process_id is None:
        return False
    if jax.distributed.is_initialized():
        return True
    if coordinator_address == "auto":
        if num_processes is not None or process_id is not None:
            raise ShardingError("coordinator_address='auto' detects num_processes and process_id; give neither")
        jax.distributed.initialize()
        return True
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ShardingError(f"multi-host: give coordinator_address, num_processes and process_id together "
                            f"(or coordinator_address='auto'), got coordinator_address={coordinator_address!r}, "
                            f"num_processes={num_processes!r}, process_id={process_id!r}")
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit():
        raise ShardingError(f"coordinator_address: expected 'host:port', got {coordinator_address!r}")
    if int(num_processes) < 1:
        raise ShardingError(f"num_processes: expected a positive integer, got {num_processes!r}")
    if not 0 <= int(process_id) < int(num_processes):
        raise ShardingError(f"process_id: expected an integer in [0, {num_processes}), got {process_id!r}")
    jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id))
    return True


def _share(total: int, count: int) -> int:
    return math.ceil(total / count) if total else 0


def process_shard(items: Sequence, process_index: int | None = None, process_count: int | None = None) -> list:
    """This process's contiguous share of ``items``.

    Every process gets the same number of items, ``ceil(len(items) / process_count)`` (so all
    run the same number of steps); the last shares are padded with copies of the final item,
    whose results ``gather_in_order`` drops.
    """
    items = list(items)
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise ShardingError(f"process_index: expected an integer in [0, {pc}), got {pi}")
    n = _share(len(items), pc)
    mine = items[pi * n:(pi + 1) * n]
    return mine + items[-1:] * (n - len(mine))


def gather_in_order(local, total: int):
    """Every process's results for its ``process_shard``, in the original item order, on every
    process.

    local: this process's results, one per item of its share (n = ``ceil(total / processes)``):
    either a list of Python objects (e.g. ``Score``s; sent as JSON, never pickled: see
    ``_allgather_objects`` for what can travel)
    -> a list of ``total`` objects; or an array-like [n, ...] (or a pytree of them) -> numpy
    [total, ...] (same pytree).
    """
    pc = jax.process_count()
    n = _share(total, pc)
    if isinstance(local, (list, tuple)):
        if len(local) != n:
            raise ShardingError(f"gather_in_order: expected {n} local results (the process_shard size "
                                f"for {total} items over {pc} processes), got {len(local)}")
        if pc == 1:
            return list(local)[:total]
        return [x for part in _allgather_objects(list(local)) for x in part][:total]

    def one(a):
        a = np.asarray(a)
        if a.shape[:1] != (n,):
            raise ShardingError(f"gather_in_order: expected {n} local results (the process_shard size "
                                f"for {total} items over {pc} processes), got leading shape {a.shape[:1]}")
        if pc > 1 and n:  # sent as raw bytes: every dtype (float64 too, without jax x64) arrives exact
            from jax.experimental import multihost_utils

            raw = np.ascontiguousarray(a).view(np.uint8).reshape(n, -1)
            raw = np.asarray(multihost_utils.process_allgather(raw, tiled=True))
            a = np.ascontiguousarray(raw).view(a.dtype).reshape((pc * n,) + a.shape[1:])
        return a[:total]

    return jax.tree_util.tree_map(one, local)


def _allgather_objects(obj) -> list:
    """``obj`` of every process, in process order.

    Sent as JSON, never pickled: a process only ever rebuilds plain data from another's bytes,
    so a hostile or broken peer cannot make it run code. What travels: None, bools, ints,
    floats (exact, NaN and infinities too), strings, lists, tuples, dicts with string keys, numpy
    arrays and scalars, and dataclasses defined in ``realm_jax`` (e.g. ``Score``), rebuilt by
    their constructor. Anything else is a ``ShardingError`` naming its type."""
    import dataclasses
    import json
    import sys

    from jax.experimental import multihost_utils

    def encode(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, np.generic):
            return {"__numpy__": x.dtype.str, "value": x.item()}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.dtype.str, "shape": list(x.shape), "data": x.reshape(-1).tolist()}
        if isinstance(x, list):
            return [encode(v) for v in x]
        if isinstance(x, tuple):
            return {"__tuple__": [encode(v) for v in x]}
        if isinstance(x, dict) and all(isinstance(k, str) for k in x):
            return {"__dict__": {k: encode(v) for k, v in x.items()}}
        cls = type(x)
        if dataclasses.is_dataclass(x) and cls.__module__.split(".")[0] == "realm_jax":
            return {"__dataclass__": [cls.__module__, cls.__qualname__],
                    "fields": {f.name: encode(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}}
        raise ShardingError(f"gather_in_order: a {cls.__module__}.{cls.__qualname__} cannot be sent between "
                            f"processes; results travel as JSON (numbers, strings, lists, tuples, dicts, numpy "
                            f"arrays, realm_jax dataclasses)")

    def decode(x):
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tuple__" in x:
            return tuple(decode(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {k: decode(v) for k, v in x["__dict__"].items()}
        if "__numpy__" in x:
            return np.array(x["value"], np.dtype(x["__numpy__"]))[()]
        if "__ndarray__" in x:
            dt = np.dtype(x["__ndarray__"])
            if dt.hasobject:
                raise ShardingError("gather_in_order: received an object array; only plain dtypes travel")
            return np.asarray(x["data"], dt).reshape(x["shape"])
        if "__dataclass__" in x:
            module, name = x["__dataclass__"]
            cls = getattr(sys.modules.get(module), name, None) if module.split(".")[0] == "realm_jax" else None
            if cls is None or not dataclasses.is_dataclass(cls) or "." in name:
                raise ShardingError(f"gather_in_order: received an unknown type {module}.{name}")
            return cls(**{k: decode(v) for k, v in x["fields"].items()})
        raise ShardingError(f"gather_in_order: received an object with unknown keys {sorted(x)[:4]}")

    data = np.frombuffer(json.dumps(encode(obj), separators=(",", ":")).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32), tiled=True))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(buf[None], tiled=True))
    out = []
    for i in range(len(sizes)):
        try:
            out.append(decode(json.loads(every[i, :int(sizes[i])].tobytes().decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError, KeyError, RecursionError) as e:
            if isinstance(e, ShardingError):
                raise
            raise ShardingError(f"gather_in_order: process {i} sent results that are not valid JSON of results "
                                f"({type(e).__name__}: {e})") from None
    return out
