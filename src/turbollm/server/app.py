"""The OpenAI-compatible HTTP API over the serving engine (shaped like vLLM's OpenAI layer: a
thin router, request models that convert themselves, one function that runs choices).

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both
streaming as SSE ending in `data: [DONE]`, or whole), GET /metrics (Prometheus), GET / (the
web chat page). Every error is OpenAI-style JSON with a 4xx code: the server never dies of a
request, never truncates a prompt, and frees a slot as soon as its client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from turbollm.engine.sequence import Event
from turbollm.engine.engine import Engine
from turbollm.errors import ContextLengthError, TurbollmError
from turbollm.server import metrics
from turbollm.server.schemas import ChatCompletionRequest, CompletionRequest


@dataclass(frozen=True)
class ServerSettings:
    model_id: str  # what /v1/models lists and requests may name
    api_key: str | None = None
    thinking_default: bool = False  # Gemma 4: think unless the request turns it off


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


async def parse_body(request: Request, schema: type[BaseModel]):
    """The JSON body as `schema`, whatever the Content-Type (curl -d sends a form type, and
    llama-server reads it as JSON too); a 400 naming the first bad field otherwise."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON in the request body: {e}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "body"
        message = first.get("msg", "invalid value")
        if first.get("type") == "extra_forbidden":  # never dropped silently
            message = "this field is not supported by this server (docs/server.md lists the fields it takes)"
        raise ApiError(400, f"{where}: {message}" if where != "body" else f"the request body: {message}",
                       param=None if where == "body" else where) from None


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="turbollm", docs_url=None, redoc_url=None, openapi_url=None)
    model = engine.model
    registry = metrics.registry(engine)

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return error_response(exc.status, exc.message, exc.kind, exc.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if settings.api_key and request.url.path not in ("/", "/health"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {settings.api_key}" and request.headers.get("x-api-key") != settings.api_key:
                return error_response(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                      "authentication_error", "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots_idle": engine.scheduler.n_slots - engine.n_running, "slots_processing": engine.n_running}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "turbollm",
            "meta": {"n_ctx_train": model.config.n_ctx_train, "n_ctx_slot": engine.slot_ctx,
                     "n_vocab": model.config.n_vocab, "architecture": model.config.arch},
        }]}

    @app.get("/metrics")
    async def metrics_route():
        body, content_type = metrics.render(registry)
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("turbollm.server").joinpath("static/index.html").read_text(encoding="utf-8")

    def check_model(name: str | None) -> str:
        if name is not None and name != settings.model_id:
            raise ApiError(404, f"model {name!r} is not served here; this server runs {settings.model_id!r}",
                           "not_found_error", "model_not_found", "model")
        return settings.model_id

    def tokens_for(prompt_ids: list[int], asked: int | None) -> int:
        """max_tokens: what the client asked for, or all the room left in a slot (the
        engine refuses a request that does not fit when it is submitted)."""
        if asked is not None:
            return asked
        try:
            return engine.room(len(prompt_ids))
        except ContextLengthError as e:
            raise _context_error(e) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        name = check_model(body.model)
        try:
            thinking = body.thinking(settings.thinking_default)
            prompt = model.chat_prompt(body.template_messages(), enable_thinking=thinking)
        except (TurbollmError, ValueError) as e:
            raise ApiError(400, str(e), param="messages") from None
        prompt_ids = model.encode(prompt)
        max_tokens = tokens_for(prompt_ids, body.requested_max_tokens())
        run = _Run.start(engine, prompt_ids, [body.sampling(max_tokens, i) for i in range(body.n)], body.cache_prompt)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(run.chat_chunks(name, include_usage), run, request)
        return JSONResponse(await run.chat_response(name, request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        name = check_model(body.model)
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            if len(body.prompt) != 1:
                raise ApiError(400, "a list of several prompts is not supported: send one prompt per request", param="prompt")
            prompt_ids = model.encode(body.prompt[0])
        elif isinstance(body.prompt, list):
            prompt_ids = [int(t) for t in body.prompt]
            bad = [t for t in prompt_ids if not 0 <= t < model.tokenizer.n_vocab]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{model.tokenizer.n_vocab - 1})", param="prompt")
        else:
            prompt_ids = model.encode(body.prompt)
        max_tokens = tokens_for(prompt_ids, body.max_tokens)
        run = _Run.start(engine, prompt_ids, [body.sampling(max_tokens, i) for i in range(body.n)], body.cache_prompt)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(run.text_chunks(name, include_usage), run, request)
        return JSONResponse(await run.text_response(name, request))

    return app


def _context_error(e: ContextLengthError) -> ApiError:
    return ApiError(400, str(e), code="context_length_exceeded", param="messages" if e.what == "prompt" else "max_tokens")


def _sse(chunks: AsyncIterator[dict], run: "_Run", request: Request) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as e:  # the headers are gone: the error travels as an event, as OpenAI's does
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'code': e.code}})}\n\n"
        finally:  # the client went away (or we are done): free the slots at once
            run.cancel()
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Run:
    """The choices of one request: sequences in the engine, their events in one queue."""

    def __init__(self, engine: Engine, n_prompt: int):
        self.engine, self.n_prompt = engine, n_prompt
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.seqs = []
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())

    @classmethod
    def start(cls, engine: Engine, prompt_ids: list[int], params: list, reuse_prompt: bool = True) -> "_Run":
        run = cls(engine, len(prompt_ids))
        loop = asyncio.get_running_loop()
        try:
            for i, p in enumerate(params):
                push = lambda ev, i=i: loop.call_soon_threadsafe(run.queue.put_nowait, (i, ev))
                run.seqs.append(engine.submit(prompt_ids, p, push, reuse_prompt=reuse_prompt))
        except ContextLengthError as e:
            run.cancel()
            raise _context_error(e) from None
        except ValueError as e:
            run.cancel()
            raise ApiError(400, str(e)) from None
        return run

    def cancel(self) -> None:
        for seq in self.seqs:
            self.engine.cancel(seq)

    @property
    def usage(self) -> dict:
        n_out = sum(len(s.generated) for s in self.seqs)
        cached = self.seqs[0].stats.n_cached if self.seqs else 0
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n_out, "total_tokens": self.n_prompt + n_out,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """Every event of every choice until all have finished; cancels if the client leaves."""
        open_choices = len(self.seqs)
        while open_choices:
            try:
                i, ev = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    return
                continue
            if ev.finish_reason == "error":
                self.cancel()
                raise ApiError(500, f"generation failed: {ev.error}", "server_error")
            if ev.finish_reason is not None:
                open_choices -= 1
            yield i, ev

    async def _collect(self, request: Request) -> list[dict]:
        out = [{"content": [], "reasoning": [], "finish_reason": None} for _ in self.seqs]
        async for i, ev in self.events(request):
            if ev.finish_reason is not None:
                out[i]["finish_reason"] = ev.finish_reason
            elif ev.text:
                out[i][ev.channel].append(ev.text)
        return out

    async def chat_response(self, name: str, request: Request) -> dict:
        choices = []
        for i, c in enumerate(await self._collect(request)):
            message = {"role": "assistant", "content": "".join(c["content"])}
            if c["reasoning"]:
                message["reasoning_content"] = "".join(c["reasoning"])
            choices.append({"index": i, "message": message, "finish_reason": c["finish_reason"]})
        return {"id": f"chatcmpl-{self.id}", "object": "chat.completion", "created": self.created, "model": name,
                "choices": choices, "usage": self.usage}

    async def text_response(self, name: str, request: Request) -> dict:
        choices = [{"index": i, "text": "".join(c["reasoning"] + c["content"]), "finish_reason": c["finish_reason"],
                    "logprobs": None} for i, c in enumerate(await self._collect(request))]
        return {"id": f"cmpl-{self.id}", "object": "text_completion", "created": self.created, "model": name,
                "choices": choices, "usage": self.usage}

    async def chat_chunks(self, name: str, include_usage: bool) -> AsyncIterator[dict]:
        head = {"id": f"chatcmpl-{self.id}", "object": "chat.completion.chunk", "created": self.created, "model": name}
        for i in range(len(self.seqs)):
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        async for i, ev in self.events():
            if ev.finish_reason is not None:
                delta, reason = {}, ev.finish_reason
            else:
                delta, reason = {"reasoning_content" if ev.channel == "reasoning" else "content": ev.text}, None
            yield {**head, "choices": [{"index": i, "delta": delta, "finish_reason": reason}]}
        if include_usage:
            yield {**head, "choices": [], "usage": self.usage}

    async def text_chunks(self, name: str, include_usage: bool) -> AsyncIterator[dict]:
        head = {"id": f"cmpl-{self.id}", "object": "text_completion", "created": self.created, "model": name}
        async for i, ev in self.events():
            yield {**head, "choices": [{"index": i, "text": ev.text, "finish_reason": ev.finish_reason, "logprobs": None}]}
        if include_usage:
            yield {**head, "choices": [], "usage": self.usage}
