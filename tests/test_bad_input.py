"""The bad-input catalogue: every public entry point, given malformed input, raises a clear
``RealmError`` (of the documented subclass) whose message names the offending file, key, tensor
or argument, before any device work. The CLI turns each into exit code 2 and one stderr line
``realm-jax <cmd>: error: ...`` with no traceback.

Everything runs on a tiny llama (V=271, D=32, L=2) written here as an HF directory, a GGUF file
and a PEFT adapter, so the whole catalogue takes seconds. Each case is one parametrized test:
(id, what is broken, the exception type, a regex the message must match).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import realm_jax
from realm_jax import cli
from realm_jax.checkpoint import file_tensor, tensor_names, tensor_shape, write_hf_checkpoint
from realm_jax.compilation_cache import CacheDirError
from realm_jax.config import ModelConfig
from realm_jax.drafts import MAX_K, DraftError
from realm_jax.engine import Engine, EngineClosedError
from realm_jax.errors import CheckpointError, ConfigError, RealmError, UnsupportedModelError
from realm_jax.params import init_params
from realm_jax.tokenizer import Tokenizer

from gguf_reference import tiny_byte_level_vocab

VOCAB = tiny_byte_level_vocab()
V = len(VOCAB["tokens"])  # 271
CFG = ModelConfig(arch="llama", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=128, bos_token_id=1,
                  eos_token_ids=(2,))


def _tokenizer_meta(vocab=VOCAB) -> dict:
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": vocab["tokens"], "tokenizer.ggml.token_type": vocab["types"],
            "tokenizer.ggml.merges": vocab["merges"], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.chat_template": vocab["chat_template"]}


# ============================================================================ files
# ---------------------------------------------------------------- a raw GGUF writer (full control)
U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_value(vtype: int, v) -> bytes:
    fmt = {U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q"}
    if vtype in fmt:
        return struct.pack(fmt[vtype], v)
    if vtype == STR:
        return _gguf_str(v)
    if vtype == ARR:
        itype, items = v
        return struct.pack("<IQ", itype, len(items)) + b"".join(_gguf_value(itype, x) for x in items)
    return b""  # an unknown type id: no payload


def gguf_bytes(meta: list, tensors: list, *, version=3, counts=None, layout_align=32) -> bytes:
    """meta: [(key, vtype, value)] (duplicates allowed); tensors: [(name, float32 array, type id,
    dims override or None)]. Tensor data is laid out at ``layout_align`` whatever the metadata says."""
    n_t, n_kv = counts or (len(tensors), len(meta))
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, n_t, n_kv))
    for key, vtype, v in meta:
        out += _gguf_str(key) + struct.pack("<I", vtype) + _gguf_value(vtype, v)
    blobs, offset = [], 0
    for name, a, type_id, dims in tensors:
        dims = list(reversed(a.shape)) if dims is None else dims
        out += _gguf_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", type_id, offset)
        data = np.ascontiguousarray(a, np.float32).tobytes()
        blobs.append(data)
        offset += -(-len(data) // layout_align) * layout_align
    out += b"\0" * (-len(out) % layout_align)
    for data in blobs:
        out += data + b"\0" * (-len(data) % layout_align)
    return bytes(out)


def base_gguf_meta(cfg=CFG) -> list:
    a = "llama"
    meta = [("general.architecture", STR, a), ("general.alignment", U32, 32),
            (f"{a}.block_count", U32, cfg.num_layers), (f"{a}.context_length", U32, cfg.max_position_embeddings),
            (f"{a}.embedding_length", U32, cfg.hidden_size), (f"{a}.feed_forward_length", U32, cfg.intermediate_size),
            (f"{a}.attention.head_count", U32, cfg.num_heads), (f"{a}.attention.head_count_kv", U32, cfg.num_kv_heads),
            (f"{a}.attention.key_length", U32, cfg.head_dim),
            (f"{a}.attention.layer_norm_rms_epsilon", F32, cfg.rms_norm_eps), (f"{a}.rope.freq_base", F32, 10000.0)]
    t = _tokenizer_meta()
    meta += [("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, "default"),
             ("tokenizer.ggml.tokens", ARR, (STR, t["tokenizer.ggml.tokens"])),
             ("tokenizer.ggml.token_type", ARR, (I32, t["tokenizer.ggml.token_type"])),
             ("tokenizer.ggml.merges", ARR, (STR, t["tokenizer.ggml.merges"])),
             ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2)]
    return meta


def base_gguf_tensors(params, cfg=CFG) -> list:
    out = []
    for name, (parts, i) in tensor_names(cfg, "gguf").items():
        a = file_tensor(params, parts, i, cfg)
        assert a.shape == tensor_shape(parts, cfg)
        out.append((name, a, 0, None))
    return out


def set_meta(meta, key, vtype, value=None):
    """Replace (or append) ``key``; ``vtype=None`` removes it."""
    out = [m for m in meta if m[0] != key]
    return out if vtype is None else out + [(key, vtype, value)]


# ---------------------------------------------------------------- the base files (once per module)
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    params = init_params(CFG, 0)
    tok = Tokenizer.from_gguf(_tokenizer_meta())
    hf = write_hf_checkpoint(root / "hf", CFG, params, extra_files=tok.to_hf_files())
    meta, tensors = base_gguf_meta(), base_gguf_tensors(params)
    (root / "m.gguf").write_bytes(gguf_bytes(meta, tensors))
    peft = root / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG))
    save_file(_peft_tensors(CFG, 2), str(peft / "adapter_model.safetensors"))
    return dict(root=root, hf=hf, params=params, meta=meta, tensors=tensors, peft=peft)


PEFT_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
               "bias": "none", "task_type": "CAUSAL_LM"}


def _peft_tensors(cfg, r, shapes=None) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    dims = {"q_proj": (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
            "v_proj": (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)}
    for i in range(cfg.num_layers):
        for m, (din, dout) in dims.items():
            key = f"base_model.model.model.layers.{i}.self_attn.{m}"
            out[f"{key}.lora_A.weight"] = rng.standard_normal((r, din)).astype(np.float32)
            out[f"{key}.lora_B.weight"] = rng.standard_normal((dout, r)).astype(np.float32)
    out.update(shapes or {})
    return out


@pytest.fixture(scope="module")
def model(files):
    return realm_jax.load(files["hf"], dtype="float32")


def test_the_base_files_are_good(files, model):
    """The catalogue's starting points load: each case breaks exactly one thing."""
    g = realm_jax.load(files["root"] / "m.gguf", dtype="float32")
    assert g.config.vocab_size == model.config.vocab_size == V and g.tokenizer.vocab_size == V
    assert model.tokenizer.encode("the") and model.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
    realm_jax.load_peft(files["peft"], CFG)


# ============================================================================ cases
def _params(cases):
    """(id, *arguments) -> pytest params."""
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


def _hf_copy(files, tmp_path) -> Path:
    return Path(shutil.copytree(files["hf"], tmp_path / "m"))


