"""The ASGI app (FastAPI): the OpenAI endpoints over one ``Engine``, tenants, metrics, admin.

Every prompt of a request is one engine request with its ``n`` choices (an engine group: one
prefill, choice i drawn with seed + i; over the engine's slots, one engine request per choice),
so all tenants share one engine batch and the choices equal ``generate(..., n=n)`` on the prompt
alone. Log-probs come from the engine too (up to its ``max_logprobs`` alternatives), streamed
with their tokens, and so does ``best_of`` when the engine keeps log-probs (its choices are
known, and a stream of them comes, once every sample has ended). What the engine does not serve
(prompt log-probs for ``echo`` with ``logprobs``, more alternatives than ``max_logprobs``,
``best_of`` without them or over the engine's slots) is answered by ``generate`` itself on a
worker thread (one such call at a time); a stream of one then comes in a single piece.

Order of checks, all before any device work: the bearer key (401), the model name (404, or 403
for a model the tenant may not use), draining (503), the body (400), the queue bound and the
tenant's limits (429 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse

from ..engine import RequestGroup
from ..errors import RealmError
from ..generation import generate, prepare_prompts
from . import protocol as pr
from .metrics import Metrics
from .errors import ApiError, bearer as _bearer
from .tenants import Refused, Tenants
from .wakeup import LoopWaker


class Server:
    """What the app serves: a model, its engine (running in the background), the base model's
    ``name``, ``tenants``, a bound on queued requests (``max_queue``)."""

    def __init__(self, model, engine, *, name: str, tenants: Tenants | None = None, max_queue: int = 256):
        self.model, self.engine, self.name = model, engine, name
        self.tenants = tenants or Tenants.open()
        self.max_queue = max_queue
        self.metrics = Metrics(engine, self.tenants)
        self.draining = False
        self._direct = ThreadPoolExecutor(1, thread_name_prefix="realm-jax-logprobs")
        self._waker: LoopWaker | None = None

    # ------------------------------------------------------------------ checks
    def tenant(self, request: Request):
        key = _bearer(request)
        t = self.tenants.tenant_for(key)
        if t is None:
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)" if key else
                           "missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
        return t

    def adapter_for(self, model: str, tenant) -> str | None:
        """The engine adapter a model name means (None: the base model)."""
        if model != self.name and model not in self.engine.adapter_names:
            raise ApiError(404, f"the model {model!r} does not exist", "model", code="model_not_found")
        if not tenant.may_use(model):
            raise ApiError(403, f"this API key may not use the model {model!r}", "model")
        return None if model == self.name else model

    def visible_models(self, tenant) -> list[str]:
        return [m for m in (self.name,) + tuple(self.engine.adapter_names) if tenant.may_use(m)]

    def check_queue(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        if not self.engine.alive:
            raise ApiError(503, "the engine is not running")
        waiting = self.engine.queue_length
        if waiting >= self.max_queue:
            raise ApiError(429, f"the queue is full ({waiting} requests waiting, max_queue={self.max_queue})",
                           retry_after=1)

    # ------------------------------------------------------------------ generation
    async def generate(self, request: Request, body, endpoint: str):
        t0 = time.perf_counter()
        tenant = self.tenant(request)
        adapter = self.adapter_for(body.model, tenant)
        self.check_queue()
        job = self._job(body, endpoint, adapter)
        self.check_queue()
        try:
            entry = self.tenants.admit(tenant, job.budget)
        except Refused as e:
            raise ApiError(429, str(e), retry_after=e.retry_after) from None
        self.metrics.in_progress.inc()
        done = _Once(lambda used: (self.tenants.settle(tenant, entry, used), self.metrics.in_progress.dec()))
        try:
            if job.direct:
                self.metrics.direct.inc()
                result = await asyncio.get_running_loop().run_in_executor(self._direct, job.run_direct, self)
                choices = job.direct_choices(self, result)
                if body.stream:
                    return self._sse(job, _replay(choices), t0, done)
                return self._respond(job, choices, t0, done)
            handles, ranked = job.submit(self.engine)
        except BaseException:
            done(0)
            raise
        if body.stream and ranked is None:
            return self._sse(job, self._follow(job, handles), t0, done)
        try:
            choices = await self._collect(job, handles, request, ranked)
        except BaseException:
            done(0)
            raise
        if body.stream:  # best_of: the choices are known once every sample has ended
            return self._sse(job, _replay(choices), t0, done)
        return self._respond(job, choices, t0, done)

    def _job(self, body, endpoint: str, adapter):
        try:
            return Job(self, body, endpoint, adapter)
        except RealmError as e:
            raise ApiError(400, str(e)) from None

    def _respond(self, job, choices: list[dict], t0: float, done) -> JSONResponse:
        completion = sum(c.pop("_tokens") for c in choices)
        first = [c.pop("_first") for c in choices]
        self._count(job, completion, t0, min((f for f in first if f is not None), default=None))
        done(job.prompt_tokens + completion)
        body = job.envelope(choices)
        body["usage"] = pr.usage(job.prompt_tokens, completion)
        return JSONResponse(body)

    def _count(self, job, completion: int, t0: float, first: float | None) -> None:
        m = self.metrics
        m.requests.labels(job.endpoint, "200").inc()
        m.prompt_tokens.inc(job.prompt_tokens)
        m.generation_tokens.inc(completion)
        m.latency.observe(time.perf_counter() - t0)
        if first is not None:
            m.ttft.observe(max(0.0, first - t0))

    async def _collect(self, job, handles, request: Request, ranked=None) -> list[dict]:
        """Wait for every handle; cancel them all if the client goes away. ``ranked``: the
        engine groups of a ``best_of`` request, whose ``results()`` are its choices."""
        out: list[Any] = [None] * len(handles)
        parts: list[list] = [[] for _ in handles]
        following = self._follow_raw(handles)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                step = asyncio.ensure_future(following.__anext__())
                await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # the client went away
                    step.cancel()
                    self.metrics.cancelled.inc()
                    raise ApiError(499, "client disconnected")
                try:
                    i, tokens, text, finish, lps = step.result()
                except StopAsyncIteration:
                    break
                parts[i].append((tokens, text, lps or []))
                if finish is not None:
                    out[i] = finish
        finally:
            watcher.cancel()
            for h in handles:
                h.cancel()
            await following.aclose()
        if ranked is not None:
            return job.ranked_choices(ranked)
        return [job.choice(i, sum((p[0] for p in parts[i]), []), "".join(p[1] or "" for p in parts[i]), out[i],
                           handles[i].first_token_at,
                           logprob_entries=sum((p[2] for p in parts[i]), []) if job.logprobs is not None else None)
                for i in range(len(handles))]

    def _waker_for(self, loop) -> LoopWaker:
        """The serving loop's waker (made on first use, and again if the app moves to another loop)."""
        if self._waker is None or self._waker.loop is not loop:
            self._waker = LoopWaker(loop)
        return self._waker

    async def _follow_raw(self, handles):
        """Yield (index, new tokens, new text, finish, their log-probs) from the handles as the
        engine delivers."""
        waker, wake = self._waker_for(asyncio.get_running_loop()), asyncio.Event()

        def ping():
            waker.wake(wake)

        cursors = [h.cursor() for h in handles]
        for h in handles:
            h.on_update(ping)
        left = set(range(len(handles)))
        while left:
            await wake.wait()
            wake.clear()
            for i in sorted(left):
                tokens, text, finish, lps = cursors[i].poll()
                if tokens or text or finish is not None:
                    yield i, tokens, text, finish, lps
                if finish is not None:
                    left.discard(i)

    async def _follow(self, job, handles):
        """The stream events of engine handles (cancelled when the stream ends early)."""
        following = self._follow_raw(handles)
        try:
            async for i, tokens, text, finish, lps in following:
                yield i, tokens, text, finish, handles[i].first_token_at, job.stream_logprobs(i, lps)
        finally:
            for h in handles:
                h.cancel()
            await following.aclose()

    def _sse(self, job, events, t0: float, done) -> EventSourceResponse:
        server = self

        async def stream():
            completion, first, finished = 0, None, False
            try:
                for i in range(job.rows):
                    head = job.stream_head(i)
                    if head is not None:
                        yield {"data": json.dumps(job.envelope([head], chunk=True))}
                async for i, tokens, text, finish, first_at, logprobs in events:
                    completion += len(tokens)
                    if first_at is not None:
                        first = first_at if first is None else min(first, first_at)
                    for c in job.stream_choices(i, tokens, text, finish, logprobs):
                        yield {"data": json.dumps(job.envelope([c], chunk=True))}
                if job.include_usage:
                    tail = job.envelope([], chunk=True)
                    tail["usage"] = pr.usage(job.prompt_tokens, completion)
                    yield {"data": json.dumps(tail)}
                yield {"data": "[DONE]"}
                finished = True
                server._count(job, completion, t0, first)
            finally:
                if not finished:
                    server.metrics.cancelled.inc()
                    server.metrics.requests.labels(job.endpoint, "499").inc()
                done(job.prompt_tokens + completion)

        return EventSourceResponse(stream(), ping=15)


