"""Bad checkpoints give a clear error naming the problem (tensor, file, option), before any
device work: HF safetensors directories, config.json, and GGUF files."""

import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import realm_jax
from realm_jax.errors import CheckpointError, UnsupportedModelError

from gguf_reference import Q, hf_state, write_gguf, write_tiny_gguf
from hf_reference import make_hf_model


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A saved tiny llama (GQA: N=6, K=2, H=8, D=30) and its torch model."""
    return make_hf_model("llama_gqa_llama3_untied", tmp_path_factory.mktemp("hf") / "m")


@pytest.fixture
def hf_dir(tiny_hf, tmp_path):
    return shutil.copytree(tiny_hf[0], tmp_path / "m")


def _edit_tensors(directory, fn):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory, fn):
    d = json.loads((directory / "config.json").read_text())
    fn(d)
    (directory / "config.json").write_text(json.dumps(d))


# ------------------------------------------------------------------ HF directories
def test_missing_tensor(hf_dir):
    _edit_tensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        realm_jax.load(hf_dir, dtype="float32")


def test_tensor_of_wrong_shape(hf_dir):
    def grow(t):
        t["model.layers.2.self_attn.k_proj.weight"] = np.zeros((24, 30), np.float32)

    _edit_tensors(hf_dir, grow)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.self_attn\.k_proj\.weight'.*"
                                              r"shape \(24, 30\), expected \(16, 30\)"):
        realm_jax.load(hf_dir, dtype="float32")


def test_unexpected_tensor(hf_dir):
    _edit_tensors(hf_dir, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2,), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        realm_jax.load(hf_dir, dtype="float32")


def test_truncated_safetensors(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        realm_jax.load(hf_dir, dtype="float32")


def test_index_pointing_to_missing_shard(hf_dir):
    names = load_file(hf_dir / "model.safetensors").keys()
    wm = {n: "model.safetensors" for n in names}
    wm["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*missing"):
        realm_jax.load(hf_dir, dtype="float32")


def test_unsupported_architecture(hf_dir):
    _edit_config(hf_dir, lambda d: d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*supported: llama, mistral, qwen2, qwen3"):
        realm_jax.load(hf_dir, dtype="float32")


@pytest.mark.parametrize("dialect", ["classic", "transformers5"])
def test_unknown_rope_scaling_type(hf_dir, dialect):
    def edit(d):
        d.pop("rope_scaling", None)
        d.pop("rope_parameters", None)
        if dialect == "classic":
            d.update(rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0})
        else:
            d.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})

    _edit_config(hf_dir, edit)
    with pytest.raises(UnsupportedModelError, match=r"rope scaling type 'yarn'.*supported: default, linear, llama3"):
        realm_jax.load(hf_dir, dtype="float32")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        realm_jax.load(tmp_path, dtype="float32")
    with pytest.raises(CheckpointError, match=r"'nope-model'.*built-in: smollm2-135m-instruct"):
        realm_jax.load("nope-model", dtype="float32")


# ------------------------------------------------------------------ GGUF files
def test_gguf_unsupported_quant_type(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, qtype_for=lambda name, a: Q.TQ2_0 if name == "blk.1.ffn_up.weight" else Q.F32,
                    hidden_size=256, head_dim=64)
    with pytest.raises(UnsupportedModelError, match=r"'blk\.1\.ffn_up\.weight'.*TQ2_0.*supported: .*Q4_K.*Q6_K"):
        realm_jax.load(path, dtype="float32")


def _write_from(tiny_hf, path, edit):
    _, model = tiny_hf
    tensors = hf_state(model)
    edit(tensors)
    write_gguf(path, "llama", model.config, tensors)


def test_gguf_missing_tensor(tiny_hf, tmp_path):
    _write_from(tiny_hf, tmp_path / "m.gguf", lambda t: t.pop("model.layers.0.mlp.gate_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'blk\.0\.ffn_gate\.weight'"):
        realm_jax.load(tmp_path / "m.gguf", dtype="float32")


def test_gguf_tensor_of_wrong_shape(tiny_hf, tmp_path):
    def edit(t):
        t["model.layers.1.self_attn.v_proj.weight"] = np.zeros((24, 30), np.float32)

    _write_from(tiny_hf, tmp_path / "m.gguf", edit)
    with pytest.raises(CheckpointError, match=r"'blk\.1\.attn_v\.weight' has shape \(24, 30\).*expected \(16, 30\)"):
        realm_jax.load(tmp_path / "m.gguf", dtype="float32")


def test_gguf_truncated(tiny_hf, tmp_path):
    path = tmp_path / "m.gguf"
    _write_from(tiny_hf, path, lambda t: None)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(CheckpointError, match=r"tensor '.*' runs past the end of the file"):
        realm_jax.load(path, dtype="float32")
    path.write_bytes(data[:200])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt GGUF header"):
        realm_jax.load(path, dtype="float32")
    path.write_bytes(b"not a gguf file at all, just text" * 4)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        realm_jax.load(path, dtype="float32")


def _metadata_only(path, arch, **kv):
    w = gguf.GGUFWriter(str(path), arch)
    for k, (v, vtype) in kv.items():
        w.add_key_value(k.replace("__", "."), v, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_unsupported_architecture(tmp_path):
    _metadata_only(tmp_path / "g.gguf", "gemma3n")
    with pytest.raises(UnsupportedModelError, match=r"'gemma3n' is not supported; supported: llama, qwen2, qwen3.*gemma3"):
        realm_jax.load(tmp_path / "g.gguf", dtype="float32")


def test_gguf_unsupported_options(tmp_path):
    T = gguf.GGUFValueType
    base = dict(llama__block_count=(2, T.UINT32), llama__embedding_length=(64, T.UINT32),
                llama__feed_forward_length=(96, T.UINT32), llama__attention__head_count=(4, T.UINT32),
                llama__vocab_size=(97, T.UINT32))
    _metadata_only(tmp_path / "moe.gguf", "llama", **base, llama__expert_count=(8, T.UINT32),
                   llama__expert_used_count=(2, T.UINT32), llama__expert_gating_func=(2, T.UINT32))
    with pytest.raises(UnsupportedModelError, match=r"llama\.expert_gating_func=2 is not supported; supported: 1"):
        realm_jax.load(tmp_path / "moe.gguf", dtype="float32")
    _metadata_only(tmp_path / "yarn.gguf", "llama", **base, llama__rope__scaling__type=("yarn", T.STRING))
    with pytest.raises(UnsupportedModelError, match=r"rope\.scaling\.type='yarn' is not supported"):
        realm_jax.load(tmp_path / "yarn.gguf", dtype="float32")
    _metadata_only(tmp_path / "tok.gguf", "llama", **base, tokenizer__ggml__model=("bert", T.STRING))
    with pytest.raises(UnsupportedModelError, match=r"tokenizer\.ggml\.model 'bert' is not supported"):
        realm_jax.load(tmp_path / "tok.gguf", dtype="float32")

