"""Sharded (data x model mesh on 8 simulated CPU devices) equals single device; every leaf is
laid out as its rule says; bad meshes are refused; multi-process evaluation gathers in order.

The single-device run is the reference: same params, same inputs, plain ``jit`` on device 0.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # a worker of the two-process test (no conftest): 4 CPU devices each
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import realm_jax
from realm_jax import sharding as sh
from realm_jax.generation import generate
from realm_jax.kv_cache import init_cache
from realm_jax.loading import Model
from realm_jax.model import forward_cached_jit, forward_jit
from realm_jax.scoring import score


def random_params(cfg, seed):
    """Params of ``param_shapes(cfg)`` from numpy (jax.random would cost seconds of compiling)."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        x = 1.0 + 0.1 * rng.standard_normal(shape) if "norm" in name else 0.3 * rng.standard_normal(shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, realm_jax.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def random_batch(rng, vocab, lengths):
    """Right-padded int32 tokens [B, max(lengths)] and lengths [B]."""
    lengths = np.asarray(lengths, np.int32)
    tokens = np.where(np.arange(lengths.max())[None] < lengths[:, None],
                      rng.integers(3, vocab, (len(lengths), lengths.max())), 0)
    return tokens.astype(np.int32), lengths


MESHES = [(8, 1), (1, 8), (2, 4), (4, 2)]

# N=8 and F=48 divide every model axis; K=8 is sharded everywhere, K=2 is replicated on model
# axes 4 and 8 (and sharded on 2); V=104 divides 8, V=97 never does (embed/lm_head replicated).
CFGS = {
    "llama_k8": realm_jax.ModelConfig(arch="llama", vocab_size=104, hidden_size=24, intermediate_size=48,
                                      num_layers=2, num_heads=8, num_kv_heads=8, head_dim=4),
    "qwen_k2_tied_bias": realm_jax.ModelConfig(arch="qwen3", vocab_size=97, hidden_size=20, intermediate_size=48,
                                               num_layers=2, num_heads=8, num_kv_heads=2, head_dim=4,
                                               qkv_bias=True, o_bias=True, qk_norm=True, tie_word_embeddings=True),
}

# The rules, written out independently of sharding.py: leaf -> {dim split over "model": the count
# that must divide}. N and F always divide here; K and V dims are replicated when they do not.
EXPECTED = {
    "embed": {0: "V"}, "lm_head": {1: "V"}, "final_norm": {},
    "attn_norm": {}, "mlp_norm": {}, "q_norm": {}, "k_norm": {}, "bo": {},
    "wq": {2: "N"}, "bq": {1: "N"}, "wo": {1: "N"},
    "wk": {2: "K"}, "wv": {2: "K"}, "bk": {1: "K"}, "bv": {1: "K"},
    "w_gate": {2: "F"}, "w_up": {2: "F"}, "w_down": {1: "F"},
}


def expected_spec(name, ndim, cfg, model_axis):
    counts = {"N": cfg.num_heads, "K": cfg.num_kv_heads, "F": cfg.intermediate_size, "V": cfg.vocab_size}
    spec = [None] * ndim
    for dim, what in EXPECTED[name].items():
        if model_axis > 1 and counts[what] % model_axis == 0:
            spec[dim] = "model"
    return tuple(spec)


def norm_spec(spec, ndim):
    s = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    return tuple(x[0] if isinstance(x, tuple) and len(x) == 1 else x for x in s)