class Job:
    """One HTTP generation request, checked: its prompts' ids, settings, and output formats."""

    def __init__(self, server: Server, body, endpoint: str, adapter):
        self.body, self.endpoint, self.adapter, self.model_name = body, endpoint, adapter, body.model
        self.chat = endpoint == "chat"
        model = server.model
        self.tok = getattr(model, "tokenizer", None)
        self.settings = pr.sampling_settings(body)
        self.n = body.n
        if self.chat:
            prompts = [pr.chat_messages(body)]
            self.ids = prepare_prompts(model, prompts, chat=True)
            constraint = pr.chat_constraint(body)
            if constraint is not None:
                self.settings["constraint"] = constraint
            self.logprobs = body.top_logprobs or 0 if body.logprobs else None
            if body.top_logprobs is not None and not body.logprobs:
                raise RealmError("top_logprobs: needs logprobs=true")
            self.echo, self.best_of = False, None
            limit = body.max_completion_tokens or body.max_tokens
            self.max_tokens = limit if limit is not None else server.engine.max_seq_len - len(self.ids[0])
            self.prompt_texts = [None]
        else:
            if body.suffix:
                raise RealmError("suffix: not supported")
            prompts = pr.completion_prompts(body)
            self.ids = prepare_prompts(model, prompts)
            self.prompt_texts = [p if isinstance(p, str) else (self.tok.decode(p) if self.tok else "") for p in prompts]
            self.logprobs, self.echo, self.best_of = body.logprobs, body.echo, body.best_of
            self.max_tokens = body.max_tokens
            if self.max_tokens == 0 and not self.echo:
                raise RealmError("max_tokens: 0 is only allowed with echo=true (the prompt's log-probs)")
            if self.best_of is not None and self.best_of < self.n:
                raise RealmError(f"best_of: expected >= n={self.n}, got {self.best_of}")
        if self.max_tokens < 0 or any(len(i) + max(self.max_tokens, 1) > server.engine.max_seq_len for i in self.ids):
            longest = max(map(len, self.ids))
            raise RealmError(f"the prompt ({longest} tokens) plus max_tokens={self.max_tokens} is over the server's "
                             f"context of {server.engine.max_seq_len} tokens")
        engine = server.engine
        served = engine.max_logprobs
        # best_of through the engine: its samples ranked by their log-probs, all in slots at once
        self.ranked = self.best_of is not None and served is not None and self.best_of <= engine.max_slots
        self.direct = ((self.logprobs is not None and (served is None or self.logprobs > served))
                       or (self.echo and self.logprobs is not None)
                       or (self.best_of not in (None, self.n) and not self.ranked))
        self.rows = len(self.ids) * self.n
        self.prompt_tokens = sum(map(len, self.ids))
        self.budget = self.prompt_tokens + max(self.max_tokens, 1) * self.rows
        opts = body.stream_options or {}
        self.include_usage = bool(body.stream and opts.get("include_usage"))
        self.id = pr.new_id("chatcmpl" if self.chat else "cmpl")
        self.created = pr.now()
        self._offsets = [0] * self.rows  # streamed completions: text_offset of the next log-prob

    # ------------------------------------------------------------------ running
    def submit(self, engine) -> tuple[list, list | None]:
        """Queue the engine requests, all or none: per prompt one group of its ``n`` choices (one
        prefill; with ``best_of``, that many samples), or with ``n`` over the engine's slots one
        request per choice (choice j with seed + j, as the group draws). Returns the handles of
        the choices, prompt-major, and with ``best_of`` the groups (None otherwise)."""
        handles, groups = [], []
        st = dict(self.settings)
        if self.logprobs is not None:
            st["logprobs"] = self.logprobs
        if self.ranked:
            st["best_of"] = self.best_of
        together = self.ranked or self.n <= engine.max_slots
        try:
            for ids in self.ids:
                if together:
                    out = engine.submit(ids, self.max_tokens, adapter=self.adapter, n=self.n, **st)
                    if isinstance(out, RequestGroup):
                        groups.append(out)
                    handles += list(out) if isinstance(out, RequestGroup) else [out]
                    continue
                for j in range(self.n):
                    row = dict(st, seed=(st["seed"] + j) % 2**32)
                    handles.append(engine.submit(ids, self.max_tokens, adapter=self.adapter, **row))
        except RealmError as e:
            for h in handles:
                h.cancel()
            raise ApiError(400, str(e)) from None
        return handles, groups if self.ranked else None

    def ranked_choices(self, groups: list) -> list[dict]:
        """The choices of a ``best_of`` request from its ended engine groups (each prompt's ``n``
        best samples, best first)."""
        out = []
        for g in groups:
            first = min((h.first_token_at for h in g if h.first_token_at is not None), default=None)
            for r in g.results():
                out.append(self.choice(len(out), r.tokens, r.text, r.finish_reason, first,
                                       logprob_entries=r.logprobs))
        return out

    def run_direct(self, server: Server):
        """``generate`` with log-probs (worker thread)."""
        ad = None
        if self.adapter is not None:
            slots = server.engine._adapters
            ad = slots.weights[slots.index(self.adapter)]
        st = dict(self.settings, n=self.n)
        if self.best_of is not None:
            st["best_of"] = self.best_of
        if self.logprobs is not None:
            st["logprobs"] = self.logprobs
        if self.echo:
            st["prompt_logprobs"] = self.logprobs or 0
        try:
            return generate(server.model, self.ids, max(self.max_tokens, 1), adapters=ad,
                            max_len=server.engine.max_seq_len, **st)
        except RealmError as e:
            raise ApiError(400, str(e)) from None

    def direct_choices(self, server: Server, res) -> list[dict]:
        out = []
        for r in range(len(res)):
            p = r // self.n
            tokens = res.tokens[r] if self.max_tokens > 0 else []
            text = res.texts[r] if self.max_tokens > 0 else ""
            lps = res.logprobs[r][:len(tokens)] if res.logprobs is not None else None
            c = self.choice(r, tokens, text, res.finish_reasons[r] if self.max_tokens > 0 else "length", None,
                            logprob_entries=lps, prompt_entries=res.prompt_logprobs[r] if self.echo else None,
                            prompt=p)
            out.append(c)
        return out

    # ------------------------------------------------------------------ formats
    def envelope(self, choices: list[dict], chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name, "choices": choices}

    def choice(self, i: int, tokens: list[int], text: str, finish: str | None, first_at, *, logprob_entries=None,
               prompt_entries=None, prompt: int | None = None) -> dict:
        finish = "stop" if finish == "cancelled" else finish
        p = i // self.n if prompt is None else prompt
        lp = None
        if self.chat:
            if logprob_entries is not None:
                lp = pr.chat_logprobs(self.tok, logprob_entries)
            c = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": finish}
        else:
            head = ""
            entries = list(logprob_entries or [])
            if self.echo:
                head = self.prompt_texts[p]
                first = [(self.ids[p][0], None)]
                entries = first + list(prompt_entries[1:]) + entries
            if self.logprobs is not None:
                lp = pr.completion_logprobs(self.tok, entries)
            c = {"index": i, "text": head + text, "logprobs": lp, "finish_reason": finish}
        c["_tokens"], c["_first"] = len(tokens), first_at
        return c

    def stream_logprobs(self, i: int, entries) -> dict | None:
        """A stream chunk's ``logprobs`` (None without); completions' offsets run on across chunks."""
        if self.logprobs is None or entries is None:
            return None
        if self.chat:
            return pr.chat_logprobs(self.tok, entries)
        out = pr.completion_logprobs(self.tok, entries, self._offsets[i])
        self._offsets[i] += sum(len(t) for t in out["tokens"])
        return out

    def stream_head(self, i: int) -> dict | None:
        if not self.chat:
            return None
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def stream_choices(self, i: int, tokens: list[int], text: str | None, finish: str | None,
                       logprobs=None) -> list[dict]:
        finish = "stop" if finish == "cancelled" else finish
        if self.chat:
            return [{"index": i, "delta": {"content": text or ""} if text or finish is None else {},
                     "logprobs": logprobs, "finish_reason": finish}]
        return [{"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}]


async def _replay(choices: list[dict]):
    """A finished (direct) result as stream events: one per choice."""
    for i, c in enumerate(choices):
        text = c["message"]["content"] if "message" in c else c["text"]
        yield i, [0] * c["_tokens"], text, c["finish_reason"], c["_first"], c["logprobs"]


class _Once:
    """Call ``fn(used)`` once (settling a request's tenant accounting)."""

    def __init__(self, fn):
        self.fn, self.called = fn, False

    def __call__(self, used: int) -> None:
        if not self.called:
            self.called = True
            self.fn(used)


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------ the app
def build_app(server: Server, *, lifespan=None) -> FastAPI:
    app = FastAPI(title="realm_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        _count_error(server, request, e.status)
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def bad_body(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
        _count_error(server, request, 400)
        return ApiError(400, f"{where}: {first.get('msg', 'invalid request body')}", where).response()

    @app.exception_handler(RealmError)
    async def realm_error(request, e: RealmError):
        _count_error(server, request, 400)
        return ApiError(400, str(e)).response()

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        _count_error(server, request, 500)
        return ApiError(500, f"internal error: {e}").response()

    @app.get("/health")
    async def health():
        if server.draining or not server.engine.alive:
            why = "shutting down" if server.draining else "the engine is not running"
            return JSONResponse({"status": "unavailable", "reason": why}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        tenant = server.tenant(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "realm_jax",
                                            "root": server.name} for m in server.visible_models(tenant)]}

    @app.post("/v1/completions")
    async def completions(request: Request, body: pr.CompletionRequest):
        return await server.generate(request, body, "completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: pr.ChatRequest):
        return await server.generate(request, body, "chat")

    from .admin import add_admin_routes

    add_admin_routes(app, server)
    return app


def _count_error(server: Server, request: Request, status: int) -> None:
    path = request.url.path
    endpoint = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(path)
    if endpoint is not None:
        server.metrics.requests.labels(endpoint, str(status)).inc()
