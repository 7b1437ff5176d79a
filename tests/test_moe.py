"""Mixture of experts (Mixtral, Qwen2-MoE with its gated shared expert, Qwen3-MoE) against HF
transformers (torch CPU, float32, HF's eager expert loop) on tiny random models
(``hf_reference.MOE_CASES``, top-k < E): logits of every form, each prompt alone and in a padded
batch; the tokens really spread over the experts; the ragged (``jax.lax.ragged_dot``) expert
path against the dense every-expert-on-every-token reference, in float32 and int8; cached decode
against the full forward; greedy tokens against HF ``generate``; a checkpoint written back and
read by transformers; and each feature shown to matter (top-k, renormalisation, the shared
expert and its gate, Mixtral's window): switched off, the logits move clearly."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import realm_jax
from realm_jax import runtime
from realm_jax.moe import dense_experts, ragged_experts, route
from realm_jax.quantization import dequantize_columns, quantize_columns
from realm_jax.reference import forward_reference_jit

from family_checks import (family_case, LENGTHS, batch, check_cached_decode, check_greedy_matches_hf, check_int8_twin,
                           check_logits_alone_and_padded, check_mesh_speculative_and_engine, check_written_checkpoint,
                           rows_max_diff)
from hf_reference import ARCH_CASES, MOE_CASES, hf_config, hf_logits, make_hf_model, random_batch

TOL = 1e-4  # float32 rounding at these logit sizes (|logit| up to ~3)
CLEAR = 1e-2  # a feature matters: switched off, the logits move 100x the tolerance at least


@pytest.fixture(scope="module", params=MOE_CASES)
def moe(request, tmp_path_factory):
    return family_case(request.param, tmp_path_factory)


def test_logits_match_hf_alone_and_in_a_padded_batch(moe):
    case, _, hf, model = moe
    cfg = model.config
    assert cfg.moe and cfg.num_experts_per_tok < cfg.num_experts
    check_logits_alone_and_padded(case, hf, model, TOL, alone_form="per_layer")


def _hf_routers(hf):
    """The router modules of HF's layers (Mixtral's block_sparse_moe.gate or Qwen's mlp.gate)."""
    return [getattr(layer, "block_sparse_moe", None) or layer.mlp for layer in hf.model.layers]


def test_tokens_spread_over_the_experts(moe):
    """In HF's own forward, every layer routes the batch's real tokens to more than k distinct
    experts, and different tokens to different expert sets: routing is exercised, not constant."""
    _, _, hf, model = moe
    cfg = model.config
    tokens, lengths = batch(cfg)
    seen = []
    hooks = [block.gate.register_forward_hook(lambda m, i, out: seen.append(out[2].numpy()))
             for block in _hf_routers(hf)]
    try:
        hf_logits(hf, tokens, lengths)
    finally:
        for h in hooks:
            h.remove()
    real = (np.arange(tokens.shape[1])[None] < lengths[:, None]).reshape(-1)
    assert len(seen) == cfg.num_layers
    for layer, idx in enumerate(seen):
        chosen = idx.reshape(-1, cfg.num_experts_per_tok)[real]
        sets = {tuple(sorted(row)) for row in chosen.tolist()}
        used = np.unique(chosen)
        print(f"layer {layer}: {len(used)} of {cfg.num_experts} experts used, {len(sets)} distinct sets")
        assert len(used) > cfg.num_experts_per_tok and len(sets) > 2, layer


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_ragged_experts_equal_the_dense_reference(moe, quantize):
    """One layer's routed experts on random activations [3, 7, D]: the runtime's sorted /
    grouped ``ragged_dot`` path equals every expert run on every token and weighted densely
    (with int8: the dense reference on the int8 round trip of the same weights)."""
    from realm_jax.layers import gate
    from realm_jax.runtime import expert_projections

    _, _, _, model = moe
    cfg = model.config
    rt = runtime.prepare(model.params, cfg, layout="per_layer", quantize=quantize)
    h = jnp.asarray(np.random.default_rng(7).standard_normal((3, 7, cfg.hidden_size), np.float32))
    for i in range(cfg.num_layers):
        lp = rt.layers[i]
        canon = {n: model.params["layers"][n][i] for n in ("router", "we_gate", "we_up", "we_down")}
        if quantize:
            canon.update({n: dequantize_columns(*quantize_columns(canon[n])) for n in ("we_gate", "we_up", "we_down")})
        weights, experts = route(cfg, h, canon["router"])

        def expert_mlp(rows, sizes, which, lp=lp):
            gu = expert_projections(rows, lp, ("we_gate", "we_up"), sizes, which)
            return expert_projections(gate(cfg, gu["we_gate"]) * gu["we_up"], lp, ("we_down",), sizes, which)["we_down"]

        fast = ragged_experts(h, weights, experts, cfg.num_experts, expert_mlp)
        ref = dense_experts(cfg, h, weights, experts, canon["we_gate"], canon["we_up"], canon["we_down"])
        np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-5, rtol=0, err_msg=f"layer {i}")
        assert float(jnp.abs(ref).max()) > 0.1  # the experts' output is not negligible


