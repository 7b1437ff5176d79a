"""Mixture-of-experts GGUF files (Mixtral as a ``llama`` file with experts, ``qwen2moe`` with its
gated shared expert, ``qwen3moe``), written the way llama.cpp's converter writes them
(``gguf_reference``: experts stacked per layer, router in float32, the shared-expert gate
squeezed) from tiny random HF models, against HF transformers: the config and the params equal
those of the HF checkpoint directory, logits within float32 tolerance, greedy tokens equal HF's
``generate``; in Q8_0 the reference is HF on the file's dequantized values. Bad files (an expert
tensor of the wrong shape, an expert count the tensors disagree with, a missing expert tensor)
are refused naming the problem."""

import gguf
import jax
import numpy as np
import pytest
import torch

import realm_jax
from realm_jax.errors import CheckpointError, ConfigError

from family_checks import batch, check_greedy_matches_hf, rows_max_diff
from gguf_reference import Q, checkpoint_tensors, write_file_as_checkpoint, write_gguf
from hf_reference import ARCH_CASES, MOE_CASES, hf_load_kwargs, hf_logits, make_hf_model, realm_logits

TOL = 1e-4  # float32 rounding at these logit sizes (as test_moe)
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# a GGUF carries no sliding window: the Mixtral reference has none either
NO_WINDOW = {"mixtral_top2_window": dict(sliding_window=None)}
# sizes whose rows are whole Q8_0 blocks (32): D = 64, expert and shared widths 32
Q8_SIZES = {"mixtral_top2_window": dict(hidden_size=64, intermediate_size=32),
            "qwen2_moe_shared": dict(hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32),
            "qwen3_moe_norm_topk": dict(hidden_size=64, moe_intermediate_size=32)}
SAME = dict(bos_token_id=None, eos_token_ids=(), pad_token_id=None, dtype="float32")  # GGUF without a tokenizer


def _arch(case):
    return GGUF_ARCH[ARCH_CASES[case][0]]


def _max_diff(model, hf, forms=("stacked", "reference")):
    tokens, lengths = batch(model.config)
    ref = hf_logits(hf, tokens, lengths)
    return {form: rows_max_diff(got, ref, lengths)
            for form, got in realm_logits(model.params, model.config, tokens, lengths, forms).items()}


@pytest.mark.parametrize("case", MOE_CASES)
def test_f32_moe_gguf_matches_hf(case, tmp_path):
    """F32 file: the same config and bit-identical params as the HF directory it was written
    from, logits of the fast and reference forms within TOL of HF's, greedy tokens equal."""
    directory, hf = make_hf_model(case, tmp_path / "hf", **NO_WINDOW.get(case, {}))
    write_gguf(tmp_path / "m.gguf", _arch(case), hf.config, checkpoint_tensors(directory))
    m = realm_jax.load(tmp_path / "m.gguf", dtype="float32")
    from_dir = realm_jax.load(directory, dtype="float32")
    assert m.config.moe and m.config.sliding_window is None
    assert m.config.replace(**SAME) == from_dir.config.replace(**SAME)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(m.params), jax.tree_util.tree_leaves(from_dir.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    diffs = _max_diff(m, hf)
    print(f"{case} F32 GGUF vs HF: max |dlogit| {diffs}")
    assert all(v <= TOL for v in diffs.values()), diffs
    check_greedy_matches_hf(case, hf, m)


@pytest.mark.parametrize("case", MOE_CASES)
def test_q8_0_moe_gguf_matches_hf_on_the_dequantized_file(case, tmp_path):
    """Every matmul weight whose rows are whole Q8_0 blocks (experts, shared expert, attention
    but the 48-wide output projections, embedding, head) in Q8_0, the router F32: our params equal the file's dequantized values, and logits match HF
    transformers loading a checkpoint of those values."""
    from transformers import AutoModelForCausalLM

    directory, original = make_hf_model(case, tmp_path / "hf", **Q8_SIZES[case], **NO_WINDOW.get(case, {}))
    path = tmp_path / "q.gguf"
    expect = write_gguf(path, _arch(case), original.config, checkpoint_tensors(directory),
                        qtype_for=lambda name, a: Q.Q8_0 if a.shape[-1] % 32 == 0 else Q.F32)
    types = {t.name: t.qtype for t in realm_jax.gguf.open_gguf(path).tensors.values()}
    assert types["blk.0.ffn_gate_exps.weight"] == Q.Q8_0 and types["blk.0.ffn_gate_inp.weight"] == Q.F32
    m = realm_jax.load(path, dtype="float32")
    layers = m.params["layers"]
    for i in range(m.config.num_layers):
        for leaf, g in (("we_gate", "gate"), ("we_up", "up"), ("we_down", "down")):
            np.testing.assert_array_equal(np.asarray(layers[leaf][i]), expect[f"blk.{i}.ffn_{g}_exps.weight"]
                                          .swapaxes(-1, -2), err_msg=f"{leaf}[{i}]")
        np.testing.assert_array_equal(np.asarray(layers["router"][i]), expect[f"blk.{i}.ffn_gate_inp.weight"].T)
    ref_dir = write_file_as_checkpoint(directory, expect, tmp_path / "dequantized")
    hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32,
                                              **hf_load_kwargs(ARCH_CASES[case][0])).eval()
    diffs = _max_diff(m, hf)
    print(f"{case} Q8_0 GGUF vs HF on the dequantized values: max |dlogit| {diffs}")
    assert all(v <= TOL for v in diffs.values()), diffs


