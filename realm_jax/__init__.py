"""realm_jax: JAX inference for decoder-only LLMs, as pure functions over explicit pytrees.

Names are imported lazily (a function is never named like its module, so submodule imports
cannot shadow it) so ``import realm_jax`` stays cheap and optional dependencies are
only needed by the features that use them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # foundation
    "ModelConfig": "config",
    "init_params": "params",
    "forward": "model",
    "forward_cached": "model",
    "param_shapes": "params",
    "KVCache": "kv_cache",
    "init_cache": "kv_cache",
    "Model": "loading",
    "load": "loading",
    "Tokenizer": "tokenizer",
    "errors": None,
    # generation
    "generate": "generation",
    "Sampling": "settings",
    "Constraint": "constraints",
    "generate_stream": "generation",
    "GenerationResult": "generation",
    "SamplingParams": "sampling",
    # lora
    "lora": None,
    "merge": "lora",
    "unmerge": "lora",
    "load_peft": "lora",
    # speculative
    "speculative_generate": "speculative",
    # engine
    "Engine": "engine",
    # scoring
    "score": "scoring",
    "perplexity": "scoring",
    # sharding
    "make_mesh": "sharding",
    # the runtime form
    "prepare": "runtime",
    "Runtime": "runtime",
    "reference": None,
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'realm_jax' has no attribute {name!r}")
    mod = _EXPORTS[name]
    if mod is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{mod}", __name__), name)


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