@pytest.mark.parametrize("layout,attention", [("per_layer", "reference"), ("stacked", "xla")])
def test_cached_decode_equals_the_full_forward(moe, layout, attention):
    """Cached decode past Mixtral's window (``family_checks.check_cached_decode``): the routed
    experts of each new token equal those of the full forward's."""
    case, _, _, model = moe
    check_cached_decode(case, model, layout, attention, TOL)


def test_greedy_matches_hf_generate(moe):
    case, _, hf, model = moe
    check_greedy_matches_hf(case, hf, model)


def test_int8_equals_its_reference_twin(moe):
    """int8 (attention, shared expert and every expert, per output column) equals the reference
    forward on the int8 round trip of the weights; the router stays in the params dtype."""
    model = moe[3]
    rt = runtime.prepare(model.params, model.config, quantize="int8")
    assert rt.layers["we_gate+we_up"].w.dtype == jnp.int8 and rt.layers["router"].dtype == jnp.float32
    check_int8_twin(model, TOL, rt)


def test_written_checkpoint_is_read_by_transformers(moe, tmp_path):
    """config.json (to_hf_dict) and per-expert tensor names written back: transformers reads them
    (its own per-expert format, stacked by its loader) to the same logits."""
    _, _, hf, model = moe
    check_written_checkpoint(hf, model, tmp_path / "out")


@pytest.mark.slow  # ~30 s a case on a 2-core CPU
def test_mesh_speculative_and_engine_equal_generate(moe):
    """A (2, 2) mesh (attention split, experts replicated), the self-speculative draft and the
    engine give generate's greedy tokens."""
    check_mesh_speculative_and_engine(moe[3])


# ------------------------------------------------------------------ each feature matters
def _switched_off(cfg, params) -> dict:
    """{feature: (config, params) with that feature off} for the features this config has."""
    out = {"top-k (all experts instead)": (cfg.replace(num_experts_per_tok=cfg.num_experts), params),
           "norm_topk_prob": (cfg.replace(norm_topk_prob=not cfg.norm_topk_prob), params)}
    if cfg.shared_expert:
        dense = ("w_gate", "w_up", "w_down", "shared_gate")
        out["shared expert"] = (cfg.replace(shared_expert=False),
                                {**params, "layers": {k: v for k, v in params["layers"].items() if k not in dense}})
        gate_open = {**params["layers"], "shared_gate": jnp.full_like(params["layers"]["shared_gate"], 0.0)}
        out["shared-expert gate (0.5 everywhere)"] = (cfg, {**params, "layers": gate_open})
    if cfg.sliding_window is not None:
        out["sliding window"] = (cfg.replace(sliding_window=None), params)
    return out


def test_each_feature_matters_in_our_forward(moe):
    """The reference forward with one feature off is clearly away from HF's logits (which it
    matches with all on): the parity tests exercise every feature of the family."""
    case, _, hf, model = moe
    tokens, lengths = batch(model.config)
    ref = hf_logits(hf, tokens, lengths)
    diffs = {}
    for feature, (cfg, params) in _switched_off(model.config, model.params).items():
        diffs[feature] = rows_max_diff(np.asarray(forward_reference_jit(params, cfg, tokens, lengths)), ref, lengths)
    print(case, {k: f"{v:.2f}" for k, v in diffs.items()})
    assert all(v > CLEAR for v in diffs.values()), diffs
    assert len(diffs) == {"mixtral_top2_window": 3, "qwen2_moe_shared": 4, "qwen3_moe_norm_topk": 2}[case]


