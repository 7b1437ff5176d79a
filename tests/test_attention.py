"""The fused attention path (``jax.nn.dot_product_attention``; cuDNN on GPU) against the einsum
reference: the kernel-level mask mapping, then whole models (prompt pass, decode, generate,
scoring) with the fused path switched on through its XLA implementation, which runs on CPU.
The mapping is the part we own; cuDNN computing the same function is measured on the GPU
(benchmarks/decode.py records the max logit difference between the two paths)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import runtime
from realm_jax.attention import attention_mask, fused_attention, gqa_attention
from realm_jax.generation import generate, new_cache
from realm_jax.loading import Model
from realm_jax.model import forward, forward_cached, forward_cached_hidden, lm_head
from realm_jax.runtime import prepare, resolve_attention

from compile_counter import CompileCounter


def _qkv(seed, b, t, s, n, k, h):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32),
            jnp.asarray(r.normal(size=(b, s, k, h)), jnp.float32),
            jnp.asarray(r.normal(size=(b, s, k, h)), jnp.float32))


@pytest.mark.parametrize("window", [None, 3])
def test_prompt_pass_mask_matches_reference(window):
    b, t, n, k, h = 3, 9, 6, 2, 8
    q, kk, v = _qkv(0, b, t, t, n, k, h)
    lengths = jnp.array([9, 4, 1], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ref = gqa_attention(q, kk, v, attention_mask(pos, lengths, t, window))
    got = fused_attention(q, kk, v, lengths, causal=True, window=window, implementation="xla")
    for row, n_real in enumerate(np.asarray(lengths)):  # padding queries are never read
        np.testing.assert_allclose(got[row, :n_real], ref[row, :n_real], atol=2e-6, rtol=1e-5)


def test_decode_mask_matches_reference():
    b, s, n, k, h = 4, 11, 6, 3, 8
    q, kk, v = _qkv(1, b, 1, s, n, k, h)
    kv_len = jnp.array([11, 1, 6, 3], jnp.int32)  # the query sits at position kv_len - 1
    ref = gqa_attention(q, kk, v, attention_mask((kv_len - 1)[:, None], kv_len, s, None))
    got = fused_attention(q, kk, v, kv_len, causal=False, window=None, implementation="xla")
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)


def test_non_causal_refuses_what_it_cannot_express():
    q, kk, v = _qkv(2, 1, 2, 4, 2, 1, 8)
    with pytest.raises(ValueError, match="single-token decode"):
        fused_attention(q, kk, v, jnp.array([4]), causal=False, window=None, implementation="xla")


def test_impl_choice(monkeypatch):
    monkeypatch.delenv(runtime.ATTENTION_ENV, raising=False)
    expect = "cudnn" if jax.default_backend() == "gpu" else "reference"
    assert resolve_attention("auto", jnp.bfloat16, 64) == expect
    assert resolve_attention("auto", jnp.float32, 64) == "reference"  # cuDNN flash attention: f16/bf16 only
    assert resolve_attention("auto", jnp.bfloat16, 12) == "reference"
    for choice in ("reference", "xla", "cudnn"):  # an explicit choice is taken as is
        assert resolve_attention(choice, jnp.float32, 12) == choice
    monkeypatch.setenv(runtime.ATTENTION_ENV, "reference")
    assert resolve_attention("auto", jnp.bfloat16, 64) == "reference"
    monkeypatch.setenv(runtime.ATTENTION_ENV, "XLA")
    assert resolve_attention("auto", jnp.float32, 12) == "xla"
    assert resolve_attention("reference", jnp.float32, 12) == "reference"  # the variable only fills in "auto"
    monkeypatch.setenv(runtime.ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match="REALM_JAX_ATTENTION"):
        resolve_attention("auto", jnp.bfloat16, 64)
    monkeypatch.delenv(runtime.ATTENTION_ENV)
    with pytest.raises(ValueError, match="attention"):
        resolve_attention("fast", jnp.bfloat16, 64)


def test_attention_is_a_static_choice_of_the_runtime(monkeypatch):
    """prepare reads the variable once: the choice lives in the runtime's static options, so two
    runtimes of different choices trace separately, and changing the variable afterwards changes
    neither an existing runtime nor its compiled program."""
    model = _model("llama")
    cfg, params = model.config, model.params
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 5)), jnp.int32)
    lengths = jnp.array([5, 3], jnp.int32)
    monkeypatch.setenv(runtime.ATTENTION_ENV, "xla")
    fused = prepare(params, cfg, layout="stacked")
    assert fused.attention == "xla"
    ref = prepare(params, cfg, layout="stacked", attention="reference")
    assert ref.attention == "reference"
    assert jax.tree_util.tree_structure(fused) != jax.tree_util.tree_structure(ref)
    fn = jax.jit(lambda *a: forward(*a), static_argnums=1)  # its own cache (jit caches are shared per function)
    with CompileCounter() as cc:
        a = fn(fused, cfg, tokens, lengths)
        b = fn(ref, cfg, tokens, lengths)
    assert fn._cache_size() == 2 and cc.count >= 2  # one trace and program per choice
    for row, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(a[row, :n], b[row, :n], atol=1e-5, rtol=1e-5)
    monkeypatch.setenv(runtime.ATTENTION_ENV, "reference")
    assert fused.attention == "xla"  # read once, by prepare
    assert prepare(params, cfg, layout="stacked").attention == "reference"
    with CompileCounter() as cc:
        np.testing.assert_array_equal(fn(fused, cfg, tokens, lengths), a)
    assert cc.count == 0 and fn._cache_size() == 2
    # the fused program really differs from the reference one
    assert fn.lower(fused, cfg, tokens, lengths).as_text() != fn.lower(ref, cfg, tokens, lengths).as_text()
    # a loaded model's runtime takes the choice the same way (load(..., attention=) / Model.prepare)
    monkeypatch.setenv(runtime.ATTENTION_ENV, "xla")
    assert model.prepare(layout="stacked").attention == "xla"
    assert model.runtime.attention == "xla"
    assert model.prepare(attention="reference").attention == "reference"
    monkeypatch.delenv(runtime.ATTENTION_ENV)


# ---------------------------------------------------------------- whole models, fused vs reference


def _model(arch, window=None, seed=0):
    cfg = realm_jax.ModelConfig(arch=arch, vocab_size=53, hidden_size=24, intermediate_size=40, num_layers=2,
                                num_heads=6, num_kv_heads=2, head_dim=8, eos_token_ids=(2,),
                                max_position_embeddings=256, sliding_window=window,
                                qk_norm=arch == "qwen3", qkv_bias=arch == "qwen2")
    return Model(cfg, realm_jax.init_params(cfg, jax.random.PRNGKey(seed)), None)


@pytest.mark.parametrize("arch,window,layout", [("llama", None, "per_layer"), ("mistral", 4, "stacked"),
                                               ("mistral", 4, "per_layer"), ("qwen3", None, "stacked")])
def test_cached_prompt_pass_and_decode(arch, window, layout):
    model = _model(arch, window)
    cfg, params = model.config, model.params
    r = np.random.default_rng(3)
    tokens = jnp.asarray(r.integers(3, cfg.vocab_size, (3, 7)), jnp.int32)
    lengths = jnp.array([7, 2, 5], jnp.int32)
    step = jnp.asarray(r.integers(3, cfg.vocab_size, (3, 1)), jnp.int32)
    advance = jnp.array([1, 1, 0], jnp.int32)  # the last row is done: it does not advance

    @partial(jax.jit, static_argnums=1)  # one program per runtime: the attention choice is static in it
    def go(rt, empty_cache):
        cache = new_cache(cfg, rt, 3, 16)
        h, cache = forward_cached_hidden(rt, cfg, tokens, lengths, cache, empty_cache=empty_cache)
        l2, cache = forward_cached(rt, cfg, step, advance, cache)
        return lm_head(rt, cfg, h), l2, cache.k, cache.v

    def run(impl, empty_cache):
        rt = prepare(params, cfg, layout=layout, attention=impl)
        assert rt.attention == impl and rt.stacked == (layout == "stacked")
        return jax.tree_util.tree_map(np.asarray, go(rt, empty_cache))

    ref = run("reference", False)
    got = run("xla", True)
    for row, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(got[0][row, :n], ref[0][row, :n], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1][:2], ref[1][:2], atol=1e-5, rtol=1e-5)  # live decode rows
    gk, rk = np.stack(got[2]), np.stack(ref[2])  # [L, B, S, K, H]; slots past a row's length are garbage
    for row, n in enumerate(np.asarray(lengths + advance)):
        np.testing.assert_allclose(gk[:, row, :n], rk[:, row, :n], atol=1e-6)


@pytest.mark.parametrize("arch,window", [("qwen2", None), ("mistral", 4)])
def test_forward_and_generate(arch, window):
    model = _model(arch, window, seed=1)
    cfg = model.config
    r = np.random.default_rng(4)
    tokens = jnp.asarray(r.integers(3, cfg.vocab_size, (2, 9)), jnp.int32)
    lengths = jnp.array([9, 6], jnp.int32)
    prompts = [r.integers(3, cfg.vocab_size, n).tolist() for n in (3, 11, 6)]

    def go(impl):
        rt = model.prepare(attention=impl)  # generate runs model.runtime
        assert model.runtime is rt and rt.attention == impl
        logits = forward(rt, cfg, tokens, lengths)
        out = generate(model, prompts, max_new_tokens=10, stop_ids=[])
        return np.asarray(logits), np.asarray(out.tokens)

    ref = go("reference")
    got = go("xla")
    for row, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(got[0][row, :n], ref[0][row, :n], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[1], ref[1])
