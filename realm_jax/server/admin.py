"""Admin endpoints (need the tenants file's ``admin_key`` as the bearer key): load and unload
LoRA adapters at run time, without restarting and without recompiling (``Engine.load_adapter``).

    GET    /admin/adapters          the loaded adapters
    POST   /admin/adapters          {"name": NAME, "path": PEFT_DIR}   (a PEFT directory on the server)
    DELETE /admin/adapters/{name}   refused (409) while a request uses it
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RealmError
from .errors import ApiError, bearer as _bearer


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1)


def add_admin_routes(app: FastAPI, server) -> None:

    def check(request: Request) -> None:
        if not server.tenants.admin_key:
            raise ApiError(403, "the admin endpoints are off (no admin_key in the tenants file)")
        if not server.tenants.is_admin(_bearer(request)):
            raise ApiError(401, "the admin endpoints need the admin key (Authorization: Bearer KEY)")

    @app.get("/admin/adapters")
    async def list_adapters(request: Request):
        check(request)
        return {"adapters": list(server.engine.adapter_names)}

    @app.post("/admin/adapters")
    async def load(request: Request, body: LoadAdapter):
        check(request)
        if body.name == server.name:
            raise ApiError(400, f"name: {body.name!r} is the base model's name", "name")
        from ..lora_peft import load_peft

        def work():
            ad = load_peft(body.path, server.model.config, dtype=server.model.dtype)
            return server.engine.load_adapter(body.name, ad)

        try:
            slot = await asyncio.get_running_loop().run_in_executor(None, work)
        except RealmError as e:
            raise ApiError(400, str(e)) from None
        return {"name": body.name, "slot": slot, "adapters": list(server.engine.adapter_names)}

    @app.delete("/admin/adapters/{name}")
    async def unload(request: Request, name: str):
        check(request)
        if name not in server.engine.adapter_names:
            raise ApiError(404, f"no adapter named {name!r} is loaded", "name")
        try:
            await asyncio.get_running_loop().run_in_executor(None, server.engine.unload_adapter, name)
        except RealmError as e:
            raise ApiError(409 if "in use" in str(e) else 400, str(e)) from None
        return {"name": name, "adapters": list(server.engine.adapter_names)}