def assert_laid_out(arr, full, spec, mesh):
    """arr's sharding is ``spec`` on ``mesh`` and each device holds exactly its block of full."""
    assert isinstance(arr.sharding, NamedSharding) and arr.sharding.mesh == mesh
    assert norm_spec(arr.sharding.spec, arr.ndim) == spec, (arr.sharding.spec, spec)
    full = np.asarray(full)
    block = [s // (mesh.shape[a] if a else 1) for s, a in zip(full.shape, spec)]
    for shard in arr.addressable_shards:
        assert shard.data.shape == tuple(block)
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


@pytest.fixture(scope="module")
def models():
    return {name: random_params(cfg, i) for i, (name, cfg) in enumerate(CFGS.items())}


@pytest.mark.parametrize("shape", MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
@pytest.mark.parametrize("name", sorted(CFGS))
def test_every_param_sharded_as_its_rule_says(models, name, shape):
    cfg, params = CFGS[name], models[name]
    mesh = sh.make_mesh(*shape)
    sp = sh.shard_params(params, cfg, mesh)
    leaves = {**{k: v for k, v in sp.items() if k != "layers"}, **sp["layers"]}
    full = {**{k: v for k, v in params.items() if k != "layers"}, **params["layers"]}
    assert set(leaves) == set(full)
    for k, arr in leaves.items():
        assert_laid_out(arr, full[k], expected_spec(k, arr.ndim, cfg, shape[1]), mesh)


@pytest.mark.parametrize("shape", MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
def test_sharded_forward_generate_score_equal_single_device(models, shape):
    mesh = sh.make_mesh(*shape)
    rng = np.random.default_rng(0)
    tokens, lengths = random_batch(rng, 97, [6, 3, 5, 1, 6, 2, 4, 6])
    worst = 0.0
    for name, cfg in CFGS.items():
        params = models[name]
        ref = np.asarray(forward_jit(params, cfg, tokens, lengths))
        sp = sh.shard_params(params, cfg, mesh)
        out = forward_jit(sp, cfg, sh.shard_batch(tokens, mesh), sh.shard_batch(lengths, mesh))
        assert norm_spec(out.sharding.spec, 3)[0] == ("data" if shape[0] > 1 else None)
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(np.asarray(out)[b, :n], ref[b, :n], atol=1e-5, rtol=0)
            worst = max(worst, float(np.abs(np.asarray(out)[b, :n] - ref[b, :n]).max()))
    print(f"mesh {shape}: max |dlogit| sharded vs single = {worst:.1e}")

    # generate and score run unchanged on a Model whose params are sharded
    cfg, params = CFGS["qwen_k2_tied_bias"], models["qwen_k2_tied_bias"]
    sp = sh.shard_params(params, cfg, mesh)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 3, 7, 2, 6, 4, 1, 8)]
    ref_gen = generate(Model(cfg, params), prompts, 6)
    got_gen = generate(Model(cfg, sp), prompts, 6)
    assert got_gen.tokens == ref_gen.tokens
    requests = [(p[:3], rng.integers(3, cfg.vocab_size, 1 + len(p) % 3).tolist()) for p in prompts]
    ref_sc = score(Model(cfg, params), requests, batch_size=8)
    got_sc = score(Model(cfg, sp), requests, batch_size=8)
    for a, b in zip(got_sc, ref_sc):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5, rtol=0)
        assert a.is_greedy == b.is_greedy


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)], ids=["2x4", "4x2"])
def test_sharded_cache_decode_loop_equals_single_device(models, shape):
    """prefill + one token at a time through ``init_cache_like`` caches (sharded per
    ``cache_specs``) gives the single-device logits, and the donated cache keeps its layout."""
    cfg, params = CFGS["llama_k8"], models["llama_k8"]
    mesh = sh.make_mesh(*shape)
    sp = sh.shard_params(params, cfg, mesh)
    rng = np.random.default_rng(3)
    full, _ = random_batch(rng, cfg.vocab_size, [9] * 4)
    prompt_lens = np.array([4, 2, 5, 3], np.int32)
    ref = np.asarray(forward_jit(params, cfg, full, np.full(4, 9, np.int32)))
    cache = sh.init_cache_like(sp, cfg, 4, 16, jnp.float32)
    b_axis = "data" if shape[0] > 1 else None
    kv_axis = "model" if cfg.num_kv_heads % shape[1] == 0 else None
    assert norm_spec(cache.k.sharding.spec, 5) == (None, b_axis, None, kv_axis, None)
    assert norm_spec(cache.lengths.sharding.spec, 1) == (b_axis,)
    prompt = np.where(np.arange(5)[None] < prompt_lens[:, None], full[:, :5], 0).astype(np.int32)
    logits, cache = forward_cached_jit(sp, cfg, *sh.shard_batch((prompt, prompt_lens), mesh), cache)
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(np.asarray(logits)[b, :n], ref[b, :n], atol=1e-5, rtol=0)
    pos = prompt_lens.copy()
    while (pos < 9).any():
        adv = (pos < 9).astype(np.int32)
        step = full[np.arange(4), np.minimum(pos, 8)][:, None].astype(np.int32)
        logits, cache = forward_cached_jit(sp, cfg, *sh.shard_batch((step, adv), mesh), cache)
        for b in np.flatnonzero(adv):
            np.testing.assert_allclose(np.asarray(logits)[b, 0], ref[b, pos[b]], atol=1e-5, rtol=0)
        pos += adv
    assert norm_spec(cache.k.sharding.spec, 5) == (None, b_axis, None, kv_axis, None)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [9] * 4)


