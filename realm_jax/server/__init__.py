"""``realm-jax serve``: an OpenAI-compatible, multi-tenant HTTP server over one ``Engine``.

    /v1/completions, /v1/chat/completions (streaming with server-sent events), /v1/models,
    /health, /metrics (Prometheus), /admin/adapters (load / unload LoRA adapters at run time)

One base model serves every tenant; a request picks its LoRA adapter by ``model`` name and all
requests share the engine's batch. The parts:

- ``protocol``: request bodies (pydantic), their mapping to the library's settings, the
  response and error objects;
- ``app``: ``Server`` (checks, submission, streaming, disconnects) and ``build_app`` (FastAPI);
- ``tenants``: API keys, per-tenant model lists and limits;
- ``metrics``: the Prometheus registry;
- ``admin``: the adapter endpoints; ``errors``: OpenAI's error JSON;
- ``run``: building the engine and running uvicorn with a graceful SIGTERM.

Needs the ``serve`` extra (fastapi, uvicorn, sse-starlette, prometheus-client).
"""

from .app import Server, build_app
from .errors import ApiError
from .tenants import Tenants

__all__ = ["ApiError", "Server", "Tenants", "build_app"]
