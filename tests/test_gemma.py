"""Gemma 1, 2 and 3 text against HF transformers (torch CPU, float32) on tiny random models
(``hf_reference.GEMMA_CASES``): logits of every form, each prompt alone and in a padded batch;
cached decode against the full forward (local layers over a window smaller than the prompt,
the reference and the fused attention paths); greedy tokens against HF ``generate``; int8
against its reference twin; a checkpoint written back and read by transformers; and each
feature shown to matter: switched off, in our config or in HF's, the logits move clearly."""

from functools import partial

import jax
import numpy as np
import pytest
import torch

import realm_jax
from realm_jax import runtime
from realm_jax.checkpoint import write_hf_checkpoint
from realm_jax.generation import generate, new_cache
from realm_jax.model import forward_cached_hidden, forward_jit, lm_head
from realm_jax.reference import forward_reference_jit

from hf_reference import GEMMA_CASES, dequantized, hf_logits, make_hf_model, random_batch, realm_logits

LENGTHS = [11, 4, 9]  # the Gemma 2 / 3 windows are 5 and 4: longer and shorter prompts
TOL = 1e-4  # float32 rounding at these logit sizes (|logit| up to ~10)
CLEAR = 1e-2  # a feature matters: switched off, the logits move 100x the tolerance at least


@pytest.fixture(scope="module", params=GEMMA_CASES)
def gemma(request, tmp_path_factory):
    """(case, checkpoint dir, HF model, our Model loaded from the dir, float32)."""
    directory, hf = make_hf_model(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, directory, hf, realm_jax.load(directory, dtype="float32")


def batch(cfg, seed=1, lengths=LENGTHS):
    return random_batch(np.random.default_rng(seed), cfg.vocab_size, lengths)


def rows_max_diff(a, b, lengths) -> float:
    return max(float(np.abs(a[i, :n] - b[i, :n]).max()) for i, n in enumerate(lengths))


def test_logits_match_hf_alone_and_in_a_padded_batch(gemma):
    case, _, hf, model = gemma
    cfg = model.config
    tokens, lengths = batch(cfg)
    ref = hf_logits(hf, tokens, lengths)
    for form, got in realm_logits(model.params, cfg, tokens, lengths).items():
        worst = rows_max_diff(got, ref, lengths)
        print(f"{case} {form}: max |dlogit| {worst:.1e}, max |logit| {np.abs(ref).max():.1f}")
        assert worst <= TOL, form
    for b, n in enumerate(lengths):
        alone_ref = hf_logits(hf, tokens[b:b + 1, :n], lengths[b:b + 1])
        alone = realm_logits(model.params, cfg, tokens[b:b + 1, :n], lengths[b:b + 1], forms=("stacked",))
        np.testing.assert_allclose(alone["stacked"][0], alone_ref[0], atol=TOL, rtol=0)
        np.testing.assert_allclose(alone_ref[0], ref[b, :n], atol=TOL, rtol=0)  # HF's own padding is clean


@partial(jax.jit, static_argnums=1)
def _prefill(rt, cfg, tokens, lengths, cache):
    hidden, cache = forward_cached_hidden(rt, cfg, tokens, lengths, cache, empty_cache=True)
    return lm_head(rt, cfg, hidden), cache


@partial(jax.jit, static_argnums=1)
def _append(rt, cfg, tokens, lengths, cache):
    hidden, cache = forward_cached_hidden(rt, cfg, tokens, lengths, cache)
    return lm_head(rt, cfg, hidden), cache


@pytest.mark.parametrize("layout,attention", [("per_layer", "reference"), ("stacked", "xla"), ("per_layer", "xla")])
def test_cached_decode_equals_the_full_forward(gemma, layout, attention):
    """Prompts of 6, 2 and 4 tokens, then 9 tokens one at a time (rows reach 15 > the window):
    every position's logits equal the uncached forward's over the whole sequence. ``xla``: the
    fused kernel where it applies (Gemma 3's global layers; Gemma 2's soft-cap keeps the reference)."""
    case, _, _, model = gemma
    cfg = model.config
    rt = runtime.prepare(model.params, cfg, layout=layout, attention=attention)
    prompt, steps = np.array([6, 2, 4], np.int32), 9
    seq, _ = batch(cfg, seed=3, lengths=[15, 15, 15])
    full = np.asarray(forward_jit(rt, cfg, seq, prompt + steps))
    tokens = np.where(np.arange(6)[None] < prompt[:, None], seq[:, :6], 0).astype(np.int32)
    logits, cache = _prefill(rt, cfg, tokens, prompt, new_cache(cfg, rt, 3, 32))
    logits = np.asarray(logits)
    for b, n in enumerate(prompt):
        np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=TOL, rtol=0, err_msg=f"prefill row {b}")
    for j in range(steps):
        pos = prompt + j
        step, cache = _append(rt, cfg, seq[np.arange(3), pos][:, None], np.ones(3, np.int32), cache)
        np.testing.assert_allclose(np.asarray(step)[:, 0], full[np.arange(3), pos], atol=TOL, rtol=0,
                                   err_msg=f"{case} decode step {j}")