def test_place_batch_makes_scoring_data_parallel(models):
    """Score inputs placed with ``place_batch`` are split over ``data``; results unchanged."""
    from realm_jax.scoring import continuation_logprobs

    cfg, params = CFGS["llama_k8"], models["llama_k8"]
    mesh = sh.make_mesh(4, 2)
    sp = sh.shard_params(params, cfg, mesh)
    rng = np.random.default_rng(5)
    tokens, lengths = random_batch(rng, cfg.vocab_size, [7, 5, 6, 3, 7, 2, 4, 7])
    starts = np.maximum(lengths - 2, 0).astype(np.int32)
    targets = rng.integers(3, cfg.vocab_size, (8, 2)).astype(np.int32)
    ref = continuation_logprobs(params, cfg, tokens, lengths, starts, targets, chunk=2)
    placed = sh.place_batch((tokens, lengths, starts, targets), sp)
    for a in placed:
        assert norm_spec(a.sharding.spec, a.ndim)[0] == "data"
    got = continuation_logprobs(sp, cfg, *placed, chunk=2)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
    assert norm_spec(got[0].sharding.spec, 2)[0] == "data"
    assert sh.place_batch(tokens, params) is tokens  # params not on a mesh: untouched
    with pytest.raises(sh.ShardingError, match=r"batch size 6 .* 'data' axis \(4\)"):
        sh.place_batch(tokens[:6], sp)
    loose = sh.place_batch(tokens[:6], sp, strict=False)
    assert norm_spec(loose.sharding.spec, 2) == (None, None)


def test_lora_adapters_and_quantized_weights_follow_their_weights(models):
    cfg, params = CFGS["qwen_k2_tied_bias"], models["qwen_k2_tied_bias"]
    mesh = sh.make_mesh(2, 4)
    # a stack of A=2 adapters of rank R=3 on every projection (layout of lora.stack_adapters)
    rng = np.random.default_rng(4)
    stack = {"layers": {}}
    for proj in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        _, din, dout = params["layers"][proj].shape
        stack["layers"][proj] = {"a": jnp.asarray(rng.standard_normal((2, 2, din, 3)), jnp.float32),
                                 "b": jnp.asarray(0.3 * rng.standard_normal((2, 2, 3, dout)), jnp.float32),
                                 "scale": jnp.asarray([[0.5, 1.0], [1.0, 0.0]], jnp.float32)}
    ss = sh.shard_adapters(stack, cfg, mesh)
    for proj, leaf in ss["layers"].items():
        w = np.asarray(params["layers"][proj])
        w_spec = expected_spec(proj, 3, cfg, 4)
        assert_laid_out(leaf["a"], stack["layers"][proj]["a"], (None, None, w_spec[1], None), mesh)
        assert_laid_out(leaf["b"], stack["layers"][proj]["b"], (None, None, None, w_spec[2]), mesh)
        assert_laid_out(leaf["scale"], stack["layers"][proj]["scale"], (None, None), mesh)
        assert w.shape[1:] == (leaf["a"].shape[2], leaf["b"].shape[3])

    # int8 weight + per-column scale (the form layers.linear takes): q as W, scale as W's columns
    qparams = jax.tree_util.tree_map(lambda x: x, params)
    w = np.asarray(params["layers"]["w_up"])
    scale = np.abs(w).max(axis=1) / 127.0  # [L, F]
    qparams["layers"]["w_up"] = {"q": jnp.asarray(np.round(w / scale[:, None, :]).astype(np.int8)),
                                 "scale": jnp.asarray(scale.astype(np.float32))}
    sq = sh.shard_params(qparams, cfg, mesh)
    assert_laid_out(sq["layers"]["w_up"]["q"], qparams["layers"]["w_up"]["q"], (None, None, "model"), mesh)
    assert_laid_out(sq["layers"]["w_up"]["scale"], qparams["layers"]["w_up"]["scale"], (None, "model"), mesh)

    rng = np.random.default_rng(6)
    tokens, lengths = random_batch(rng, cfg.vocab_size, [5, 2, 4, 5])
    ids = np.array([0, -1, 1, 0], np.int32)
    ref = np.asarray(forward_jit(qparams, cfg, tokens, lengths, adapters=stack, adapter_ids=ids))
    got = forward_jit(sq, cfg, *sh.shard_batch((tokens, lengths), mesh), adapters=ss,
                      adapter_ids=sh.shard_batch(ids, mesh))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(got)[b, :n], ref[b, :n], atol=1e-5, rtol=0)


