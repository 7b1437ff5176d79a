"""Adapter facts shared by ``lora.py`` and ``lora_peft.py``: PEFT's scale rule and the structure
and shape check of a canonical adapter or stack (kept apart so neither module imports the other)."""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .errors import RealmError
from .params import PROJECTIONS

Adapter = dict


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def check_adapter(adapter, dims: Mapping[str, tuple], num_layers: int, what: str = "adapter",
                  stacked: bool | None = None) -> int | None:
    """Validate structure and shapes (static: works on tracers). Returns A for a stack, None for a
    single adapter. ``dims``: {projection: (D_in, D_out)}; ``stacked``: require one form."""
    layers = adapter.get("layers") if isinstance(adapter, Mapping) else None
    if not isinstance(layers, Mapping) or not layers:
        raise RealmError(f"{what}: expected {{'layers': {{projection: {{'a', 'b', 'scale'}}}}}}, "
                         f"got {type(adapter).__name__} {_keys(adapter)}")
    order = [n for n in layers if n not in PROJECTIONS] + [p for p in PROJECTIONS if p in layers]
    counts = [_check_leaf(layers[name], f"{what}['layers'][{name!r}]", name, dims, num_layers) for name in order]
    count = counts[0]
    if any(c != count for c in counts):
        raise RealmError(f"{what}: projections disagree on the number of adapters: {sorted(set(map(str, counts)))}")
    if stacked is True and count is None:
        raise RealmError(f"{what}: expected a stack of adapters (see stack_adapters), got a single adapter")
    if stacked is False and count is not None:
        raise RealmError(f"{what}: expected a single adapter, got a stack of {count}")
    return count


def _check_leaf(leaf, where: str, name: str, dims: Mapping, num_layers: int) -> int | None:
    """One projection's {'a', 'b', 'scale'}: a [L, (A,) D_in, R], b [L, (A,) R, D_out], scale [L, (A,)].
    Returns A or None; every value must be finite (a NaN alpha would give NaN logits)."""
    if name not in dims:
        raise RealmError(f"{where}: unknown projection; expected one of {tuple(dims)}")
    if not isinstance(leaf, Mapping) or set(leaf) != {"a", "b", "scale"}:
        raise RealmError(f"{where}: expected keys {{'a', 'b', 'scale'}}, got {_keys(leaf)}")
    a, b, s = (tuple(jnp.shape(leaf[k])) for k in ("a", "b", "scale"))
    din, dout = dims[name]
    A = a[1] if len(a) == 4 else None
    head = (num_layers,) + (() if A is None else (A,))
    r = a[-1] if len(a) in (3, 4) else -1
    want = {"a": head + (din, r), "b": head + (r, dout), "scale": head}
    for k, shape in (("a", a), ("b", b), ("scale", s)):
        if r <= 0 or shape != want[k]:
            form = "[L, " + ("A, " if A is not None else "") + "D_in, R]"
            raise RealmError(f"{where}['{k}']: expected shape {want[k] if r > 0 else form} "
                             f"(D_in={din}, D_out={dout}, L={num_layers}), got {shape}")
    scale = leaf["scale"]
    if not isinstance(scale, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(scale, np.float32))):
        raise RealmError(f"{where}['scale']: expected finite values (alpha / r), got {np.asarray(scale).ravel()[:4]}")
    return A


def _keys(x):
    return sorted(map(str, x)) if isinstance(x, Mapping) else ""