def _edit_json(path: Path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


# ---------------------------------------------------------------- HF config.json keys
def _drop(key):
    return lambda d: d.pop(key)


def _put(**kv):
    return lambda d: d.update(kv)


CONFIG_CASES = [
    # id, edit of config.json, exception, regex the message must match
    ("missing-vocab_size", _drop("vocab_size"), ConfigError, r"config\.json: missing key 'vocab_size'"),
    ("missing-hidden_size", _drop("hidden_size"), ConfigError, r"missing key 'hidden_size'"),
    ("missing-intermediate_size", _drop("intermediate_size"), ConfigError, r"missing key 'intermediate_size'"),
    ("missing-num_hidden_layers", _drop("num_hidden_layers"), ConfigError, r"missing key 'num_hidden_layers'"),
    ("missing-num_attention_heads", _drop("num_attention_heads"), ConfigError,
     r"missing key 'num_attention_heads'"),
    ("heads-0", _put(num_attention_heads=0), ConfigError, r"'num_attention_heads': expected a positive integer, got 0"),
    ("heads-negative", _put(num_attention_heads=-4), ConfigError, r"'num_attention_heads'.*got -4"),
    ("heads-string", _put(num_attention_heads="4"), ConfigError, r"'num_attention_heads'.*got '4' \(str\)"),
    ("heads-fraction", _put(num_attention_heads=2.5), ConfigError, r"'num_attention_heads'.*got 2\.5"),
    ("heads-bool", _put(num_attention_heads=True), ConfigError, r"'num_attention_heads'.*got True"),
    ("kv-heads-0", _put(num_key_value_heads=0), ConfigError, r"'num_key_value_heads': expected a positive integer"),
    ("kv-heads-not-dividing", _put(num_key_value_heads=3), ConfigError,
     r"'num_attention_heads': 4 heads are not a multiple of num_key_value_heads=3"),
    ("heads-not-dividing-hidden", lambda d: d.update(num_attention_heads=6, num_key_value_heads=6, head_dim=None),
     ConfigError, r"'hidden_size' and 'num_attention_heads'.*hidden size 32 is not a multiple of the 6.*inconsistent"),
    ("head_dim-odd", _put(head_dim=7), ConfigError, r"'head_dim'.*must be even.*got 7"),
    ("head_dim-negative", _put(head_dim=-8), ConfigError, r"'head_dim': expected a positive integer, got -8"),
    ("vocab-0", _put(vocab_size=0), ConfigError, r"'vocab_size': expected a positive integer, got 0"),
    ("vocab-2**70", _put(vocab_size=2 ** 70), ConfigError, r"'vocab_size'.*got 1180591620717411303424"),
    ("intermediate-negative", _put(intermediate_size=-1), ConfigError, r"'intermediate_size'.*got -1"),
    ("layers-0", _put(num_hidden_layers=0), ConfigError, r"'num_hidden_layers'.*got 0"),
    ("max_positions-0", _put(max_position_embeddings=0), ConfigError, r"'max_position_embeddings'.*got 0"),
    ("max_positions-negative", _put(max_position_embeddings=-5), ConfigError, r"'max_position_embeddings'.*got -5"),
    ("eps-0", _put(rms_norm_eps=0), ConfigError, r"'rms_norm_eps': expected a finite positive number, got 0"),
    ("eps-string", _put(rms_norm_eps="1e-5"), ConfigError, r"'rms_norm_eps'.*'1e-5' \(str\)"),
    ("eps-nan", _put(rms_norm_eps=float("nan")), ConfigError, r"'rms_norm_eps'.*got nan"),
    ("eps-inf", _put(rms_norm_eps=float("inf")), ConfigError, r"'rms_norm_eps'.*got inf"),
    ("rope_theta-0", lambda d: (d.pop("rope_parameters", None), d.update(rope_theta=0)), ConfigError,
     r"'rope_theta'.*got 0"),
    ("rope_theta-negative", lambda d: d.update(rope_parameters={"rope_type": "default", "rope_theta": -1.0}),
     ConfigError, r"'rope_parameters\.rope_theta'.*got -1"),
    ("rope_scaling-list", _put(rope_scaling=[1, 2]), ConfigError, r"'rope_scaling': expected an object"),
    ("rope_parameters-string", _put(rope_parameters="fast"), ConfigError, r"'rope_parameters': expected an object"),
    ("rope-linear-no-factor", _put(rope_scaling={"rope_type": "linear"}), ConfigError,
     r"missing key 'rope_scaling\.factor'"),
    ("rope-linear-factor-0", _put(rope_scaling={"rope_type": "linear", "factor": 0}), ConfigError,
     r"'rope_scaling\.factor'.*got 0"),
    ("rope-llama3-missing-low", _put(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64}),
     ConfigError, r"missing key 'rope_scaling\.low_freq_factor'"),
    ("rope-llama3-low-above-high", _put(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     ConfigError, r"'rope_scaling\.high_freq_factor': expected more than low_freq_factor=4"),
    ("rope-yarn", _put(rope_scaling={"rope_type": "yarn", "factor": 4.0}), UnsupportedModelError,
     r"'rope_scaling\.rope_type'.*'yarn' is not supported"),
    ("model_type-gpt2", _put(model_type="gpt2"), UnsupportedModelError, r"model_type 'gpt2'.*not supported"),
    ("model_type-missing", _drop("model_type"), UnsupportedModelError, r"model_type None"),
    ("mistral-window-negative", _put(model_type="mistral", sliding_window=-16), ConfigError,
     r"'sliding_window': expected a positive integer, got -16"),
    ("mistral-window-0", _put(model_type="mistral", sliding_window=0), ConfigError, r"'sliding_window'.*got 0"),
    ("mistral-window-string", _put(model_type="mistral", sliding_window="big"), ConfigError,
     r"'sliding_window'.*'big'"),
    ("qwen2-use_sliding_window", _put(model_type="qwen2", use_sliding_window=True), UnsupportedModelError,
     r"use_sliding_window=True"),
    ("bos-2**70", _put(bos_token_id=2 ** 70), ConfigError,
     r"'bos_token_id': expected a token id in \[0, 271\).*1180591620717411303424"),
    ("eos-negative", _put(eos_token_id=-1), ConfigError, r"'eos_token_id'.*got -1"),
    ("eos-list-outside", _put(eos_token_id=[2, 10 ** 6]), ConfigError, r"'eos_token_id'.*got 1000000"),
    ("eos-string", _put(eos_token_id="</s>"), ConfigError, r"'eos_token_id'.*'</s>'"),
    ("pad-at-vocab", _put(pad_token_id=V), ConfigError, r"'pad_token_id'.*got 271"),
    ("torch_dtype-foo", _put(torch_dtype="foo"), ConfigError, r"'torch_dtype': expected a floating-point dtype.*'foo'"),
    ("torch_dtype-int8", _put(torch_dtype="int8"), ConfigError, r"'torch_dtype'.*'int8'"),
    ("dtype-number", _put(dtype=5), ConfigError, r"'dtype'.*got 5"),
    ("tie-string", _put(tie_word_embeddings="yes"), ConfigError, r"'tie_word_embeddings': expected true or false"),
    ("attention_bias-string", _put(attention_bias="no"), ConfigError, r"'attention_bias': expected true or false"),
    ("hidden_act-gelu", _put(hidden_act="gelu"), UnsupportedModelError, r"hidden_act='gelu'"),
    ("mlp_bias", _put(mlp_bias=True), UnsupportedModelError, r"mlp_bias=True"),
    ("pretraining_tp", _put(pretraining_tp=2), UnsupportedModelError, r"pretraining_tp=2"),
]


@pytest.mark.parametrize("edit,exc,match", _params(CONFIG_CASES))
def test_config_json(files, tmp_path, edit, exc, match):
    d = _hf_copy(files, tmp_path)
    _edit_json(d / "config.json", edit)
    with pytest.raises(exc, match=match) as e:
        realm_jax.load(d, dtype="float32")
    assert "config.json" in str(e.value)


# ---------------------------------------------------------------- HF directories: files and tensors
def _edit_tensors(fn):
    def edit(d):
        t = load_file(d / "model.safetensors")
        fn(t)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _write(name, content):
    def edit(d):
        p = d / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return edit


def _split_shards(index=None):
    """model.safetensors -> two shards (+ an index built by ``index(names0, names1)``)."""
    def edit(d):
        t = load_file(d / "model.safetensors")
        names = sorted(t)
        a, b = names[: len(names) // 2], names[len(names) // 2:]
        (d / "model.safetensors").unlink()
        save_file({n: t[n] for n in a}, str(d / "model-00001-of-00002.safetensors"))
        save_file({n: t[n] for n in b}, str(d / "model-00002-of-00002.safetensors"))
        if index is not None:
            (d / "model.safetensors.index.json").write_text(json.dumps(index(a, b)))
    return edit


def _duplicate_across_shards(d):
    t = load_file(d / "model.safetensors")
    save_file({"model.norm.weight": t["model.norm.weight"]}, str(d / "model-extra.safetensors"))


def _wm(a, b, **extra):
    wm = {n: "model-00001-of-00002.safetensors" for n in a}
    wm.update({n: "model-00002-of-00002.safetensors" for n in b})
    wm.update(extra)
    return {"metadata": {}, "weight_map": wm}


def _mkdir(name):
    return lambda d: ((d / name).unlink(), (d / name).mkdir())


def _wrong_tok_config(**kv):
    return lambda d: _edit_json(d / "tokenizer_config.json", lambda c: c.update(kv))


def _small_vocab_model(d):
    """A model of 200 tokens beside the tokenizer of 271."""
    cfg = CFG.replace(vocab_size=200)
    tok = (d / "tokenizer.json").read_text(), (d / "tokenizer_config.json").read_text()
    shutil.rmtree(d)
    write_hf_checkpoint(d, cfg, init_params(cfg, 0), extra_files={"tokenizer.json": tok[0],
                                                                   "tokenizer_config.json": tok[1]})


HF_CASES = [
    ("tensor-missing", _edit_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), CheckpointError,
     r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    ("tensor-unexpected", _edit_tensors(lambda t: t.update({"model.layers.0.extra.weight": np.zeros(2, np.float32)})),
     CheckpointError, r"unexpected tensor 'model\.layers\.0\.extra\.weight'"),
    ("tensor-shape", _edit_tensors(lambda t: t.update({"model.layers.1.self_attn.k_proj.weight":
                                                       np.zeros((24, 32), np.float32)})),
     CheckpointError, r"'model\.layers\.1\.self_attn\.k_proj\.weight' in model\.safetensors has shape \(24, 32\), "
                      r"expected \(16, 32\)"),
    ("tensor-int-dtype", _edit_tensors(lambda t: t.update({"model.norm.weight": np.ones(32, np.int32)})),
     CheckpointError, r"'model\.norm\.weight'.*dtype I32; expected a float"),
    ("safetensors-truncated", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:300]), CheckpointError, r"model\.safetensors: unreadable or truncated"),
    ("safetensors-garbage", _write("model.safetensors", b"\xff" * 64), CheckpointError,
     r"model\.safetensors: unreadable or truncated"),
    ("duplicate-across-shards", _duplicate_across_shards, CheckpointError,
     r"'model\.norm\.weight' is in both model-extra\.safetensors and model\.safetensors.*no model\.safetensors\.index"),
    ("no-safetensors", lambda d: (d / "model.safetensors").unlink(), CheckpointError, r"no \*\.safetensors files"),
    ("index-not-json", _write("model.safetensors.index.json", "{weight_map"), CheckpointError,
     r"model\.safetensors\.index\.json: not valid JSON"),
    ("index-weight_map-list", _write("model.safetensors.index.json", '{"weight_map": []}'), CheckpointError,
     r"model\.safetensors\.index\.json: malformed index.*weight_map of type list"),
    ("index-a-list", _write("model.safetensors.index.json", "[1]"), CheckpointError,
     r"model\.safetensors\.index\.json: malformed index.*a JSON list"),
    ("index-path-outside", _split_shards(lambda a, b: _wm(a, b, **{"model.norm.weight": "../x.safetensors"})),
     CheckpointError, r"weight_map names file '\.\./x\.safetensors'"),
    ("index-not-safetensors", _split_shards(lambda a, b: _wm(a, b, **{"model.norm.weight": "pytorch_model.bin"})),
     CheckpointError, r"weight_map names file 'pytorch_model\.bin'"),
    ("index-missing-shard", _split_shards(lambda a, b: _wm(a, b, **{"model.norm.weight": "model-3.safetensors"})),
     CheckpointError, r"model-3\.safetensors: listed in the index but missing"),
    ("index-wrong-file", _split_shards(lambda a, b: _wm(b, a)), CheckpointError,
     r"tensor '.*': index says model-0000[12]-of-00002\.safetensors, but that file does not hold it"),
    ("config-not-json", _write("config.json", '{"model_type": "llama",'), ConfigError,
     r"config\.json: not valid JSON \(.* line 1, column"),
    ("config-a-list", _write("config.json", "[1, 2]"), ConfigError, r"config\.json: expected a JSON object.*list"),
    ("config-not-utf8", _write("config.json", b'{"model_type": "\xff"}'), ConfigError,
     r"config\.json: not valid UTF-8 \(byte 0xff"),
    ("config-missing", lambda d: (d / "config.json").unlink(), CheckpointError, r"no config\.json"),
    ("config-a-directory", _mkdir("config.json"), CheckpointError, r"no config\.json"),
    ("tokenizer-not-json", _write("tokenizer.json", "{"), CheckpointError, r"tokenizer\.json: cannot be read"),
    ("tokenizer-empty", _write("tokenizer.json", ""), CheckpointError, r"tokenizer\.json: cannot be read"),
    ("tokenizer_config-not-json", _write("tokenizer_config.json", "{'a': 1}"), CheckpointError,
     r"tokenizer_config\.json: not valid JSON"),
    ("tokenizer_config-a-list", _write("tokenizer_config.json", "[]"), CheckpointError,
     r"tokenizer_config\.json: expected a JSON object, got list"),
    ("tokenizer-bos-unknown", _wrong_tok_config(bos_token="<s>"), CheckpointError,
     r"tokenizer_config\.json: key 'bos_token': token '<s>' is not in the vocabulary"),
    ("tokenizer-eos-int", _wrong_tok_config(eos_token=2), CheckpointError,
     r"tokenizer_config\.json: key 'eos_token': expected a token string, got 2"),
    ("tokenizer-chat_template-int", _wrong_tok_config(chat_template=5), CheckpointError,
     r"tokenizer_config\.json: key 'chat_template': expected a string"),
    ("tokenizer-add_bos-string", _wrong_tok_config(add_bos_token="yes"), CheckpointError,
     r"tokenizer_config\.json: key 'add_bos_token': expected true or false"),
    ("tokenizer-jinja-not-utf8", lambda d: (_wrong_tok_config(chat_template=None)(d),
                                            (d / "chat_template.jinja").write_bytes(b"\xff{{ x }}")),
     CheckpointError, r"chat_template\.jinja: cannot be read as UTF-8"),
    ("tokenizer-larger-than-model", _small_vocab_model, CheckpointError,
     r"tokenizer\.json: the tokenizer has 271 tokens, but the model's vocabulary.*only 200"),
]


