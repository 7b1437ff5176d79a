"""HF safetensors checkpoints: read a directory into our params pytree, write one back.

Reading is tensor by tensor (each stacked leaf is built from its L per-layer tensors, then the
per-layer pieces are dropped), so the weights are never held twice. Every name and shape is
checked against the leaf table ``params.LEAVES`` and a problem is a ``CheckpointError`` naming the tensor
and file. All headers (names, shapes, dtypes, which shard holds what) are checked before the
first tensor is read. Only safetensors files are read; pickles (``*.bin``, ``*.pt``) never are.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import CheckpointError
from .params import LEAVES, Leaf, axis_sizes, experts_stacked, file_name, leaf_shape, model_leaves

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def tensor_names(cfg: ModelConfig, fmt: str = "hf") -> dict[str, tuple[tuple[Leaf, ...], int | tuple | None]]:
    """Every tensor name this config has in a file (``fmt``: ``"hf"`` or ``"gguf"``, the ``Leaf``
    field) -> (the leaves it holds, where the tensor sits in them: the layer index, (layer,
    expert) for a per-expert leaf stored one tensor per expert, or None), in the leaves' order
    (layer-major, then expert). A tensor holds one leaf's slice, or several leaves' slices side
    by side on its first (output) axis when they name one tensor (``part_rows``: Phi-3's fused
    ``qkv_proj`` / ``gate_up_proj``)."""
    out: dict = {}
    for leaf in model_leaves(cfg):
        pattern = file_name(leaf, cfg, fmt)
        if leaf.per_expert and not experts_stacked(leaf, cfg, fmt):
            slots = [(pattern.format(i=i, e=e), (i, e)) for i in range(cfg.num_layers) for e in range(cfg.num_experts)]
        else:
            slots = [(pattern.format(i=i), i) for i in (range(cfg.num_layers) if leaf.is_layer else (None,))]
        for name, where in slots:
            out[name] = (out[name][0] + (leaf,) if name in out else (leaf,), where)
    return out


def part_rows(parts: tuple[Leaf, ...], cfg: ModelConfig, fmt: str = "hf") -> list[tuple[Leaf, int, int]]:
    """(leaf, start, stop): the rows of a file tensor's first axis that each of its parts holds."""
    out, start = [], 0
    for leaf in parts:
        stop = start + file_shape(leaf, cfg, fmt)[0]
        out.append((leaf, start, stop))
        start = stop
    return out


def tensor_shape(parts: tuple[Leaf, ...], cfg: ModelConfig, fmt: str = "hf") -> tuple[int, ...]:
    """The shape of a file tensor holding ``parts`` (``tensor_names``): one leaf's ``file_shape``,
    or the parts' rows together."""
    shape = file_shape(parts[0], cfg, fmt)
    return (part_rows(parts, cfg, fmt)[-1][2],) + shape[1:]


def fused_note(parts: tuple[Leaf, ...], cfg: ModelConfig, fmt: str = "hf") -> str:
    """For a fused tensor's shape error: which leaves its rows should hold, from the config."""
    if len(parts) == 1:
        return ""
    rows = " + ".join(f"{stop - start} {leaf.name}" for leaf, start, stop in part_rows(parts, cfg, fmt))
    return f" (the fused {' | '.join(p.name for p in parts)}: {rows} rows, from the config)"


def file_tensor(params: dict, parts: tuple[Leaf, ...], where, cfg: ModelConfig) -> np.ndarray:
    """The file tensor (numpy) holding ``parts`` at ``where`` (``tensor_names``), from params."""
    arrays = []
    for leaf in parts:
        a = (params["layers"] if leaf.is_layer else params)[leaf.name]
        a = np.asarray(a[where] if where is not None else a)
        arrays.append(a.T if leaf.hf_transposed else a)
    return np.ascontiguousarray(arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0))


def leaf_path(leaf: Leaf) -> tuple[str, ...]:
    """The leaf's path in the params tree (what ``place`` receives)."""
    return ("layers", leaf.name) if leaf.is_layer else (leaf.name,)


