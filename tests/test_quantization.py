"""int8 weight-only quantization: exact against its own dequantized weights, close to float."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax.model import forward_jit
from realm_jax.params import param_bytes
from realm_jax.quantization import dequantize_columns, quantize_columns
from realm_jax.reference import forward_reference_jit
from realm_jax.runtime import Weight, prepare

from hf_reference import dequantized, random_batch


def _cfg(**kw):
    base = dict(arch="llama", vocab_size=89, hidden_size=32, intermediate_size=48, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8)
    base.update(kw)
    return realm_jax.ModelConfig(**base)


def test_weight_roundtrip_error_is_half_a_step():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 40, 24))
    q, scale = quantize_columns(w)
    assert q.dtype == jnp.int8 and q.shape == w.shape and scale.shape == (3, 24) and scale.dtype == jnp.float32
    err = np.abs(np.asarray(dequantize_columns(q, scale)) - np.asarray(w))
    step = np.asarray(scale)[:, None, :]
    assert (err <= step / 2 + 1e-7).all()
    # the column maximum is represented exactly (|q| = 127 there)
    assert (np.abs(np.asarray(q)).max(axis=1) == 127).all()


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
@pytest.mark.parametrize("tied", [True, False])
def test_int8_forward_equals_forward_on_dequantized_weights(tied, layout):
    cfg = _cfg(tie_word_embeddings=tied)
    params = realm_jax.init_params(cfg, jax.random.PRNGKey(1))
    q = prepare(params, cfg, quantize="int8", layout=layout)
    weights = [w for w in jax.tree_util.tree_leaves(q.layers, is_leaf=lambda x: isinstance(x, Weight))
               if isinstance(w, Weight)]
    assert len(weights) == 4 * (1 if layout == "stacked" else cfg.num_layers)  # qkv, o, gate|up, down
    assert all(w.w.dtype == jnp.int8 and w.scale.dtype == jnp.float32 for w in weights)
    if tied:  # the head is the embedding itself, never quantized
        assert q.head.scale is None and q.head.w.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(q.head.w), np.asarray(q.embed))
    else:
        assert q.head.w.dtype == jnp.int8 and q.head.scale.shape == (cfg.vocab_size,)
    full_rt = prepare(params, cfg, layout=layout)
    assert param_bytes(q) < 0.5 * param_bytes(full_rt)
    tokens, lengths = random_batch(np.random.default_rng(0), cfg.vocab_size, [7, 3])
    got = np.asarray(forward_jit(q, cfg, tokens, lengths))
    ref = np.asarray(forward_reference_jit(dequantized(params), cfg, tokens, lengths))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], ref[b, :n], atol=1e-5)
    # and close to the float model: relative logit error of int8 rounding (stated bound 2%)
    full = np.asarray(forward_jit(full_rt, cfg, tokens, lengths))
    rel = max(np.abs(got[b, :n] - full[b, :n]).max() / np.abs(full[b, :n]).max() for b, n in enumerate(lengths))
    assert rel < 0.02, rel


def test_unknown_scheme_is_rejected():
    cfg = _cfg()
    params = realm_jax.init_params(cfg, jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="int4"):
        prepare(params, cfg, quantize="int4")


FIXED_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small tin "
    "of oil and a cloth for the lens. From the gallery he could see the fishing boats returning, "
    "their lamps swaying over the dark water, and beyond them the long line of the reef where the "
    "waves broke white even on calm nights. He wrote the weather in a ledger: wind from the north "
    "west, visibility good, sea moderate. In winter the storms came quickly, and the whole tower "
    "hummed with the wind, but the light never went out. Years later, when the station was "
    "automated, the ledgers were taken to the town museum, where children still read the careful "
    "handwriting and count the ships he saw pass: 1,204 in the first year alone."
)


def test_int8_smollm2_quality(smollm2):
    """Real weights: int8 perplexity within 1% of float32 on a fixed text (measured: +0.1%),
    top-1 next-token agreement >= 90% (measured: ~95%)."""
    from realm_jax.loading import Model

    q = Model(smollm2.config, smollm2.params, smollm2.tokenizer)
    assert q.prepare(quantize="int8").options.quantize == "int8"
    a = realm_jax.perplexity(smollm2, [FIXED_TEXT], max_length=64, stride=32)
    b = realm_jax.perplexity(q, [FIXED_TEXT], max_length=64, stride=32)
    assert a.num_tokens == b.num_tokens > 100
    assert abs(b.ppl - a.ppl) / a.ppl < 0.01, (a.ppl, b.ppl)
    ids = smollm2.tokenizer.encode(FIXED_TEXT)[:96]
    t, n = np.array([ids], np.int32), np.array([len(ids)], np.int32)
    fa = np.asarray(forward_jit(smollm2.runtime, smollm2.config, t, n))
    fb = np.asarray(forward_jit(q.runtime, q.config, t, n))
    assert (fa.argmax(-1) == fb.argmax(-1)).mean() >= 0.9