@pytest.mark.parametrize("edit,exc,match", _params(HF_CASES))
def test_hf_directory(files, tmp_path, edit, exc, match):
    d = _hf_copy(files, tmp_path)
    edit(d)
    with pytest.raises(exc, match=match):
        realm_jax.load(d, dtype="float32")


def test_every_header_is_checked_before_any_tensor_is_read(files, tmp_path, monkeypatch):
    """A wrong shape in the last layer is found without reading a single tensor."""
    from realm_jax import checkpoint

    d = _hf_copy(files, tmp_path)
    _edit_tensors(lambda t: t.update({"model.layers.1.mlp.down_proj.weight": np.zeros((32, 40), np.float32)}))(d)

    def no_read(self, name):
        raise AssertionError(f"tensor {name} was read before every header was checked")

    monkeypatch.setattr(checkpoint._TensorIndex, "get", no_read)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight'.*\(32, 40\)"):
        realm_jax.load(d, dtype="float32")


# ---------------------------------------------------------------- GGUF files
L = "llama"


def _meta(key, vtype, value=None):
    return lambda meta, tensors: (set_meta(meta, key, vtype, value), tensors)


def _tensors(fn):
    return lambda meta, tensors: (meta, fn(list(tensors)))


def _drop_tensor(name):
    return _tensors(lambda ts: [t for t in ts if t[0] != name])


def _reshape_tensor(name, shape):
    return _tensors(lambda ts: [(n, np.zeros(shape, np.float32), ty, None) if n == name else (n, a, ty, d)
                                for n, a, ty, d in ts])


def _tensor_field(name, type_id=None, dims=None):
    return _tensors(lambda ts: [(n, a, type_id if type_id is not None else ty, dims if dims is not None else d)
                                if n == name else (n, a, ty, d) for n, a, ty, d in ts])