def file_axes(leaf: Leaf, cfg: ModelConfig, fmt: str = "hf") -> tuple[str, ...]:
    """The logical axes of one of the leaf's tensors in a file: one layer's (and expert's) slice
    of a layer leaf, reversed (``[D_out, D_in]``) for a weight stored transposed (HF and GGUF
    matmul weights); a GGUF expert tensor holds the layer's every expert, ``[E, D_out, D_in]``."""
    axes = leaf.axes[2:] if leaf.per_expert else leaf.axes[1:] if leaf.is_layer else leaf.axes
    axes = axes[::-1] if leaf.hf_transposed else axes
    return ("experts", *axes) if experts_stacked(leaf, cfg, fmt) else axes


def file_shape(leaf: Leaf, cfg: ModelConfig, fmt: str = "hf") -> tuple[int, ...]:
    """The shape of one of the leaf's tensors in a file (``file_axes``)."""
    sizes = axis_sizes(cfg)
    return tuple(sizes[a] for a in file_axes(leaf, cfg, fmt))


def check_file_tensor_shape(where: str, name: str, parts: tuple[Leaf, ...], cfg: ModelConfig, got: tuple,
                            fmt: str = "hf", expert_count_key: str = "num_experts") -> None:
    """A ``CheckpointError`` naming the tensor unless its shape ``got`` (numpy order) is the one
    ``cfg`` expects for the leaves ``parts`` it holds (a fused tensor's error says how its rows
    should split). A tensor with an expert axis (stacked experts, the router) whose expert
    count alone is off says that the expert count (``expert_count_key``, where it came from)
    disagrees with the tensor. A leaf with a size-1 axis (the shared-expert gate ``[1, D]``)
    may be stored squeezed (``[D]``), as llama.cpp's converter writes it."""
    leaf = parts[0]
    axes, want = file_axes(leaf, cfg, fmt), tensor_shape(parts, cfg, fmt)
    if got == want or ("one" in axes and got == tuple(d for d in want if d != 1)):
        return
    if len(parts) > 1:
        raise CheckpointError(f"{where}: tensor {name!r} has shape {got} (numpy order), expected {want}"
                              f"{fused_note(parts, cfg, fmt)}")
    if "experts" in axes and len(got) == len(want):
        e = axes.index("experts")
        if got[:e] + got[e + 1:] == want[:e] + want[e + 1:]:
            raise CheckpointError(f"{where}: tensor {name!r} holds {got[e]} experts, but {expert_count_key} says "
                                  f"{cfg.num_experts}: the expert count disagrees with the tensor")
    shown = f" ([{', '.join(axes)}])" if "experts" in axes else ""
    raise CheckpointError(f"{where}: tensor {name!r} has shape {got} (numpy order), expected {want}{shown}")


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtypes we read (cast to the params dtype)


def _shard_name(index: Path, name) -> str:
    """A file name from an index's weight_map: a plain name in the checkpoint directory."""
    if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name \
            or name in (".", ".."):
        raise CheckpointError(f"{index}: weight_map names file {name!r}; expected a *.safetensors file name "
                              f"in the checkpoint directory (no folders)")
    return name


