"""The engine's adapter slots: LoRA adapters loaded and unloaded while it serves, without
recompiling.

The served stack has a fixed shape: A = ``capacity`` adapters, each projection of ``targets`` at
rank R = ``rank`` (``lora.stack_adapters``' layout, [L, A, D_in, R] / [L, A, R, D_out] / [L, A]).
A free slot holds zero factors and scale 0 (the base model's output, exactly); an adapter of a
smaller rank or fewer targets is zero-padded into its slot, which is exact too. Loading or
unloading rebuilds the stack with the same shapes and dtypes, so every compiled program is
reused. Requests name their adapter; its slot index is what travels to the device.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import RealmError


class AdapterSlots:
    """Names and weights of the adapters in the served stack (host side).

    adapters: {name: single adapter} loaded at the start (checked); capacity: slots in all
    (default: as many as ``adapters``); rank: R of every slot (default: the adapters' largest);
    targets: the projections a slot may touch (default: those of ``adapters``, or all seven
    when none is given)."""

    def __init__(self, model, adapters: Mapping[str, Any] | None, capacity: int | None = None,
                 rank: int | None = None, targets: Sequence[str] | None = None):
        from .. import lora

        cfg = model.config
        self.model = model
        self.dims = lora.projection_dims(cfg)
        adapters = dict(adapters or {})
        for name, ad in adapters.items():
            _check_name(name)
            lora.check_adapter(ad, self.dims, cfg.num_layers, f"adapters[{name!r}]", stacked=False)
        if capacity is None:
            capacity = len(adapters)
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < max(1, len(adapters)):
            raise RealmError(f"adapter_slots: expected an integer >= max(1, the {len(adapters)} adapters given), "
                             f"got {capacity!r}")
        ranks = [leaf["a"].shape[-1] for ad in adapters.values() for leaf in ad["layers"].values()]
        rank = max(ranks, default=16) if rank is None else rank
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < max(ranks, default=1):
            raise RealmError(f"adapter_rank: expected an integer >= the given adapters' largest rank "
                             f"{max(ranks, default=1)}, got {rank!r}")
        if targets is None:
            found = {p for ad in adapters.values() for p in ad["layers"]}
            targets = [p for p in self.dims if p in found] or list(self.dims)
        lora._check_targets(list(targets), "adapter_targets", self.dims)
        self.capacity, self.rank, self.targets = capacity, rank, tuple(targets)
        self.names: list[str | None] = [None] * capacity
        self.weights: list[Any] = [None] * capacity
        for i, (name, ad) in enumerate(adapters.items()):
            self._check_fits(name, ad)
            self.names[i], self.weights[i] = name, ad

    # ------------------------------------------------------------------ lookups
    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n is not None)

    def index(self, name) -> int:
        """The slot of ``name`` (a ``RealmError`` naming the loaded ones if it is not loaded)."""
        if isinstance(name, str) and name in self.names:
            return self.names.index(name)
        known = list(self.loaded) or "none (no adapter is loaded)"
        raise RealmError(f"adapter: unknown name {name!r}; expected one of {known} or None (base model)")

    # ------------------------------------------------------------------ changes
    def _check_fits(self, name: str, adapter) -> None:
        for p, leaf in adapter["layers"].items():
            if p not in self.targets:
                raise RealmError(f"adapter {name!r}: targets {p}, which the engine's adapter slots do not serve "
                                 f"(adapter_targets={list(self.targets)})")
            r = leaf["a"].shape[-1]
            if r > self.rank:
                raise RealmError(f"adapter {name!r}: rank {r} at {p} is over the slots' rank {self.rank} "
                                 f"(adapter_rank)")

    def place(self, name: str, adapter) -> int:
        """Check ``adapter`` against the model and the slots, put it into a free slot; its index."""
        from .. import lora

        _check_name(name)
        if name in self.names:
            raise RealmError(f"adapter {name!r} is already loaded; unload it first")
        lora.check_adapter(adapter, self.dims, self.model.config.num_layers, f"adapter {name!r}", stacked=False)
        self._check_fits(name, adapter)
        if None not in self.names:
            raise RealmError(f"adapter {name!r}: all {self.capacity} adapter slots are in use "
                             f"({list(self.loaded)}); unload one or build the engine with more adapter_slots")
        i = self.names.index(None)
        self.names[i], self.weights[i] = name, adapter
        return i

    def remove(self, name: str) -> int:
        i = self.index(name)
        self.names[i], self.weights[i] = None, None
        return i

    # ------------------------------------------------------------------ the served form
    def stack(self):
        """The served stack [L, A, ...] (fixed shapes: free slots and missing targets are zeros)."""
        from .. import lora

        cfg, dtype = self.model.config, self.model.dtype
        filler = {p: _zeros(cfg.num_layers, *self.dims[p], self.rank, dtype) for p in self.targets}
        full = []
        for ad in self.weights:
            layers = dict(filler)
            if ad is not None:
                layers.update({p: _padded(leaf, self.rank) for p, leaf in ad["layers"].items()})
            full.append({"layers": layers})
        return lora.stack_adapters(full, dtype=dtype)


def _check_name(name) -> None:
    if not isinstance(name, str) or not name:
        raise RealmError(f"adapters: names must be non-empty strings, got {name!r}")


# On the host (numpy): building a slot's leaves compiles nothing, and the stack's jitted build
# always sees the same shapes.
def _zeros(layers: int, din: int, dout: int, rank: int, dtype) -> dict:
    return {"a": np.zeros((layers, din, rank), np.float32), "b": np.zeros((layers, rank, dout), np.float32),
            "scale": np.zeros((layers,), np.float32)}


def _padded(leaf: Mapping, rank: int) -> dict:
    """A leaf with its rank zero-padded to ``rank`` (exact: the extra columns of A meet zero rows of B)."""
    pad = rank - leaf["a"].shape[-1]
    host = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return {"a": np.pad(host(leaf["a"]), ((0, 0), (0, 0), (0, pad))),
            "b": np.pad(host(leaf["b"]), ((0, 0), (0, pad), (0, 0))),
            "scale": host(leaf["scale"])}