GGUF_CASES = [
    ("alignment-0", _meta("general.alignment", U32, 0), CheckpointError,
     r"'general\.alignment': expected a positive multiple of 8, got 0"),
    ("alignment-7", _meta("general.alignment", U32, 7), CheckpointError, r"'general\.alignment'.*got 7"),
    ("alignment-string", _meta("general.alignment", STR, "32"), CheckpointError, r"'general\.alignment'.*'32'"),
    ("head_count-0", _meta(f"{L}.attention.head_count", U32, 0), ConfigError,
     r"'llama\.attention\.head_count': expected a positive integer, got 0"),
    ("head_count-missing", _meta(f"{L}.attention.head_count", None), ConfigError,
     r"missing 'llama\.attention\.head_count'"),
    ("head_count-string", _meta(f"{L}.attention.head_count", STR, "4"), ConfigError,
     r"'llama\.attention\.head_count'.*'4' \(str\)"),
    ("head_count-per-layer", _meta(f"{L}.attention.head_count", ARR, (U32, [4, 2])), UnsupportedModelError,
     r"'llama\.attention\.head_count' varies per layer"),
    ("head_count_kv-0", _meta(f"{L}.attention.head_count_kv", U32, 0), ConfigError,
     r"'llama\.attention\.head_count_kv'.*got 0"),
    ("head_count_kv-not-dividing", _meta(f"{L}.attention.head_count_kv", U32, 3), ConfigError,
     r"4 heads are not a multiple of llama\.attention\.head_count_kv=3"),
    ("heads-not-dividing-hidden", lambda m, t: (set_meta(set_meta(set_meta(
        m, f"{L}.attention.key_length", None), f"{L}.attention.head_count", U32, 6),
        f"{L}.attention.head_count_kv", U32, 6), t), ConfigError,
     r"'llama\.embedding_length' and 'llama\.attention\.head_count'.*32 is not a multiple of the 6"),
    ("key_length-odd", _meta(f"{L}.attention.key_length", U32, 7), ConfigError, r"key_length'.*must be even.*7"),
    ("value_length-differs", _meta(f"{L}.attention.value_length", U32, 4), UnsupportedModelError,
     r"value_length=4 != key_length=8"),
    ("rope-dims-partial", _meta(f"{L}.rope.dimension_count", U32, 4), UnsupportedModelError,
     r"rope\.dimension_count=4 != head dim 8"),
    ("block_count-0", _meta(f"{L}.block_count", U32, 0), ConfigError, r"'llama\.block_count'.*got 0"),
    ("block_count-missing", _meta(f"{L}.block_count", None), ConfigError, r"missing 'llama\.block_count'"),
    ("feed_forward-string", _meta(f"{L}.feed_forward_length", STR, "48"), ConfigError,
     r"'llama\.feed_forward_length'.*'48'"),
    ("embedding_length-0", _meta(f"{L}.embedding_length", U32, 0), ConfigError, r"'llama\.embedding_length'.*0"),
    ("context_length-0", _meta(f"{L}.context_length", U32, 0), ConfigError, r"'llama\.context_length'.*got 0"),
    ("eps-negative", _meta(f"{L}.attention.layer_norm_rms_epsilon", F32, -1e-5), ConfigError,
     r"'llama\.attention\.layer_norm_rms_epsilon': expected a finite positive number"),
    ("eps-nan", _meta(f"{L}.attention.layer_norm_rms_epsilon", F32, float("nan")), ConfigError,
     r"layer_norm_rms_epsilon'.*nan"),
    ("freq_base-0", _meta(f"{L}.rope.freq_base", F32, 0.0), ConfigError, r"'llama\.rope\.freq_base'.*got 0"),
    ("freq_base-string", _meta(f"{L}.rope.freq_base", STR, "1e4"), ConfigError, r"'llama\.rope\.freq_base'.*'1e4'"),
    ("rope-scaling-yarn", _meta(f"{L}.rope.scaling.type", STR, "yarn"), UnsupportedModelError,
     r"rope\.scaling\.type='yarn' is not supported"),
    ("rope-scaling-factor-negative", _meta(f"{L}.rope.scaling.factor", F32, -2.0), ConfigError,
     r"'llama\.rope\.scaling\.factor'.*-2"),
    # a llama file with experts is Mixtral: the top-k key is required, then the expert tensors
    ("expert_count", _meta(f"{L}.expert_count", U32, 8), ConfigError, r"missing 'llama\.expert_used_count'"),
    ("expert_count-dense-tensors", lambda m, t: (set_meta(set_meta(m, f"{L}.expert_count", U32, 8),
                                                          f"{L}.expert_used_count", U32, 2), t),
     CheckpointError, r"missing tensor 'blk\.0\.ffn_gate_inp\.weight'"),
    ("split_count", _meta("split.count", U32, 2), UnsupportedModelError, r"split\.count=2"),
    ("architecture-gemma3n", _meta("general.architecture", STR, "gemma3n"), UnsupportedModelError,
     r"general\.architecture 'gemma3n' is not supported"),
    ("architecture-missing", _meta("general.architecture", None), UnsupportedModelError,
     r"general\.architecture None"),
    ("bos-2**40", _meta("tokenizer.ggml.bos_token_id", U64, 2 ** 40), ConfigError,
     r"bad\.gguf: key 'tokenizer\.ggml\.bos_token_id': expected a token id in \[0, 271\).*got 1099511627776"),
    ("eos-at-vocab", _meta("tokenizer.ggml.eos_token_id", U32, V), ConfigError,
     r"'tokenizer\.ggml\.eos_token_id'.*got 271"),
    ("tokens-ints", _meta("tokenizer.ggml.tokens", ARR, (U32, list(range(V)))), CheckpointError,
     r"'tokenizer\.ggml\.tokens': expected a non-empty list of strings"),
    ("tokenizer-model-bert", _meta("tokenizer.ggml.model", STR, "bert"), UnsupportedModelError,
     r"tokenizer\.ggml\.model 'bert' is not supported"),
    ("tokenizer-llama-no-scores", _meta("tokenizer.ggml.model", STR, "llama"), CheckpointError,
     r"'tokenizer\.ggml\.scores': expected one number per token \(271\)"),
    ("tokenizer-pre-unknown", _meta("tokenizer.ggml.pre", STR, "weird"), UnsupportedModelError,
     r"tokenizer\.ggml\.pre 'weird' is not supported"),
    ("tokenizer-no-merges", _meta("tokenizer.ggml.merges", None), CheckpointError, r"no tokenizer\.ggml\.merges"),
    ("tokenizer-merge-malformed", _meta("tokenizer.ggml.merges", ARR, (STR, ["ab"])), CheckpointError,
     r"merge 'ab' is not two tokens"),
    ("token_type-length", _meta("tokenizer.ggml.token_type", ARR, (I32, [1, 1])), CheckpointError,
     r"'tokenizer\.ggml\.token_type': expected one type per token \(271\), got 2"),
    ("duplicate-metadata-key", lambda m, t: (m + [("general.alignment", U32, 32)], t), CheckpointError,
     r"metadata key 'general\.alignment' appears twice"),
    ("tensor-missing", _drop_tensor("blk.1.ffn_up.weight"), CheckpointError, r"missing tensor 'blk\.1\.ffn_up\.weight'"),
    ("tensor-unexpected", _tensors(lambda ts: ts + [("blk.0.extra.weight", np.zeros(4, np.float32), 0, None)]),
     CheckpointError, r"unexpected tensor 'blk\.0\.extra\.weight'"),
    ("tensor-shape", _reshape_tensor("blk.0.attn_k.weight", (24, 32)), CheckpointError,
     r"'blk\.0\.attn_k\.weight' has shape \(24, 32\).*expected \(16, 32\)"),
    ("tensor-duplicate", _tensors(lambda ts: ts + [ts[0]]), CheckpointError,
     r"tensor 'token_embd\.weight' appears twice"),
    ("tensor-too-many-dims", _tensor_field("output_norm.weight", dims=[2] * 9), CheckpointError,
     r"'output_norm\.weight' has 9 dimensions"),
    ("tensor-unknown-type", _tensor_field("output_norm.weight", type_id=99), UnsupportedModelError,
     r"'output_norm\.weight' has unknown GGML type id 99"),
    ("tensor-past-end", _tensor_field("output_norm.weight", dims=[32, 2 ** 40]), CheckpointError,
     r"'output_norm\.weight' runs past the end of the file"),
    ("tensor-dims-overflow", _tensor_field("output_norm.weight", dims=[32, 2 ** 62, 8]), CheckpointError,
     r"'output_norm\.weight' runs past the end of the file"),
    ("metadata-unknown-type", lambda m, t: (m + [("x.y", 99, None)], t), CheckpointError,
     r"unknown GGUF metadata value type 99"),
]


@pytest.mark.parametrize("edit,exc,match", _params(GGUF_CASES))
def test_gguf_file(files, tmp_path, edit, exc, match):
    meta, tensors = edit(files["meta"], files["tensors"])
    path = tmp_path / "bad.gguf"
    path.write_bytes(gguf_bytes(meta, tensors))
    with pytest.raises(exc, match=match) as e:
        realm_jax.load(path, dtype="float32")
    assert "bad.gguf" in str(e.value) or exc is not ConfigError


GGUF_RAW_CASES = [
    ("truncated", lambda b: b[:200], CheckpointError, r"bad\.gguf: truncated or corrupt GGUF header"),
    ("bad-magic", lambda b: b"GGML" + b[4:], CheckpointError, r"bad\.gguf: not a GGUF file"),
    ("version-1", lambda b: b[:4] + struct.pack("<I", 1) + b[8:], UnsupportedModelError, r"GGUF version 1"),
    ("huge-counts", lambda b: b[:8] + struct.pack("<QQ", 2 ** 60, 2 ** 60) + b[24:], CheckpointError,
     r"claims 1152921504606846976 tensors"),
    ("empty-file", lambda b: b"", CheckpointError, r"bad\.gguf: not a GGUF file"),
]