def test_greedy_matches_hf_generate(gemma):
    case, _, hf, model = gemma
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (7, 3, 12)]
    res = generate(model, prompts, 14)  # stops at the config's eos (2)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=14, eos_token_id=2, pad_token_id=0)
        assert res.tokens[i] == out[0, len(p):].tolist(), f"{case} row {i}"


def test_int8_equals_its_reference_twin(gemma):
    _, _, _, model = gemma
    cfg = model.config
    tokens, lengths = batch(cfg)
    got = np.asarray(forward_jit(runtime.prepare(model.params, cfg, quantize="int8"), cfg, tokens, lengths))
    want = np.asarray(forward_reference_jit(dequantized(model.params), cfg, tokens, lengths))
    assert rows_max_diff(got, want, lengths) <= TOL


def test_written_checkpoint_is_read_by_transformers(gemma, tmp_path):
    """config.json (to_hf_dict) and tensor names written back: transformers loads them to the same logits."""
    import transformers

    _, _, hf, model = gemma
    out = write_hf_checkpoint(tmp_path / "out", model.config, model.params)
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again) is type(hf)
    tokens, lengths = batch(model.config)
    assert rows_max_diff(hf_logits(again, tokens, lengths), hf_logits(hf, tokens, lengths), lengths) <= 1e-5


# ------------------------------------------------------------------ each feature matters
def _drop(params, *names):
    return {**params, "layers": {k: v for k, v in params["layers"].items() if k not in names}}


def _switched_off(cfg, params) -> dict:
    """{feature: (config, params) with that feature off} for the features this config has."""
    out = {"embed_scale": (cfg.replace(embed_scale=False), params),
           "norm_plus_one": (cfg.replace(norm_plus_one=False), params),
           "hidden_act gelu_tanh": (cfg.replace(hidden_act="silu"), params)}
    if cfg.post_norms:
        out["post_norms"] = (cfg.replace(post_norms=False), _drop(params, "post_attn_norm", "post_mlp_norm"))
    if cfg.qk_norm:
        out["qk_norm"] = (cfg.replace(qk_norm=False), _drop(params, "q_norm", "k_norm"))
    for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta"):
        if getattr(cfg, name) is not None:
            out[name] = (cfg.replace(**{name: None}), params)
    if cfg.sliding_window is not None:
        out["sliding window"] = (cfg.replace(sliding_window=None), params)
        out["local:global pattern"] = (cfg.replace(sliding_layers=(True,) * cfg.num_layers), params)
    if cfg.rope_type != "default":
        out["global rope scaling"] = (cfg.replace(rope_type="default"), params)
    return out


def test_each_feature_matters_in_our_forward(gemma):
    """The reference forward with one feature off is clearly away from HF's logits (which it
    matches with all on): the parity tests exercise every feature of the family."""
    case, _, hf, model = gemma
    tokens, lengths = batch(model.config)
    ref = hf_logits(hf, tokens, lengths)
    diffs = {}
    for feature, (cfg, params) in _switched_off(model.config, model.params).items():
        diffs[feature] = rows_max_diff(np.asarray(forward_reference_jit(params, cfg, tokens, lengths)), ref, lengths)
    print(case, {k: f"{v:.2f}" for k, v in diffs.items()})
    assert all(v > CLEAR for v in diffs.values()), diffs
    expected = {"gemma_mqa": 3, "gemma2_softcap_window": 9, "gemma3_pattern_rope": 10}[case]
    assert len(diffs) == expected, sorted(diffs)


HF_SWITCHES = {  # case: {feature: the HF config keys that switch it off}
    "gemma2_softcap_window": {"attn_logit_softcapping": dict(attn_logit_softcapping=None),
                              "final_logit_softcapping": dict(final_logit_softcapping=None),
                              "sliding_window": dict(sliding_window=64),
                              "query_pre_attn_scalar": dict(query_pre_attn_scalar=8)},
    "gemma3_pattern_rope": {"sliding_window": dict(sliding_window=64),
                            "local rope base": dict(rope_parameters={
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}),
                            "global rope scaling": dict(rope_parameters={
                                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})},
}


@pytest.mark.parametrize("case", sorted(HF_SWITCHES))
def test_each_feature_matters_in_hf(case, tmp_path):
    """The same HF weights under a config with one feature off give clearly other logits: the
    tiny configs are in the regime where the feature acts (caps bind, windows cut, ropes differ)."""
    _, hf = make_hf_model(case, tmp_path / case)
    tokens, lengths = random_batch(np.random.default_rng(1), hf.config.vocab_size, LENGTHS)
    ref = hf_logits(hf, tokens, lengths)
    diffs = {}
    for feature, change in HF_SWITCHES[case].items():
        d = hf.config.to_dict()
        d.update(change)
        off = type(hf)(type(hf.config).from_dict(d)).float().eval()
        off.load_state_dict(hf.state_dict())
        diffs[feature] = rows_max_diff(hf_logits(off, tokens, lengths), ref, lengths)
    print(case, {k: f"{v:.2f}" for k, v in diffs.items()})
    assert all(v > CLEAR for v in diffs.values()), diffs


