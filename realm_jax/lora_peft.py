"""PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``) <-> our
adapter pytree (see ``lora.py``): ``read_peft_config``, ``peft_targets``, ``load_peft``,
``save_peft``. Everything PEFT can express that we cannot honour is an error naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import CheckpointError, UnsupportedModelError
from .adapter_checks import Adapter, check_adapter, lora_scale
from .params import LEAVES, PROJECTIONS, file_name, fused_parts, model_leaves, projection_dims

# adapter_config.json fields with no effect on inference.
_PEFT_HARMLESS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "qalora_group_size", "runtime_config", "ensure_weight_tying",
}
# Fields naming a feature we do not implement: an error when set to anything but off.
_PEFT_REFUSED = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "trained LoRA biases (lora_bias)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication", "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "use_qalora": "QA-LoRA",
    "megatron_config": "Megatron parallel LoRA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
}
# Initialisations that rewrite the base weights (the adapter only works with that modified base).
_BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _module_path(proj: str, layer: int, cfg: ModelConfig) -> str:
    """The HF module of a projection in one layer: its weight's name without ``.weight``."""
    return file_name(LEAVES[proj], cfg).format(i=layer).removesuffix(".weight")


def _hf_modules(cfg: ModelConfig) -> list[tuple[str, str | None, int | None]]:
    """The HF module names of this model (as ``named_modules`` lists them) -> (key, projection, layer).
    A mixture of experts adds its block, router (``gate``), ``experts`` and, for Qwen2-MoE, the
    shared expert (whose projections are the LoRA targets w_gate / w_up / w_down) and its gate:
    modules that are not LoRA targets here, so a PEFT config naming them is refused by name."""
    out = [("model", None, None), ("model.embed_tokens", None, None), ("model.layers", None, None)]
    dense = [p for p in ("w_gate", "w_up", "w_down") if p in projection_dims(cfg)]
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}"
        out += [(pre, None, None), (f"{pre}.self_attn", None, None)]
        out += [(_module_path(p, i, cfg), p, i) for p in ("wq", "wk", "wv", "wo")]
        block = f"{pre}.block_sparse_moe" if cfg.block_sparse_moe else f"{pre}.mlp"
        out += [(block, None, None)]
        if cfg.moe:
            out += [(f"{block}.gate", None, None), (f"{block}.experts", None, None)]
        if cfg.shared_expert:
            out += [(f"{block}.shared_expert", None, None), (f"{block}.shared_expert_gate", None, None)]
        out += [(_module_path(p, i, cfg), p, i) for p in dense]
        if dense:
            act = "activation_fn" if cfg.fused_checkpoint else "act_fn"  # Phi-3's MLP names it activation_fn
            out += [(_module_path("w_gate", i, cfg).rsplit(".", 1)[0] + "." + act, None, None)]
        out += [(file_name(leaf, cfg).format(i=i).removesuffix(".weight"), None, None)  # the layer's norms
                for leaf in model_leaves(cfg) if leaf.is_layer and leaf.init == "norm"]
    out += [("model.norm", None, None), ("model.rotary_emb", None, None), ("lm_head", None, None)]
    return out


def _peft_names(cfg: ModelConfig) -> list[str]:
    """The PEFT module names of this model's LoRA targets (q_proj ... down_proj; Phi-3's fused
    qkv_proj and gate_up_proj)."""
    return list(dict.fromkeys(_module_path(p, 0, cfg).rsplit(".", 1)[1] for p in projection_dims(cfg)))


def _fused_rows(proj: str, cfg: ModelConfig) -> tuple[int, int, int]:
    """(start, stop, total): the rows of ``proj``'s output in its HF module's (one part of a
    fused module: LoRA B's rows split as the weight's; A is shared by the parts)."""
    dims = projection_dims(cfg)
    parts = fused_parts(LEAVES[proj], cfg)
    start = sum(dims[p][1] for p in parts[:parts.index(proj)])
    return start, start + dims[proj][1], sum(dims[p][1] for p in parts)


