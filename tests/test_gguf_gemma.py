"""Gemma 1, 2 and 3 text GGUF files (``gemma``, ``gemma2``, ``gemma3``), written the way llama.cpp's
converter writes them (``gguf_reference``: every RMSNorm weight stored as 1 + w, the head tied to
``token_embd``, Gemma 2's soft-caps and window as keys, Gemma 3's global rope base and linear
factor) from tiny random HF models, against HF transformers on the original weights: the config
equals the one HF's config.json gives, the params equal the checkpoint's (the norms back to w),
logits (the fast runtime and the reference forward) within float32 tolerance, greedy tokens equal
HF's ``generate``; the SentencePiece vocabulary tokenizes as llama.cpp does.

The cases are those of test_gemma, changed only where a GGUF cannot say otherwise (llama.cpp reads
no key for them): the query scale is H ** -0.5 (``query_pre_attn_scalar`` = H, as in every Gemma but
the 27B models, whose scale llama.cpp derives from the layer count), Gemma 3 has five local layers to
one global and rope base 10000 on the local ones. Bad files (a missing tensor or key, a key whose
value llama.cpp would ignore) are refused naming the problem."""

import gguf
import numpy as np
import pytest

import realm_jax
from realm_jax.config import ModelConfig
from realm_jax.errors import CheckpointError, ConfigError, UnsupportedModelError
from realm_jax.gguf import config_from_gguf, open_gguf

from family_checks import bad_gguf_cases, batch, check_bad_gguf_refused, check_greedy_matches_hf, rows_max_diff
from gguf_reference import checkpoint_tensors, gguf_name, write_gguf
from hf_reference import hf_logits, make_hf_model, realm_logits

TOL = 1e-4  # float32 rounding at these logit sizes (as test_gemma)
SAME = dict(bos_token_id=None, eos_token_ids=(), pad_token_id=None, dtype="float32")  # a GGUF without a tokenizer
GEMMA3_LAYER_TYPES = ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
CASES = {  # test_gemma's case: (GGUF architecture, config changes)
    "gemma_mqa": ("gemma", {}),
    "gemma2_softcap_window": ("gemma2", dict(query_pre_attn_scalar=8)),
    "gemma3_pattern_rope": ("gemma3", dict(
        num_hidden_layers=7, query_pre_attn_scalar=8, sliding_window_pattern=6, layer_types=GEMMA3_LAYER_TYPES,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}})),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def gemma(request, tmp_path_factory):
    """(case, HF model, the checkpoint's tensors, GGUF path, the file's tensors, our Model)."""
    case = request.param
    arch, change = CASES[case]
    tmp = tmp_path_factory.mktemp(case)
    directory, hf = make_hf_model(case, tmp / "hf", **change)
    tensors = checkpoint_tensors(directory)
    path = tmp / f"{case}.gguf"
    expect = write_gguf(path, arch, hf.config, tensors)
    return case, hf, tensors, path, expect, realm_jax.load(path, dtype="float32")


def test_gemma_gguf_matches_hf(gemma):
    """The config of HF's config.json, the file's norms stored as 1 + w and read back as w, every
    other tensor as the checkpoint has it; logits of every form within TOL of HF's."""
    case, hf, tensors, path, expect, m = gemma
    cfg = m.config
    assert cfg.replace(**SAME) == ModelConfig.from_hf_dict(hf.config.to_dict()).replace(**SAME)
    assert cfg.tie_word_embeddings and "output.weight" not in open_gguf(path).tensors
    if case == "gemma2_softcap_window":
        assert (cfg.attn_softcap, cfg.final_softcap, cfg.sliding_window) == (3.0, 4.0, 5)
        assert cfg.layer_local == (True, False, True, False)
    if case == "gemma3_pattern_rope":
        assert hf.config.layer_types == GEMMA3_LAYER_TYPES
        assert (cfg.qk_norm, cfg.rope_local_theta, cfg.rope_type, cfg.rope_factor) == (True, 10000.0, "linear", 4.0)
    leaves = {**{k: v for k, v in m.params.items() if k != "layers"},
              **{f"{k}.{i}": v[i] for k, v in m.params["layers"].items() for i in range(cfg.num_layers)}}
    norms = 0
    for hf_name, a in tensors.items():
        name = gguf_name(hf_name, CASES[case][0])
        if hf_name.endswith("norm.weight"):
            norms += 1
            np.testing.assert_array_equal(expect[name], a + np.float32(1), err_msg=name)  # the file: 1 + w
        else:
            np.testing.assert_array_equal(expect[name], a, err_msg=name)
    assert norms == {"gemma_mqa": 7, "gemma2_softcap_window": 17, "gemma3_pattern_rope": 43}[case]
    ours = {k: np.asarray(v) for k, v in leaves.items()}
    np.testing.assert_allclose(ours["final_norm"], tensors["model.norm.weight"], rtol=0, atol=1e-6)
    for i in range(cfg.num_layers):
        np.testing.assert_allclose(ours[f"attn_norm.{i}"], tensors[f"model.layers.{i}.input_layernorm.weight"],
                                   rtol=0, atol=1e-6)
        if cfg.qk_norm:
            np.testing.assert_allclose(ours[f"k_norm.{i}"], tensors[f"model.layers.{i}.self_attn.k_norm.weight"],
                                       rtol=0, atol=1e-6)
        np.testing.assert_array_equal(ours[f"wq.{i}"], tensors[f"model.layers.{i}.self_attn.q_proj.weight"].T)
    tokens, lengths = batch(cfg)
    assert lengths.max() > (cfg.sliding_window or 0)  # the window cuts the longer prompts
    ref = hf_logits(hf, tokens, lengths)
    for form, got in realm_logits(m.params, cfg, tokens, lengths, ("stacked", "reference")).items():
        diff = rows_max_diff(got, ref, lengths)
        print(f"{case} GGUF vs HF ({form}): max |dlogit| {diff:.1e}")
        assert diff <= TOL, form


