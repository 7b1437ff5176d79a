"""The runtime form: what the fast forward runs, prepared once from canonical params.

``prepare(params, cfg, ...)`` takes canonical params (``params.py``) plus the choices and returns
a ``Runtime``. Every choice composes with every other:

- ``layout``: ``"per_layer"`` (each layer's weights their own buffers, a Python loop over layers:
  the fast decode layout on GPU) or ``"stacked"`` (leaves ``[L, ...]``, ``lax.scan``: faster
  compiles); ``"auto"``: per-layer on GPU, stacked elsewhere.
- ``transposed``: matmul weights stored ``[D_out, D_in]`` (XLA's GPU matrix-vector kernels then
  read the contracted axis contiguously: 1B shape, batch 1, H100 1.93 -> 1.33 ms/step).
- ``quantize="int8"``: weight-only int8, symmetric per output channel (``quantization.py``).
- ``adapters``: a LoRA adapter or stack (``lora.stack_adapters``), served per row by
  ``adapter_ids``; ``fold=True`` appends their A factors to the base weights, so one matmul gives
  the base output and every adapter's rank activations (with int8 the A rows are quantized too,
  each with its own scale).
- ``mesh``: tensor parallel over ``model``, data parallel over ``data`` (``sharding.py``'s rules);
  the cache (``new_cache``) is sharded on the same mesh.
- ``attention``: ``"auto"`` (cuDNN flash attention on a GPU for bf16/f16, else the einsum
  reference; the ``REALM_JAX_ATTENTION`` variable is read here, once), ``"reference"``,
  ``"cudnn"`` or ``"xla"``. A static field: changing it means a new ``Runtime`` and a new trace.

**Typed weight leaves.** A matmul weight is a ``Weight``: one or more projections fused on the
output axis (q|k|v, gate|up), arranged as G contiguous groups (G = the ``model`` mesh axis when
the output axis is sharded, else 1), each group holding its share of every part and then the
folded LoRA rows. Sharded on the output axis, each device's slice is one whole group, so the
fused matmul needs no communication. A ``Lora`` leaf holds a projection's adapters (A factors
concatenated on the rank axis, adapter-major; B in the weight's grouped column order). An
``Experts`` leaf holds a mixture of experts' stacked weights (gate|up fused, or down; int8 per
expert and output column with ``quantize``; never transposed, never LoRA targets). This module is
the only one that looks inside them: ``project`` applies a weight and its adapters,
``project_experts`` applies expert weights to rows grouped by expert (``jax.lax.ragged_dot``).
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import RealmError
from .params import EXPERT_LEAVES, LEAVES, param_shapes, present, projection_dims
from .quantization import SCHEMES, quantize_columns

ATTENTION_ENV = "REALM_JAX_ATTENTION"  # auto (default) | reference | cudnn | xla
ATTENTION_CHOICES = ("auto", "reference", "cudnn", "xla")
LAYOUTS = ("auto", "per_layer", "stacked")

# The fusion groups of one layer's projections, in the order the layer applies them.
FUSIONS = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))
# The routed experts' fused weights (mixture-of-experts models).
EXPERT_FUSIONS = (("we_gate", "we_up"), ("we_down",))


def _static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


@partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class Weight:
    """A matmul weight in runtime form.

    w: ``[(L,) D_in, G*(P+K)]``, or ``[(L,) G*(P+K), D_in]`` when ``transposed``; int8 when
    ``scale`` is given (``[(L,) G*(P+K)]`` float32, per output column). P = sum(sizes): the
    per-group output columns of the fused parts ``names`` (part i has ``sizes[i]`` columns in
    each group, G*sizes[i] in all); K = ``rank``: folded LoRA rows per group (0 = none).
    axes: the logical (input, output) axes, for the sharding rules.
    """

    w: jax.Array
    scale: jax.Array | None
    names: tuple = _static()
    sizes: tuple = _static()
    rank: int = _static(default=0)
    transposed: bool = _static(default=False)
    axes: tuple = _static(default=("embed", "embed"))


@partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class Experts:
    """The routed experts' matmul weights in runtime form.

    w: ``[(L,) E, D_in, P]``: expert e's weights, the fused parts ``names`` side by side on the
    output axis (part i has ``sizes[i]`` columns); int8 when ``scale`` ``[(L,) E, P]`` float32
    (per expert and output column) is given. axes: the logical (input, output) axes."""

    w: jax.Array
    scale: jax.Array | None
    names: tuple = _static()
    sizes: tuple = _static()
    axes: tuple = _static(default=("embed", "expert_mlp"))


@partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class Lora:
    """The adapters of one fused projection: a_t ``[(L,) A*R, D_in]`` (None when folded into the
    weight), b ``[(L,) G, A*R, P]`` (block-diagonal over the fused parts, columns grouped as the
    weight's), scale ``[(L,) A, R]`` float32 (per rank column; 0 for an untouched layer)."""

    a_t: jax.Array | None
    b: jax.Array
    scale: jax.Array


@partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class Runtime:
    """Prepared params. ``layers``: a tuple of L per-layer dicts (``per_layer``) or one dict of
    ``[L, ...]`` leaves (``stacked``); each holds norms, biases (canonical names) and ``Weight``s
    keyed by their joined part names (``"wq+wk+wv"``). ``lora``: the same container of
    ``{weight key: Lora}`` dicts, or None. ``head``: the vocab projection (the embedding itself,
    transposed, when tied). ``options``: the static choices it was prepared with (``Options``:
    ``stacked``, ``num_adapters`` (0 = none), ``fold``, ``attention`` (the resolved
    implementation), ``mesh`` (or None), ...), part of every jit cache key."""

    embed: jax.Array
    layers: tuple | dict
    final_norm: jax.Array
    head: Weight
    lora: tuple | dict | None = None
    options: "Options" = _static(default=None)

    @property
    def dtype(self):
        return self.embed.dtype

    @property
    def stacked(self) -> bool:
        return self.options.stacked

    @property
    def num_adapters(self) -> int:
        return self.options.num_adapters

    @property
    def folded(self) -> bool:
        return self.options.fold

    @property
    def attention(self) -> str:
        return self.options.attention

    @property
    def mesh(self):
        return self.options.mesh

    @property
    def num_layers(self) -> int:
        return self.layers["attn_norm"].shape[0] if self.stacked else len(self.layers)


def is_runtime(x) -> bool:
    return isinstance(x, Runtime)


# ------------------------------------------------------------------------------------ apply
def project(x: jax.Array, w: Weight, lora: Lora | None = None, adapter_ids: jax.Array | None = None,
            out_dtype=None) -> dict[str, jax.Array]:
    """Apply one weight (and its adapters, per row): x [B, T, D_in] -> {part name: [B, T, D_out_part]}.

    Matmuls accumulate in float32; int8 columns are scaled before the cast; the base output is
    cast to ``out_dtype`` (default x.dtype), then each row's LoRA term ``((x @ A) * scale) @ B``
    (float32, only the row's own adapter: ids outside [0, A) get none) is added in that dtype.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    ww = w.w if w.scale is None else w.w.astype(x.dtype)
    if w.transposed:
        y = jnp.einsum("...i,oi->...o", x, ww, preferred_element_type=jnp.float32)
    else:
        y = jnp.matmul(x, ww, preferred_element_type=jnp.float32)
    if w.scale is not None:
        y = y * w.scale
    P = sum(w.sizes)
    G = y.shape[-1] // (P + w.rank)
    y = y.reshape(y.shape[:-1] + (G, P + w.rank))
    out = y[..., :P].astype(out_dtype)
    if lora is not None:
        b, t, din = x.shape
        if w.rank:
            h = y[..., P:]  # [B, T, G, K]: the folded rows' outputs
        else:  # 2-D, contracting a_t's minor axis: unlike x @ W, so XLA's dot merger leaves W alone
            h = jax.lax.dot_general(x.reshape(b * t, din), lora.a_t, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32).reshape(b, t, 1, -1)
        m = _rank_mask(lora.scale, adapter_ids, b)[:, None, None, :]
        delta = jnp.einsum("btgk,gko->btgo", (h * m).astype(lora.b.dtype), lora.b,
                           preferred_element_type=jnp.float32)
        out = out + delta.astype(out_dtype)
    cuts = np.cumsum(w.sizes)[:-1].tolist()
    return {n: p.reshape(p.shape[:-2] + (-1,)) for n, p in zip(w.names, jnp.split(out, cuts, axis=-1))}


def _rank_mask(scale: jax.Array, adapter_ids, bsz: int) -> jax.Array:
    """scale [A, R], ids [B] -> [B, A*R] float32: row b's own rank block scaled, the rest 0."""
    A, R = scale.shape
    ids = jnp.zeros((bsz,), jnp.int32) if adapter_ids is None else adapter_ids.astype(jnp.int32)
    hit = ids[:, None] == jnp.arange(A, dtype=jnp.int32)[None, :]
    return jnp.where(hit[:, :, None], scale[None].astype(jnp.float32), 0.0).reshape(bsz, A * R)


def projections(x: jax.Array, layer: Mapping, lora_layer: Mapping | None, adapter_ids, names) -> dict:
    """The outputs of projections ``names`` (one fusion group of ``FUSIONS``) for one layer."""
    out = {}
    for key, w in layer.items():
        if isinstance(w, Weight) and w.names[0] in names:
            out.update(project(x, w, None if lora_layer is None else lora_layer.get(key), adapter_ids))
    return out


def project_experts(rows: jax.Array, w: Experts, group_sizes: jax.Array, row_experts: jax.Array) -> dict:
    """Rows grouped by expert through their expert's weights: rows [M, D_in] (the rows of expert
    e are the e-th of the consecutive groups, ``group_sizes`` [E] int32 summing to M),
    row_experts [M] int32 (each row's expert, for the int8 scales) -> {part name: [M, D_out_part]}
    in rows.dtype. One ``jax.lax.ragged_dot`` per fused weight, accumulating in float32."""
    ww = w.w if w.scale is None else w.w.astype(rows.dtype)
    y = jax.lax.ragged_dot(rows, ww, group_sizes, preferred_element_type=jnp.float32)
    if w.scale is not None:
        y = y * w.scale[row_experts]
    cuts = np.cumsum(w.sizes)[:-1].tolist()
    return dict(zip(w.names, jnp.split(y.astype(rows.dtype), cuts, axis=-1)))


def expert_projections(rows: jax.Array, layer: Mapping, names, group_sizes: jax.Array,
                       row_experts: jax.Array) -> dict:
    """The outputs of expert weights ``names`` (one group of ``EXPERT_FUSIONS``) for one layer's
    rows grouped by expert (see ``project_experts``)."""
    out = {}
    for w in layer.values():
        if isinstance(w, Experts) and w.names[0] in names:
            out.update(project_experts(rows, w, group_sizes, row_experts))
    return out


def head_logits(x: jax.Array, head: Weight) -> jax.Array:
    """x [B, T, D] -> float32 logits [B, T, V]."""
    return project(x, head, out_dtype=jnp.float32)["lm_head"]


# ------------------------------------------------------------------------------------ prepare
def resolve_attention(choice: str, dtype, head_dim: int) -> str:
    """``auto`` -> cuDNN on a GPU for bf16/f16 with head dim a multiple of 8 and <= 128, else the reference."""
    if choice == "auto":
        choice = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
        if choice not in ATTENTION_CHOICES:
            raise RealmError(f"{ATTENTION_ENV} must be one of {', '.join(ATTENTION_CHOICES)}; got {choice!r}")
    elif choice not in ATTENTION_CHOICES:
        raise RealmError(f"attention: expected one of {ATTENTION_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim % 8 == 0 and head_dim <= 128)
    return "cudnn" if ok else "reference"


def check_params(params, cfg: ModelConfig, what: str = "params") -> None:
    """Canonical params must have exactly the leaves and shapes of ``param_shapes(cfg)``."""
    if isinstance(params, Runtime):
        raise RealmError(f"{what}: expected canonical params (a dict), got a Runtime (already prepared)")
    shapes = param_shapes(cfg)
    if not isinstance(params, Mapping) or not isinstance(params.get("layers"), Mapping):
        raise RealmError(f"{what}: expected canonical params {{'embed', 'layers': {{...}}, ...}} (stacked [L, ...] "
                         f"leaves), got {type(params).__name__}")
    for group, want, have in (("", shapes, params), ("['layers']", shapes["layers"], params["layers"])):
        want_keys = {k for k in want if k != "layers"}
        have_keys = {k for k in have if k != "layers"}
        if want_keys != have_keys:
            raise RealmError(f"{what}{group}: leaves do not match the config: missing {sorted(want_keys - have_keys)}, "
                             f"unexpected {sorted(have_keys - want_keys)}")
        for k in want_keys:
            leaf = have[k]
            if not hasattr(leaf, "shape") or isinstance(leaf, Mapping):
                raise RealmError(f"{what}{group}[{k!r}]: expected an array, got {type(leaf).__name__} "
                                 f"(int8 and other forms are prepare() options, not params)")
            if tuple(leaf.shape) != tuple(want[k]):
                raise RealmError(f"{what}{group}[{k!r}]: expected shape {tuple(want[k])} from the config, "
                                 f"got {tuple(leaf.shape)}")


def _fusion_plan(cfg: ModelConfig, rules: Mapping) -> tuple[tuple[str, ...], ...]:
    """The fused weights of a layer: parts fuse when their output axes shard alike."""
    plan = []
    for group in FUSIONS:
        if not present(LEAVES[group[0]], cfg):  # a model whose MLP is experts only has no w_gate / w_up / w_down
            continue
        if group[0] == "wq" and rules.get("q_heads") != rules.get("kv_heads"):
            plan += [("wq",), ("wk", "wv")]
        else:
            plan.append(group)
    return tuple(plan)


@dataclasses.dataclass(frozen=True)
class Options:
    """The static choices of a ``Runtime`` (hashable: part of the jit cache key).

    plan: the fused weights of a layer (tuples of projection names); rules: logical axis ->
    mesh axis (sorted pairs; empty without a mesh); groups: the ``model`` axis size."""

    plan: tuple
    rules: tuple = ()
    groups: int = 1
    fold: bool = False
    quantize: str | None = None
    transposed: bool = True
    stacked: bool = False
    num_adapters: int = 0
    attention: str = "reference"
    mesh: object = None


def prepare(params, cfg: ModelConfig, *, adapters=None, fold: bool = False, quantize: str | None = None,
            mesh=None, layout: str = "auto", transposed: bool = True, attention: str = "auto") -> Runtime:
    """Canonical params (+ adapters) -> the ``Runtime`` the forward runs (see the module docstring).

    Everything is checked on the host first (shapes against ``cfg``, the adapters against the
    model, the mesh against the heads); then one jitted transform builds every leaf, placed
    straight into its sharding when ``mesh`` is given. The runtime holds new buffers for the
    projections (the embedding and norms are shared with ``params`` on one device): drop
    ``params`` after preparing if memory is short.
    """
    check_params(params, cfg)
    if layout not in LAYOUTS:
        raise RealmError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if quantize is not None and quantize not in SCHEMES:
        raise RealmError(f"quantize: scheme {quantize!r} is not supported; supported: {', '.join(SCHEMES)}")
    if fold and adapters is None:
        raise RealmError("fold=True needs adapters (a stack from lora.stack_adapters, or one adapter)")
    stacked = layout == "stacked" or (layout == "auto" and jax.default_backend() != "gpu")
    rules, groups = {}, 1
    if mesh is not None:
        from .sharding import resolve_axes

        rules = {k: v for k, v in resolve_axes(cfg, mesh).items() if k != "batch"}
        groups = int(mesh.shape["model"])
    impl = resolve_attention(attention, params["embed"].dtype, cfg.head_dim)
    opts = Options(_fusion_plan(cfg, rules), tuple(sorted(rules.items())), groups, bool(fold), quantize,
                   bool(transposed), stacked, 0, impl, mesh)
    lora_layers, opts = _checked_adapters(adapters, cfg, opts)
    rt = _place(_build, (params, lora_layers), opts, cfg, lambda shapes: runtime_specs(shapes, cfg))
    if mesh is None:  # jit outputs are new buffers: share the embedding and final norm with params
        rt = dataclasses.replace(rt, embed=params["embed"], final_norm=params["final_norm"])
    if "lm_head" not in params:  # tied: the head is the embedding buffer itself, not a second copy
        rt = dataclasses.replace(rt, head=dataclasses.replace(rt.head, w=rt.embed))
    return rt


def with_adapters(rt: Runtime, cfg: ModelConfig, adapters) -> Runtime:
    """``rt`` serving new (unfolded) adapters, or none (``adapters=None``): the base weights are
    reused as they are (no copy); only the adapters' leaves are built, with rt's layout and mesh."""
    if rt.folded:
        raise RealmError("with_adapters: this runtime has LoRA factors folded into its weights; prepare a new "
                         "one from the canonical params with the new adapters (prepare(..., adapters=, fold=True))")
    lora_layers, opts = _checked_adapters(adapters, cfg, dataclasses.replace(rt.options, num_adapters=0))
    if lora_layers is None:
        return dataclasses.replace(rt, lora=None, options=opts)
    lora = _place(_build_lora_only, (lora_layers,), opts, cfg,
                  lambda shapes: runtime_specs(dataclasses.replace(rt, lora=shapes, options=opts), cfg).lora)
    return dataclasses.replace(rt, lora=lora, options=opts)


def choices_of(rt: Runtime) -> dict:
    """The ``prepare`` choices ``rt`` was built with, but adapters: ``prepare(params, cfg, **choices_of(rt), ...)``."""
    o = rt.options
    return dict(quantize=o.quantize, mesh=o.mesh, layout="stacked" if o.stacked else "per_layer",
                transposed=o.transposed, attention=o.attention)


def without_adapters(rt: Runtime) -> Runtime:
    """``rt`` serving no adapters (folded weights then give their base output alone)."""
    return dataclasses.replace(rt, lora=None, options=dataclasses.replace(rt.options, num_adapters=0))


def _checked_adapters(adapters, cfg: ModelConfig, opts: Options):
    """Host check of canonical adapters -> (stack layers with an adapter axis, opts with A)."""
    if adapters is None:
        return None, opts
    from .lora import check_adapter

    count = check_adapter(adapters, projection_dims(cfg), cfg.num_layers, "adapters")
    layers = adapters["layers"]
    if count is None:  # one adapter = a stack of one
        layers = {n: {"a": leaf["a"][:, None], "b": leaf["b"][:, None], "scale": jnp.asarray(leaf["scale"])[:, None]}
                  for n, leaf in layers.items()}
    return layers, dataclasses.replace(opts, num_adapters=1 if count is None else count)


_BUILDERS: dict = {}  # (builder, options, config) -> its jitted program: a new prepare of the same shapes reuses it


def _place(fn, args, opts: Options, cfg: ModelConfig, specs_of):
    """Run the jitted builder; with a mesh, straight into the shardings ``specs_of(shapes)``."""
    key = (fn, opts, cfg)
    jitted = _BUILDERS.get(key)
    if jitted is None:
        build = partial(fn, opts=opts, cfg=cfg)
        if opts.mesh is None:
            jitted = jax.jit(build)
        else:
            from jax.sharding import NamedSharding, PartitionSpec

            specs = specs_of(jax.eval_shape(build, *args))
            jitted = jax.jit(build, out_shardings=jax.tree_util.tree_map(
                lambda s: NamedSharding(opts.mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)))
        _BUILDERS[key] = jitted
    return jitted(*args)


def _groups_of(name: str, opts: Options) -> int:
    return opts.groups if dict(opts.rules).get(LEAVES[name].axes[-1]) else 1


def _grouped(x: jax.Array, widths, g: int) -> jax.Array:
    """x [..., sum(widths)] (parts side by side) -> [..., G, sum(widths)/G]: group j holds the
    j-th G-th of every part, so an even split of the last axis gives each device whole parts."""
    cuts = np.cumsum(widths)[:-1].tolist()
    return jnp.concatenate([p.reshape(p.shape[:-1] + (g, -1)) for p in jnp.split(x, cuts, axis=-1)], axis=-1)


def _fused_lora(lora_layers: Mapping, names, dims: Mapping, g: int):
    """Canonical stack leaves of ``names`` -> (a_t [L, A*Rf, D_in], b [L, G, A*Rf, P], scale [L, A, Rf]),
    the parts' factors side by side on the rank axis and b block-diagonal over the parts."""
    present = [n for n in names if n in lora_layers]
    widths = [dims[n][1] for n in names]
    offs = dict(zip(names, np.cumsum([0] + widths[:-1]).tolist()))
    As, Bs, Ss = [], [], []
    for n in present:
        a, b, s = lora_layers[n]["a"], lora_layers[n]["b"], lora_layers[n]["scale"]  # [L,A,Din,R] [L,A,R,O] [L,A]
        As.append(a)
        Bs.append(jnp.pad(b, [(0, 0)] * 3 + [(offs[n], sum(widths) - offs[n] - b.shape[-1])]))
        Ss.append(jnp.broadcast_to(s.astype(jnp.float32)[..., None], s.shape + (a.shape[-1],)))
    a, b, s = jnp.concatenate(As, -1), jnp.concatenate(Bs, -2), jnp.concatenate(Ss, -1)
    L, A, din, rf = a.shape
    a_t = jnp.swapaxes(a, -1, -2).reshape(L, A * rf, din)
    b = jnp.swapaxes(_grouped(b.reshape(L, A * rf, -1), widths, g), 1, 2)  # [L, G, A*Rf, P]
    return a_t, b, s


def _layer_weights(layers: Mapping, lora_layers, opts: Options, cfg: ModelConfig):
    """Stacked canonical layer leaves -> ({key: Weight}, {key: Lora}) with leading L."""
    dims = projection_dims(cfg)
    weights, loras = {}, {}
    for names in opts.plan:
        key, g = "+".join(names), _groups_of(names[0], opts)
        widths = [dims[n][1] for n in names]
        w = _grouped(jnp.concatenate([layers[n] for n in names], -1), widths, g)  # [L, Din, G, P]
        rank = 0
        if lora_layers is not None and any(n in lora_layers for n in names):
            a_t, b, s = _fused_lora(lora_layers, names, dims, g)
            if opts.fold:
                rank = a_t.shape[1]
                rows = jnp.broadcast_to(jnp.swapaxes(a_t, 1, 2)[:, :, None].astype(w.dtype),
                                        w.shape[:2] + (g, rank))
                w = jnp.concatenate([w, rows], -1)
                a_t = None
            loras[key] = Lora(a_t, b, s)
        weights[key] = _weight(w.reshape(w.shape[:2] + (-1,)), names, tuple(x // g for x in widths), rank, opts)
    return weights, loras


def _weight(w: jax.Array, names, sizes, rank: int, opts: Options) -> Weight:
    """w [.., D_in, D_out] float -> a Weight (int8 per output column, transposed) as ``opts`` say."""
    scale = None
    if opts.quantize:
        w, scale = quantize_columns(w)
    if opts.transposed:
        w = jnp.swapaxes(w, -1, -2)
    axes = (LEAVES[names[0]].axes[-2], LEAVES[names[0]].axes[-1])
    return Weight(w, scale, tuple(names), tuple(sizes), rank, opts.transposed, axes)


def _expert_weights(layers: Mapping, opts: Options, cfg: ModelConfig) -> dict:
    """Stacked canonical expert leaves [L, E, D_in, D_out] -> {key: Experts} (gate|up fused)."""
    if not cfg.moe:
        return {}
    out = {}
    for names in EXPERT_FUSIONS:
        w = jnp.concatenate([layers[n] for n in names], -1)
        scale = None
        if opts.quantize:
            w, scale = quantize_columns(w)
        out["+".join(names)] = Experts(w, scale, names, tuple(layers[n].shape[-1] for n in names),
                                       LEAVES[names[0]].axes[-2:])
    return out


def _unstack(tree, n: int) -> tuple:
    return tuple(jax.tree_util.tree_map(lambda a: a[i], tree) for i in range(n))


def _build(params: Mapping, lora_layers, *, opts: Options, cfg: ModelConfig) -> Runtime:
    layers = params["layers"]
    weights, loras = _layer_weights(layers, lora_layers, opts, cfg)
    fused = {n for names in opts.plan for n in names} | set(EXPERT_LEAVES)
    body = {**{k: v for k, v in layers.items() if k not in fused}, **weights, **_expert_weights(layers, opts, cfg)}
    lora = loras if lora_layers is not None else None
    if not opts.stacked:
        body = _unstack(body, cfg.num_layers)
        lora = None if lora is None else _unstack(lora, cfg.num_layers)
    V = cfg.vocab_size
    if "lm_head" in params:
        g = _groups_of("lm_head", opts)
        head = _weight(params["lm_head"], ("lm_head",), (V // g,), 0, opts)
    else:  # tied: the embedding [V, D] is the transposed head, same buffer, never quantized
        head = Weight(params["embed"], None, ("lm_head",), (V // _groups_of("lm_head", opts),), 0, True,
                      ("embed", "vocab"))
    return Runtime(params["embed"], body, params["final_norm"], head, lora, opts)


def _build_lora_only(lora_layers, *, opts: Options, cfg: ModelConfig):
    dims = projection_dims(cfg)
    loras = {}
    for names in opts.plan:
        if any(n in lora_layers for n in names):
            loras["+".join(names)] = Lora(*_fused_lora(lora_layers, names, dims, _groups_of(names[0], opts)))
    return loras if opts.stacked else _unstack(loras, cfg.num_layers)


# ------------------------------------------------------------------------------------ sharding
def runtime_specs(rt, cfg: ModelConfig):
    """PartitionSpecs for a Runtime (or its ``eval_shape``): weights by their logical (input,
    output) axes (grouped output axes on ``model``), norms and biases by their table axes."""
    from jax.sharding import PartitionSpec as P

    from .sharding import PARAM_AXES  # the sharding table's axes (the router's E is never split)

    opts = rt.options
    rules = dict(opts.rules)
    lead = (None,) if opts.stacked else ()

    def ax(a):
        return rules.get(a)

    def weight(w: Weight):
        i, o = ax(w.axes[0]), ax(w.axes[1])
        spec = (o, i) if w.transposed else (i, o)
        n = len(w.w.shape) - 2
        return Weight(P(*([None] * n), *spec), None if w.scale is None else P(*([None] * n), o),
                      w.names, w.sizes, w.rank, w.transposed, w.axes)

    def experts(e: Experts):
        i, o = ax(e.axes[0]), ax(e.axes[1])
        return Experts(P(*lead, ax("experts"), i, o), None if e.scale is None else P(*lead, ax("experts"), o),
                       e.names, e.sizes, e.axes)

    def layer(lp):
        out = {}
        for k, v in lp.items():
            out[k] = weight(v) if isinstance(v, Weight) else experts(v) if isinstance(v, Experts) else \
                P(*lead, *(ax(a) for a in PARAM_AXES[k][1:]))
        return out

    def lora_layer(ll, lp):
        out = {}
        for k, lo in ll.items():
            w = lp[k]
            out[k] = Lora(None if lo.a_t is None else P(*lead, None, ax(w.axes[0])),
                          P(*lead, ax(w.axes[1]), None, None), P(*lead, None, None))
        return out

    if opts.stacked:
        layers, lora = layer(rt.layers), None if rt.lora is None else lora_layer(rt.lora, rt.layers)
    else:
        layers = tuple(layer(lp) for lp in rt.layers)
        lora = None if rt.lora is None else tuple(lora_layer(ll, lp) for ll, lp in zip(rt.lora, rt.layers))
    return Runtime(P(ax("vocab"), None), layers, P(None), weight(rt.head), lora, opts)