@pytest.mark.parametrize("mangle,exc,match", _params(GGUF_RAW_CASES))
def test_gguf_bytes(files, tmp_path, mangle, exc, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(mangle((files["root"] / "m.gguf").read_bytes()))
    with pytest.raises(exc, match=match):
        realm_jax.load(path, dtype="float32")


# ---------------------------------------------------------------- load() arguments
LOAD_ARG_CASES = [
    ("dtype-foo", dict(dtype="foo"), RealmError, r"dtype: expected 'auto' or one of float32, bfloat16, float16, "
                                                 r"got 'foo'"),
    ("dtype-int8", dict(dtype="int8"), RealmError, r"dtype:.*got 'int8'"),
    ("dtype-number", dict(dtype=5), RealmError, r"dtype:.*got 5"),
    ("dtype-float64", dict(dtype="float64"), RealmError, r"dtype:.*got 'float64'"),
    ("source-None", dict(source=None), RealmError, r"source: expected a checkpoint directory.*got NoneType"),
    ("source-int", dict(source=5), RealmError, r"source:.*got int"),
    ("source-empty", dict(source=""), CheckpointError, r"source: expected a checkpoint directory.*got ''"),
    ("source-nonexistent", dict(source="/nonexistent/model"), CheckpointError,
     r"source '/nonexistent/model': no such file or directory"),
    ("source-text-file", dict(source="TEXT"), CheckpointError, r"not a checkpoint directory or a \.gguf file"),
    ("quantize-int4", dict(quantize="int4"), RealmError, r"quantize: scheme 'int4' is not supported"),
    ("quantize-number", dict(quantize=8), RealmError, r"quantize: scheme 8 is not supported"),
    ("layout-foo", dict(layout="foo"), RealmError, r"layout: expected one of .*'foo'"),
    ("attention-foo", dict(attention="foo"), RealmError, r"attention.*'foo'"),
]


@pytest.mark.parametrize("kw,exc,match", _params(LOAD_ARG_CASES))
def test_load_arguments(files, tmp_path, kw, exc, match):
    kw = dict(kw)
    source = kw.pop("source", files["hf"])
    if source == "TEXT":
        source = tmp_path / "notes.txt"
        source.write_text("hello")
    with pytest.raises(exc, match=match):
        realm_jax.load(source, **{"dtype": "float32", **kw})


# ---------------------------------------------------------------- ModelConfig fields and other entry points
def _cfg(**kw):
    return lambda files, tmp_path: CFG.replace(**kw)


def _pairings(text):
    def call(files, tmp_path):
        from realm_jax.drafts import load_pairings

        (tmp_path / "pairs.json").write_text(text)
        return load_pairings(tmp_path / "pairs.json")
    return call


def _gguf_dtype(dtype):
    def call(files, tmp_path):
        from realm_jax.gguf import load_gguf

        return load_gguf(files["root"] / "m.gguf", dtype=dtype)
    return call


def _gguf_to_hf(dtype):
    def call(files, tmp_path):
        from realm_jax.gguf import gguf_to_hf

        return gguf_to_hf(files["root"] / "m.gguf", tmp_path / "out", dtype=dtype)
    return call


def _prior(value):
    def call(files, tmp_path):
        from realm_jax.drafts import make_draft

        return make_draft(realm_jax.load(files["hf"], dtype="float32"), "lookup", prior_acceptance=value)
    return call


def _encode(value):
    return lambda files, tmp_path: realm_jax.load(files["hf"], dtype="float32").tokenizer.encode(value)


OTHER_CASES = [
    ("ModelConfig-kv-heads-0", _cfg(num_kv_heads=0), ConfigError, r"ModelConfig num_kv_heads: expected a positive "
                                                                 r"integer, got 0"),
    ("ModelConfig-heads-not-multiple", _cfg(num_kv_heads=3), ConfigError, r"num_heads \(4\) must be a multiple of "
                                                                         r"num_kv_heads \(3\)"),
    ("ModelConfig-window-negative", _cfg(sliding_window=-16), ConfigError, r"ModelConfig sliding_window.*got -16"),
    ("ModelConfig-window-0", _cfg(sliding_window=0), ConfigError, r"ModelConfig sliding_window.*got 0"),
    ("ModelConfig-positions-0", _cfg(max_position_embeddings=0), ConfigError,
     r"ModelConfig max_position_embeddings.*got 0"),
    ("ModelConfig-eos-outside", _cfg(eos_token_ids=(2, 999)), ConfigError,
     r"ModelConfig eos_token_ids: expected a token id in \[0, 271\).*999"),
    ("ModelConfig-bos-string", _cfg(bos_token_id="1"), ConfigError, r"ModelConfig bos_token_id.*'1' \(str\)"),
    ("ModelConfig-head_dim-odd", _cfg(head_dim=7), ConfigError, r"ModelConfig head_dim: expected an even number"),
    ("ModelConfig-theta-nan", _cfg(rope_theta=float("nan")), ConfigError, r"ModelConfig rope_theta.*nan"),
    ("ModelConfig-eps-negative", _cfg(rms_norm_eps=-1.0), ConfigError, r"ModelConfig rms_norm_eps.*-1"),
    ("ModelConfig-tie-string", _cfg(tie_word_embeddings="yes"), ConfigError,
     r"ModelConfig tie_word_embeddings: expected true or false"),
    ("ModelConfig-llama3-low-high", _cfg(rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=4.0,
                                         rope_high_freq_factor=1.0), ConfigError,
     r"ModelConfig rope_high_freq_factor: expected more than rope_low_freq_factor=4"),
    ("ModelConfig-vocab-2**70", _cfg(vocab_size=2 ** 70), ConfigError, r"ModelConfig vocab_size.*1180591620717411303424"),
    ("ModelConfig-arch", _cfg(arch="gpt2"), UnsupportedModelError, r"architecture 'gpt2' is not supported"),
    ("load_gguf-dtype-foo", _gguf_dtype("foo"), RealmError, r"dtype: expected a floating-point dtype.*'foo'"),
    ("load_gguf-dtype-int32", _gguf_dtype("int32"), RealmError, r"dtype:.*'int32'"),
    ("gguf_to_hf-dtype-int8", _gguf_to_hf("int8"), RealmError, r"dtype:.*'int8'"),
    ("pairings-not-json", _pairings("{pairings"), DraftError, r"pairs\.json'?: not valid JSON"),
    ("pairings-wrong-shape", _pairings('{"pairings": [{"target": 1}]}'), DraftError,
     r"pairs\.json'?: expected \{\"pairings\""),
    ("prior_acceptance-2", _prior(2.0), DraftError, r"prior_acceptance: expected a rate in \[0, 1\], got 2\.0"),
    ("prior_acceptance-string", _prior("0.5"), DraftError, r"prior_acceptance:.*'0\.5'"),
    ("encode-not-a-string", _encode(5), RealmError, r"encode: expected a string, got int"),
]


@pytest.mark.parametrize("call,exc,match", _params(OTHER_CASES))
def test_other_entry_points(files, tmp_path, call, exc, match):
    with pytest.raises(exc, match=match):
        call(files, tmp_path)


# ---------------------------------------------------------------- PEFT directories (lora.load_peft)
def _peft_config(**kv):
    return lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(kv))


def _peft_shape(d):
    save_file(_peft_tensors(CFG, 2, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                     np.zeros((2, 31), np.float32)}), str(d / "adapter_model.safetensors"))


def _peft_bin_only(d):
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")


PEFT_CASES = [
    ("no-config", lambda d: (d / "adapter_config.json").unlink(), CheckpointError, r"no adapter_config\.json"),
    ("config-not-json", _write("adapter_config.json", "{r: 2}"), CheckpointError,
     r"adapter_config\.json: not valid JSON"),
    ("config-a-list", _write("adapter_config.json", "[]"), CheckpointError, r"adapter_config\.json: expected a JSON "
                                                                           r"object"),
    ("r-0", _peft_config(r=0), CheckpointError, r"r must be a positive int, got 0"),
    ("r-string", _peft_config(r="2"), CheckpointError, r"r must be a positive int, got '2'"),
    ("alpha-nan", _peft_config(lora_alpha=float("nan")), CheckpointError, r"lora_alpha.*must be a finite number"),
    ("alpha-string", _peft_config(lora_alpha="4"), CheckpointError, r"lora_alpha.*'4'"),
    ("target-unknown", _peft_config(target_modules=["qq_proj"]), UnsupportedModelError,
     r"target_modules: unknown module 'qq_proj'"),
    ("target-lm_head", _peft_config(target_modules=["lm_head"]), UnsupportedModelError, r"'lm_head'"),
    ("dora", _peft_config(use_dora=True), UnsupportedModelError, r"DoRA \(use_dora\)"),
    ("peft_type", _peft_config(peft_type="IA3"), UnsupportedModelError, r"peft_type 'IA3'"),
    ("bias", _peft_config(bias="all"), UnsupportedModelError, r"bias='all'"),
    ("pickle-only", _peft_bin_only, CheckpointError, r"adapter_model\.bin, a pickle, is not read"),
    ("tensor-shape", _peft_shape, CheckpointError,
     r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \(2, 31\), "
     r"expected \(2, 32\)"),
    ("tensor-missing", lambda d: save_file({k: v for k, v in _peft_tensors(CFG, 2).items() if "layers.1.self_attn.v"
                                            not in k}, str(d / "adapter_model.safetensors")),
     CheckpointError, r"missing tensor 'model\.layers\.1\.self_attn\.v_proj\.lora_A\.weight'"),
    ("safetensors-garbage", _write("adapter_model.safetensors", b"\x00" * 10), CheckpointError,
     r"adapter_model\.safetensors: unreadable or truncated"),
]


@pytest.mark.parametrize("edit,exc,match", _params(PEFT_CASES))
def test_peft_directory(files, tmp_path, edit, exc, match):
    d = Path(shutil.copytree(files["peft"], tmp_path / "adapter"))
    edit(d)
    with pytest.raises(exc, match=match):
        realm_jax.load_peft(d, CFG)


# ---------------------------------------------------------------- forward
def _forward_case(tokens, lengths, params=None):
    def call(model):
        import jax.numpy as jnp

        from realm_jax.model import forward

        rt = model.runtime if params is None else params(model)
        return forward(rt, model.config, jnp.asarray(tokens), jnp.asarray(lengths))
    return call


def _other_runtime(model):
    from realm_jax.runtime import prepare

    other = CFG.replace(vocab_size=300)
    return prepare(init_params(other, 1), other)


FORWARD_CASES = [
    ("tokens-1d", _forward_case([1, 2, 3], [3]), RealmError, r"forward: expected tokens \[B, T\]"),
    ("lengths-shape", _forward_case([[1, 2, 3]], [3, 3]), RealmError, r"lengths"),
    ("token-above-vocab", _forward_case([[1, V, 3]], [3]), RealmError, r"token id 271.*outside the vocabulary"),
    ("token-negative", _forward_case([[1, -1, 3]], [3]), RealmError, r"token id -1.*outside the vocabulary"),
    ("lengths-above-T", _forward_case([[1, 2, 3]], [4]), RealmError, r"lengths must be in \[0, T=3\]"),
    ("float-tokens", _forward_case([[1.0, 2.0]], [2]), RealmError, r"expected integer tokens"),
    ("canonical-params", _forward_case([[1, 2]], [2], params=lambda m: m.params), RealmError,
     r"forward: expected the runtime form"),
    ("params-of-another-model", _forward_case([[1, 2]], [2], params=_other_runtime), RealmError,
     r"does not match"),
]