def test_load_with_mesh_places_each_tensor_sharded(tmp_path):
    from hf_reference import make_hf_model

    directory, _ = make_hf_model("llama_gqa_llama3_untied", tmp_path / "m")  # N=6 K=2 F=56 V=97
    plain = realm_jax.load(directory, dtype="float32")
    mesh = sh.make_mesh(4, 2)
    placed = []
    real_put = sh._put
    sh_put = lambda x, s: placed.append(s) or real_put(x, s)  # noqa: E731
    try:
        sh._put = sh_put
        model = realm_jax.load(directory, dtype="float32", mesh=mesh)
    finally:
        sh._put = real_put
    cfg = model.config
    n_leaves = len(jax.tree_util.tree_leaves(model.params))
    assert len(placed) == n_leaves  # each leaf placed once, as it was read
    for k, arr in {**model.params["layers"], **{k: v for k, v in model.params.items() if k != "layers"}}.items():
        full = plain.params["layers"][k] if k in plain.params["layers"] else plain.params[k]
        assert_laid_out(arr, full, expected_spec(k, arr.ndim, cfg, 2), mesh)
    rng = np.random.default_rng(1)
    tokens, lengths = random_batch(rng, cfg.vocab_size, [7, 4, 2, 7])
    ref = np.asarray(forward_jit(plain.params, cfg, tokens, lengths))
    got = np.asarray(forward_jit(model.params, cfg, *sh.shard_batch((tokens, lengths), mesh)))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], ref[b, :n], atol=1e-5, rtol=0)
    # a mesh that cannot hold the model is refused before any tensor is read
    sh._put = lambda x, s: pytest.fail("a tensor was placed")
    try:
        with pytest.raises(sh.ShardingError, match=r"num_heads=6 is not divisible by the mesh 'model' axis \(4\)"):
            realm_jax.load(directory, dtype="float32", mesh=sh.make_mesh(2, 4))
    finally:
        sh._put = real_put


def test_real_model_gguf_loaded_onto_a_mesh(smollm2, smollm2_gguf):
    """SmolLM2-135M (N=9, K=3, F=1536, V=49152) from its GGUF onto a 2 x 3 mesh: every leaf as
    its rule says (the GGUF reader places leaves before the config is known to the placer; KV
    projections are then moved into place), logits equal the single-device model's."""
    mesh = sh.make_mesh(2, 3)
    model = realm_jax.load(smollm2_gguf, dtype="float32", mesh=mesh)
    cfg = model.config
    for k, arr in {**model.params["layers"], **{k: v for k, v in model.params.items() if k != "layers"}}.items():
        full = smollm2.params["layers"][k] if k in smollm2.params["layers"] else smollm2.params[k]
        assert_laid_out(arr, full, expected_spec(k, arr.ndim, cfg, 3), mesh)
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    tokens = np.array([ids, ids[::-1]], np.int32)
    lengths = np.array([len(ids), len(ids) - 3], np.int32)
    ref = np.asarray(forward_jit(smollm2.params, cfg, tokens, lengths))
    got = np.asarray(forward_jit(model.params, cfg, *sh.shard_batch((tokens, lengths), mesh)))
    scale = np.abs(ref).max()
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], ref[b, :n], atol=1e-5 * scale, rtol=0)
    print(f"SmolLM2 2x3 mesh: max |dlogit| = {max(np.abs(got[b, :n] - ref[b, :n]).max() for b, n in enumerate(lengths)):.1e}"
          f" (logits up to {scale:.0f})")


def test_bad_meshes_are_refused_naming_the_dimension():
    cfg = CFGS["llama_k8"]
    with pytest.raises(sh.ShardingError, match=r"num_heads=6 is not divisible by the mesh 'model' axis \(4\)"):
        sh.param_specs(cfg.replace(num_heads=6, num_kv_heads=2), sh.make_mesh(2, 4))
    with pytest.raises(sh.ShardingError, match=r"intermediate_size=50 is not divisible by the mesh 'model' axis \(4\)"):
        sh.param_placer(sh.make_mesh(2, 4), cfg.replace(intermediate_size=50))
    # K and V that do not divide are replicated, not refused
    specs = sh.param_specs(cfg.replace(num_kv_heads=2, vocab_size=97), sh.make_mesh(1, 8))
    assert norm_spec(specs["layers"]["wk"], 3) == (None, None, None)
    assert norm_spec(specs["embed"], 2) == (None, None)
    mesh = sh.make_mesh(2, 4)
    with pytest.raises(sh.ShardingError, match=r"batch size 3 is not divisible by the mesh 'data' axis \(2\)"):
        sh.shard_batch(np.zeros((3, 5), np.int32), mesh)
    with pytest.raises(sh.ShardingError, match=r"batch size 3 is not divisible by the mesh 'data' axis \(2\)"):
        sh.shard_cache(init_cache(cfg, 3, 8, jnp.float32), mesh)
    with pytest.raises(sh.ShardingError, match=r"data=3 x model=3 needs 9 devices, available: 8"):
        sh.make_mesh(3, 3)
    with pytest.raises(sh.ShardingError, match=r"model=3 does not divide the number of devices \(8\)"):
        sh.make_mesh(model=3)
    with pytest.raises(sh.ShardingError, match=r"data=2 x model=1 needs 2 devices, given: 4"):
        sh.make_mesh(2, 1, devices=jax.devices()[:4])
    with pytest.raises(sh.ShardingError, match=r"model: expected a positive integer, got 0"):
        sh.make_mesh(1, 0)
    m = sh.make_mesh(1, 3)  # a subset of the devices is fine in one process
    assert m.shape == {"data": 1, "model": 3} and m.axis_names == ("data", "model")