class _TensorIndex:
    """Maps tensor name -> open safetensors file; opens each shard once. Reads only headers."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        from .config import read_json

        index = directory / "model.safetensors.index.json"
        if index.exists():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
                got = (f"a weight_map of type {type(weight_map).__name__}" if isinstance(data, dict)
                       else f"a JSON {type(data).__name__}")
                raise CheckpointError(f"{index}: malformed index: expected {{\"weight_map\": {{tensor name: "
                                      f"file name}}}}, got {got}")
            files = sorted({_shard_name(index, f) for f in weight_map.values()})
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = None
        self.handles = {}
        self.where: dict[str, str] = {}
        for fname in files:
            path = directory / fname
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in the index but missing")
            try:
                h = safe_open(str(path), framework="flax")
                keys = list(h.keys())
            except Exception as e:  # safetensors raises its own error type
                raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from None
            self.handles[fname] = h
            for k in keys:
                if k in self.where and weight_map is None:
                    raise CheckpointError(f"tensor {k!r} is in both {self.where[k]} and {fname} (and there is no "
                                          f"model.safetensors.index.json saying which is meant)")
                if weight_map is None or weight_map.get(k) == fname:
                    self.where[k] = fname
        if weight_map is not None:
            for k, f in weight_map.items():
                if self.where.get(k) != f:
                    raise CheckpointError(f"tensor {k!r}: index says {f}, but that file does not hold it")

    def shape(self, name: str) -> tuple:
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self.handles[self.where[name]].get_slice(name).get_dtype())

    def get(self, name: str, start: int = 0, stop: int | None = None) -> jax.Array:
        """The tensor, or only its rows [start, stop) of the first axis (one part of a fused tensor)."""
        fname = self.where[name]
        try:
            h = self.handles[fname]
            return h.get_tensor(name) if start == 0 and stop in (None, self.shape(name)[0]) \
                else h.get_slice(name)[start:stop]
        except Exception as e:
            raise CheckpointError(f"tensor {name!r} in {fname}: cannot be read ({e})") from None


def check_hf_headers(directory: str | os.PathLike, cfg: ModelConfig) -> tuple[_TensorIndex, dict]:
    """Every safetensors header of the checkpoint against ``cfg``, before any tensor is read:
    names (missing, unexpected, duplicated), shapes and dtypes. Returns (index, {leaf: [(name,
    start, stop)]}: the tensors holding the leaf, in order, and the rows of each that are its own)."""
    directory = Path(directory)
    idx = _TensorIndex(directory)
    needed = tensor_names(cfg)
    missing = [n for n in needed if n not in idx.where]
    if missing:
        raise CheckpointError(f"{directory}: missing tensor {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [n for n in idx.where if n not in needed and not n.endswith(_IGNORED_SUFFIXES)
             and not (n == LEAVES["lm_head"].hf and cfg.tie_word_embeddings)]
    if extra:
        raise CheckpointError(f"{directory}: unexpected tensor {extra[0]!r} for a {cfg.arch} model "
                              f"(the config does not describe this checkpoint)")
    by_leaf: dict[Leaf, list[tuple[str, int, int]]] = {}
    for name, (parts, _) in needed.items():
        expect, got = tensor_shape(parts, cfg), idx.shape(name)
        if got != expect:
            raise CheckpointError(f"tensor {name!r} in {idx.where[name]} has shape {got}, expected {expect} "
                                  f"{fused_note(parts, cfg)[1:] or '(from config.json)'}")
        dt = idx.dtype(name)
        if dt not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {idx.where[name]} has dtype {dt}; expected a float "
                                  f"({', '.join(FLOAT_DTYPES)})")
        for leaf, start, stop in part_rows(parts, cfg):
            by_leaf.setdefault(leaf, []).append((name, start, stop))
    return idx, by_leaf


def read_hf_params(directory: str | os.PathLike, cfg: ModelConfig, dtype=jnp.float32,
                   place=None) -> dict:
    """Read ``*.safetensors`` under ``directory`` into a params pytree of ``dtype``.

    ``place(path, array) -> array`` may put each finished leaf on devices (sharding); default:
    the default device. Every header is checked first (``check_hf_headers``): a missing,
    unexpected, duplicated or mis-shaped tensor is a ``CheckpointError`` before any is read.
    """
    idx, by_leaf = check_hf_headers(directory, cfg)
    place = place or (lambda path, a: a)
    params: dict = {"layers": {}}
    for leaf, names in by_leaf.items():
        tr = leaf.hf_transposed
        pieces = []
        for name, start, stop in names:
            t = idx.get(name, start, stop).astype(dtype)
            pieces.append(t.T if tr else t)
        arr = jnp.stack(pieces).reshape(leaf_shape(leaf, cfg)) if leaf.is_layer else pieces[0]  # [L(, E), ...]
        del pieces
        (params["layers"] if leaf.is_layer else params)[leaf.name] = place(leaf_path(leaf), arr)
    return params


def write_hf_checkpoint(directory: str | os.PathLike, cfg: ModelConfig, params: dict,
                        extra_files: dict[str, str | bytes] | None = None, dtype=None) -> Path:
    """Write config.json + model.safetensors (+ ``extra_files``, e.g. tokenizer.json) atomically:
    everything goes to a temporary folder beside ``directory`` which is renamed at the end."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"output directory {directory} already exists")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + directory.name, dir=directory.parent))
    try:
        tensors = {}
        for name, (parts, i) in tensor_names(cfg).items():
            a = file_tensor(params, parts, i, cfg)
            tensors[name] = np.asarray(jnp.asarray(a, dtype=dtype)) if dtype is not None else a
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = cfg.to_hf_dict()
        if dtype is not None:
            hf["torch_dtype"] = jnp.dtype(dtype).name
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        for fname, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / fname, mode) as f:
                f.write(content)
        _default_permissions(tmp)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders; give the finished output the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        os.chmod(p, 0o666 & ~umask)
