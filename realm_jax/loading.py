"""``load(source)``: one entry point for HF checkpoint directories, GGUF files and built-in names."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .errors import CheckpointError, RealmError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass
class Model:
    """A loaded model: static ``config``, canonical ``params``, its ``tokenizer`` (may be None),
    and ``runtime``: the prepared form every generation / scoring call runs (``runtime.prepare``
    with the default choices on first use, or the choices given to ``prepare`` / ``load``)."""

    config: ModelConfig
    params: dict
    tokenizer: Any = None
    source: str = ""
    _runtime: Any = dataclasses.field(default=None, repr=False)

    @property
    def dtype(self):
        return self.params["embed"].dtype

    @property
    def runtime(self):
        if self._runtime is None:
            self.prepare()
        return self._runtime

    @property
    def num_adapters(self) -> int:
        """How many adapters ``runtime`` serves (0: none), known without preparing it."""
        return 0 if self._runtime is None else self._runtime.num_adapters

    def prepare(self, **choices):
        """(Re)build ``runtime`` with ``runtime.prepare``'s choices (mesh, quantize, adapters, fold,
        layout, transposed, attention); returns it."""
        from .runtime import prepare

        self._runtime = prepare(self.params, self.config, **choices)
        return self._runtime


PARAM_DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype) -> jnp.dtype:
    """'auto' -> float32 on CPU, bfloat16 on accelerators; else the named dtype (one of
    ``PARAM_DTYPES``, as a name or a dtype); anything else is a ``RealmError`` naming it."""
    if isinstance(dtype, str) and dtype == "auto" or dtype is None:
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    try:
        dt = jnp.dtype(dtype)
    except (TypeError, ValueError):
        dt = None
    if dt is None or isinstance(dtype, bool) or dt.name not in PARAM_DTYPES:
        raise RealmError(f"dtype: expected 'auto' or one of {', '.join(PARAM_DTYPES)}, got {dtype!r}")
    return dt


def load(source: str | os.PathLike = DEFAULT_MODEL, dtype="auto", *, mesh=None, **choices) -> Model:
    """Load a model.

    source: an HF checkpoint directory (config.json + *.safetensors [+ index] + tokenizer.json),
    a ``.gguf`` file, or a built-in name (``smollm2-135m-instruct``).
    dtype: params dtype ('auto': float32 on CPU, bfloat16 on GPU/TPU).
    mesh: a ``jax.sharding.Mesh``; each tensor is placed in its sharded layout as it is read,
    and the runtime is prepared on it.
    choices: ``runtime.prepare``'s (quantize, adapters, fold, layout, transposed, attention);
    with a mesh or any choice the runtime is prepared here, else on first use.
    """
    model = _load(source, dtype, mesh)
    if mesh is not None or choices:
        model.prepare(mesh=mesh, **choices)
    return model


def _load(source, dtype, mesh) -> Model:
    from .compilation_cache import enable_compilation_cache

    dt = resolve_dtype(dtype)  # every argument checked before anything is read
    if not isinstance(source, (str, os.PathLike)):
        raise RealmError(f"source: expected a checkpoint directory, a .gguf file or a built-in name (a string "
                         f"or path), got {type(source).__name__}")
    enable_compilation_cache()  # on by default; REALM_JAX_COMPILATION_CACHE=0 opts out
    place = None
    if mesh is not None:
        from .sharding import param_placer

        place = param_placer(mesh)
    src = str(source)
    if not src.strip():
        raise CheckpointError(f"source: expected a checkpoint directory, a .gguf file or a built-in name, got {src!r}")
    from . import builtin

    if src in builtin.BUILTIN_MODELS:
        src = str(builtin.ensure_builtin(src))
    path = Path(src)
    if path.is_dir():
        from .checkpoint import read_hf_params
        from .tokenizer import Tokenizer

        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: no config.json (not an HF checkpoint directory)")
        cfg = ModelConfig.from_json_file(cfg_path)
        place = place and param_placer(mesh, cfg)  # with cfg: the mesh is checked before reading
        tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
        check_tokenizer(tok, cfg, path / "tokenizer.json")  # before any tensor is read
        params = read_hf_params(path, cfg, dt, place=place)
        return Model(cfg, params, tok, src)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import load_gguf

        cfg, params, tok = load_gguf(path, dt, place=place)
        if mesh is not None:  # leaves whose layout needs cfg (KV heads); the others stay put
            from .sharding import shard_params

            params = shard_params(params, cfg, mesh)
        return Model(cfg, params, tok, src)
    if path.exists():
        raise CheckpointError(f"source {src!r}: not a checkpoint directory or a .gguf file")
    raise CheckpointError(
        f"source {src!r}: no such file or directory, and not a built-in model "
        f"(built-in: {', '.join(builtin.BUILTIN_MODELS)})")


def check_tokenizer(tok, cfg: ModelConfig, where) -> None:
    """A tokenizer may not have more tokens than the model's vocabulary (ids it makes would
    index past the embedding); its special tokens must be ids of the model."""
    if tok is None:
        return
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tok.vocab_size} tokens, but the model's vocabulary "
                              f"(config vocab_size) only {cfg.vocab_size}")
