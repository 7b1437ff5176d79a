"""Build the engine and the app, and run uvicorn. SIGTERM (and Ctrl-C) drain: new requests get
503, running ones finish within ``shutdown_timeout`` seconds (then they are cancelled), the
engine is closed, and the process exits 0."""

from __future__ import annotations

import contextlib
import signal

from ..errors import RealmError


def serve(model, *, name: str, host: str = "127.0.0.1", port: int = 8000, tenants=None, adapters=None,
          engine_options: dict | None = None, max_queue: int = 256, shutdown_timeout: float = 30.0,
          log_level: str = "info") -> int:
    """Serve ``model`` until a signal; the exit status. adapters: {name: PEFT dir} loaded at start."""
    import uvicorn

    from ..engine import Engine
    from ..lora_peft import load_peft
    from .app import Server, build_app
    from .tenants import Tenants

    tenants = tenants or Tenants.open()
    dirs = dict(tenants.adapters)
    dirs.update(adapters or {})
    if name in dirs:
        raise RealmError(f"adapter name {name!r} is the base model's name; pick another")
    loaded = {n: load_peft(d, model.config, dtype=model.dtype) for n, d in dirs.items()}
    opts = dict(engine_options or {})
    if loaded or opts.get("adapter_slots"):
        opts["adapters"] = loaded or None
    engine = Engine(model, **opts)
    engine.warmup()
    server = Server(model, engine, name=name, tenants=tenants, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        server.draining = True
        engine.close("the server shut down")

    app = build_app(server, lifespan=lifespan)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout)
    uv = _Uvicorn(config, server)
    uv.run()
    return 0


class _Uvicorn:
    """uvicorn's server, with a signal marking the app as draining and ending in exit status 0
    (uvicorn itself re-raises the signal after its graceful shutdown)."""

    def __new__(cls, config, server):
        import uvicorn

        class Draining(uvicorn.Server):
            def handle_exit(self, sig, frame):
                server.draining = True
                super().handle_exit(sig, frame)
                if sig == signal.SIGTERM and sig in self._captured_signals:
                    self._captured_signals.remove(sig)

        return Draining(config)