@pytest.mark.parametrize("call,exc,match", _params(FORWARD_CASES))
def test_forward(model, call, exc, match):
    with pytest.raises(exc, match=match):
        call(model)


# ---------------------------------------------------------------- generate / generate_stream
GEN_CASES = [
    ("prompts-string", dict(prompts="hello"), RealmError, r"prompts: expected a list.*wrap a single prompt"),
    ("prompts-empty", dict(prompts=[]), RealmError, r"prompts: expected at least one prompt"),
    ("prompt-empty", dict(prompts=[[]]), RealmError, r"prompt 0 is empty"),
    ("token-2**70", dict(prompts=[[1, 2 ** 70]]), RealmError,
     r"prompt 0: token id 1180591620717411303424 at position 1 is outside the vocabulary \[0, 271\)"),
    ("token-negative", dict(prompts=[[1, 5], [-1]]), RealmError, r"prompt 1: token id -1 at position 0"),
    ("token-at-vocab", dict(prompts=[[V]]), RealmError, r"token id 271 at position 0 is outside"),
    ("token-float", dict(prompts=[[1, 1.5]]), RealmError, r"prompt 0: .*1\.5"),
    ("token-bool", dict(prompts=[[True]]), RealmError, r"prompt 0: .*True"),
    ("max_new-0", dict(max_new_tokens=0), RealmError, r"max_new_tokens must be an integer >= 1, got 0"),
    ("max_new-string", dict(max_new_tokens="5"), RealmError, r"max_new_tokens.*'5'"),
    ("max_new-float", dict(max_new_tokens=2.0), RealmError, r"max_new_tokens.*2\.0"),
    ("max_new-rows", dict(max_new_tokens=[2, 3]), RealmError, r"max_new_tokens: expected an int or 1 values"),
    ("temperature-string", dict(temperature="0.7"), RealmError, r"temperature: expected numbers, got '0\.7' \(str\)"),
    ("temperature-negative", dict(temperature=-1.0), RealmError, r"temperature must be finite and >= 0"),
    ("temperature-nan", dict(temperature=float("nan")), RealmError, r"temperature must be.*nan"),
    ("temperature-huge", dict(temperature=1e30), RealmError, r"temperature must be.*at most"),
    ("temperature-bool", dict(temperature=True), RealmError, r"temperature: expected numbers, got True"),
    ("temperature-rows", dict(temperature=[0.5, 0.5]), RealmError, r"temperature: expected a scalar or 1 values"),
    ("seed-string", dict(seed="42"), RealmError, r"seed: expected numbers, got '42' \(str\)"),
    ("seed-negative", dict(seed=-1), RealmError, r"seed must be an integer in \[0, 2\*\*32\)"),
    ("seed-2**40", dict(seed=2 ** 40), RealmError, r"seed must be an integer in \[0, 2\*\*32\)"),
    ("seed-2**1100", dict(seed=2 ** 1100), RealmError, r"seed: expected a number in range"),
    ("seed-fraction", dict(seed=1.5), RealmError, r"seed must be an integer"),
    ("top_k-negative", dict(top_k=-1), RealmError, r"top_k must be a non-negative integer"),
    ("top_k-string", dict(top_k="3"), RealmError, r"top_k: expected numbers, got '3'"),
    ("top_k-2**40", dict(top_k=2 ** 40), RealmError, r"top_k must be a non-negative integer below 2\*\*31"),
    ("top_p-0", dict(top_p=0.0), RealmError, r"top_p must be in \(0, 1\]"),
    ("top_p-above-1", dict(top_p=1.5), RealmError, r"top_p must be in \(0, 1\].*1\.5"),
    ("stop_ids-string", dict(stop_ids="x"), RealmError, r"stop_ids: expected a list of token ids.*'x'"),
    ("stop_ids-outside", dict(stop_ids=[10 ** 9]), RealmError, r"stop_ids: 1000000000 is not a token id in \[0, 271\)"),
    ("stop_ids-2**70", dict(stop_ids=[2 ** 70]), RealmError, r"stop_ids: 1180591620717411303424 is not a token id"),
    ("max_len-0", dict(max_len=0), RealmError, r"max_len must be a positive integer, got 0"),
    ("too-long-for-positions", dict(prompts=[[1] * 100], max_new_tokens=40), RealmError,
     r"prompt 0 has 100 tokens \+ max_new_tokens 40 = 140 tokens, over the model's max_position_embeddings=128"),
    ("too-long-for-max_len", dict(max_len=8, max_new_tokens=8), RealmError, r"over the cache length max_len=8"),
    ("adapter_ids-without-adapters", dict(adapter_ids=[0]), RealmError, r"adapter_ids given without adapters"),
    ("chat-messages-not-dicts", dict(prompts=[["hi"]], chat=True), RealmError, r"chat|prompt"),
]


@pytest.mark.parametrize("kw,exc,match", _params(GEN_CASES))
def test_generate(model, kw, exc, match):
    kw = {"prompts": [[1, 5, 6]], "max_new_tokens": 2, **kw}
    with pytest.raises(exc, match=match):
        realm_jax.generate(model, kw.pop("prompts"), kw.pop("max_new_tokens"), **kw)


@pytest.mark.parametrize("kw,exc,match", _params(GEN_CASES[::4]))
def test_generate_stream(model, kw, exc, match):
    kw = {"prompts": [[1, 5, 6]], "max_new_tokens": 2, **kw}
    with pytest.raises(exc, match=match):
        next(iter(realm_jax.generate_stream(model, kw.pop("prompts"), kw.pop("max_new_tokens"), **kw)))


def test_string_prompts_need_a_chat_template(files):
    """A model whose tokenizer has no chat template refuses chat=True with a RealmError naming it."""
    m = realm_jax.load(files["hf"], dtype="float32")
    m.tokenizer.chat_template = None
    with pytest.raises(RealmError, match=r"no chat template"):
        realm_jax.generate(m, ["hello"], 2, chat=True)


def test_a_failing_chat_template_is_a_realm_error(files):
    m = realm_jax.load(files["hf"], dtype="float32")
    m.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RealmError, match=r"chat template: TemplateError: roles must alternate"):
        realm_jax.generate(m, ["hello"], 2, chat=True)
    m.tokenizer.chat_template = "{{ ''.__class__.__mro__ }}"  # the sandbox refuses it
    with pytest.raises(RealmError, match=r"chat template: SecurityError"):
        realm_jax.generate(m, ["hello"], 2, chat=True)


# ---------------------------------------------------------------- speculative_generate
def _other_vocab_model(model):
    from realm_jax.loading import Model

    other = CFG.replace(vocab_size=300)
    return Model(other, init_params(other, 1), None)


SPEC_CASES = [
    ("k-negative", dict(k=-1), RealmError, r"k: expected an integer >= 0, got -1"),
    ("k-string", dict(k="4"), RealmError, r"k: expected an integer >= 0, got '4'"),
    ("k-above-MAX_K", dict(k=MAX_K + 1), RealmError, rf"k: expected an integer in \[1, {MAX_K}\].*got {MAX_K + 1}"),
    ("k-above-cache", dict(k=40, max_len=40, max_new_tokens=2), RealmError,
     r"k: 40 drafted tokens .* do not fit in a cache of 40 positions"),
    ("k_max-negative", dict(k="auto", k_max=-1), RealmError, r"k_max: expected an integer >= 0"),
    ("k_max-above-MAX_K", dict(k="auto", k_max=MAX_K + 1), RealmError, rf"k_max: expected at most drafts.MAX_K={MAX_K}"),
    ("acceptance-2", dict(k="auto", acceptance=2.0), RealmError, r"acceptance: expected a rate in \[0, 1\], got 2"),
    ("acceptance-string", dict(k="auto", acceptance="x"), RealmError, r"acceptance:.*'x'"),
    ("draft-self-0", dict(draft="self:0"), DraftError, r"draft 'self:N': expected 1 <= N < 2.*N=0"),
    ("draft-self-too-deep", dict(draft="self:2"), DraftError, r"N=2"),
    ("draft-nonsense", dict(draft="bigger"), DraftError, r"draft: expected a loaded Model.*'bigger'"),
    ("draft-int", dict(draft=5), DraftError, r"draft: expected a loaded Model.*got int"),
    ("draft-other-vocab", dict(draft=_other_vocab_model), DraftError,
     r"draft vocab_size: expected 271 \(the target's\), got 300"),
    ("prompt-token-outside", dict(prompts=[[V + 5]]), RealmError, r"token id 276 at position 0 is outside"),
    ("temperature-string", dict(temperature="0.7"), RealmError, r"temperature: expected numbers"),
]


@pytest.mark.parametrize("kw,exc,match", _params(SPEC_CASES))
def test_speculative(model, kw, exc, match):
    kw = {"prompts": [[1, 5, 6]], "max_new_tokens": 2, "draft": "lookup", **kw}
    draft = kw.pop("draft")
    draft = draft(model) if callable(draft) else draft
    with pytest.raises(exc, match=match):
        realm_jax.speculative_generate(model, draft, kw.pop("prompts"), kw.pop("max_new_tokens"), **kw)


