"""Mixture-of-experts GGUF files (Mixtral as a ``llama`` file with experts, ``qwen2moe`` with its
gated shared expert, ``qwen3moe``), written the way llama.cpp's converter writes them
(``gguf_reference``: experts stacked per layer, router in float32, the shared-expert gate
squeezed) from tiny random HF models, against HF transformers: the config and the params equal
those of the HF checkpoint directory, logits within float32 tolerance, greedy tokens equal HF's
``generate``; in Q8_0 the reference is HF on the file's dequantized values. Bad files (an expert
tensor of the wrong shape, an expert count the tensors disagree with, a missing expert tensor)
are refused naming the problem."""

import gguf
import numpy as np
import pytest
import torch

import realm_jax
from realm_jax.config import ModelConfig
from realm_jax.errors import CheckpointError, ConfigError, UnsupportedModelError
from realm_jax.gguf import open_gguf

from family_checks import bad_gguf_cases, batch, check_bad_gguf_refused, check_greedy_matches_hf, rows_max_diff
from gguf_reference import Q, checkpoint_tensors, expert_slot, gguf_name, write_file_as_checkpoint, write_gguf
from hf_reference import ARCH_CASES, MOE_CASES, hf_load_kwargs, hf_logits, make_hf_model, realm_logits

TOL = 1e-4  # float32 rounding at these logit sizes (as test_moe)
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# The cases of test_moe at sizes whose rows are whole Q8_0 blocks (32): D = 64, expert and shared
# widths 32 (Qwen2-MoE with 4 heads of 16). A GGUF carries no sliding window: Mixtral has none.
SIZES = {"mixtral_top2_window": dict(hidden_size=64, intermediate_size=32, sliding_window=None),
         "qwen2_moe_shared": dict(hidden_size=64, num_attention_heads=4, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=32),
         "qwen3_moe_norm_topk": dict(hidden_size=64, moe_intermediate_size=32)}
SAME = dict(bos_token_id=None, eos_token_ids=(), pad_token_id=None, dtype="float32")  # GGUF without a tokenizer


def _q8_where_whole_blocks(name, a):
    return Q.Q8_0 if a.shape[-1] % 32 == 0 else Q.F32


@pytest.fixture(scope="module", params=MOE_CASES)
def moe(request, tmp_path_factory):
    """(case, HF model, checkpoint dir, {"F32" / "Q8_0": (GGUF path, the file's dequantized tensors)})."""
    case = request.param
    tmp = tmp_path_factory.mktemp(case)
    directory, hf = make_hf_model(case, tmp / "hf", **SIZES[case])
    arch, tensors = GGUF_ARCH[ARCH_CASES[case][0]], checkpoint_tensors(directory)
    files = {}
    for qname, qtype_for in (("F32", None), ("Q8_0", _q8_where_whole_blocks)):
        path = tmp / f"{qname}.gguf"
        files[qname] = path, write_gguf(path, arch, hf.config, tensors, qtype_for=qtype_for)
    return case, hf, directory, files


def _check_params_are_the_file(m, expect):
    """Every expert, router and shared-expert leaf equals the file's dequantized tensor."""
    layers, cfg = m.params["layers"], m.config
    names = {"we_gate": "ffn_gate_exps", "we_up": "ffn_up_exps", "we_down": "ffn_down_exps", "router": "ffn_gate_inp"}
    if cfg.shared_expert:
        names.update(w_gate="ffn_gate_shexp", w_up="ffn_up_shexp", w_down="ffn_down_shexp",
                     shared_gate="ffn_gate_inp_shexp")
    for i in range(cfg.num_layers):
        for leaf, g in names.items():
            want = expect[f"blk.{i}.{g}.weight"]
            want = want[:, None] if want.ndim == 1 else want.swapaxes(-1, -2)
            np.testing.assert_array_equal(np.asarray(layers[leaf][i]), want, err_msg=f"{leaf}[{i}]")


def _max_diff(model, hf):
    tokens, lengths = batch(model.config)
    got = realm_logits(model.params, model.config, tokens, lengths, ("stacked",))["stacked"]
    return rows_max_diff(got, hf_logits(hf, tokens, lengths), lengths)


def test_f32_moe_gguf_matches_hf(moe):
    """F32 file: the config HF's config.json gives, the expert leaves equal to the file's
    tensors, which are the checkpoint's; logits within TOL of HF's."""
    case, hf, directory, files = moe
    path, expect = files["F32"]
    m = realm_jax.load(path, dtype="float32")
    assert m.config.moe and m.config.sliding_window is None and m.config.arch == ARCH_CASES[case][0]
    assert m.config.replace(**SAME) == ModelConfig.from_hf_dict(hf.config.to_dict()).replace(**SAME)
    _check_params_are_the_file(m, expect)
    for name, a in checkpoint_tensors(directory).items():  # F32: the file is the checkpoint, and so are we
        slot = expert_slot(name)
        want = expect[slot[2]][slot[1]] if slot else expect[gguf_name(name)]
        np.testing.assert_array_equal(want.reshape(a.shape), a, err_msg=name)
    diff = _max_diff(m, hf)
    print(f"{case} F32 GGUF vs HF: max |dlogit| {diff:.1e}")
    assert diff <= TOL


