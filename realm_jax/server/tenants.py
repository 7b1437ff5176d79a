"""Tenants: API keys, the model names (base model and adapters) each may use, and per-tenant
limits on concurrent requests and tokens per minute.

A tenants file (JSON)::

    {"admin_key": "...",                      # optional: enables the /admin endpoints
     "adapters": {"alice-lora": "PEFT_DIR"},  # optional: loaded at start, like --adapter
     "tenants": {
        "alice": {"api_keys": ["sk-a"], "models": ["base", "alice-lora"],
                  "max_concurrent": 4, "tokens_per_minute": 20000},
        "bob":   {"api_keys": ["sk-b"], "models": ["*"]}}}

``models`` lists names a tenant may use (``"*"``: all, including adapters loaded later).
Without a tenants file the server is open: no key is needed and every model may be used.
A request with a missing or unknown key gets 401; a known key naming a model its tenant may not
use gets 403, before anything reaches the engine.

Tokens per minute count, over a sliding 60 s window, each request's prompt tokens plus its
``max_tokens`` x n reserved at admission; when it ends the reservation becomes what it used.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import json
import math
import threading
import time
from pathlib import Path

from ..errors import RealmError

WINDOW_S = 60.0


@dataclasses.dataclass
class Tenant:
    name: str
    models: tuple[str, ...] = ("*",)
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None
    running: int = 0
    used: collections.deque = dataclasses.field(default_factory=collections.deque)  # [time, tokens] entries

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class Refused(Exception):
    """A request the tenant's limits refuse (429); ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Tenants:
    """Keys -> tenants, with their limits. ``open()`` = no keys, one unlimited tenant."""

    def __init__(self, tenants: dict[str, Tenant], keys: dict[str, str], admin_key: str | None = None,
                 adapters: dict[str, str] | None = None):
        self.tenants, self.keys, self.admin_key = tenants, keys, admin_key
        self.adapters = dict(adapters or {})
        self._lock = threading.Lock()

    @classmethod
    def open(cls) -> "Tenants":
        return cls({"default": Tenant("default")}, {})

    @property
    def needs_keys(self) -> bool:
        return bool(self.keys)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tenants":
        """Read and check a tenants file (a ``RealmError`` naming the file and the field)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RealmError(f"{path}: not a readable JSON tenants file: {e}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data, where: str = "tenants") -> "Tenants":
        if not isinstance(data, dict) or not isinstance(data.get("tenants"), dict) or not data["tenants"]:
            raise RealmError(f"{where}: expected an object with a non-empty 'tenants' object")
        unknown = sorted(set(data) - {"admin_key", "adapters", "tenants"})
        if unknown:
            raise RealmError(f"{where}: unknown key(s) {unknown}; expected admin_key, adapters, tenants")
        admin = data.get("admin_key")
        if admin is not None and (not isinstance(admin, str) or len(admin) < 8):
            raise RealmError(f"{where}: admin_key: expected a string of at least 8 characters")
        adapters = data.get("adapters", {})
        if not isinstance(adapters, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in adapters.items()):
            raise RealmError(f"{where}: adapters: expected an object {{name: PEFT directory}}")
        tenants, keys = {}, {}
        for name, t in data["tenants"].items():
            w = f"{where}: tenants[{name!r}]"
            if not isinstance(t, dict):
                raise RealmError(f"{w}: expected an object")
            extra = sorted(set(t) - {"api_keys", "models", "max_concurrent", "tokens_per_minute"})
            if extra:
                raise RealmError(f"{w}: unknown key(s) {extra}; expected api_keys, models, max_concurrent, "
                                 f"tokens_per_minute")
            ks, models = t.get("api_keys"), t.get("models", ["*"])
            if not isinstance(ks, list) or not ks or not all(isinstance(k, str) and len(k) >= 8 for k in ks):
                raise RealmError(f"{w}: api_keys: expected a non-empty list of strings of at least 8 characters")
            if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
                raise RealmError(f"{w}: models: expected a non-empty list of model names (or '*')")
            limits = {}
            for lim in ("max_concurrent", "tokens_per_minute"):
                v = t.get(lim)
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                    raise RealmError(f"{w}: {lim}: expected a positive integer, got {v!r}")
                limits[lim] = v
            for k in ks:
                if k in keys or k == admin:
                    raise RealmError(f"{w}: an API key is given twice (tenants must not share keys)")
                keys[k] = name
            tenants[name] = Tenant(name, tuple(models), **limits)
        return cls(tenants, keys, admin, adapters)

    # ------------------------------------------------------------------ checks
    def tenant_for(self, key: str | None) -> Tenant | None:
        """The tenant of a bearer key (None: unknown or missing, when keys are needed)."""
        if not self.needs_keys:
            return self.tenants["default"]
        if not key:
            return None
        for k, name in self.keys.items():  # constant-time comparisons
            if hmac.compare_digest(k.encode(), key.encode()):
                return self.tenants[name]
        return None

    def is_admin(self, key: str | None) -> bool:
        return bool(self.admin_key and key and hmac.compare_digest(self.admin_key.encode(), key.encode()))

    def admit(self, tenant: Tenant, tokens: int) -> list:
        """Count a request in, reserving ``tokens`` in the window (``Refused`` if over a limit);
        the window's entry, for ``settle``."""
        with self._lock:
            if tenant.max_concurrent is not None and tenant.running >= tenant.max_concurrent:
                raise Refused(f"tenant {tenant.name!r} has {tenant.running} requests running, its limit "
                              f"(max_concurrent={tenant.max_concurrent})", 1)
            if tenant.tokens_per_minute is not None:
                if tokens > tenant.tokens_per_minute:
                    raise Refused(f"this request may use {tokens} tokens, over tenant {tenant.name!r}'s "
                                  f"tokens_per_minute={tenant.tokens_per_minute}", int(WINDOW_S))
                t = time.monotonic()
                self._expire(tenant, t)
                used = sum(n for _, n in tenant.used)
                if used + tokens > tenant.tokens_per_minute:
                    free_at, need = t, used + tokens - tenant.tokens_per_minute
                    for when, n in tenant.used:  # the oldest entries expire first
                        need -= n
                        free_at = when + WINDOW_S
                        if need <= 0:
                            break
                    raise Refused(f"tenant {tenant.name!r} used {used} of its tokens_per_minute="
                                  f"{tenant.tokens_per_minute}", max(1, math.ceil(free_at - t)))
            tenant.running += 1
            entry = [time.monotonic(), tokens]
            if tenant.tokens_per_minute is not None:
                tenant.used.append(entry)
            return entry

    def settle(self, tenant: Tenant, entry: list, used: int) -> None:
        """A request ended: its entry becomes the tokens it used; it no longer runs."""
        with self._lock:
            entry[1] = used
            tenant.running -= 1

    @staticmethod
    def _expire(tenant: Tenant, t: float) -> None:
        while tenant.used and tenant.used[0][0] <= t - WINDOW_S:
            tenant.used.popleft()