# ---------------------------------------------------------------- Engine
ENGINE_ARG_CASES = [
    ("max_slots-0", dict(max_slots=0), RealmError, r"max_slots"),
    ("max_seq_len-above-positions", dict(max_seq_len=256), RealmError,
     r"max_seq_len: expected at most the model's max_position_embeddings=128, got 256"),
    ("k-0", dict(draft="lookup", k=0), RealmError, rf"k: expected an integer in \[1, {MAX_K}\].*got 0"),
    ("k-above-MAX_K", dict(draft="lookup", k=MAX_K + 1), RealmError, rf"\[1, {MAX_K}\].*got {MAX_K + 1}"),
    ("k-above-cache", dict(draft="lookup", k=20, max_seq_len=16), RealmError,
     r"do not fit in a cache of 16 positions; expected k <= 14"),
    ("draft-self-0", dict(draft="self:0"), DraftError, r"N=0"),
    ("fold-without-adapters", dict(fold_adapters=True), RealmError, r"fold_adapters: needs adapters"),
]


@pytest.mark.parametrize("kw,exc,match", _params(ENGINE_ARG_CASES))
def test_engine_arguments(model, kw, exc, match):
    with pytest.raises(exc, match=match):
        Engine(model, **{"max_seq_len": 64, **kw})


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, max_slots=2, max_seq_len=64, prefill_buckets=[16, 32])


SUBMIT_CASES = [
    ("max_new-0", dict(max_new_tokens=0), RealmError, r"max_new_tokens must be an integer >= 1, got 0"),
    ("temperature-string", dict(temperature="0.7"), RealmError, r"temperature: expected numbers, got '0\.7'"),
    ("seed-string", dict(seed="42"), RealmError, r"seed: expected numbers, got '42'"),
    ("token-2**70", dict(prompt=[1, 2 ** 70]), RealmError, r"token id 1180591620717411303424 at position 1"),
    ("prompt-over-bucket", dict(prompt=[1] * 40, max_new_tokens=2), RealmError,
     r"prompt has 40 tokens, over the engine's longest prompt bucket 32"),
    ("too-long", dict(prompt=[1] * 30, max_new_tokens=40), RealmError, r"over the cache length max_len=64"),
    ("adapter-unknown", dict(adapter="french"), RealmError, r"adapter: unknown name 'french'"),
    ("stop_ids-too-many", dict(stop_ids=list(range(20))), RealmError, r"stop_ids: expected at most max_stop_ids=8"),
    ("prompt-int", dict(prompt=5), RealmError, r"prompts?|prompt"),
]


@pytest.mark.parametrize("kw,exc,match", _params(SUBMIT_CASES))
def test_engine_submit(engine, kw, exc, match):
    kw = {"prompt": [1, 5, 6], "max_new_tokens": 2, **kw}
    with pytest.raises(exc, match=match):
        engine.submit(kw.pop("prompt"), kw.pop("max_new_tokens"), **kw)
    assert not engine._queue  # nothing was queued


def test_engine_generate_many_refuses_a_bad_request_by_index(engine):
    with pytest.raises(RealmError, match=r"requests\[1\]: .*temperature: expected numbers"):
        engine.generate_many([{"prompt": [1, 2], "max_new_tokens": 2},
                              {"prompt": [1, 2], "max_new_tokens": 2, "temperature": "hot"}])
    with pytest.raises(RealmError, match=r"requests: expected a list"):
        engine.generate_many("hello")


def test_engine_close(model):
    """After close(): submit raises EngineClosedError; what was queued is cancelled with a reason."""
    eng = Engine(model, max_slots=1, max_seq_len=64, prefill_buckets=[16])
    queued = [eng.submit([1, 5, 6], 4) for _ in range(3)]
    eng.close()
    for h in queued:
        r = h.result(timeout=5)
        assert r.finish_reason == "cancelled" and r.cancel_reason == "engine closed"
    with pytest.raises(EngineClosedError, match=r"the engine is closed \(engine closed\)"):
        eng.submit([1, 5, 6], 2)
    with pytest.raises(EngineClosedError):
        eng.generate_many([[1, 2]], max_new_tokens=2)
    with pytest.raises(EngineClosedError):
        eng.start()
    eng.close()  # idempotent
    with Engine(model, max_slots=1, max_seq_len=64, prefill_buckets=[16]) as e2:
        h = e2.submit([1, 5, 6], 3)
        assert len(h.result(timeout=60).tokens) == 3
        pending = [e2.submit([1, 5, 6], 50) for _ in range(3)]
    assert e2.closed and all(p.done for p in pending)
    assert any(p.result().cancel_reason == "engine closed" for p in pending)


# ---------------------------------------------------------------- score / perplexity
def _score(requests, **kw):
    from realm_jax.scoring import score

    return lambda model: score(model, requests, progress=False, **kw)


def _ppl(text, **kw):
    from realm_jax.scoring import perplexity

    return lambda model: perplexity(model, text, progress=False, **kw)


SCORE_CASES = [
    ("requests-string", _score("hello"), RealmError, r"requests: expected a list of \(context, continuation\) pairs"),
    ("request-not-pair", _score([("a",)]), RealmError, r"requests\[0\]: expected a \(context, continuation\) pair"),
    ("continuation-empty", _score([("a", "")]), RealmError, r"requests\[0\]: continuation is empty"),
    ("token-outside", _score([([1, 2], [V])]), RealmError, r"requests\[0\] continuation: token ids must be in "
                                                          r"\[0, 271\).*271"),
    ("token-2**70", _score([([1, 2 ** 70], [3])]), RealmError, r"requests\[0\] context:.*1180591620717411303424"),
    ("token-float", _score([([1, 2.5], [3])]), RealmError, r"requests\[0\] context: expected token ids \(ints\)"),
    ("mixed-kinds", _score([("a", [3])]), RealmError, r"requests\[0\]: context and continuation must both be"),
    ("context-empty-ids", _score([([], [3])]), RealmError, r"requests\[0\]: context ids are empty"),
    ("batch_size-0", _score([([1], [3])], batch_size=0), RealmError, r"batch_size"),
    ("longer-than-positions", _score([([1] * 100, [3] * 40)]), RealmError, r"requests\[0\]: 139 input tokens.*max_position_embeddings=128"),
    ("ppl-empty-text", _ppl(""), RealmError, r"texts_or_ids\[0\]: needs at least 2 tokens"),
    ("ppl-max_length-0", _ppl("hello there", max_length=0), RealmError, r"max_length"),
    ("ppl-stride-too-big", _ppl("hello there", max_length=8, stride=8), RealmError, r"stride"),
    ("ppl-max_length-above-positions", _ppl("hello there", max_length=1000), RealmError,
     r"max_length: expected an int in \[2, 128\].*got 1000"),
    ("score-max_length-above-positions", _score([([1], [3])], max_length=129), RealmError,
     r"max_length: expected an int in \[1, 128\].*got 129"),
    ("ppl-token-outside", _ppl([[1, 2, V]]), RealmError, r"271"),
]


@pytest.mark.parametrize("call,exc,match", _params(SCORE_CASES))
def test_score_and_perplexity(model, call, exc, match):
    with pytest.raises(exc, match=match):
        call(model)


# ---------------------------------------------------------------- the CLI, in process
def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def _cli_score_data(tmp_path, text):
    p = tmp_path / "data.jsonl"
    p.write_text(text)
    return p


