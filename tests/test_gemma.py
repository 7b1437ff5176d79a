"""Gemma 1, 2 and 3 text against HF transformers (torch CPU, float32) on tiny random models
(``hf_reference.GEMMA_CASES``): logits of every form, each prompt alone and in a padded batch;
cached decode against the full forward (local layers over a window smaller than the prompt,
the reference and the fused attention paths); greedy tokens against HF ``generate``; int8
against its reference twin; a checkpoint written back and read by transformers; and each
feature shown to matter: switched off, in our config or in HF's, the logits move clearly."""

import numpy as np
import pytest

import realm_jax
from realm_jax.reference import forward_reference_jit

from family_checks import (family_case, LENGTHS, batch, check_cached_decode, check_mesh_speculative_and_engine, check_greedy_matches_hf, check_int8_twin,
                           check_logits_alone_and_padded, check_written_checkpoint, rows_max_diff)
from hf_reference import GEMMA_CASES, hf_logits, make_hf_model, random_batch

TOL = 1e-4  # float32 rounding at these logit sizes (|logit| up to ~10)
CLEAR = 1e-2  # a feature matters: switched off, the logits move 100x the tolerance at least


@pytest.fixture(scope="module", params=GEMMA_CASES)
def gemma(request, tmp_path_factory):
    return family_case(request.param, tmp_path_factory)


def test_logits_match_hf_alone_and_in_a_padded_batch(gemma):
    case, _, hf, model = gemma
    check_logits_alone_and_padded(case, hf, model, TOL)


@pytest.mark.parametrize("layout,attention", [("per_layer", "reference"), ("stacked", "xla"), ("per_layer", "xla")])
def test_cached_decode_equals_the_full_forward(gemma, layout, attention):
    """Cached decode past the window (``family_checks.check_cached_decode``). ``xla``: the fused
    kernel where it applies (Gemma 3's global layers; Gemma 2's soft-cap keeps the reference)."""
    case, _, _, model = gemma
    check_cached_decode(case, model, layout, attention, TOL)


def test_greedy_matches_hf_generate(gemma):
    case, _, hf, model = gemma
    check_greedy_matches_hf(case, hf, model)


def test_int8_equals_its_reference_twin(gemma):
    check_int8_twin(gemma[3], TOL)


def test_written_checkpoint_is_read_by_transformers(gemma, tmp_path):
    """config.json (to_hf_dict) and tensor names written back: transformers loads them to the same logits."""
    _, _, hf, model = gemma
    check_written_checkpoint(hf, model, tmp_path / "out")


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
    check_mesh_speculative_and_engine(gemma[3])


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
