"""PEFT adapters: our logits (merged and unmerged) equal PEFT's (torch CPU, float32), and every
adapter feature we cannot honour is refused by name."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import lora, runtime
from realm_jax.config import ModelConfig
from realm_jax.errors import CheckpointError, RealmError, UnsupportedModelError
from realm_jax.model import forward_jit
from realm_jax.reference import forward_reference_jit

from hf_reference import hf_logits, make_hf_model, random_batch, randomize_lora

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_CASES = {
    # name: (architecture case, LoraConfig kwargs)
    "all7": ("llama_gqa_llama3_untied", dict(r=4, lora_alpha=8, target_modules=ALL)),
    "rslora": ("qwen2_bias", dict(r=8, lora_alpha=4, use_rslora=True,
                                  target_modules=["q_proj", "k_proj", "v_proj", "up_proj"])),
    "patterns_regex": ("llama_tied_linear", dict(
        r=4, lora_alpha=6, target_modules=r".*\.(q_proj|o_proj|gate_proj|down_proj)",
        rank_pattern={"o_proj": 2, "model.layers.1.mlp.down_proj": 7},
        alpha_pattern={"q_proj": 3, "model.layers.2.self_attn.o_proj": 11})),
    "layers_subset": ("qwen3_qknorm", dict(r=3, lora_alpha=5, target_modules=["k_proj", "v_proj", "down_proj"],
                                           layers_to_transform=[0, 2])),
    "all_linear_rslora_rank_pattern": ("mistral_window", dict(
        r=6, lora_alpha=4, target_modules="all-linear", use_rslora=True, rank_pattern={"gate_proj": 3},
        exclude_modules=["model.layers.1.self_attn.k_proj"])),
    "gemma_all7": ("gemma_mqa", dict(r=4, lora_alpha=8, target_modules=ALL)),
    "gemma2_subset": ("gemma2_softcap_window", dict(r=3, lora_alpha=6,
                                                    target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])),
    "gemma3_all_linear_rslora": ("gemma3_pattern_rope", dict(r=4, lora_alpha=4, target_modules="all-linear",
                                                             use_rslora=True)),
    # mixture of experts: LoRA on the attention and on Qwen2-MoE's shared expert
    "mixtral_attention": ("mixtral_top2_window", dict(r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "qwen2_moe_shared_expert": ("qwen2_moe_shared", dict(r=3, lora_alpha=6,
                                                         target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])),
    "qwen3_moe_attention_rslora": ("qwen3_moe_norm_topk", dict(r=4, lora_alpha=4, use_rslora=True,
                                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    # Phi-3: LoRA on the fused qkv_proj / gate_up_proj (A shared by the parts, B split by rows)
    "phi3_fused": ("phi3_mha_short", dict(r=4, lora_alpha=8,
                                          target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])),
}
SLOW_PEFT_CASES = {"gemma_all7", "gemma3_all_linear_rslora", "qwen3_moe_attention_rslora", "phi3_fused"}  # ~30 s each on a 2-core CPU


def peft_adapter(case, tmp_path, seed=0):
    """(our base Model, PEFT model, adapter dir) for a PEFT case on a tiny random HF model."""
    import peft

    arch, kw = PEFT_CASES[case]
    base_dir, hf = make_hf_model(arch, tmp_path / "base", seed=seed)
    pm = peft.get_peft_model(hf, peft.LoraConfig(**kw)).eval()
    randomize_lora(pm, seed)
    pm.save_pretrained(tmp_path / "adapter")
    return realm_jax.load(base_dir, dtype="float32"), pm, tmp_path / "adapter"


def rows_max_diff(a, b, lengths):
    return max(float(np.abs(a[i, :n] - b[i, :n]).max()) for i, n in enumerate(lengths))


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_PEFT_CASES else c
                                  for c in sorted(PEFT_CASES)])
def test_logits_match_peft_merged_and_unmerged(case, tmp_path):
    """The adapter merged, in the reference forward (alone and as a stack with a base row) and
    in prepared runtimes (unfolded and folded, stacked and per-layer, served to every row or
    per row): every row's logits equal PEFT's (with the adapter, or disabled for a base row)."""
    model, pm, adir = peft_adapter(case, tmp_path)
    cfg = model.config
    tokens, lengths = random_batch(np.random.default_rng(1), cfg.vocab_size, [9, 4, 7])
    ref = hf_logits(pm, tokens, lengths)
    with pm.disable_adapter():
        base_ref = hf_logits(pm, tokens, lengths)
    assert rows_max_diff(ref, base_ref, lengths) > 0.1  # the adapter matters

    adapter = lora.load_peft(adir, cfg)
    stack = lora.stack_adapters([adapter])
    every, ids = jnp.zeros((3,), jnp.int32), jnp.array([0, -1, 0], jnp.int32)  # per row: the middle one is the base

    def served(adapters, ids=None, **choices):
        return np.asarray(forward_jit(runtime.prepare(model.params, cfg, adapters=adapters, **choices), cfg,
                                      tokens, lengths, adapter_ids=ids))

    merged = np.asarray(forward_jit(runtime.prepare(lora.merge(model.params, adapter), cfg), cfg, tokens, lengths))
    outs = {
        "merged": merged,
        "reference": forward_reference_jit(model.params, cfg, tokens, lengths, adapters=adapter),
        "reference stack": forward_reference_jit(model.params, cfg, tokens, lengths, adapters=stack, adapter_ids=ids),
        "runtime": served(adapter, layout="stacked"),
        "runtime stack per_layer": served(stack, every, layout="per_layer"),
        "folded": served(stack, ids, fold=True, layout="per_layer"),
        "folded stacked": served(adapter, ids, fold=True, layout="stacked"),
    }
    per_row = ("reference stack", "folded", "folded stacked")
    ref_merged = hf_logits(pm.merge_and_unload(), tokens, lengths)
    diffs = {"merged vs merge_and_unload": rows_max_diff(merged, ref_merged, lengths)}
    for k, v in outs.items():
        v = np.asarray(v)
        if k in per_row:
            diffs[k] = rows_max_diff(v[[0, 2]], ref[[0, 2]], lengths[[0, 2]])
            diffs[k + " base row"] = rows_max_diff(v[[1]], base_ref[[1]], lengths[[1]])
        else:
            diffs[k] = rows_max_diff(v, ref, lengths)
    print(case, {k: f"{v:.1e}" for k, v in diffs.items()})
    for k, v in diffs.items():
        assert v <= 1e-4, (k, v)


def test_adapter_contents_follow_the_config(tmp_path):
    """Ranks, scales and untouched layers, read off the PEFT modules themselves."""
    model, pm, adir = peft_adapter("patterns_regex", tmp_path)
    adapter = lora.load_peft(adir, model.config)
    assert sorted(adapter["layers"]) == ["w_down", "w_gate", "wo", "wq"]
    for name, mod in pm.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
            continue
        i = int(name.split(".layers.")[1].split(".")[0])
        proj = lora.PEFT_MODULES[name.rsplit(".", 1)[1]]
        leaf = adapter["layers"][proj]
        r = mod.r["default"]
        assert float(leaf["scale"][i]) == pytest.approx(mod.scaling["default"], rel=1e-6)
        np.testing.assert_array_equal(np.asarray(leaf["a"][i, :, :r]), mod.lora_A["default"].weight.detach().numpy().T)
        assert not np.asarray(leaf["a"][i, :, r:]).any()  # zero padding to the largest rank
    assert adapter["layers"]["w_down"]["a"].shape[-1] == 7 and adapter["layers"]["wo"]["a"].shape[-1] == 2
    assert float(adapter["layers"]["wo"]["scale"][2]) == pytest.approx(11 / 2)


def test_names_without_base_model_prefix(tmp_path):
    from safetensors.numpy import load_file, save_file

    model, _, adir = peft_adapter("rslora", tmp_path)
    want = lora.load_peft(adir, model.config)
    f = adir / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in load_file(f).items()}, f)
    got = lora.load_peft(adir, model.config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want, got)


def test_save_peft_round_trip_and_peft_reads_it(tmp_path):
    import peft

    base_dir, hf = make_hf_model("llama_gqa_llama3_untied", tmp_path / "base")
    model = realm_jax.load(base_dir, dtype="float32")
    ad = lora.stack_adapters([  # mixed ranks and per-layer scales, as a single adapter after unstacking
        lora.init_adapter(model.config, 3, rank=2, targets=("wq", "w_up"), b_std=0.3),
        lora.init_adapter(model.config, 4, rank=5, targets=("wv",), layers=(1,), alpha=2.0, b_std=0.3)])
    ad = jax.tree.map(lambda x: x[:, 0] + x[:, 1], ad)  # one adapter: wq/w_up rank padded to 5, wv on layer 1
    out = lora.save_peft(tmp_path / "saved", ad, model.config)
    back = lora.load_peft(out, model.config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), ad, back)
    with pytest.raises(FileExistsError):
        lora.save_peft(out, ad, model.config)

    pm = peft.PeftModel.from_pretrained(hf, out).eval()
    tokens, lengths = random_batch(np.random.default_rng(2), model.config.vocab_size, [8, 5])
    want = hf_logits(pm, tokens, lengths)
    ours = forward_jit(runtime.prepare(model.params, model.config, adapters=ad), model.config, tokens, lengths)
    assert rows_max_diff(np.asarray(ours), want, lengths) <= 1e-4
    ref = forward_reference_jit(model.params, model.config, tokens, lengths, adapters=ad)
    assert rows_max_diff(np.asarray(ref), want, lengths) <= 1e-4


def test_smollm2_logits_match_peft(smollm2, smollm2_hf, smollm2_hf_tokenizer, tmp_path):
    """The real model: PEFT on the HF SmolLM2, our adapter from its saved directory."""
    import peft

    cfg = smollm2.config
    ids = [smollm2_hf_tokenizer(t)["input_ids"] for t in ("The capital of France is", "Low-rank adapters")]
    lengths = np.array([len(i) for i in ids], np.int32)
    tokens = np.zeros((2, lengths.max()), np.int32)
    for i, t in enumerate(ids):
        tokens[i, :len(t)] = t
    before = hf_logits(smollm2_hf, tokens, lengths)
    pm = peft.get_peft_model(smollm2_hf, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        rank_pattern={"o_proj": 4})).eval()
    try:
        randomize_lora(pm, std=0.05)
        ref = hf_logits(pm, tokens, lengths)
        pm.save_pretrained(tmp_path / "adapter")
    finally:
        pm.unload()  # give the shared fixture back unchanged
    np.testing.assert_array_equal(hf_logits(smollm2_hf, tokens, lengths), before)

    adapter = lora.load_peft(tmp_path / "adapter", cfg)
    scale = np.abs(ref).max()
    assert rows_max_diff(ref, before, lengths) > 0.05 * scale  # the adapter matters
    merged = forward_jit(runtime.prepare(lora.merge(smollm2.params, adapter), cfg), cfg, tokens, lengths)
    unmerged = forward_jit(runtime.prepare(smollm2.params, cfg, adapters=adapter), cfg, tokens, lengths)
    two, ids = lora.stack_adapters([adapter, adapter]), jnp.array([1, 0], jnp.int32)
    folded = forward_jit(runtime.prepare(smollm2.params, cfg, adapters=two, fold=True), cfg, tokens, lengths,
                         adapter_ids=ids)
    reference = forward_reference_jit(smollm2.params, cfg, tokens, lengths, adapters=two, adapter_ids=ids)
    rel = {k: rows_max_diff(np.asarray(v), ref, lengths) / scale for k, v in
           dict(merged=merged, unmerged=unmerged, folded=folded, reference=reference).items()}
    print("smollm2 max |dlogit| / max |logit|:", {k: f"{v:.1e}" for k, v in rel.items()})
    assert max(rel.values()) <= 1e-3, rel


# ----------------------------------------------------------------------------------- bad input
CFG = ModelConfig(arch="llama", vocab_size=97, hidden_size=30, intermediate_size=56, num_layers=3,
                  num_heads=6, num_kv_heads=2, head_dim=8)


@pytest.fixture
def adapter_dir(tmp_path):
    """A valid PEFT directory (written by save_peft) to break in each test."""
    ad = lora.init_adapter(CFG, 0, rank=2, targets=("wq", "wv", "w_down"))
    return lora.save_peft(tmp_path / "ok", ad, CFG)


def edit_config(d: Path, **changes):
    f = d / "adapter_config.json"
    c = json.loads(f.read_text())
    c.update(changes)
    f.write_text(json.dumps(c))


def test_valid_fixture_loads(adapter_dir):
    assert sorted(lora.load_peft(adapter_dir, CFG)["layers"]) == ["w_down", "wq", "wv"]


@pytest.mark.parametrize("changes, error, pattern", [
    (dict(peft_type="IA3"), UnsupportedModelError, r"peft_type 'IA3' is not supported"),
    (dict(use_dora=True), UnsupportedModelError, r"DoRA \(use_dora\) is not supported"),
    (dict(bias="lora_only"), UnsupportedModelError, r"bias='lora_only' \(trained biases\)"),
    (dict(lora_bias=True), UnsupportedModelError, r"trained LoRA biases \(lora_bias\)"),
    (dict(modules_to_save=["lm_head"]), UnsupportedModelError, r"modules_to_save"),
    (dict(target_modules=["q_proj", "embed_tokens"]), UnsupportedModelError,
     r"'model.embed_tokens': embedding LoRA is not supported"),
    (dict(target_modules=["lm_head"]), UnsupportedModelError, r"'lm_head': LoRA on lm_head is not supported"),
    (dict(target_modules=["q_proj", "c_attn"]), UnsupportedModelError, r"unknown module 'c_attn'"),
    (dict(target_modules=["input_layernorm"]), UnsupportedModelError, r"is not a linear projection"),
    (dict(target_modules=r".*\.nothing"), UnsupportedModelError, r"matches no module of this model"),
    (dict(init_lora_weights="pissa"), UnsupportedModelError, r"init_lora_weights='pissa' modifies the base"),
    (dict(some_new_feature={"x": 1}), UnsupportedModelError, r"unknown adapter_config.json setting some_new_feature"),
    (dict(r=0), CheckpointError, r"r must be a positive int, got 0"),
])
def test_unsupported_configs_are_refused_by_name(adapter_dir, changes, error, pattern):
    edit_config(adapter_dir, **changes)
    with pytest.raises(error, match=pattern):
        lora.load_peft(adapter_dir, CFG)


def test_another_models_adapter_names_the_first_mismatching_tensor(tmp_path):
    wider = CFG.replace(hidden_size=32)
    d = lora.save_peft(tmp_path / "wide", lora.init_adapter(wider, 0, rank=2, targets=("wv", "w_down")), wider)
    with pytest.raises(CheckpointError, match=r"'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight' "
                                               r"has shape \(2, 32\), expected \(2, 30\)"):
        lora.load_peft(d, CFG)
    deeper = CFG.replace(num_layers=4)
    d = lora.save_peft(tmp_path / "deep", lora.init_adapter(deeper, 0, rank=2, targets=("wq",)), deeper)
    with pytest.raises(UnsupportedModelError, match=r"unexpected tensor .*layers.3.self_attn.q_proj.lora_A"):
        lora.load_peft(d, CFG)
    shallower = CFG.replace(num_layers=2)
    d = lora.save_peft(tmp_path / "shallow", lora.init_adapter(shallower, 0, rank=2, targets=("wq",)), shallower)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.2.self_attn.q_proj.lora_A.weight'"):
        lora.load_peft(d, CFG)


@pytest.mark.parametrize("extra, pattern", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA magnitude"),
    ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding LoRA"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "a bias"),
])
def test_unexpected_tensors_are_refused(adapter_dir, extra, pattern):
    from safetensors.numpy import load_file, save_file

    f = adapter_dir / "adapter_model.safetensors"
    t = load_file(f)
    t[extra] = np.zeros((2, 2), np.float32)
    save_file(t, f)
    with pytest.raises(UnsupportedModelError, match=f"unexpected tensor '{extra}' \\({pattern}\\)"):
        lora.load_peft(adapter_dir, CFG)


def test_missing_files(adapter_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        lora.load_peft(tmp_path, CFG)
    (adapter_dir / "adapter_model.safetensors").rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"no adapter_model.safetensors \(adapter_model.bin"):
        lora.load_peft(adapter_dir, CFG)
    (adapter_dir / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        lora.load_peft(adapter_dir, CFG)


@pytest.mark.parametrize("changes", [dict(lora_alpha=float("nan"), alpha_pattern={}),
                                     dict(alpha_pattern={"v_proj": float("inf")})],
                         ids=["nan_lora_alpha", "inf_alpha_pattern"])
def test_non_finite_alpha_is_refused(adapter_dir, changes):
    """A NaN / inf alpha would give non-finite logits: refused with a RealmError (by load_peft, or
    at the latest by what serves or merges the adapter), never served. (save_peft writes an
    alpha_pattern entry for every module, so each case replaces the patterns.)"""
    from realm_jax.params import init_params

    edit_config(adapter_dir, **changes)
    params = init_params(CFG, 0)
    pattern = r"alpha|expected finite values"
    with pytest.raises(RealmError, match=pattern):
        runtime.prepare(params, CFG, adapters=lora.load_peft(adapter_dir, CFG))
    with pytest.raises(RealmError, match=pattern):
        lora.merge(params, lora.load_peft(adapter_dir, CFG))
    with pytest.raises(RealmError, match=pattern):
        realm_jax.generate(realm_jax.Model(CFG, params), [[5, 6]], 2, adapters=lora.load_peft(adapter_dir, CFG))


def test_layers_to_transform_with_regex_targets_is_refused(adapter_dir):
    edit_config(adapter_dir, target_modules=r".*q_proj", layers_to_transform=[0])
    with pytest.raises(RealmError, match="layers_to_transform cannot be combined with a regex"):
        lora.load_peft(adapter_dir, CFG)


# ----------------------------------------------------------------------------------- command line
def test_cli_generate_with_named_adapters_per_prompt(tmp_path, capsys):
    """``realm-jax generate --lora a=DIR --lora b=DIR --adapter ...``: each prompt's tokens equal
    generate() on that prompt alone with its adapter merged."""
    from realm_jax import cli

    base_dir, _ = make_hf_model("llama_gqa_llama3_untied", tmp_path / "base")
    model = realm_jax.load(base_dir, dtype="float32")
    ads = {"a": lora.init_adapter(model.config, 1, rank=3, b_std=0.5),
           "b": lora.init_adapter(model.config, 2, rank=2, targets=("wv", "w_up"), b_std=0.5)}
    dirs = {k: lora.save_peft(tmp_path / k, v, model.config) for k, v in ads.items()}
    prompts = [[5, 17, 33, 8], [60, 61], [90, 4, 4, 70]]
    argv = ["generate", "--model", str(base_dir), "--max-new-tokens", "6", "--json", "--dtype", "float32",
            "--lora", f"a={dirs['a']}", "--lora", str(dirs["b"])]  # the second is named by its directory
    for p in prompts:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    argv += ["--adapter", "b", "--adapter", "base", "--adapter", "a"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, p, name in zip(rows, prompts, ["b", None, "a"]):
        params = model.params if name is None else lora.merge(model.params, lora.load_peft(dirs[name], model.config))
        alone = realm_jax.generate(realm_jax.Model(model.config, params), [p], 6)
        assert row["tokens"] == alone.tokens[0]
    assert len({tuple(r["tokens"]) for r in rows}) == 3


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    return make_hf_model("llama_gqa_llama3_untied", tmp_path_factory.mktemp("cli") / "base")[0]


@pytest.mark.parametrize("argv, pattern", [
    (["--lora", "x=d1", "--lora", "y=d2"], r"2 --lora adapters \(x, y\): choose one per prompt"),
    (["--lora", "x=d1", "--adapter", "z"], r"--adapter: unknown name 'z'; expected one of \['x', 'base'\]"),
    (["--adapter", "x"], r"--adapter 'x' given without any --lora"),
    (["--lora", "x=d1", "--lora", "x=d2", "--adapter", "x"], r"the name 'x' is given twice"),
    (["--lora", "x=d1", "--adapter", "x", "--adapter", "x", "--adapter", "x"], r"expected one per prompt \(2\)"),
    (["--lora", "x=/no/such/dir"], r"no adapter_config.json"),
])
def test_cli_adapter_errors(tiny_base_dir, capsys, argv, pattern):
    import re

    from realm_jax import cli

    code = cli.main(["generate", "--model", str(tiny_base_dir), "--prompt-ids", "5,6", "--prompt-ids", "7",
                     "--max-new-tokens", "2", "--dtype", "float32"] + argv)
    assert code == 2
    assert re.search(pattern, capsys.readouterr().err)


@pytest.mark.parametrize("case,targets,pattern", [
    ("mixtral_top2_window", ["gate"], r"block_sparse_moe.gate': LoRA on the experts, the router"),
    ("qwen3_moe_norm_topk", ["experts"], r"mlp.experts': LoRA on the experts"),
    ("qwen2_moe_shared", ["shared_expert_gate"], r"shared_expert_gate': LoRA on the experts, the router or the "
                                                  r"shared-expert gate"),
    ("qwen2_moe_shared", "all-linear", r"'all-linear' on qwen2_moe includes the experts and the router"),
    ("mixtral_top2_window", ["gate_proj"], r"unknown module 'gate_proj'; this model has q_proj, k_proj, v_proj, "
                                           r"o_proj$"),
])
def test_moe_targets_we_do_not_serve_are_refused(case, targets, pattern):
    """LoRA on a mixture of experts' router, experts or shared-expert gate is refused by module
    name; Mixtral has no dense gate_proj to target."""
    from hf_reference import ARCH_CASES, hf_config

    cfg = ModelConfig.from_hf_dict(hf_config(ARCH_CASES[case][0], **ARCH_CASES[case][1]).to_dict())
    with pytest.raises(UnsupportedModelError, match=pattern):
        lora.peft_targets({"target_modules": targets, "r": 4}, cfg)
    with pytest.raises(RealmError, match=r"expected a non-empty subset of this model's projections"):
        lora.init_adapter(cfg, 0, targets=["w_gate"] if not cfg.dense_mlp else ["we_gate"])
    assert set(lora.init_adapter(cfg, 0)["layers"]) == set(lora.projection_dims(cfg))


def test_peft_all_linear_on_moe_is_refused(tmp_path):
    """PEFT's own all-linear adapter on a mixture of experts also targets the experts and the
    router as parameters (``target_parameters``): refused by name, before any tensor is read."""
    import peft

    _, hf = make_hf_model("qwen3_moe_norm_topk", tmp_path / "base")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules="all-linear"))
    pm.save_pretrained(tmp_path / "adapter")
    cfg = ModelConfig.from_json_file(tmp_path / "base" / "config.json")
    with pytest.raises(UnsupportedModelError, match=r"LoRA on parameters \(target_parameters\) is not supported"):
        lora.load_peft(tmp_path / "adapter", cfg)