def test_q8_0_moe_gguf_matches_hf_on_the_dequantized_file(moe, tmp_path):
    """Every matmul weight whose rows are whole Q8_0 blocks (experts, shared expert, attention
    but Mixtral's 48-wide output projection, embedding, head) in Q8_0, the router F32: our params
    equal the file's dequantized values, and logits match HF transformers loading a checkpoint of
    those values."""
    from transformers import AutoModelForCausalLM

    case, _, directory, files = moe
    path, expect = files["Q8_0"]
    types = {t.name: t.qtype for t in open_gguf(path).tensors.values()}
    assert types["blk.0.ffn_gate_exps.weight"] == Q.Q8_0 and types["blk.0.ffn_down_exps.weight"] == Q.Q8_0
    assert types["blk.0.ffn_gate_inp.weight"] == Q.F32
    m = realm_jax.load(path, dtype="float32")
    _check_params_are_the_file(m, expect)
    ref_dir = write_file_as_checkpoint(directory, expect, tmp_path / "dequantized")
    hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32,
                                              **hf_load_kwargs(ARCH_CASES[case][0])).eval()
    diff = _max_diff(m, hf)
    print(f"{case} Q8_0 GGUF vs HF on the dequantized values: max |dlogit| {diff:.1e}")
    assert diff <= TOL


@pytest.mark.parametrize("moe", [c if c == "qwen2_moe_shared" else pytest.param(c, marks=pytest.mark.slow)
                                 for c in MOE_CASES], indirect=True)
def test_greedy_matches_hf_generate(moe):
    """Greedy tokens from the F32 file equal HF's ``generate`` (Qwen2-MoE in the quick set, the
    other two in the slow one: each compiles its own decode loop, ~9 s on a 2-core CPU)."""
    case, hf, _, files = moe
    check_greedy_matches_hf(case, hf, realm_jax.load(files["F32"][0], dtype="float32"))


@pytest.mark.parametrize("moe", ["qwen2_moe_shared"], indirect=True)
def test_converted_to_hf_is_read_by_transformers(moe, tmp_path):
    """``gguf_to_hf`` of the Q8_0 file (the shared expert and its gate included): transformers
    reads the directory to the logits of HF on the file's dequantized values."""
    from transformers import AutoModelForCausalLM

    from realm_jax.gguf import gguf_to_hf

    case, _, directory, files = moe
    path, expect = files["Q8_0"]
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **hf_load_kwargs(ARCH_CASES[case][0])).eval()
              for d in (gguf_to_hf(path, tmp_path / "converted"),
                        write_file_as_checkpoint(directory, expect, tmp_path / "dequantized"))]
    tokens, lengths = batch(models[0].config)
    assert rows_max_diff(*(hf_logits(m, tokens, lengths) for m in models), lengths) <= 1e-5


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
     r"tensor 'blk\.0\.ffn_gate_exps\.weight' holds 4 experts, but key 'llama\.expert_count' says 5"),
    ("expert-count-in-metadata", None, {"llama.expert_count": (6, U32)}, CheckpointError,
     r"tensor 'blk\.0\.ffn_gate_inp\.weight' holds 5 experts, but key 'llama\.expert_count' says 6"),
    ("expert-tensor-shape", _narrow_down_proj, {}, CheckpointError,
     r"tensor 'blk\.1\.ffn_down_exps\.weight' has shape \(5, 30, 12\) \(numpy order\), expected \(5, 30, 14\) "
     r"\(\[experts, embed, expert_mlp\]\)"),
    ("missing-expert-tensor", _drop_layer_gate, {}, CheckpointError, r"missing tensor 'blk\.1\.ffn_gate_exps\.weight'"),
    ("used-more-than-experts", None, {"llama.expert_used_count": (9, U32)}, ConfigError,
     r"key 'llama\.expert_used_count': expected at most the 5 experts of 'llama\.expert_count', got 9"),
    ("no-used-count", None, {"llama.expert_used_count": None}, ConfigError,
     r"missing 'llama\.expert_used_count'"),
    ("experts-without-count", None, {"llama.expert_count": None}, ConfigError,
     r"expert tensors \('blk\.0\.ffn_gate_inp\.weight'|expert tensors \('blk\.0\.ffn_\w+_exps\.weight'\) but no "
     r"'llama\.expert_count'"),
    ("sigmoid-gating", None, {"llama.expert_gating_func": (2, U32)}, UnsupportedModelError,
     r"llama\.expert_gating_func=2 is not supported"),
]


@bad_gguf_cases(BAD_FILES)
def test_bad_moe_gguf_is_refused_naming_the_problem(mixtral, tmp_path, edit, meta, exc, match):
    hf_cfg, tensors = mixtral
    tensors = dict(tensors)
    if edit:
        edit(tensors)
    check_bad_gguf_refused(tmp_path / "bad.gguf", "llama", hf_cfg, tensors, meta, exc, match)
