"""The OpenAI-compatible HTTP API over the serving engine (shaped like vLLM's OpenAI layer: a
thin router, request models that convert themselves, one function that runs choices), with
llama-server's own endpoints beside it.

Routes: GET /health and /v1/health, GET /v1/models, POST /v1/chat/completions, POST
/v1/completions (both streaming as SSE ending in `data: [DONE]`, or whole), GET /metrics
(Prometheus), GET / (the web chat page); llama-server's POST /completion and /completions
(its native body and answer; streamed without `[DONE]`, as llama-server's), POST /tokenize,
POST /detokenize, POST /apply-template (the chat route's prompt, not run), GET /props (POST
/props is a 501: nothing can be changed at run time), GET /slots (read-only). Every error is
OpenAI-style JSON, with a 4xx code for a bad request and 501 for a feature not offered: the
server never dies of a request, never truncates a prompt, and frees a slot as soon as its
client disconnects. CORS headers only for the origins `--cors-origins` names (none by default).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from importlib import metadata, resources

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from turbollm.engine.sequence import Event
from turbollm.engine.engine import Engine
from turbollm.errors import ContextLengthError, TurbollmError
from turbollm.server import metrics
from turbollm.server.logprobs import LogprobFormatter
from turbollm.engine.grammar import Constraint
from turbollm.server.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                     NativeCompletionRequest, TokenizeRequest, default_sampling,
                                     generation_settings)

PUBLIC_PATHS = ("/", "/health", "/v1/health")  # open without the API key, as llama-server's health routes
# --cors-origins localhost: reflect the Origin only when it is this machine (llama-server's special value)
LOCALHOST_ORIGIN = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]+)?"


@dataclass(frozen=True)
class ServerSettings:
    model_id: str  # what /v1/models lists and requests may name
    api_key: str | None = None
    thinking_default: bool = False  # Gemma 4: think unless the request turns it off
    # browser origins allowed to call the API (CORS); "*" any, "localhost" this machine's; () none
    cors_origins: tuple[str, ...] = ()


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


MAX_BODY_BYTES = 16 << 20  # a request body (413 above): 16 MiB is ~4M tokens of text, far past any context


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body, refused with a 413 as soon as it passes `limit` bytes (declared or
    sent): a huge body never reaches the parser or memory whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, the most this server takes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, schema: type[BaseModel]):
    """The JSON body as `schema`, whatever the Content-Type (curl -d sends a form type, and
    llama-server reads it as JSON too); a 400 naming the first bad field otherwise. The JSON
    is parsed by pydantic's own parser: invalid UTF-8, lone surrogates, NaN/Infinity in a
    number field and nesting past its recursion limit are 400s, never a 500."""
    raw = await read_body(request)
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            raise ApiError(400, f"malformed JSON in the request body: {first.get('msg', '')}") from None
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
        if settings.api_key and request.url.path not in PUBLIC_PATHS:
            given = request.headers.get("authorization", "")
            if given != f"Bearer {settings.api_key}" and request.headers.get("x-api-key") != settings.api_key:
                return error_response(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                      "authentication_error", "invalid_api_key")
        return await call_next(request)

    if settings.cors_origins:  # added last, so outermost: preflights are answered before the key check
        localhost = "localhost" in settings.cors_origins
        app.add_middleware(CORSMiddleware, allow_origins=[o for o in settings.cors_origins if o != "localhost"],
                           allow_origin_regex=LOCALHOST_ORIGIN if localhost else None,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])

    @app.get("/health")
    @app.get("/v1/health")
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

    def chat_prompt(body: ChatCompletionRequest) -> str:
        """The prompt text a chat request is run on (and what /apply-template answers): the
        messages, and the tools in the model's tool format (text/tool_calls.py)."""
        tools = body.tool_list()
        fmt = model.tool_format()
        try:
            thinking = body.thinking(settings.thinking_default)
            messages = fmt.messages(body.template_messages(), tools)
            return model.chat_prompt(messages, enable_thinking=thinking, tools=fmt.template_tools(tools))
        except (TurbollmError, ValueError) as e:
            raise ApiError(400, str(e), param="messages") from None

    def tool_constraint(body: ChatCompletionRequest):
        """The grammar a forced call (tool_choice "required" or a named function) decodes under."""
        tools, choice = body.tool_list(), body.tool_mode()
        if not tools or choice.mode not in ("required", "function"):
            return None
        if body.constraint() is not None:
            raise ApiError(400, "tool_choice: a forced tool call is decoded under its own grammar; it cannot be "
                                "combined with response_format, json_schema or grammar", param="tool_choice")
        kind, spec = model.tool_format().constraint(tools, choice)
        return Constraint.gbnf(spec) if kind == "gbnf" else Constraint.json_schema(spec)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        name = check_model(body.model)
        prompt_ids = await asyncio.to_thread(lambda: model.encode(chat_prompt(body)))  # off the event loop
        max_tokens = tokens_for(prompt_ids, body.requested_max_tokens())
        params = [body.sampling(max_tokens, i) for i in range(body.n)]
        forced = tool_constraint(body)
        if forced is not None:
            params = [replace(p, constraint=forced) for p in params]
        run = await _Run.start(engine, prompt_ids, params, "chatcmpl", body.cache_prompt,
                         tools=model.tool_format() if body.tool_list() else None)
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
            prompt_ids = await asyncio.to_thread(model.encode, body.prompt[0])
        elif isinstance(body.prompt, list):
            prompt_ids = check_ids([int(t) for t in body.prompt], "prompt")
        else:
            prompt_ids = await asyncio.to_thread(model.encode, body.prompt)
        max_tokens = tokens_for(prompt_ids, body.max_tokens)
        run = await _Run.start(engine, prompt_ids, [body.sampling(max_tokens, i) for i in range(body.n)], "cmpl",
                         body.cache_prompt)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(run.text_chunks(name, include_usage), run, request)
        return JSONResponse(await run.text_response(name, request))

    # ---- llama-server's own endpoints --------------------------------------------------------

    tok = model.tokenizer

    def mixed_tokens(content: str | list, add_special: bool, parse_special: bool, field: str) -> list[int]:
        """llama-server's tokenize_mixed: a string, or strings and token ids in a list (special
        tokens are added only when the list starts with a string); ids outside the vocabulary
        are a 400 naming `field`."""
        if isinstance(content, str):
            return tok.encode(content, add_special=add_special, parse_special=parse_special)
        ids: list[int] = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                ids += tok.encode(part, add_special=add_special and i == 0, parse_special=parse_special)
            else:
                ids.append(check_ids([part], field)[0])
        return ids

    def check_ids(ids: list[int], field: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < tok.n_vocab]
        if bad:
            raise ApiError(400, f"{field}: token id {bad[0]} is outside the vocabulary (0..{tok.n_vocab - 1})", param=field)
        return ids

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse_body(request, TokenizeRequest)
        ids = await asyncio.to_thread(mixed_tokens, body.content, body.add_special, body.parse_special, "content")
        if not body.with_pieces:
            return {"tokens": ids}
        return {"tokens": [{"id": t, "piece": _piece(tok.token_bytes(t, special=True))} for t in ids]}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse_body(request, DetokenizeRequest)
        return {"content": tok.decode(check_ids(body.tokens, "tokens"), special=True)}

    @app.post("/apply-template")
    async def apply_template(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        return {"prompt": await asyncio.to_thread(chat_prompt, body)}

    @app.get("/props")
    async def props():
        def special(token_id):
            return tok.token_text(token_id) if token_id is not None else ""
        template = model.gguf.get("tokenizer.chat_template")
        return {
            "default_generation_settings": {"n_ctx": engine.slot_ctx, "params": generation_settings(default_sampling())},
            "total_slots": engine.scheduler.n_slots,
            "model_alias": settings.model_id,
            "model_path": str(model.gguf.path),
            "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": True, "endpoint_props": False, "endpoint_metrics": True,
            # the GGUF's Jinja template; without one the built-in turn format (Python) is named instead
            "chat_template": template or "",
            "chat_template_builtin": None if template else ("gemma4" if model.config.arch == "gemma4" else "gemma"),
            "bos_token": special(tok.bos_id), "eos_token": special(tok.eos_id),
            "build_info": f"turbollm {_version()}",
            "is_sleeping": False,
        }

    @app.post("/props")
    async def set_props():
        raise ApiError(501, "this server does not support changing global properties: "
                            "its settings are the flags it was started with", "not_supported_error")

    @app.get("/slots")
    async def slots(request: Request):
        by_slot = {seq.slot: seq for seq in list(engine.scheduler.running) if not seq.is_finished}
        if request.query_params.get("fail_on_no_slot") and len(by_slot) >= engine.scheduler.n_slots:
            raise ApiError(503, "no slot available", "unavailable_error")
        return [_slot_state(i, by_slot.get(i), engine) for i in range(engine.scheduler.n_slots)]

    @app.post("/completion")
    @app.post("/completions")
    async def native_completion(request: Request):
        body = await parse_body(request, NativeCompletionRequest)
        name = check_model(body.model)
        if body.n != 1:
            raise ApiError(400, "n: /completion gives one answer; use /v1/completions for several", param="n")
        if isinstance(body.prompt, list) and len(body.prompt) > 1 and all(isinstance(p, str) for p in body.prompt):
            raise ApiError(400, "a list of several prompts is not supported: send one prompt per request", param="prompt")
        prompt_ids = await asyncio.to_thread(mixed_tokens, body.prompt, True, True, "prompt")
        max_tokens = tokens_for(prompt_ids, body.requested_max_tokens())
        params = body.sampling(max_tokens)
        run = await _Run.start(engine, prompt_ids, [params], "cmpl", body.cache_prompt)
        final = _NativeFinal(name, body, params, tok)
        if body.stream:
            return _sse(run.native_chunks(final), run, request, done=False)
        return JSONResponse(await run.native_response(final, request))

    return app


def _piece(raw: bytes) -> str | list[int]:
    """A token's piece as llama-server gives it: the text when it is valid UTF-8, else its bytes."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _version() -> str:
    try:
        return metadata.version("turbollm")
    except metadata.PackageNotFoundError:
        return "unknown"


def _slot_state(i: int, seq, engine: Engine) -> dict:
    """One slot in llama-server's /slots shape, from what the engine holds now (read without a
    lock: a snapshot that may be a step old)."""
    out = {"id": i, "n_ctx": engine.slot_ctx, "speculative": engine.model.spec.kind != "none",
           "is_processing": seq is not None}
    if seq is None:
        return out
    cache, n_decoded = seq.cache, len(seq.generated)
    out.update({
        "id_task": seq.seq_id, "id_request": seq.request_id, "state": seq.state.value,
        "n_prompt_tokens": seq.n_prompt, "n_prompt_tokens_processed": seq.n_prefilled,
        "n_past": cache.n_tokens if cache is not None else 0,
        "params": generation_settings(seq.params, seq.params.max_tokens),
        "next_token": [{"has_next_token": not seq.is_finished, "n_remain": seq.max_new - n_decoded, "n_decoded": n_decoded}],
    })
    return out


def _context_error(e: ContextLengthError) -> ApiError:
    return ApiError(400, str(e), code="context_length_exceeded", param="messages" if e.what == "prompt" else "max_tokens")


def _sse(chunks: AsyncIterator[dict], run: "_Run", request: Request, done: bool = True) -> StreamingResponse:
    """`done`: end with `data: [DONE]` (OpenAI's streams; llama-server's native one ends without)."""
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            if done:
                yield "data: [DONE]\n\n"
        except ApiError as e:  # the headers are gone: the error travels as an event, as OpenAI's does
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'code': e.code}})}\n\n"
        finally:  # the client went away (or we are done): free the slots at once
            run.cancel()
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Run:
    """The choices of one request: sequences in the engine, their events in one queue."""

    def __init__(self, engine: Engine, n_prompt: int, kind: str, logprobs: bool = False, tools=None):
        self.engine, self.n_prompt = engine, n_prompt
        self.tools = tools  # the model's tool format when the request offers tools: answers are parsed for calls
        self.logprobs = LogprobFormatter(engine.tokenizer) if logprobs else None  # when the request asks
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.seqs = []
        self.id = f"{kind}-{uuid.uuid4().hex[:24]}"  # the response's id ("chatcmpl-...", "cmpl-...")
        self.created = int(time.time())

    @classmethod
    async def start(cls, engine: Engine, prompt_ids: list[int], params: list, kind: str, reuse_prompt: bool = True,
                    tools=None) -> "_Run":
        """Submit the choices, off the event loop (a constrained one builds its grammar, and the
        first one the vocabulary's view for it: ~2 s on Gemma's 262K tokens)."""
        run = cls(engine, len(prompt_ids), kind, logprobs=params[0].logprobs is not None, tools=tools)
        loop = asyncio.get_running_loop()
        try:
            for i, p in enumerate(params):
                push = lambda ev, i=i: loop.call_soon_threadsafe(run.queue.put_nowait, (i, ev))
                seq = await asyncio.to_thread(engine.submit, prompt_ids, p, push, reuse_prompt=reuse_prompt)
                seq.request_id = run.id  # what /slots shows of it
                run.seqs.append(seq)
        except ContextLengthError as e:
            run.cancel()
            raise _context_error(e) from None
        except ValueError as e:
            run.cancel()
            raise ApiError(400, str(e)) from None
        except asyncio.CancelledError:  # the client went away while it was being submitted
            run.cancel()
            raise
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
        out = [{"content": [], "reasoning": [], "finish_reason": None, "logprobs": []} for _ in self.seqs]
        async for i, ev in self.events(request):
            out[i]["logprobs"] += ev.logprobs
            if ev.finish_reason is not None:
                out[i]["finish_reason"] = ev.finish_reason
            elif ev.text:
                out[i][ev.channel].append(ev.text)
        return out

    async def chat_response(self, name: str, request: Request) -> dict:
        choices = []
        for i, c in enumerate(await self._collect(request)):
            message = {"role": "assistant", "content": "".join(c["content"])}
            reason = c["finish_reason"]
            if self.tools is not None:
                content, calls = self.tools.parse(message["content"])
                if calls:
                    message = {"role": "assistant", "content": content or None,
                               "tool_calls": [call.openai() for call in calls]}
                    reason = "tool_calls"
            if c["reasoning"]:
                message["reasoning_content"] = "".join(c["reasoning"])
            logprobs = None if self.logprobs is None else {"content": self.logprobs.chat(c["logprobs"]), "refusal": None}
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": name,
                "choices": choices, "usage": self.usage}

    async def text_response(self, name: str, request: Request) -> dict:
        choices = [{"index": i, "text": "".join(c["reasoning"] + c["content"]), "finish_reason": c["finish_reason"],
                    "logprobs": None if self.logprobs is None else self.logprobs.completion(c["logprobs"], 0)}
                   for i, c in enumerate(await self._collect(request))]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": name,
                "choices": choices, "usage": self.usage}

    async def chat_chunks(self, name: str, include_usage: bool) -> AsyncIterator[dict]:
        head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": name}
        for i in range(len(self.seqs)):
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        held = [_HeldCalls(self.tools) for _ in self.seqs] if self.tools is not None else None
        async for i, ev in self.events():
            if ev.finish_reason is not None:
                delta, reason = {}, ev.finish_reason
                if held is not None:  # what was held back: content, or the calls it makes
                    content, calls = held[i].finish()
                    if content:
                        yield {**head, "choices": [{"index": i, "delta": {"content": content}, "finish_reason": None}]}
                    if calls:
                        delta, reason = {"tool_calls": [c.openai(k) for k, c in enumerate(calls)]}, "tool_calls"
            elif ev.channel == "content" and held is not None:
                piece = held[i].push(ev.text)
                if not piece and not ev.logprobs:
                    continue
                delta, reason = {"content": piece}, None
            else:
                delta, reason = {"reasoning_content" if ev.channel == "reasoning" else "content": ev.text}, None
            choice = {"index": i, "delta": delta, "finish_reason": reason}
            if self.logprobs is not None:
                choice["logprobs"] = {"content": self.logprobs.chat(ev.logprobs)} if ev.logprobs else None
            yield {**head, "choices": [choice]}
        if include_usage:
            yield {**head, "choices": [], "usage": self.usage}

    async def text_chunks(self, name: str, include_usage: bool) -> AsyncIterator[dict]:
        head = {"id": self.id, "object": "text_completion", "created": self.created, "model": name}
        offsets = [0] * len(self.seqs)  # characters of each choice's text sent so far
        async for i, ev in self.events():
            logprobs = None
            if self.logprobs is not None and ev.logprobs:
                logprobs = self.logprobs.completion(ev.logprobs, offsets[i])
            offsets[i] += len(ev.text)
            yield {**head, "choices": [{"index": i, "text": ev.text, "finish_reason": ev.finish_reason, "logprobs": logprobs}]}
        if include_usage:
            yield {**head, "choices": [], "usage": self.usage}

    async def native_response(self, final: "_NativeFinal", request: Request) -> dict:
        c = (await self._collect(request))[0]
        return final.body(self, "".join(c["reasoning"] + c["content"]), c["finish_reason"], c["logprobs"])

    async def native_chunks(self, final: "_NativeFinal") -> AsyncIterator[dict]:
        """llama-server's stream: a chunk per piece of text (`tokens`: the token that completed
        it), then the whole answer's fields with empty content and `stop: true`."""
        seq, text, reason, left = self.seqs[0], [], None, ()
        async for _, ev in self.events():
            if ev.finish_reason is not None:
                reason, left = ev.finish_reason, ev.logprobs
            elif ev.text:
                text.append(ev.text)
                chunk = {"index": 0, "content": ev.text, "tokens": [ev.token_id] if ev.token_id is not None else [],
                         "stop": False, "id_slot": seq.slot, "tokens_predicted": len(seq.generated),
                         "tokens_evaluated": self.n_prompt}
                if self.logprobs is not None:
                    chunk["completion_probabilities"] = final.probabilities(self.logprobs, ev.logprobs)
                yield chunk
        # the last chunk carries only the probabilities not sent yet (tokens without text of their own)
        yield {**final.body(self, "".join(text), reason, left), "content": "", "tokens": []}