@pytest.mark.parametrize("gemma", ["gemma2_softcap_window",
                                   pytest.param("gemma3_pattern_rope", marks=pytest.mark.slow)], indirect=True)
def test_greedy_matches_hf_generate(gemma):
    """Greedy tokens from the file equal HF's ``generate`` on the original model (prompts longer
    than the window; Gemma 2's soft-caps, Gemma 3's local and scaled global rope). Gemma 2 in the
    quick set, Gemma 3 in the slow one (each compiles its own decode loop, ~11 s on a 2-core CPU)."""
    case, hf, _, _, _, m = gemma
    check_greedy_matches_hf(case, hf, m)


@pytest.mark.parametrize("gemma", ["gemma3_pattern_rope"], indirect=True)
def test_converted_to_hf_is_read_by_transformers(gemma, tmp_path):
    """``gguf_to_hf``: the norms go back to HF's w, and transformers reads the directory to the
    original model's logits."""
    from transformers import AutoModelForCausalLM

    from realm_jax.gguf import gguf_to_hf

    _, hf, _, path, _, _ = gemma
    back = AutoModelForCausalLM.from_pretrained(gguf_to_hf(path, tmp_path / "converted")).float().eval()
    tokens, lengths = batch(back.config)
    assert rows_max_diff(hf_logits(back, tokens, lengths), hf_logits(hf, tokens, lengths), lengths) <= TOL


# ------------------------------------------------------------------ what llama.cpp derives
def _meta(arch, layers, **extra):
    return {"general.architecture": arch, f"{arch}.block_count": layers, f"{arch}.embedding_length": 4608,
            f"{arch}.attention.head_count": 32, f"{arch}.attention.head_count_kv": 16,
            f"{arch}.attention.key_length": 128, f"{arch}.attention.value_length": 128,
            f"{arch}.feed_forward_length": 64, f"{arch}.vocab_size": 100, **extra}


@pytest.mark.parametrize("arch,layers,scalar", [("gemma2", 46, 144.0), ("gemma2", 42, 128.0),
                                                 ("gemma3", 62, 144.0), ("gemma3", 34, 128.0)])
def test_query_scale_follows_llama_cpp(arch, layers, scalar):
    """The 27B layer counts (46, 62) scale queries by (D / N) ** -0.5, the others by H ** -0.5."""
    assert config_from_gguf(_meta(arch, layers)).query_pre_attn_scalar == scalar


def test_defaults_follow_llama_cpp():
    """Keys a file may leave out: Gemma 2's caps (50, 30) and window (4096); a Gemma 3 file without
    a window has only global layers and no final soft-cap."""
    g2 = config_from_gguf(_meta("gemma2", 4))
    assert (g2.attn_softcap, g2.final_softcap, g2.sliding_window, g2.layer_local) == \
        (50.0, 30.0, 4096, (True, False, True, False))
    g3 = config_from_gguf(_meta("gemma3", 7))
    assert (g3.sliding_window, g3.final_softcap, g3.attn_softcap, g3.layer_local) == (None, None, None, (False,) * 7)
    g3 = config_from_gguf(_meta("gemma3", 7, **{"gemma3.attention.sliding_window": 512,
                                                "gemma3.rope.freq_base_swa": 10000.0}))
    assert g3.layer_local == (True,) * 5 + (False, True) and g3.rope_local_theta == 10000.0
    with pytest.raises(UnsupportedModelError, match=r"'gemma3\.rope\.freq_base_swa' = 1000\.0"):
        config_from_gguf(_meta("gemma3", 7, **{"gemma3.rope.freq_base_swa": 1000.0}))


# ------------------------------------------------------------------ bad files
@pytest.fixture(scope="module")
def gemma2_hf(tmp_path_factory):
    """(HF config, checkpoint tensors) of the tiny Gemma 2."""
    directory, hf = make_hf_model("gemma2_softcap_window", tmp_path_factory.mktemp("gemma2_bad"),
                                  query_pre_attn_scalar=8)
    return hf.config, checkpoint_tensors(directory)


