"""Expert parallelism: a mixture of experts' stacked expert weights split over the mesh's
``model`` axis (E / m experts per device) give the single-device results.

Tiny random Mixtral-, Qwen2-MoE- (gated shared expert, q/k/v biases) and Qwen3-MoE-style
(q/k norms, renormalised top 3) models with E = 8 on (1, 4) and (2, 2) meshes of simulated CPU
devices: every expert leaf (canonical and runtime, both layouts) is really split, each device
holding its E / m experts and the router whole; the full forward, int8, cached decode and greedy
``generate`` equal the unsharded runtime's; the compiled decode step moves no weights (one
all-reduce per MoE layer beside attention's); E not divisible by the model axis replicates the
experts, with the same results. The reference is always the same params on one device."""

import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import realm_jax
from realm_jax import runtime
from realm_jax import sharding as sh
from realm_jax.generation import generate, new_cache
from realm_jax.loading import Model
from realm_jax.model import forward_cached_jit, forward_jit
from realm_jax.runtime import Experts

from test_sharding import _describe, assert_logits_close, collectives, random_batch, random_params

_BASE = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=4,
             num_experts=8, moe_intermediate_size=8)
CFGS = {
    "mixtral": realm_jax.ModelConfig(arch="mixtral", intermediate_size=8, num_experts_per_tok=2,
                                     norm_topk_prob=True, **_BASE),
    "qwen2_moe": realm_jax.ModelConfig(arch="qwen2_moe", intermediate_size=12, num_experts_per_tok=2,
                                       shared_expert=True, qkv_bias=True, **_BASE),
    "qwen3_moe": realm_jax.ModelConfig(arch="qwen3_moe", intermediate_size=8, num_experts_per_tok=3,
                                       norm_topk_prob=True, qk_norm=True, **_BASE),
}
MESHES = [(1, 4), (2, 2)]
EXPERT_KEYS = ("we_gate+we_up", "we_down")
LENGTHS = (7, 3, 5, 1)


@pytest.fixture(scope="module")
def models():
    return {name: random_params(cfg, i) for i, (name, cfg) in enumerate(CFGS.items())}


def _layers(rt):
    return list(rt.layers) if not rt.stacked else [rt.layers]


def assert_experts_split(arr, full, mesh, e_axis):
    """``arr`` (logical shape of ``full``) has its E axis ``e_axis`` on ``model``: every device
    holds E / m whole experts, exactly its block of ``full``, and nothing else is split."""
    m, e = mesh.shape["model"], full.shape[e_axis]
    assert isinstance(arr.sharding, NamedSharding) and arr.sharding.mesh == mesh
    spec = tuple(arr.sharding.spec) + (None,) * (arr.ndim - len(tuple(arr.sharding.spec)))
    assert spec == tuple("model" if d == e_axis else None for d in range(arr.ndim)), spec
    want = list(full.shape)
    want[e_axis] = e // m
    for shard in arr.addressable_shards:
        assert shard.data.shape == tuple(want), (shard.data.shape, want)
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(full)[shard.index])
    assert len({shard.index[e_axis].start for shard in arr.addressable_shards}) == m  # m different expert blocks