class _HeldCalls:
    """One streamed choice's content when tools are offered: text is sent until it may be the
    start of a call, then held until the choice ends, when it is parsed into calls (or sent
    as content after all: nothing is lost)."""

    def __init__(self, tools):
        self.tools, self.text, self.sent = tools, "", 0

    def push(self, text: str) -> str:
        self.text += text
        upto = max(self.sent, self.tools.holds(self.text))
        out, self.sent = self.text[self.sent:upto], upto
        return out

    def finish(self) -> tuple[str, list]:
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        return self.tools.parse(rest)  # (rest, []) when it makes no call


class _NativeFinal:
    """The last answer of llama-server's /completion (its `to_json_non_oaicompat`)."""

    def __init__(self, name: str, request: NativeCompletionRequest, params, tokenizer):
        self.name, self.request, self.params, self.tokenizer = name, request, params, tokenizer

    def stop_type(self, seq, reason: str | None) -> tuple[str, str]:
        """(stop_type, stopping_word): "limit" at max tokens, "word" at a stop string, "eos" at an
        end-of-generation token, "none" otherwise (cancelled)."""
        if reason == "length":
            return "limit", ""
        if reason != "stop":
            return "none", ""
        text = self.tokenizer.decode(seq.generated)
        found = sorted((text.find(w), i, w) for i, w in enumerate(self.params.stop) if w in text)
        return ("word", found[0][2]) if found else ("eos", "")

    def probabilities(self, formatter: LogprobFormatter, entries) -> list[dict]:
        return formatter.native(entries, self.request.post_sampling_probs)

    def body(self, run: _Run, content: str, reason: str | None, logprobs=()) -> dict:
        seq = run.seqs[0]
        stats = seq.stats
        stop_type, word = self.stop_type(seq, reason)
        n_gen, prompt_ms, gen_ms = len(seq.generated), stats.prompt_seconds * 1e3, stats.decode_seconds * 1e3
        asked = self.request.requested_max_tokens()
        n_predict = -1 if asked is None else asked
        prefilled = run.n_prompt - stats.n_cached
        timings = {"cache_n": stats.n_cached, "prompt_n": prefilled, "prompt_ms": prompt_ms,
                   "prompt_per_token_ms": prompt_ms / prefilled if prefilled else 0.0,
                   "prompt_per_second": stats.prompt_tokens_per_second,
                   "predicted_n": n_gen, "predicted_ms": gen_ms,
                   "predicted_per_token_ms": gen_ms / n_gen if n_gen else 0.0,
                   "predicted_per_second": n_gen / stats.decode_seconds if stats.decode_seconds else 0.0}
        if stats.spec.n_drafted:
            timings.update(draft_n=stats.spec.n_drafted, draft_n_accepted=stats.spec.n_accepted)
        out = {"index": 0, "content": content, "tokens": list(seq.generated) if self.request.return_tokens else [],
                "id_slot": seq.slot, "stop": True, "model": self.name, "tokens_predicted": n_gen,
                "tokens_evaluated": run.n_prompt,
                "generation_settings": generation_settings(self.params, n_predict, self.request.stream),
                "prompt": self.tokenizer.decode(seq.prompt_ids, special=True), "has_new_line": "\n" in content,
                "truncated": False, "stop_type": stop_type, "stopping_word": word, "tokens_cached": stats.n_cached,
                "timings": timings}
        if run.logprobs is not None:
            out["completion_probabilities"] = self.probabilities(run.logprobs, logprobs)
        return out
