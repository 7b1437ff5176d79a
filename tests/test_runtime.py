"""The runtime form: every choice composes with every other, against the plain reference.

{float32, bfloat16} x {float, int8} x {no adapter, one, a stack of 4 folded, a stack of 4
unfolded} x {1 device, a (2, 2) mesh, a (1, 4) mesh}: forward and cached decode must match
``reference.forward_reference`` (canonical params, scan, einsum attention, gather LoRA).

The int8 reference runs on the dequantized weights (``dequantize_columns(quantize_columns(W))``
for every quantizable leaf, and for the A factors when they are folded into int8 weights), so it
is the exact twin of the int8 computation: float32 agrees to rounding.

Tolerances: float32, max |logit - reference| <= 5e-5 (logits are O(1); what we see is ~1e-6:
different summation orders). bfloat16 runs against the float32 reference on the same
(bf16-rounded) params: each layer rounds its activations to bf16 (relative 2^-8), which over 2
layers gives logit errors of a few 1e-2; the bound is 0.15 absolute and the greedy tokens
agree on >= 90% of positions.
"""

from __future__ import annotations

import ast
import itertools
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import lora, reference, runtime
from realm_jax.config import ModelConfig
from realm_jax.generation import new_cache
from realm_jax.model import forward, forward_cached, forward_jit
from realm_jax.params import LEAVES, PROJECTIONS, init_params
from realm_jax.quantization import dequantize_columns, quantize_columns
from realm_jax.sharding import make_mesh

CFG = ModelConfig(arch="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=False, max_position_embeddings=64)
B, T, STEPS = 4, 9, 3
LENGTHS = np.array([9, 6, 3, 1], np.int32)
IDS = np.array([0, 3, -1, 1], np.int32)


def _dq(w):
    return dequantize_columns(*quantize_columns(w))


def _reference_params(params, int8: bool):
    if not int8:
        return params
    layers = {k: _dq(v) if LEAVES[k].quantizable else v for k, v in params["layers"].items()}
    out = {**params, "layers": layers}
    if "lm_head" in out:
        out["lm_head"] = _dq(out["lm_head"])
    return out


def _reference_adapters(ad, int8_folded: bool):
    """Folded into int8 weights, each A column (one output row of the folded weight) is quantized."""
    if ad is None or not int8_folded:
        return ad
    return {"layers": {n: {**leaf, "a": _dq(leaf["a"].astype(jnp.float32)).astype(leaf["a"].dtype)}
                       for n, leaf in ad["layers"].items()}}


@pytest.fixture(scope="module")
def setup():
    params32 = init_params(CFG, 0)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CFG.vocab_size, (B, T + STEPS)).astype(np.int32)
    one = lora.init_adapter(CFG, 7, rank=4, targets=("wq", "wv", "w_down"), b_std=0.3)
    stack = lora.stack_adapters([lora.init_adapter(CFG, i, rank=2 + i, b_std=0.3,
                                                   targets=PROJECTIONS if i % 2 == 0 else ("wk", "wo", "w_up"))
                                 for i in range(4)])
    return params32, tokens, {"none": None, "one": one, "stack": stack}


MESHES = {"1": None, "2x2": (2, 2), "1x4": (1, 4)}
CASES = list(itertools.product(("float32", "bfloat16"), (False, True), ("none", "one", "folded", "unfolded"),
                               tuple(MESHES)))


@pytest.mark.parametrize("dtype,int8,lora_form,mesh_name", CASES,
                         ids=[f"{d}-{'int8' if q else 'float'}-{a}-{m}" for d, q, a, m in CASES])
def test_composition_matches_reference(setup, dtype, int8, lora_form, mesh_name):
    params32, tokens, adapters = setup
    dt = jnp.dtype(dtype)
    params = jax.tree_util.tree_map(lambda a: a.astype(dt), params32)
    ad = {"none": None, "one": adapters["one"]}.get(lora_form, adapters["stack"])
    fold = lora_form == "folded"
    ids = None if lora_form in ("none", "one") else IDS
    mesh = None if MESHES[mesh_name] is None else make_mesh(*MESHES[mesh_name])
    layout = ("per_layer", "stacked")[CASES.index((dtype, int8, lora_form, mesh_name)) % 2]
    rt = runtime.prepare(params, CFG, adapters=ad, fold=fold, quantize="int8" if int8 else None, mesh=mesh,
                         layout=layout)
    assert rt.stacked == (layout == "stacked") and rt.folded == fold and rt.mesh is mesh

    # reference: float32 on the same (dtype-rounded, dequantized) values
    ref_params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), _reference_params(params, int8))
    ref_ad = _reference_adapters(ad, int8 and fold)
    ref_ad = None if ref_ad is None else jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), ref_ad)
    full_len = LENGTHS + STEPS
    ref = np.asarray(reference.forward_reference_jit(ref_params, CFG, jnp.asarray(tokens), jnp.asarray(full_len),
                                                     adapters=ref_ad, adapter_ids=ids))
    f32 = dt == jnp.float32
    atol = 5e-5 if f32 else 0.15

    prompt = np.where(np.arange(T)[None] < LENGTHS[:, None], tokens[:, :T], 0)
    steps = tokens[np.arange(B)[:, None], LENGTHS[:, None] + np.arange(STEPS)[None]]  # [B, STEPS]
    out, got = _forward_and_decode(rt, CFG, jnp.asarray(prompt), jnp.asarray(LENGTHS), jnp.asarray(steps),
                                   None if ids is None else jnp.asarray(ids))
    out, got = np.asarray(out), np.asarray(got)

    # forward, no cache, on the prompt (each row's first LENGTHS tokens)
    valid = np.arange(T)[None] < LENGTHS[:, None]
    err = np.abs(out - ref[:, :T])[valid].max()
    assert err <= atol, f"forward: max |err| {err:.3g} > {atol}"

    # cached: prefill, then STEPS single-token steps; got [B, STEPS + 1, V] predicts after LENGTHS - 1 + s
    want = np.stack([ref[np.arange(B), LENGTHS - 1 + s] for s in range(STEPS + 1)], 1)
    err = np.abs(got - want).max()
    assert err <= atol, f"cached decode: max |err| {err:.3g} > {atol}"
    same = (got.argmax(-1) == want.argmax(-1)).mean()
    if f32:
        assert same == 1.0, "greedy tokens differ in float32"
    else:
        assert same >= 0.9, f"bf16 greedy agreement {same:.2f}"


