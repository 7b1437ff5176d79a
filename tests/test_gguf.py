"""GGUF loading: the real SmolLM2 GGUF vs HF transformers, and tiny GGUFs written the way
llama.cpp's converter writes them (F32/F16/BF16, block and K quants) vs the model they came
from and vs HF transformers reading the same file.

Real-model metric: per row and position, max|ours - ref| / max|ref| over the vocabulary;
the test asserts its maximum is <= 1e-3 and prints it.
"""

import jax
import numpy as np
import pytest
import torch

import realm_jax
from realm_jax.config import ModelConfig

from gguf_reference import Q, hf_state, write_gguf, write_tiny_gguf
from hf_reference import ARCH_CASES, hf_logits, make_hf_model, random_batch, realm_logits

PROMPTS = ["The capital of France is", "def fib(n):\n    return",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Olá, café ☕ 日本"]


def _padded(tokenizer, texts):
    ids = [tokenizer.encode(t) for t in texts]
    lengths = np.array([len(i) for i in ids], np.int32)
    tokens = np.zeros((len(ids), lengths.max()), np.int32)
    for b, i in enumerate(ids):
        tokens[b, :len(i)] = i
    return tokens, lengths


def _rel_err(ours, ref, lengths):
    """max over real positions of max_v|ours - ref| / max_v|ref|."""
    return max(float((np.abs(ours[b, :n] - ref[b, :n]).max(-1) / np.abs(ref[b, :n]).max(-1)).max())
               for b, n in enumerate(lengths))


@pytest.fixture(scope="module")
def smollm2_batch(smollm2, smollm2_hf):
    tokens, lengths = _padded(smollm2.tokenizer, PROMPTS)
    return tokens, lengths, hf_logits(smollm2_hf, tokens, lengths)


def test_smollm2_gguf_matches_hf(smollm2, smollm2_batch):
    tokens, lengths, ref = smollm2_batch
    assert len(set(lengths.tolist())) > 1  # a right-padded batch of unequal rows
    cfg = smollm2.config
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == \
        ("llama", 30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    for form, ours in realm_logits(smollm2.params, cfg, tokens, lengths).items():
        err = _rel_err(ours, ref, lengths)
        worst = max(float(np.abs(ours[b, :n] - ref[b, :n]).max()) for b, n in enumerate(lengths))
        print(f"SmolLM2 GGUF vs HF ({form}): max relative logit error {err:.2e} (max |dlogit| {worst:.2e})")
        assert err <= 1e-3, form
        for b, n in enumerate(lengths):  # and the same next-token choice everywhere
            np.testing.assert_array_equal(ours[b, :n].argmax(-1), ref[b, :n].argmax(-1), err_msg=form)


def test_builtin_name_matches_hf(smollm2, smollm2_batch):
    """The built-in name loads the cached converted HF directory: same weights, same logits."""
    tokens, lengths, ref = smollm2_batch
    model = realm_jax.load("smollm2-135m-instruct", dtype="float32")
    assert model.config.replace(dtype="float32") == smollm2.config.replace(dtype="float32")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(model.params),
                            jax.tree_util.tree_leaves(smollm2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    for text in PROMPTS:
        assert model.tokenizer.encode(text) == smollm2.tokenizer.encode(text)
    assert model.tokenizer.chat_template == smollm2.tokenizer.chat_template
    assert (model.tokenizer.bos_id, model.tokenizer.eos_id) == (smollm2.tokenizer.bos_id, smollm2.tokenizer.eos_id)
    for form, ours in realm_logits(model.params, model.config, tokens, lengths).items():
        err = _rel_err(ours, ref, lengths)
        print(f"built-in (converted dir) vs HF ({form}): max relative logit error {err:.2e}")
        assert err <= 1e-3, form
    # transformers reads the converted directory to the same model it builds from the GGUF
    from realm_jax import builtin
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = builtin.ensure_builtin("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    err_dir = _rel_err(hf_logits(hf, tokens, lengths), ref, lengths)
    del hf
    print(f"HF on the converted dir vs HF on the GGUF: max relative logit error {err_dir:.2e}")
    assert err_dir <= 1e-5
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    for text in PROMPTS:
        assert hf_tok(text)["input_ids"] == model.tokenizer.encode(text)


# ------------------------------------------------------------------ tiny models, F32 round trip
GGUF_CASES = ["llama_gqa_llama3_untied", "llama_tied_linear", "qwen2_bias", "qwen3_qknorm"]


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_from_hf_model_round_trips(case, tmp_path):
    """HF model -> GGUF (converter layout: permuted Q/K for llama, rope scaling metadata or
    rope_freqs) -> realm_jax.load: same config, bit-identical params, logits equal to torch."""
    directory, hf = make_hf_model(case, tmp_path / "hf")
    model_type = ARCH_CASES[case][0]
    write_gguf(tmp_path / "m.gguf", model_type, hf.config, hf_state(hf))
    m = realm_jax.load(tmp_path / "m.gguf", dtype="float32")
    from_dir = realm_jax.load(directory, dtype="float32")
    # GGUF has no bos/eos without a tokenizer; everything else must agree
    same = dict(bos_token_id=None, eos_token_ids=(), pad_token_id=None, dtype="float32")
    assert m.config.replace(**same) == from_dir.config.replace(**same)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(m.params), jax.tree_util.tree_leaves(from_dir.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    tokens, lengths = random_batch(np.random.default_rng(3), m.config.vocab_size, [10, 4, 7])
    ref = hf_logits(hf, tokens, lengths)
    for form, ours in realm_logits(m.params, m.config, tokens, lengths).items():
        worst = max(np.abs(ours[b, :n] - ref[b, :n]).max() for b, n in enumerate(lengths))
        print(f"{case} ({form}): GGUF round trip max |dlogit| = {worst:.2e}")
        assert worst <= 1e-4, form


# ------------------------------------------------------------------ quantized types
BLOCK_TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
K_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def _check_against_expected(m, expect):
    """Our params equal the dequantized file contents (the reference un-permutes them itself)."""
    cfg = m.config
    names = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
             "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down", "attn_norm": "attn_norm",
             "mlp_norm": "ffn_norm"}
    for leaf, g in names.items():
        for i in range(cfg.num_layers):
            want = expect[f"blk.{i}.{g}.weight"]
            got = np.asarray(m.params["layers"][leaf][i])
            np.testing.assert_array_equal(got, want.T if want.ndim == 2 else want, err_msg=f"{leaf}[{i}]")
    np.testing.assert_array_equal(np.asarray(m.params["embed"]), expect["token_embd.weight"])


@pytest.mark.parametrize("qtype", BLOCK_TYPES + K_TYPES, ids=lambda q: q.name)
def test_quantized_gguf_matches_hf(qtype, tmp_path):
    """Every projection and the embedding in ``qtype`` (GQA llama, N=4 != K=2): params equal the
    file's dequantized values, logits match HF transformers loading the same file."""
    from transformers import AutoModelForCausalLM

    size = dict(hidden_size=256, intermediate_size=256, head_dim=64) if qtype in K_TYPES else {}
    path = tmp_path / "q.gguf"
    _, expect = write_tiny_gguf(path, "llama", qtype_for=lambda name, a: qtype, num_hidden_layers=2, **size)
    m = realm_jax.load(path, dtype="float32")
    assert m.config.num_heads == 4 and m.config.num_kv_heads == 2
    _check_against_expected(m, expect)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    tokens, lengths = random_batch(np.random.default_rng(4), m.config.vocab_size, [9, 5])
    ref = hf_logits(hf, tokens, lengths)
    for form, ours in realm_logits(m.params, m.config, tokens, lengths).items():
        err = _rel_err(ours, ref, lengths)
        print(f"{qtype.name} ({form}): max relative logit error vs HF {err:.2e}")
        assert err <= 1e-5, form


def test_qwen2_quantized_not_permuted(tmp_path):
    """qwen2 GGUFs keep HF row order (no un-permutation); checked against HF reading the file."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "qwen2.gguf"
    _, expect = write_tiny_gguf(path, "qwen2", qtype_for=lambda name, a: Q.Q8_0, tie_word_embeddings=True)
    m = realm_jax.load(path, dtype="float32")
    assert m.config.qkv_bias and m.config.tie_word_embeddings
    _check_against_expected(m, expect)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    tokens, lengths = random_batch(np.random.default_rng(5), m.config.vocab_size, [6, 8])
    ref = hf_logits(hf, tokens, lengths)
    for form, ours in realm_logits(m.params, m.config, tokens, lengths).items():
        assert _rel_err(ours, ref, lengths) <= 1e-5, form


def test_bfloat16_load(tmp_path):
    """dtype=bfloat16 gives bfloat16 leaves equal to the float32 load rounded."""
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, "llama", qtype_for=lambda name, a: Q.Q8_0)
    f32 = realm_jax.load(path, dtype="float32")
    bf = realm_jax.load(path, dtype="bfloat16")
    for a, b in zip(jax.tree_util.tree_leaves(f32.params), jax.tree_util.tree_leaves(bf.params)):
        assert b.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(a.astype(jax.numpy.bfloat16)), np.asarray(b))


def test_config_from_gguf_metadata(tmp_path):
    """Metadata keys map onto ModelConfig: sizes, eps, theta, context, linear scaling, tying."""
    from realm_jax.gguf import config_from_gguf, open_gguf

    path = tmp_path / "t.gguf"
    model, _ = write_tiny_gguf(path, "llama", tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=5e5,
                               max_position_embeddings=300,
                               rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 5e5})
    gf = open_gguf(path)
    cfg = config_from_gguf(gf.metadata, gf.tensors)
    assert cfg == ModelConfig(arch="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3,
                              num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=5e5,
                              rope_type="linear", rope_factor=3.0, max_position_embeddings=300,
                              tie_word_embeddings=True)
    assert ModelConfig.from_hf_dict(model.config.to_dict()).replace(
        bos_token_id=None, eos_token_ids=(), pad_token_id=None) == cfg


def test_reader_agrees_with_gguf_package(smollm2_gguf):
    """Our GGUF header parser vs the gguf package's GGUFReader on the real file: every
    metadata value, and every tensor's name, type, shape and bytes."""
    import gguf

    from realm_jax.gguf import open_gguf

    ours = open_gguf(smollm2_gguf)
    ref = gguf.GGUFReader(smollm2_gguf)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == want.keys()
    for k, v in want.items():
        assert ours.metadata[k] == v, k
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type and mine.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        np.testing.assert_array_equal(mine.data.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
    from realm_jax.tokenizer import Tokenizer  # from_gguf takes either reader

    for text in PROMPTS:
        assert Tokenizer.from_gguf(ref).encode(text) == Tokenizer.from_gguf(ours).encode(text)