def test_layer_kinds_follow_the_config():
    """Gemma 2 alternates local/global from a local first layer; Gemma 3 has 5 local : 1 global
    (``sliding_window_pattern``) unless ``layer_types`` says otherwise; Gemma 1 has no local layers."""
    from realm_jax.config import ModelConfig

    from hf_reference import ARCH_CASES, hf_config

    def cfg(case, **change):
        d = hf_config(ARCH_CASES[case][0], **ARCH_CASES[case][1]).to_dict()
        d.pop("layer_types")
        return ModelConfig.from_hf_dict({**d, **change})

    assert cfg("gemma2_softcap_window").layer_local == (True, False, True, False)
    assert cfg("gemma3_pattern_rope", num_hidden_layers=7, sliding_window_pattern=None).layer_local == \
        (True,) * 5 + (False, True)
    g3 = cfg("gemma3_pattern_rope", layer_types=["full_attention"] * 5)
    assert g3.layer_local == (False,) * 5 and g3.rope_local_theta == 100.0
    d = hf_config("gemma").to_dict()
    assert ModelConfig.from_hf_dict(d).layer_local == (False,) * d["num_hidden_layers"]
    g2 = cfg("gemma2_softcap_window")
    assert (g2.attn_softcap, g2.final_softcap, g2.query_pre_attn_scalar, g2.rope_local_theta) == (3.0, 4.0, 12.0, None)


# ------------------------------------------------------------------ the rest of the package
@pytest.mark.slow  # ~30 s a case on a 2-core CPU (three programs compiled)
def test_mesh_speculative_and_engine_equal_generate(gemma):
    """Greedy tokens of ``generate`` (one device) equal: a (2, 2) mesh (Gemma's single KV head
    and Gemma 2's three are replicated over ``model``), the self-speculative draft (the first
    layers: local and global alike) and the engine."""
    from realm_jax import sharding
    from realm_jax.engine import Engine
    from realm_jax.loading import Model
    from realm_jax.speculative import speculative_generate

    case, _, _, model = gemma
    cfg = model.config
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (9, 2, 6)]
    ref = generate(model, prompts, 10, stop_ids=[]).tokens
    meshed = Model(cfg, model.params)
    meshed.prepare(mesh=sharding.make_mesh(2, 2))
    assert generate(meshed, prompts, 10, stop_ids=[]).tokens == ref, "mesh"
    assert speculative_generate(model, "self:2", prompts, 10, stop_ids=[], k=3).tokens == ref, "self-speculative"
    eng = Engine(model, max_slots=2, max_seq_len=32, prefill_buckets=(16,), prefill_batch=1)
    handles = [eng.submit(p, 10, stop_ids=[]) for p in prompts]
    eng.run_until_idle()
    assert [h.result().tokens for h in handles] == ref, "engine"


@pytest.mark.parametrize("case,change,error,pattern", [
    ("gemma_mqa", dict(use_bidirectional_attention=True), "UnsupportedModelError", r"use_bidirectional_attention"),
    ("gemma_mqa", dict(hidden_act="silu"), "UnsupportedModelError", r"'hidden_act': 'silu' is not supported"),
    ("gemma2_softcap_window", dict(hidden_activation="gelu"), "UnsupportedModelError",
     r"'hidden_activation': 'gelu' is not supported for gemma2"),
    ("gemma2_softcap_window", dict(attn_logit_softcapping=0), "ConfigError", r"'attn_logit_softcapping'.*positive"),
    ("gemma2_softcap_window", dict(query_pre_attn_scalar="x"), "ConfigError", r"'query_pre_attn_scalar'"),
    ("gemma2_softcap_window", dict(layer_types=["sliding_attention"] * 3), "ConfigError",
     r"'layer_types': expected 4 entries"),
    ("gemma3_pattern_rope", dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                                                  "full_attention": {"rope_type": "default"}}),
     "UnsupportedModelError", r"only plain rope is supported on local layers"),
])
def test_bad_gemma_configs_are_refused_by_key(case, change, error, pattern):
    from realm_jax import errors
    from realm_jax.config import ModelConfig

    from hf_reference import ARCH_CASES, hf_config

    d = {**hf_config(ARCH_CASES[case][0], **ARCH_CASES[case][1]).to_dict(), **change}
    with pytest.raises(getattr(errors, error), match=pattern):
        ModelConfig.from_hf_dict(d)