CLI_CASES = [
    # id, argv (MODEL = the tiny HF dir, TMP = this case's tmp_path), regex for the stderr line
    ("no-command", [], r"realm-jax: error: the following arguments are required: command"),
    ("unknown-command", ["train"], r"realm-jax: error: argument command: invalid choice: 'train'"),
    ("generate-max-new-not-int", ["generate", "--max-new-tokens", "x"],
     r"realm-jax generate: error: argument --max-new-tokens: invalid int value: 'x'"),
    ("generate-dtype-choice", ["generate", "--dtype", "foo"], r"realm-jax generate: error: argument --dtype"),
    ("generate-no-prompt", ["generate", "--model", "MODEL"], r"realm-jax generate: error: give at least one --prompt"),
    ("generate-missing-model", ["generate", "--model", "/nonexistent/m", "--prompt", "hi"],
     r"realm-jax generate: error: source '/nonexistent/m': no such file or directory"),
    ("generate-bad-prompt-ids", ["generate", "--prompt-ids", "1,a"],
     r"realm-jax generate: error: --prompt-ids #0: expected comma-separated integers, got '1,a'"),
    ("generate-token-outside", ["generate", "--model", "MODEL", "--prompt-ids", "1,999"],
     r"realm-jax generate: error: prompt 0: token id 999 at position 1 is outside the vocabulary"),
    ("generate-temperature-negative", ["generate", "--model", "MODEL", "--prompt-ids", "1,2", "--temperature", "-1"],
     r"realm-jax generate: error: temperature must be finite and >= 0"),
    ("generate-top-p", ["generate", "--model", "MODEL", "--prompt-ids", "1,2", "--top-p", "2"],
     r"realm-jax generate: error: top_p must be in \(0, 1\]"),
    ("generate-too-long", ["generate", "--model", "MODEL", "--prompt-ids", "1,2", "--max-new-tokens", "500"],
     r"realm-jax generate: error: prompt 0 has 2 tokens \+ max_new_tokens 500"),
    ("generate-k-not-int", ["generate", "--model", "MODEL", "--prompt-ids", "1,2", "--draft", "lookup", "--k", "abc"],
     r"realm-jax generate: error: --k: expected an integer >= 0 or 'auto', got 'abc'"),
    ("generate-k-above-max", ["generate", "--model", "MODEL", "--prompt-ids", "1,2", "--draft", "lookup", "--k",
                              str(MAX_K + 1)], rf"realm-jax generate: error: k: expected an integer in \[1, {MAX_K}\]"),
    ("generate-draft-self-0", ["generate", "--model", "MODEL", "--prompt-ids", "1,2", "--draft", "self:0"],
     r"realm-jax generate: error: draft 'self:N': expected 1 <= N < 2"),
    ("generate-lora-twice", ["generate", "--prompt", "hi", "--lora", "a=x", "--lora", "a=y"],
     r"realm-jax generate: error: --lora: the name 'a' is given twice"),
    ("generate-adapter-without-lora", ["generate", "--prompt", "hi", "--adapter", "x"],
     r"realm-jax generate: error: --adapter 'x' given without any --lora"),
    ("generate-lora-missing-dir", ["generate", "--model", "MODEL", "--prompt-ids", "1,2", "--lora", "TMP/none"],
     r"realm-jax generate: error: .*none.*(not a PEFT adapter directory|no adapter_config)"),
    ("generate-bad-config", ["generate", "--model", "BADMODEL", "--prompt-ids", "1,2"],
     r"realm-jax generate: error: .*config\.json: key 'num_attention_heads': expected a positive integer, got 0"),
    ("convert-missing-source", ["convert", "/nonexistent/x.gguf", "TMP/out"],
     r"realm-jax convert: error: source '/nonexistent/x\.gguf': not a \.gguf file"),
    ("convert-out-exists", ["convert", "MODEL", "TMP"], r"realm-jax convert: error: output directory .* already exists"),
    ("convert-dtype-choice", ["convert", "MODEL", "TMP/out", "--dtype", "int8"],
     r"realm-jax convert: error: argument --dtype: invalid choice: 'int8'"),
    ("convert-write-fails", ["convert", "MODEL", "TMP/file/out"],
     r"realm-jax convert: error: .*file.*(Not a directory|File exists)"),
    ("convert-missing-args", ["convert"], r"realm-jax convert: error: the following arguments are required"),
    ("score-data-directory", ["score", "--model", "MODEL", "--data", "TMP"], r"realm-jax score: error: .*Is a directory"),
    ("score-data-missing", ["score", "--data", "TMP/none.jsonl"],
     r"realm-jax score: error: .*none\.jsonl: No such file or directory"),
    ("score-data-bad-json", ["score", "--data", "DATA:{\"context\": 1"],
     r"realm-jax score: error: .*data\.jsonl: line 1: not valid JSON"),
    ("score-data-missing-key", ["score", "--data", "DATA:{\"context\": \"a\"}"],
     r"realm-jax score: error: .*line 1: missing key 'continuation'"),
    ("score-data-empty", ["score", "--data", "DATA:"], r"realm-jax score: error: .*data\.jsonl: no requests"),
    ("score-token-outside", ["score", "--model", "MODEL", "--data",
                             "DATA:{\"context_ids\": [1], \"continuation_ids\": [999]}"],
     r"realm-jax score: error: .*data\.jsonl: line 1: .*999"),
    ("score-batch-size-0", ["score", "--data", "TMP/x.jsonl", "--batch-size", "0"],
     r"realm-jax score: error: --batch-size: expected a positive int, got 0"),
    ("score-mesh", ["score", "--data", "DATA:{\"context\": \"a\", \"continuation\": \"b\"}", "--model", "MODEL",
                    "--mesh", "x"], r"realm-jax score: error: --mesh: expected DATA,MODEL"),
    ("score-batch-size-not-int", ["score", "--data", "x", "--batch-size", "two"],
     r"realm-jax score: error: argument --batch-size: invalid int value: 'two'"),
    ("perplexity-text-missing", ["perplexity", "--text", "TMP/none.txt"],
     r"realm-jax perplexity: error: .*none\.txt: No such file or directory"),
    ("perplexity-text-directory", ["perplexity", "--text", "TMP"], r"realm-jax perplexity: error: .*Is a directory"),
    ("perplexity-text-empty", ["perplexity", "--text", "TEXT:   "],
     r"realm-jax perplexity: error: .*text\.txt: the text is empty"),
    ("perplexity-not-utf8", ["perplexity", "--text", "BYTES:\xff"],
     r"realm-jax perplexity: error: .*text\.txt: line 1: not valid UTF-8"),
    ("perplexity-stride", ["perplexity", "--text", "TMP/x.txt", "--max-length", "4", "--stride", "8"],
     r"realm-jax perplexity: error: --stride: expected < --max-length=4"),
    ("perplexity-batch-size-0", ["perplexity", "--text", "TMP/x.txt", "--batch-size", "0"],
     r"realm-jax perplexity: error: --batch-size: expected a positive int"),
    ("perplexity-no-text", ["perplexity"], r"realm-jax perplexity: error: the following arguments are required: --text"),
    ("bench-prompt-len-0", ["bench", "--shape", "tiny", "--prompt-len", "0"],
     r"realm-jax bench: error: --prompt-len is too small: 0"),
    ("bench-batch-0", ["bench", "--shape", "tiny", "--batch", "0"], r"realm-jax bench: error: --batch: expected "
                                                                    r"positive sizes"),
    ("bench-shape-choice", ["bench", "--shape", "huge"], r"realm-jax bench: error: argument --shape: invalid choice"),
    ("bench-missing-model", ["bench", "--model", "/nonexistent/m"],
     r"realm-jax bench: error: source '/nonexistent/m': no such file"),
]


def _argv(argv, files, tmp_path):
    out = []
    for a in argv:
        if a == "MODEL":
            a = str(files["hf"])
        elif a == "BADMODEL":
            d = _hf_copy(files, tmp_path)
            _edit_json(d / "config.json", lambda c: c.update(num_attention_heads=0))
            a = str(d)
        elif a.startswith("DATA:"):
            a = str(_cli_score_data(tmp_path, a[5:]))
        elif a.startswith("TEXT:") or a.startswith("BYTES:"):
            p = tmp_path / "text.txt"
            p.write_bytes(a[5:].encode() if a.startswith("TEXT:") else a[6:].encode("latin-1"))
            a = str(p)
        elif a.startswith("TMP"):
            (tmp_path / "file").write_text("not a directory")
            a = str(tmp_path) + a[3:]
        out.append(a)
    return out


@pytest.mark.parametrize("argv,match", _params(CLI_CASES))
def test_cli(files, tmp_path, capsys, argv, match):
    rc, err = run_cli(_argv(argv, files, tmp_path), capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.endswith("\n")
    assert re.search(match, err), err


# ---------------------------------------------------------------- the CLI, real processes
@pytest.mark.parametrize("argv,match", [
    (["generate", "--max-new-tokens", "x"], r"^realm-jax generate: error: argument --max-new-tokens"),
    (["score", "--data", "TMP"], r"^realm-jax score: error: .*Is a directory$"),
    (["convert", "MODEL", "TMP/file/out"], r"^realm-jax convert: error: "),
], ids=["generate-argparse", "score-directory", "convert-write-fails"])
def test_cli_subprocess(files, tmp_path, argv, match):
    import os

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "REALM_JAX_COMPILATION_CACHE": "0"}
    p = subprocess.run([sys.executable, "-m", "realm_jax.cli", *_argv(argv, files, tmp_path)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert re.search(match, lines[0]), lines[0]


def test_cli_entry_point_has_the_same_errors(tmp_path):
    """The installed ``realm-jax`` script behaves as ``python -m realm_jax.cli``."""
    exe = Path(sys.executable).parent / "realm-jax"
    assert exe.exists(), f"no realm-jax script beside {sys.executable}: the package is not installed (pip install -e .)"
    p = subprocess.run([str(exe), "perplexity", "--text", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Is a directory" in p.stderr


# ---------------------------------------------------------------- errors are plain data
def test_error_classes():
    assert issubclass(ConfigError, UnsupportedModelError) and issubclass(ConfigError, CheckpointError)
    assert issubclass(CacheDirError, RealmError) and issubclass(EngineClosedError, RealmError)
    assert issubclass(RealmError, ValueError)


def test_catalogue_size():
    n = sum(len(c) for c in (CONFIG_CASES, HF_CASES, GGUF_CASES, GGUF_RAW_CASES, LOAD_ARG_CASES, OTHER_CASES, PEFT_CASES,
                             FORWARD_CASES, GEN_CASES, SPEC_CASES, ENGINE_ARG_CASES, SUBMIT_CASES, SCORE_CASES,
                             CLI_CASES))
    assert n >= 150, n