@pytest.mark.parametrize("shape", MESHES, ids=["1x4", "2x2"])
@pytest.mark.parametrize("name", CFGS)
def test_expert_leaves_hold_a_share_of_the_experts(models, name, shape):
    """Canonical params (``shard_params``) and the runtime (``prepare(mesh=)``, both layouts): the
    expert stacks hold E / m experts per device (a quarter of their bytes on a model axis of 4),
    the router stays whole on every device."""
    cfg, params = CFGS[name], models[name]
    mesh = sh.make_mesh(*shape)
    m = shape[1]
    sp = sh.shard_params(params, cfg, mesh)
    for leaf in ("we_gate", "we_up", "we_down"):
        assert_experts_split(sp["layers"][leaf], params["layers"][leaf], mesh, 1)
    assert sp["layers"]["router"].sharding.spec == P(None, None, None)
    for layout in ("per_layer", "stacked"):
        rt = runtime.prepare(sp, cfg, mesh=mesh, layout=layout)
        for i, lp in enumerate(_layers(rt)):
            sl = (lambda a: a) if rt.stacked else (lambda a: a[i])
            full = {"we_gate+we_up": np.concatenate([sl(params["layers"]["we_gate"]), sl(params["layers"]["we_up"])], -1),
                    "we_down": sl(params["layers"]["we_down"])}
            for key in EXPERT_KEYS:
                w = lp[key]
                assert isinstance(w, Experts)
                assert_experts_split(w.w, full[key], mesh, 1 if rt.stacked else 0)
                per_device = {s.data.nbytes for s in w.w.addressable_shards}
                assert per_device == {w.w.nbytes // m}, (per_device, w.w.nbytes)
            assert all(s.data.shape == lp["router"].shape for s in lp["router"].addressable_shards)


# model -> (mesh, runtime choices) of the forward test
STACKED, INT8 = {"layout": "stacked"}, {"layout": "stacked", "quantize": "int8"}
FORWARD_CASES = {"mixtral": [((1, 4), STACKED), ((1, 4), INT8)], "qwen3_moe": [((1, 4), STACKED)],
                 "qwen2_moe": [((1, 4), STACKED), ((2, 2), STACKED)]}


@pytest.mark.parametrize("name", CFGS)
def test_forward_on_mesh_equals_single_device(models, name):
    """The full forward on the mesh (``FORWARD_CASES``; the per-layer layout is in the decode
    tests): the single-device logits of the same runtime choices, to 1e-5 of the largest logit
    (float32 summation order: the experts' partial sums are all-reduced)."""
    cfg, params = CFGS[name], models[name]
    tokens, lengths = random_batch(np.random.default_rng(3), cfg.vocab_size, LENGTHS)
    refs = {}
    for shape, choices in FORWARD_CASES[name]:
        key = tuple(sorted(choices.items()))
        if key not in refs:
            refs[key] = forward_jit(runtime.prepare(params, cfg, **choices), cfg, tokens, lengths)
        mesh = sh.make_mesh(*shape)
        rt = runtime.prepare(params, cfg, mesh=mesh, **choices)
        assert dict(rt.options.rules)["experts"] == "model"
        got = forward_jit(rt, cfg, *sh.shard_batch((tokens, lengths), mesh))
        worst = assert_logits_close(got, refs[key], lengths)
        print(f"{name} {shape} {choices}: max |dlogit| = {worst:.1e} of {float(np.abs(refs[key]).max()):.2f}")


@pytest.mark.parametrize("name,shape,layout", [("mixtral", (1, 4), "per_layer"), ("qwen3_moe", (1, 4), "stacked"),
                                               ("qwen2_moe", (2, 2), "stacked")],
                         ids=["mixtral-1x4", "qwen3-1x4", "qwen2-2x2"])
def test_cached_decode_on_mesh_equals_single_device(models, name, shape, layout):
    """A prompt pass and two greedy decode steps through a sharded cache give the single-device
    logits at every step. On (2, 2) the batch is odd (3 rows, not split over ``data``: every
    data replica runs the whole batch through its experts)."""
    cfg, params = CFGS[name], models[name]
    mesh = sh.make_mesh(*shape)
    rows = LENGTHS if shape[0] == 1 else LENGTHS[:3]
    tokens, lengths = random_batch(np.random.default_rng(4), cfg.vocab_size, rows)
    one = runtime.prepare(params, cfg, layout=layout)
    many = runtime.prepare(params, cfg, mesh=mesh, layout=layout)
    c1, cm = new_cache(cfg, one, len(rows), 16), new_cache(cfg, many, len(rows), 16)
    step, step_len = tokens, lengths
    for _ in range(3):
        ref, c1 = forward_cached_jit(one, cfg, step, step_len, c1)
        got, cm = forward_cached_jit(many, cfg, *sh.place_batch((step, step_len), many, strict=False), cm)
        assert_logits_close(got, ref, step_len)
        last = np.asarray(ref)[np.arange(len(rows)), np.asarray(step_len) - 1]
        step, step_len = last.argmax(-1).astype(np.int32)[:, None], np.ones(len(rows), np.int32)


def test_greedy_generate_on_mesh_equals_single_device(models):
    """Greedy ``generate`` of the Qwen2-MoE-style model (routed and shared experts) on a (1, 4)
    mesh gives the single-device tokens."""
    cfg, params = CFGS["qwen2_moe"], models["qwen2_moe"]
    prompts = [np.random.default_rng(6).integers(3, cfg.vocab_size, n).tolist() for n in (6, 2, 5, 3)]
    single, meshed = Model(cfg, params), Model(cfg, params)
    single.prepare(layout="stacked")
    meshed.prepare(mesh=sh.make_mesh(1, 4), layout="stacked")
    want = generate(single, prompts, 6, stop_ids=[]).tokens
    got = generate(meshed, prompts, 6, stop_ids=[]).tokens
    assert got == want and [len(t) for t in got] == [6] * 4


@pytest.mark.parametrize("name", ["qwen2_moe"])
def test_decode_step_moves_no_expert_weights(models, name):
    """The compiled per-layer decode step on a (1, 4) mesh has no all-gather, collective-permute,
    all-to-all or reduce-scatter (no expert weight moves: each device runs its own experts), and
    at most one all-reduce per MoE layer beside attention's (after wo) and the dense / shared
    expert MLP's (after w_down), plus the embedding lookup's (V = 64 is split)."""
    cfg, params = CFGS[name], models[name]
    mesh = sh.make_mesh(1, 4)
    rt = runtime.prepare(params, cfg, mesh=mesh, layout="per_layer")
    cache = new_cache(cfg, rt, 4, 16)
    tokens, lengths = sh.shard_batch((np.full((4, 1), 5, np.int32), np.ones((4,), np.int32)), mesh)
    found = collectives(forward_cached_jit.lower(rt, cfg, tokens, lengths, cache).compile().as_text())
    moves = {c: _describe(found[c]) for c in ("all-gather", "collective-permute", "all-to-all", "reduce-scatter")}
    assert not any(moves.values()), moves
    per_layer = 2 + int(cfg.dense_mlp)  # wo, the experts' psum, w_down of the shared expert
    assert 0 < len(found["all-reduce"]) <= per_layer * cfg.num_layers + 1, _describe(found["all-reduce"])


def test_experts_not_divisible_by_the_model_axis_are_replicated():
    """E = 6 on a model axis of 4: the policy is ``replicate`` (as for KV heads and the vocab):
    the expert stacks stay whole on every device, attention is still split, and the logits equal
    one device's. On a model axis of 2 the same model is expert parallel."""
    cfg = realm_jax.ModelConfig(arch="qwen3_moe", **{**_BASE, "num_experts": 6}, intermediate_size=8,
                                num_experts_per_tok=2, norm_topk_prob=True)
    params = random_params(cfg, 7)
    tokens, lengths = random_batch(np.random.default_rng(5), cfg.vocab_size, LENGTHS)
    ref = forward_jit(runtime.prepare(params, cfg, layout="stacked"), cfg, tokens, lengths)
    assert sh.resolve_axes(cfg, sh.make_mesh(1, 2))["experts"] == "model"
    mesh = sh.make_mesh(1, 4)
    assert sh.resolve_axes(cfg, mesh)["experts"] is None
    assert sh.param_specs(cfg, mesh)["layers"]["we_gate"] == P(None, None, None, None)
    rt = runtime.prepare(params, cfg, mesh=mesh, layout="stacked")
    for key in EXPERT_KEYS:
        w = rt.layers[key].w
        assert all(s.data.shape == w.shape for s in w.addressable_shards)
    assert rt.layers["wq+wk+wv"].w.sharding.spec[1] == "model"  # attention still tensor parallel
    assert_logits_close(forward_jit(rt, cfg, *sh.shard_batch((tokens, lengths), mesh)), ref, lengths)


def test_placer_without_a_config_splits_experts_by_size():
    """``param_placer(mesh)`` without a config (readers that learn it while reading) splits an
    expert stack whose E divides the model axis, keeps the router whole, and leaves E = 6 on 4 whole."""
    mesh = sh.make_mesh(1, 4)
    place = sh.param_placer(mesh)
    assert place(("layers", "we_up"), np.zeros((2, 8, 16, 8), np.float32)).sharding.spec[1] == "model"
    assert place(("layers", "router"), np.zeros((2, 16, 8), np.float32)).sharding.spec == P(None, None, None)
    spec = place(("layers", "we_up"), np.zeros((2, 6, 16, 8), np.float32)).sharding.spec
    assert all(a is None for a in spec)