# ------------------------------------------------------------------ bad files
@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(HF config, checkpoint tensors) of the tiny Mixtral without a window."""
    directory, hf = make_hf_model("mixtral_top2_window", tmp_path_factory.mktemp("mixtral"), sliding_window=None)
    return hf.config, checkpoint_tensors(directory)


def _expert(layer, e, w):
    return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"


def _drop_expert(t, e=4):
    for w in ("w1", "w2", "w3"):
        t.pop(_expert(0, e, w))


def _narrow_down_proj(t):
    for e in range(5):
        t[_expert(1, e, "w2")] = t[_expert(1, e, "w2")][:, :-2]


def _drop_layer_gate(t):
    for e in range(5):
        t.pop(_expert(1, e, "w1"))


U32 = gguf.GGUFValueType.UINT32
BAD_FILES = [
    ("expert-count-vs-tensor", _drop_expert, {}, CheckpointError,
     r"tensor 'blk\.0\.ffn_gate_exps\.weight' stacks 4 experts, but key 'llama\.expert_count' says 5"),
    ("expert-count-in-metadata", None, {"llama.expert_count": (6, U32)}, CheckpointError,
     r"tensor 'blk\.0\.ffn_gate_exps\.weight' stacks 5 experts, but key 'llama\.expert_count' says 6"),
    ("expert-tensor-shape", _narrow_down_proj, {}, CheckpointError,
     r"tensor 'blk\.1\.ffn_down_exps\.weight' has shape \(5, 30, 12\) \(numpy order\), expected \(5, 30, 14\)"),
    ("missing-expert-tensor", _drop_layer_gate, {}, CheckpointError, r"missing tensor 'blk\.1\.ffn_gate_exps\.weight'"),
    ("used-more-than-experts", None, {"llama.expert_used_count": (9, U32)}, ConfigError,
     r"key 'llama\.expert_used_count': expected at most the 5 experts of 'llama\.expert_count', got 9"),
    ("no-used-count", None, {"llama.expert_used_count": None}, ConfigError,
     r"missing 'llama\.expert_used_count'"),
    ("experts-without-count", None, {"llama.expert_count": None}, ConfigError,
     r"expert tensors \('blk\.0\.ffn_gate_inp\.weight'|expert tensors \('blk\.0\.ffn_\w+_exps\.weight'\) but no "
     r"'llama\.expert_count'"),
    ("sigmoid-gating", None, {"llama.expert_gating_func": (2, U32)}, realm_jax.errors.UnsupportedModelError,
     r"llama\.expert_gating_func=2 is not supported"),
]


@pytest.mark.parametrize("edit,meta,exc,match", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_moe_gguf_is_refused_naming_the_problem(mixtral, tmp_path, edit, meta, exc, match):
    hf_cfg, tensors = mixtral
    tensors = dict(tensors)
    if edit:
        edit(tensors)
    path = tmp_path / "bad.gguf"
    write_gguf(path, "llama", hf_cfg, tensors, extra_meta=meta)
    with pytest.raises(exc, match=match) as e:
        realm_jax.load(path, dtype="float32")
    assert "bad.gguf" in str(e.value)