F32, U32 = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.UINT32
BAD_FILES = [
    ("missing-post-ffw-norm", "model.layers.2.post_feedforward_layernorm.weight", {}, CheckpointError,
     r"missing tensor 'blk\.2\.post_ffw_norm\.weight'"),
    ("missing-head-count", None, {"gemma2.attention.head_count": None}, ConfigError,
     r"missing 'gemma2\.attention\.head_count'"),
    ("negative-softcap", None, {"gemma2.attn_logit_softcapping": (-1.0, F32)}, ConfigError,
     r"key 'gemma2\.attn_logit_softcapping': expected a finite positive number, got -1\.0"),
    ("other-pattern", None, {"gemma2.attention.sliding_window_pattern": (3, U32)}, UnsupportedModelError,
     r"'gemma2\.attention\.sliding_window_pattern' = 3"),
]


@bad_gguf_cases(BAD_FILES, "drop")
def test_bad_gemma_gguf_is_refused_naming_the_problem(gemma2_hf, tmp_path, drop, meta, exc, match):
    hf_cfg, tensors = gemma2_hf
    tensors = {k: v for k, v in tensors.items() if k != drop}
    check_bad_gguf_refused(tmp_path / "bad.gguf", "gemma2", hf_cfg, tensors, meta, exc, match)


def test_gemma3_without_q_norm_and_with_an_attention_cap_is_refused(tmp_path):
    """Gemma 3 needs its q/k norms; an attention soft-cap key (which llama.cpp ignores) is refused."""
    directory, hf = make_hf_model("gemma3_pattern_rope", tmp_path / "hf", **CASES["gemma3_pattern_rope"][1])
    tensors = checkpoint_tensors(directory)
    check_bad_gguf_refused(tmp_path / "no_qnorm.gguf", "gemma3", hf.config,
                           {k: v for k, v in tensors.items() if k != "model.layers.3.self_attn.q_norm.weight"}, None,
                           CheckpointError, r"missing tensor 'blk\.3\.attn_q_norm\.weight'")
    check_bad_gguf_refused(tmp_path / "cap.gguf", "gemma3", hf.config, tensors,
                           {"gemma3.attn_logit_softcapping": (50.0, F32)}, UnsupportedModelError,
                           r"GGUF key 'gemma3\.attn_logit_softcapping'")


# ------------------------------------------------------------------ the SentencePiece vocabulary
def _llama_cpp_spm(vocab, text):
    """llama.cpp's SPM tokenizer in plain Python: CONTROL / USER_DEFINED tokens cut out of the raw
    text first (longest first), then per piece: spaces to U+2581, adjacent symbols merged while
    some pair forms a vocabulary piece (the highest score first, the leftmost on a tie), a symbol
    outside the vocabulary as its UTF-8 bytes."""
    tokens, scores, types = vocab["tokens"], vocab["scores"], vocab["types"]
    ids = {t: i for i, t in enumerate(tokens)}
    specials = sorted((t for t, k in zip(tokens, types) if k in (3, 4)), key=len, reverse=True)
    fragments = [text]
    for s in specials:
        fragments = [p for f in fragments for p in ([f] if f in specials else _cut(f, s))]
    out = []
    for f in fragments:
        if f in specials:
            out.append(ids[f])
            continue
        symbols = list(f.replace(" ", "\u2581"))
        while True:
            pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
            if not pairs:
                break
            i = -max(pairs)[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        for s in symbols:
            out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
    return out


def _cut(text, special):
    parts = text.split(special)
    out = [parts[0]]
    for p in parts[1:]:
        out += [special, p]
    return [p for p in out if p]


SPM_TEXTS = ["the cat is in the water", "  the  water", "Olá, café ☕!", "<start_of_turn>user\nhi<end_of_turn>\n",
             "a\n\nb", "", "wattering cats"]


def test_sentencepiece_vocabulary_tokenizes_as_llama_cpp(tmp_path):
    """A Gemma file's ``llama`` (SentencePiece) vocabulary: ids equal llama.cpp's SPM algorithm
    and transformers' tokenizer from the same file, BOS added, byte fallback, the control tokens
    and the USER_DEFINED run of spaces kept whole; decode gives the text back; bos / eos / eot /
    padding ids reach the config."""
    from transformers import AutoTokenizer

    from gguf_reference import tiny_sentencepiece_vocab

    vocab = tiny_sentencepiece_vocab()
    directory, hf = make_hf_model("gemma2_softcap_window", tmp_path / "hf", vocab_size=len(vocab["tokens"]),
                                  **CASES["gemma2_softcap_window"][1])  # transformers reads no gemma (1) GGUF
    write_gguf(tmp_path / "tok.gguf", "gemma2", hf.config, checkpoint_tensors(directory), tokenizer=vocab)
    m = realm_jax.load(tmp_path / "tok.gguf", dtype="float32")
    tok = m.tokenizer
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    assert (m.config.bos_token_id, m.config.eos_token_ids, m.config.pad_token_id) == (2, (1, 5), 0)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (2, (1, 5), True)
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        assert ids == [2] + _llama_cpp_spm(vocab, text), text
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text
    assert tok.encode("  ")[1:] == [6] and tok.encode("á")[1:] == [vocab["tokens"].index("<0xC3>"),
                                                                  vocab["tokens"].index("<0xA1>")]
    assert tok.decode(tok.encode("<start_of_turn>user\nhi")) == "user\nhi"