@partial(jax.jit, static_argnums=1)
def _forward_and_decode(rt, cfg, prompt, lengths, steps, ids):
    """One program per case (compiles dominate on the CPU): the uncached forward of the prompt, and
    the cached prefill + one step per column of ``steps``, each row's last-position logits."""
    out = forward(rt, cfg, prompt, lengths, adapter_ids=ids)
    b = prompt.shape[0]
    logits, cache = forward_cached(rt, cfg, prompt, lengths, new_cache(cfg, rt, b, 16), adapter_ids=ids)
    got = [logits[jnp.arange(b), lengths - 1]]
    for s in range(steps.shape[1]):
        logits, cache = forward_cached(rt, cfg, steps[:, s:s + 1], jnp.ones((b,), jnp.int32), cache, adapter_ids=ids)
        got.append(logits[:, 0])
    return out, jnp.stack(got, 1)


def test_runtime_shares_base_weights_and_refuses_mismatches(setup):
    params, _, adapters = setup
    rt = runtime.prepare(params, CFG, layout="per_layer")
    rt2 = runtime.with_adapters(rt, CFG, adapters["stack"])
    assert rt2.num_adapters == 4 and rt2.layers[0]["wq+wk+wv"].w is rt.layers[0]["wq+wk+wv"].w
    folded = runtime.prepare(params, CFG, adapters=adapters["stack"], fold=True, layout="per_layer")
    with pytest.raises(Exception, match="folded"):
        runtime.with_adapters(folded, CFG, adapters["one"])
    other = ModelConfig(arch="qwen2", vocab_size=96, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, qkv_bias=True)
    with pytest.raises(Exception, match="intermediate|shape|w_gate"):
        runtime.prepare(params, other)
    with pytest.raises(Exception, match="fold"):
        runtime.prepare(params, CFG, fold=True)
    with pytest.raises(Exception, match="quantize"):
        runtime.prepare(params, CFG, quantize="int4")
    with pytest.raises(Exception, match="adapter_ids"):
        forward_jit(rt2, CFG, jnp.zeros((2, 3), jnp.int32), jnp.array([3, 2], jnp.int32))
    with pytest.raises(Exception, match="runtime form"):
        forward_jit(params, CFG, jnp.zeros((2, 3), jnp.int32), jnp.array([3, 2], jnp.int32))


def test_attention_is_a_static_choice_of_the_runtime(setup, monkeypatch):
    params, tokens, _ = setup
    monkeypatch.setenv(runtime.ATTENTION_ENV, "xla")
    rt = runtime.prepare(params, CFG)
    monkeypatch.setenv(runtime.ATTENTION_ENV, "reference")
    assert rt.attention == "xla"  # read once, at prepare
    assert runtime.prepare(params, CFG).attention == "reference"
    assert runtime.prepare(params, CFG, attention="xla").attention == "xla"
    toks, lens = jnp.asarray(tokens[:, :T]), jnp.asarray(LENGTHS)
    a = forward_jit(rt, CFG, toks, lens)
    b = forward_jit(runtime.prepare(params, CFG, attention="reference"), CFG, toks, lens)
    valid = np.arange(T)[None] < LENGTHS[:, None]
    assert np.abs(np.asarray(a) - np.asarray(b))[valid].max() < 5e-5


# ------------------------------------------------------------------------------- structure
PKG = Path(__file__).resolve().parents[1] / "realm_jax"


def _imports(path: Path) -> set[str]:
    """Modules of the package a file imports (relative imports, any depth in the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = path.parent.relative_to(PKG).parts[:len(path.parent.relative_to(PKG).parts) - node.level + 1]
            mod = ".".join(base + tuple((node.module or "").split("."))).strip(".")
            if node.module:  # `from . import x` imports x, not the package's own __init__
                out.add(mod)
            for alias in node.names:
                out.add(f"{mod}.{alias.name}".strip("."))
    return out


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_structure_one_weight_form_module_no_cycles():
    files = sorted(PKG.rglob("*.py"))
    graph = {}
    for f in files:
        mods = {_module_name(g) for g in files}
        graph[_module_name(f)] = {m for m in _imports(f) if m in mods and m != _module_name(f)}
    # model.py knows no LoRA storage format, no sharding, no environment variable
    assert not graph["model"] & {"lora", "lora_peft", "sharding"}, graph["model"]
    assert "os" not in (PKG / "model.py").read_text().split("import ")[1:2] and "environ" not in (PKG / "model.py").read_text()
    # only runtime.py looks inside weight leaves: no other module names their fields
    for f in files:
        if f.name == "runtime.py":
            continue
        text = f.read_text()
        for needle in (".transposed", "isinstance(w, Weight)", ".sizes", "\"t_lora\"", '["qt"]', '["t"]'):
            assert needle not in text, f"{f.relative_to(PKG)} inspects a weight form ({needle})"
    # no import cycle (function-local imports included)
    state = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, n])}")
            if not state.get(n):
                visit(n, stack + [m])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [])