def test_initialize_distributed_checks_its_arguments():
    assert sh.initialize_distributed() is False  # single process: nothing to do
    with pytest.raises(sh.ShardingError, match="together"):
        sh.initialize_distributed("localhost:1234", None, 0)
    with pytest.raises(sh.ShardingError, match=r"coordinator_address: expected 'host:port', got 'localhost'"):
        sh.initialize_distributed("localhost", 2, 0)
    with pytest.raises(sh.ShardingError, match=r"process_id: expected an integer in \[0, 2\), got 2"):
        sh.initialize_distributed("localhost:1234", 2, 2)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8])
def test_process_shares_cover_items_once_in_order(n, count):
    items = [f"item{i}" for i in range(n)]
    shares = [sh.process_shard(items, p, count) for p in range(count)]
    assert len({len(s) for s in shares}) == 1  # every process runs the same number of steps
    assert [x for s in shares for x in s][:n] == items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_share_evaluation_and_gather_in_order(models, tmp_path):
    """Two real processes (jax.distributed on CPU, 4 devices each): per-process meshes score
    their shares, gather_in_order returns every score in input order; a mesh spanning both
    processes runs forward on the global batch. Both equal the single-process results."""
    cfg, params = CFGS["llama_k8"], models["llama_k8"]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(i), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    requests, tokens, lengths = _worker_inputs(cfg)
    ref = np.array([s.logprob for s in score(Model(cfg, params), requests, batch_size=2)])
    ref_logits = np.asarray(forward_jit(params, cfg, tokens, lengths))
    for i in range(2):
        got = np.load(tmp_path / f"result{i}.npz")
        np.testing.assert_allclose(got["scores"], ref, atol=1e-5, rtol=0)
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(got["logits"][b, :n], ref_logits[b, :n], atol=1e-5, rtol=0)


def _worker_inputs(cfg):
    rng = np.random.default_rng(11)
    requests = [(rng.integers(3, cfg.vocab_size, 2 + i % 3).tolist(), rng.integers(3, cfg.vocab_size, 1 + i % 2).tolist())
                for i in range(7)]
    tokens, lengths = random_batch(rng, cfg.vocab_size, [5, 2, 4, 5])
    return requests, tokens, lengths


def _worker(pid: int, port: int, out_dir: str) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    sh.initialize_distributed(f"localhost:{port}", 2, pid)
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    cfg = CFGS["llama_k8"]
    params = random_params(cfg, 0)  # as the `models` fixture
    requests, tokens, lengths = _worker_inputs(cfg)
    # evaluation: each process scores its share on a mesh of its own devices
    local = sh.make_mesh(2, 2, devices=jax.local_devices())
    mine = sh.process_shard(requests)
    scores = score(Model(cfg, sh.shard_params(params, cfg, local)), mine, batch_size=2)
    gathered = sh.gather_in_order(np.array([s.logprob for s in scores]), len(requests))  # arrays
    objects = sh.gather_in_order(scores, len(requests))  # any picklable results
    assert [s.token_ids for s in objects] == [tuple(c) for _, c in requests]
    np.testing.assert_array_equal([s.logprob for s in objects], gathered)
    # one program over all 8 devices: each process feeds its half of the batch
    glob = sh.make_mesh(2, 4)
    half = slice(2 * pid, 2 * pid + 2)
    out = forward_jit(sh.shard_params(params, cfg, glob), cfg, sh.shard_batch(tokens[half], glob),
                      sh.shard_batch(lengths[half], glob))
    from jax.experimental import multihost_utils

    logits = multihost_utils.process_allgather(out, tiled=True)
    np.savez(Path(out_dir) / f"result{pid}.npz", scores=gathered, logits=np.asarray(logits))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
