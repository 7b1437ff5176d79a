"""``realm-jax convert``: GGUF / built-in name / HF directory -> HF safetensors directory that
both realm_jax.load and HF transformers load, with equal logits and token ids."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import realm_jax
from realm_jax import builtin
from realm_jax.cli import main

from gguf_reference import Q, tiny_byte_level_vocab, write_fake_builtin_wheel, write_tiny_gguf, pin_fake_builtin
from hf_reference import hf_logits, random_batch, realm_logits

TEXTS = ["the cat sat on the mat", "<|im_start|>user\nhello there<|im_end|>\n", "  spaces\tand\nlines 12"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "tiny.gguf"
    write_tiny_gguf(path, "llama", tokenizer=tiny_byte_level_vocab(), num_hidden_layers=2,
                    qtype_for=lambda name, a: Q.Q4_1 if "ffn" in name else Q.Q8_0)
    return path


def _same_params(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_convert_gguf_loads_in_realm_jax_and_transformers(tiny_gguf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert main(["convert", str(tiny_gguf), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    ours = realm_jax.load(out, dtype="float32")
    direct = realm_jax.load(tiny_gguf, dtype="float32")
    _same_params(ours.params, direct.params)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens, lengths = random_batch(np.random.default_rng(0), ours.config.vocab_size, [8, 5, 2])
    ref = hf_logits(hf, tokens, lengths)
    for form, mine in realm_logits(ours.params, ours.config, tokens, lengths).items():
        worst = max(np.abs(mine[b, :n] - ref[b, :n]).max() for b, n in enumerate(lengths))
        print(f"convert: realm_jax ({form}) vs transformers on the converted dir, max |dlogit| = {worst:.2e}")
        assert worst <= 1e-4, form
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == ours.tokenizer.encode(text) == direct.tokenizer.encode(text)
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert conf["bos_token"] == "<|im_start|>" and conf["eos_token"] == "<|im_end|>"
    msgs = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        direct.tokenizer.apply_chat_template(msgs)


def test_convert_bfloat16(tiny_gguf, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    assert main(["convert", str(tiny_gguf), str(out), "--dtype", "bfloat16"]) == 0
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _same_params(realm_jax.load(out, dtype="bfloat16").params, realm_jax.load(tiny_gguf, dtype="bfloat16").params)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    emb = hf.model.embed_tokens.weight.float().detach().numpy()
    np.testing.assert_array_equal(emb, np.asarray(realm_jax.load(tiny_gguf, dtype="bfloat16").params["embed"],
                                                  np.float32))


def test_convert_hf_directory_and_builtin_name(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("REALM_JAX_CACHE", str(tmp_path / "cache"))
    write_fake_builtin_wheel(tmp_path / "cache" / "smollm2-135m-instruct",
                             builtin.BUILTIN_MODELS["smollm2-135m-instruct"], seed=3)
    pin_fake_builtin(monkeypatch, tmp_path / "cache" / "smollm2-135m-instruct")
    assert main(["convert", "smollm2-135m-instruct", str(tmp_path / "a")]) == 0
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--dtype", "float16"]) == 0
    a = realm_jax.load(tmp_path / "a", dtype="float32")
    b = realm_jax.load(tmp_path / "b", dtype="float32")
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float16).astype(jnp.float32)), np.asarray(y))
    assert b.tokenizer.encode(TEXTS[1]) == a.tokenizer.encode(TEXTS[1])
    assert b.tokenizer.chat_template == a.tokenizer.chat_template


def test_convert_errors_leave_nothing_behind(tmp_path, tiny_gguf, capsys):
    bad = tmp_path / "bad.gguf"
    write_tiny_gguf(bad, "llama", qtype_for=lambda name, a: Q.TQ2_0 if name == "blk.0.ffn_up.weight" else Q.F32,
                    hidden_size=256, head_dim=64, num_hidden_layers=1)
    out = tmp_path / "out"
    assert main(["convert", str(bad), str(out)]) == 2
    err = capsys.readouterr().err
    assert "blk.0.ffn_up.weight" in err and "TQ2_0" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
    out.mkdir()
    assert main(["convert", str(tiny_gguf), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o2")]) == 2
    assert "missing.gguf" in capsys.readouterr().err