def test_each_feature_matters_in_hf(tmp_path):
    """HF's own Qwen2-MoE with its shared-expert gate zeroed (sigmoid 0.5) or top-k widened to
    every expert gives clearly other logits: the tiny config is in the regime where both act."""
    case = "qwen2_moe_shared"
    _, hf = make_hf_model(case, tmp_path / case)
    tokens, lengths = random_batch(np.random.default_rng(1), hf.config.vocab_size, LENGTHS)
    ref = hf_logits(hf, tokens, lengths)
    diffs = {}
    for feature, change in {"top-k": dict(num_experts_per_tok=hf.config.num_experts), "gate": {}}.items():
        off = type(hf)(type(hf.config).from_dict({**hf.config.to_dict(), **change}),
                       ).float().eval()
        off.config._experts_implementation = hf.config._experts_implementation
        state = hf.state_dict()
        if feature == "gate":
            state = {k: (torch.zeros_like(v) if k.endswith("shared_expert_gate.weight") else v) for k, v in state.items()}
        off.load_state_dict(state)
        diffs[feature] = rows_max_diff(hf_logits(off, tokens, lengths), ref, lengths)
    print(case, {k: f"{v:.2f}" for k, v in diffs.items()})
    assert all(v > CLEAR for v in diffs.values()), diffs


# ------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("case,change,error,pattern", [
    ("qwen2_moe_shared", dict(decoder_sparse_step=2), "UnsupportedModelError", r"'decoder_sparse_step': 2"),
    ("qwen3_moe_norm_topk", dict(mlp_only_layers=[1]), "UnsupportedModelError", r"'mlp_only_layers': \[1\]"),
    ("qwen3_moe_norm_topk", dict(mlp_only_layers=[9]), "ConfigError", r"'mlp_only_layers': expected a list"),
    ("qwen2_moe_shared", dict(num_experts_per_tok=7), "ConfigError", r"'num_experts_per_tok': expected at most the 6"),
    ("qwen2_moe_shared", dict(num_experts=0), "ConfigError", r"'num_experts': expected a positive integer"),
    ("mixtral_top2_window", dict(num_local_experts=None, num_experts=None), "ConfigError",
     r"missing key 'num_local_experts'"),
    ("qwen3_moe_norm_topk", dict(num_experts=7, num_local_experts=8), "ConfigError", r"disagree"),
    ("qwen2_moe_shared", dict(shared_expert_intermediate_size=0), "ConfigError",
     r"'shared_expert_intermediate_size': expected a positive"),
    ("qwen3_moe_norm_topk", dict(moe_intermediate_size="x"), "ConfigError", r"'moe_intermediate_size'"),
    ("qwen3_moe_norm_topk", dict(use_sliding_window=True), "UnsupportedModelError", r"use_sliding_window"),
    ("mixtral_top2_window", dict(hidden_act="gelu"), "UnsupportedModelError", r"hidden_act='gelu'"),
])
def test_bad_moe_configs_are_refused_by_key(case, change, error, pattern):
    from realm_jax import errors
    from realm_jax.config import ModelConfig

    d = {**hf_config(ARCH_CASES[case][0], **ARCH_CASES[case][1]).to_dict(), **change}
    with pytest.raises(getattr(errors, error), match=pattern):
        ModelConfig.from_hf_dict(d)


def test_moe_fields_are_checked_on_the_config():
    from realm_jax.config import ModelConfig
    from realm_jax.errors import ConfigError

    d = hf_config(*ARCH_CASES["qwen3_moe_norm_topk"][:1], **ARCH_CASES["qwen3_moe_norm_topk"][1]).to_dict()
    cfg = ModelConfig.from_hf_dict(d)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob) == (7, 3, 10, True)
    assert not cfg.dense_mlp and not cfg.shared_expert
    with pytest.raises(ConfigError, match=r"num_experts_per_tok: expected an integer in \[1, num_experts=7\]"):
        cfg.replace(num_experts_per_tok=0)
    with pytest.raises(ConfigError, match=r"shared_expert: a gated shared expert is a qwen2_moe feature"):
        cfg.replace(shared_expert=True)
    with pytest.raises(ConfigError, match=r"num_experts: llama is not a mixture-of-experts architecture"):
        cfg.replace(arch="llama", qk_norm=False)