def _peft_is_target(c: Mapping, key: str) -> bool:
    """PEFT's rule for whether module ``key`` gets LoRA (target_modules, exclude_modules,
    layers_to_transform / layers_pattern)."""
    excl = c.get("exclude_modules")
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return False
        elif key in excl or any(key.endswith(f".{e}") for e in excl):
            return False
    tm = c["target_modules"]
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    if not (key in tm or any(key.endswith(f".{t}") for t in tm)):
        return False
    idxs = c.get("layers_to_transform")
    if idxs is None or (isinstance(idxs, list) and not idxs):
        return True
    pattern = c.get("layers_pattern")
    m = None
    if not pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pat in [pattern] if isinstance(pattern, str) else pattern:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
            if m:
                break
    if not m:
        return False
    i = int(m.group("idx"))
    return i == idxs if isinstance(idxs, int) else i in idxs


def _pattern_value(patterns: Mapping, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching the end of ``key``."""
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def read_peft_config(path: str | os.PathLike) -> dict:
    """``adapter_config.json`` of a PEFT directory, with everything we cannot honour refused."""
    f = Path(path) / "adapter_config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    try:
        c = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(c).__name__}")
    if c.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModelError(f"{f}: peft_type {c.get('peft_type')!r} is not supported; supported: 'LORA'")
    for k, what in _PEFT_REFUSED.items():
        if c.get(k) not in (None, False, [], {}, ""):
            raise UnsupportedModelError(f"{f}: {what} is not supported ({k}={c[k]!r})")
    if c.get("bias", "none") != "none":
        raise UnsupportedModelError(f"{f}: bias={c['bias']!r} (trained biases) is not supported; supported: 'none'")
    init = c.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
            raise UnsupportedModelError(
                f"{f}: init_lora_weights={init!r} modifies the base weights, so this adapter only works with "
                f"that modified base; re-save it converted to a plain LoRA (PEFT save_pretrained with "
                f"path_initial_model_for_weight_conversion)")
        raise UnsupportedModelError(f"{f}: init_lora_weights={init!r} is not supported; "
                                    f"supported: {list(_PLAIN_INITS)}")
    for k, v in c.items():
        if k not in _PEFT_HARMLESS and k not in _PEFT_REFUSED and v not in (None, False, [], {}, ""):
            raise UnsupportedModelError(f"{f}: unknown adapter_config.json setting {k}={v!r}; not supported")
    if isinstance(c.get("target_modules"), str) and c.get("layers_to_transform") is not None:
        raise UnsupportedModelError(f"{f}: layers_to_transform cannot be combined with a regex target_modules")
    r = c.get("r", 8)
    if not isinstance(r, int) or r <= 0:
        raise CheckpointError(f"{f}: r must be a positive int, got {r!r}")
    return c


def peft_targets(c: Mapping, cfg: ModelConfig) -> dict[tuple[str, int], tuple[str, int, float]]:
    """Which (projection, layer) a PEFT config targets on this model -> (module key, rank, scale)."""
    c = dict(c)
    tm = c.get("target_modules")
    if tm is None:  # PEFT's default for Llama-family models
        tm = ["q_proj", "v_proj"]
    if isinstance(tm, str) and tm.lower() == "all-linear":
        if cfg.moe:  # PEFT's all-linear also takes the experts and the router (and Qwen2-MoE's shared-expert gate)
            raise UnsupportedModelError(f"target_modules 'all-linear' on {cfg.arch} includes the experts and the "
                                        f"router, and LoRA on them is not supported: list the target modules "
                                        f"({', '.join(_peft_names(cfg))})")
        tm = _peft_names(cfg)
    if not isinstance(tm, (str, list)):
        raise CheckpointError(f"target_modules: expected a list or a regex string, got {tm!r}")
    c["target_modules"] = tm
    rank_pat, alpha_pat = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
    r0, alpha0, rs = c.get("r", 8), c.get("lora_alpha", 8), bool(c.get("use_rslora", False))
    out, hit = {}, set()
    for key, proj, layer in _hf_modules(cfg):
        if not _peft_is_target(c, key):
            continue
        if proj is None:
            if key == "model.embed_tokens":
                raise UnsupportedModelError(f"target module {key!r}: embedding LoRA is not supported")
            if key == "lm_head":
                raise UnsupportedModelError(f"target module {key!r}: LoRA on lm_head is not supported")
            if key.endswith((".experts", ".gate", ".shared_expert_gate")):
                raise UnsupportedModelError(f"target module {key!r}: LoRA on the experts, the router or the "
                                            f"shared-expert gate of a mixture of experts is not supported; LoRA "
                                            f"applies to {', '.join(_peft_names(cfg))}")
            raise UnsupportedModelError(f"target module {key!r} is not a linear projection; LoRA applies to "
                                        f"{', '.join(_peft_names(cfg))}")
        r = _pattern_value(rank_pat, key, r0)
        alpha = _pattern_value(alpha_pat, key, alpha0)
        if not isinstance(r, int) or r <= 0:
            raise CheckpointError(f"rank_pattern: rank for {key!r} must be a positive int, got {r!r}")
        ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)  # a JSON number, not "4"
        scale = lora_scale(r, alpha, rs) if ok else float("nan")
        if not math.isfinite(scale):
            raise CheckpointError(f"lora_alpha / alpha_pattern: alpha for {key!r} must be a finite number, got {alpha!r}")
        out[(proj, layer)] = (key, r, scale)
        hit.add(key)
    if isinstance(tm, str):
        if not hit:
            raise UnsupportedModelError(f"target_modules regex {tm!r} matches no module of this model")
    else:
        for t in tm:
            if not any(k == t or k.endswith(f".{t}") for k, _, _ in _hf_modules(cfg)):
                raise UnsupportedModelError(
                    f"target_modules: unknown module {t!r}; this model has {', '.join(_peft_names(cfg))}")
        if not out:
            raise UnsupportedModelError(f"target_modules {tm} (with layers_to_transform="
                                        f"{c.get('layers_to_transform')}) select no module of this model")
    return out


def load_peft(path: str | os.PathLike, config: ModelConfig, dtype=jnp.float32) -> Adapter:
    """Read a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) into an
    adapter for a model of ``config``; factors in ``dtype``, scales float32.

    Honours r, lora_alpha, use_rslora, target_modules (list or regex; "all-linear"),
    exclude_modules, rank_pattern / alpha_pattern, layers_to_transform / layers_pattern.
    Anything else that changes the model (DoRA, biases, embedding / lm_head LoRA, ...) is an
    error naming it; so is every tensor that is missing, unexpected or mis-shaped (an adapter
    for another model), before any tensor is read.
    """
    from safetensors import safe_open

    path = Path(path)
    c = read_peft_config(path)
    wfile = path / "adapter_model.safetensors"
    if not wfile.is_file():
        extra = " (adapter_model.bin, a pickle, is not read: re-save with safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{path}: no adapter_model.safetensors{extra}")
    targets = peft_targets(c, config)
    try:
        h = safe_open(str(wfile), framework="flax")
        names = list(h.keys())
    except Exception as e:  # safetensors raises its own error type
        raise CheckpointError(f"{wfile}: unreadable or truncated safetensors file ({e})") from None
    prefix = "base_model.model."
    by_key = {(n[len(prefix):] if n.startswith(prefix) else n): n for n in names}
    dims = projection_dims(config)
    wanted = []
    for (proj, layer), (key, r, _) in sorted(targets.items(), key=lambda kv: (kv[0][1], PROJECTIONS.index(kv[0][0]))):
        din, dout = dims[proj][0], _fused_rows(proj, config)[2]
        for part, shape in (("lora_A", (r, din)), ("lora_B", (dout, r))):
            name = f"{key}.{part}.weight"
            if name not in by_key:
                raise CheckpointError(f"{wfile}: missing tensor {name!r} (target {key}, r={r})")
            got = tuple(h.get_slice(by_key[name]).get_shape())
            if got != shape:
                raise CheckpointError(
                    f"{wfile}: tensor {by_key[name]!r} has shape {got}, expected {shape} (r={r}, "
                    f"D_in={din}, D_out={dout}); is this an adapter for another model?")
            wanted.append(name)
    for n in sorted(set(by_key) - set(wanted)):  # sorted: the error names the same tensor every run
        what = ("embedding LoRA" if "lora_embedding" in n else "DoRA magnitude" if "magnitude" in n
                else "a bias" if n.endswith(".bias") else "not a LoRA factor of a targeted module")
        raise UnsupportedModelError(f"{wfile}: unexpected tensor {by_key[n]!r} ({what}); not supported")
    L = config.num_layers
    ranks = {}
    for (proj, _), (_, r, _) in targets.items():
        ranks[proj] = max(ranks.get(proj, 0), r)
    out = {}
    for proj in (p for p in PROJECTIONS if p in ranks):
        din, dout = dims[proj]
        R = ranks[proj]
        a = np.zeros((L, din, R), np.float32)
        b = np.zeros((L, R, dout), np.float32)
        s = np.zeros((L,), np.float32)
        for layer in range(L):
            if (proj, layer) not in targets:
                continue
            key, r, scale = targets[(proj, layer)]
            start, stop, _ = _fused_rows(proj, config)
            a[layer, :, :r] = np.asarray(h.get_tensor(by_key[f"{key}.lora_A.weight"]), np.float32).T
            b[layer, :r, :] = np.asarray(h.get_slice(by_key[f"{key}.lora_B.weight"])[start:stop], np.float32).T
            s[layer] = scale
        out[proj] = {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype), "scale": jnp.asarray(s)}
    return {"layers": out}


def _module_factors(layers: Mapping, parts: tuple[str, ...], cfg: ModelConfig):
    """(a [L, D_in, R], b [L, R, D_out], scale [L]) of one HF module's LoRA, from the adapter's
    leaves of its ``parts``. A fused module (Phi-3's qkv_proj, gate_up_proj) whose parts all
    share A and the scale (as PEFT's do) gets that A and B joined on the output axis; otherwise
    the parts' A are concatenated on the rank axis and B is block-diagonal with each part's scale
    folded in (scale 1): exact either way."""
    f32 = {p: {k: np.asarray(v, np.float64 if k == "scale" else np.float32) for k, v in layers[p].items()}
           for p in parts if p in layers}
    first = next(iter(f32.values()))
    if len(parts) == 1:
        return first["a"], first["b"], first["scale"]
    if len(f32) == len(parts) and all(np.array_equal(f["a"], first["a"]) and np.array_equal(f["scale"], first["scale"])
                                      for f in f32.values()):
        return first["a"], np.concatenate([f32[p]["b"] for p in parts], axis=-1), first["scale"]
    a = np.concatenate([f["a"] for f in f32.values()], axis=-1)
    b = np.zeros((cfg.num_layers, a.shape[-1], _fused_rows(parts[0], cfg)[2]), np.float32)
    r0 = 0
    for p, f in f32.items():
        start, stop, _ = _fused_rows(p, cfg)
        r = f["a"].shape[-1]
        b[:, r0:r0 + r, start:stop] = f["b"] * f["scale"][:, None, None]
        r0 += r
    return a, b, np.ones((cfg.num_layers,))


def save_peft(path: str | os.PathLike, adapter: Adapter, config: ModelConfig,
              base_model_name_or_path: str | None = None) -> Path:
    """Write a single adapter as a PEFT LoRA directory that PEFT and ``load_peft`` read back.

    Every targeted module of every layer is written at its padded rank R with ``alpha_pattern``
    entries reproducing the per-layer scale (so the result is exact, not minimal); a fused
    module's parts are joined (``_module_factors``). The directory must not exist; it appears
    complete or not at all.
    """
    from safetensors.numpy import save_file

    check_adapter(adapter, projection_dims(config), config.num_layers, "adapter", stacked=False)
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; refusing to overwrite")
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    modules = {fused_parts(LEAVES[p], config): None for p in PROJECTIONS if p in adapter["layers"]}
    factors = {parts: _module_factors(adapter["layers"], parts, config) for parts in modules}
    R0 = max(a.shape[-1] for a, _, _ in factors.values())
    names = []
    for parts, (a, b, scale) in factors.items():
        R = a.shape[-1]
        names.append(_module_path(parts[0], 0, config).rsplit(".", 1)[1])
        if R != R0:
            rank_pattern[names[-1]] = R
        for i in range(config.num_layers):
            key = _module_path(parts[0], i, config)
            tensors[f"base_model.model.{key}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"base_model.model.{key}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
            alpha_pattern["^" + re.escape(key)] = float(scale[i]) * R
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": R0, "lora_alpha": R0, "use_rslora": False, "bias": "none", "lora_dropout": 0.0,
        "target_modules": sorted(names), "init_lora_weights": True,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "inference_mode": True,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


