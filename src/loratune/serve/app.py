"""The HTTP side: OpenAI-compatible routes, adapter management, the playground page and the limits.

Every refusal is a 4xx JSON body in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`,
so the official client raises its usual exceptions.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import AdapterFileError, AdapterNameError, LoratuneError
from .bodies import (
    AdapterRequest,
    APIError,
    ChatRequest,
    CompletionRequest,
    Generation,
    error_body,
    message_text,
    refuse_unsupported,
)
from .registry import AdapterLimitError, AdapterRegistry, check_name, resolve_under_root
from .scheduler import Engine, Event, Job, QueueFull, Sampling


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_body_bytes: int = 1 << 20
    body_seconds: float = 30.0  # a body must arrive whole within this (uvicorn has no read timeout of its own)
    max_positions: int | None = None  # the model's context length, when it has one


@dataclass(frozen=True)
class Settings:
    base_name: str
    api_key: str | None = None
    adapter_root: Path | None = None
    limits: Limits = Limits()


# --- the app --------------------------------------------------------------------------------------------------
def create_app(engine: Engine, registry: AdapterRegistry, settings: Settings) -> FastAPI:
    app = FastAPI(title="loratune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=settings.limits.max_body_bytes, seconds=settings.limits.body_seconds)
    created = int(time.time())
    _add_error_handlers(app, settings.api_key)

    def authorized(request: Request) -> None:
        _check_key(request, settings.api_key)

    @app.get("/", response_class=HTMLResponse)
    def playground() -> str:  # static page, no data: it asks for the key when the API wants one
        return resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/health", dependencies=[Depends(authorized)])
    def health() -> dict:
        return {"status": "ok", "adapters": len(registry.loaded), **engine.stats()}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def models() -> dict:
        base = {"id": registry.base_name, "object": "model", "created": created, "owned_by": "loratune"}
        adapters = [{"id": name, "object": "model", "created": created, "owned_by": "loratune",
                     "parent": registry.base_name} for name in sorted(registry.loaded)]
        return {"object": "list", "data": [base, *adapters]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest):
        prompt = _single_prompt(body)
        with engine.tokenizer_lock:
            ids = engine.tokenizer(prompt).input_ids
        return await _generate(engine, registry, settings, body, ids, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest):
        ids = _chat_ids(engine, body)
        return await _generate(engine, registry, settings, body, ids, chat=True)

    _add_adapter_routes(app, engine, registry, settings)
    return app


def _add_adapter_routes(app: FastAPI, engine: Engine, registry: AdapterRegistry, settings: Settings) -> None:
    """Loading and deleting adapters at run time: always behind the API key."""

    def manager(request: Request) -> None:
        if settings.api_key is None:
            raise APIError(403, "adapter management needs the server to be started with an API key "
                                "(--api-key or LORATUNE_API_KEY)", "permission_error")
        _check_key(request, settings.api_key)

    @app.post("/v1/adapters", dependencies=[Depends(manager)])
    async def add_adapter(body: AdapterRequest) -> dict:
        if settings.adapter_root is None:
            raise APIError(403, "the server was started without --adapter-root, so it loads no adapters at run time",
                           "permission_error")
        try:
            check_name(body.name)
            folder = await asyncio.to_thread(resolve_under_root, settings.adapter_root, body.path)
            registry.reserve(body.name)
        except AdapterLimitError as exc:
            raise APIError(409, str(exc), param="name", code="adapter_limit") from None
        except AdapterNameError as exc:
            raise APIError(400, str(exc), param="name") from None
        except AdapterFileError as exc:
            raise APIError(400, str(exc), param="path") from None
        try:
            await asyncio.wrap_future(engine.load_adapter(body.name, str(folder)))
        except LoratuneError as exc:
            registry.busy.discard(body.name)
            raise APIError(400, str(exc), param="path") from None
        except BaseException:
            registry.busy.discard(body.name)
            raise
        registry.settle(body.name, str(folder))
        return {"id": body.name, "object": "model", "created": int(time.time()), "owned_by": "loratune",
                "parent": registry.base_name}

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(manager)])
    async def delete_adapter(name: str) -> dict:
        try:
            registry.start_delete(name)
        except AdapterNameError as exc:
            raise APIError(404, str(exc), param="name", code="model_not_found") from None
        try:
            await asyncio.wrap_future(engine.delete_adapter(name))
        finally:
            registry.settle(name, None)
        return {"id": name, "object": "model", "deleted": True}


def _check_key(request: Request, key: str | None) -> None:
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                       "authentication_error", code="invalid_api_key")


def _add_error_handlers(app: FastAPI, api_key: str | None) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        try:  # FastAPI reads the body before the key check: a client without the key learns nothing of it
            _check_key(request, api_key)
        except APIError as refused:
            return await api_error(request, refused)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request")
        if first.get("type") == "invalid_unicode":  # the message names the field already
            param, message = first["ctx"]["where"], first["msg"]
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception) -> JSONResponse:  # a bug: still OpenAI's shape (and logged)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413) or slower than `seconds` to arrive whole (408): by
    Content-Length up front, else while the body streams in.

    The body is read here, at most `limit` bytes of it, and handed on whole to the routes. The time limit is
    here because uvicorn has no read timeout: a client that stalls mid-body would hold its request forever.
    """

    def __init__(self, app, limit: int, seconds: float = 30.0) -> None:
        self.app, self.limit, self.seconds = app, limit, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse(error_body(f"request body larger than the server's limit of {self.limit} bytes",
                                            "invalid_request_error", code="request_too_large"), 413)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_large(scope, receive, send)
        try:
            async with asyncio.timeout(self.seconds):
                body = await self._read(receive)
        except TimeoutError:
            body = JSONResponse(error_body(f"request body not received whole within {self.seconds:g} s",
                                           "invalid_request_error", code="request_timeout"), 408)
        if body is None:
            return  # the client left before sending its body
        if isinstance(body, JSONResponse):
            return await body(scope, receive, send)
        if len(body) > self.limit:
            return await too_large(scope, receive, send)
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body, or as soon as it passes the limit what came so far; None if the client left."""
        chunks, size = [], 0
        while True:
            event = await receive()
            if event["type"] != "http.request":
                return None
            chunks.append(event.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit or not event.get("more_body", False):
                return b"".join(chunks)


# --- generation -----------------------------------------------------------------------------------------------
def _single_prompt(body: CompletionRequest) -> str:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "prompt: this server takes one prompt per request", param="prompt")
        prompt = prompt[0]
    if body.echo:
        raise APIError(400, "echo: not supported", param="echo")
    return prompt


def _chat_ids(engine: Engine, body: ChatRequest) -> list[int]:
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "messages: this model's tokenizer has no chat template; use /v1/completions",
                       param="messages")
    messages = [{"role": m.role, "content": message_text(m.content, f"messages.{i}.content")}
                for i, m in enumerate(body.messages)]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # e.g. a template that refuses a role or an order of turns
        raise APIError(400, f"messages: the chat template refused them ({exc})", param="messages") from None
    with engine.tokenizer_lock:
        return tokenizer(text, add_special_tokens=False).input_ids


def _sampling(body: Generation, prompt_tokens: int, limits: Limits, chat: bool) -> Sampling:
    if body.n != 1:
        raise APIError(400, "n: only n=1 is supported", param="n")
    if body.logprobs not in (None, False):
        raise APIError(400, "logprobs: not supported", param="logprobs")
    if prompt_tokens == 0:
        raise APIError(400, "prompt: the prompt is empty", param="prompt")
    if prompt_tokens > limits.max_prompt_tokens:
        raise APIError(400, f"prompt: {prompt_tokens} tokens, more than the server's limit of "
                            f"{limits.max_prompt_tokens}", param="messages" if chat else "prompt")
    room = limits.max_tokens if limits.max_positions is None else min(limits.max_tokens,
                                                                       limits.max_positions - prompt_tokens)
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is None:
        asked = room if chat else min(16, room)  # OpenAI's completions default is 16 tokens
    if asked > limits.max_tokens:
        raise APIError(400, f"max_tokens: {asked} is more than the server's limit of {limits.max_tokens}",
                       param="max_tokens")
    if asked > room or room < 1:
        raise APIError(400, f"max_tokens: the prompt ({prompt_tokens} tokens) plus {asked} new tokens exceed the "
                            f"model's {limits.max_positions} positions", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop: up to 4 non-empty strings", param="stop")
    return Sampling(max_tokens=asked, temperature=body.temperature, top_p=body.top_p, stop=tuple(stop),
                    seed=body.seed, ignore_eos=body.ignore_eos)


async def _generate(engine: Engine, registry: AdapterRegistry, settings: Settings, body: Generation,
                    ids: list[int], chat: bool):
    if body.model in registry.busy:
        raise APIError(404, f"model {body.model!r} is being loaded or removed", param="model",
                       code="model_not_found")
    try:
        adapter = registry.adapter_for(body.model)
    except AdapterNameError as exc:
        raise APIError(404, str(exc), "invalid_request_error", param="model", code="model_not_found") from None
    refuse_unsupported(body)
    sampling = _sampling(body, len(ids), settings.limits, chat)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is stopping
            pass

    job = Job(ids, adapter, sampling, emit)
    try:
        engine.submit(job)
    except QueueFull as exc:
        raise APIError(429, f"the server is busy: {exc}; retry later", "rate_limit_error",
                       code="queue_full") from None
    shape = _ChatShape(body.model) if chat else _CompletionShape(body.model)
    if body.stream:
        return StreamingResponse(_stream(engine, job, events, shape), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    parts = []
    try:
        while True:
            event = await events.get()
            if event.error:
                raise APIError(500, event.error, "server_error")
            parts.append(event.text)
            if event.finish_reason:
                return shape.whole("".join(parts), event)
    finally:
        engine.cancel(job)  # no-op once finished; frees the row if this handler is cancelled


async def _stream(engine: Engine, job: Job, events: asyncio.Queue, shape) -> AsyncIterator[str]:
    try:
        first = shape.first()
        if first is not None:
            yield _sse(first)
        while True:
            event = await events.get()
            if event.error:
                yield _sse(error_body(event.error, "server_error"))
                break
            if event.text or event.finish_reason:
                yield _sse(shape.chunk(event))
            if event.finish_reason:
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(job)  # the client went away (or we are done): free the row


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


class _CompletionShape:
    def __init__(self, model: str) -> None:
        self.id, self.model, self.created = f"cmpl-{uuid.uuid4().hex}", model, int(time.time())

    def _envelope(self, choice: dict, event: Event) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}
        if event.finish_reason:
            body["usage"] = _usage(event)
        return body

    def whole(self, text: str, event: Event) -> dict:
        return self._envelope({"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason},
                              event)

    def first(self) -> None:
        return None

    def chunk(self, event: Event) -> dict:
        return self.whole(event.text, event)


class _ChatShape:
    def __init__(self, model: str) -> None:
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def _envelope(self, kind: str, choice: dict, event: Event | None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}
        if event is not None and event.finish_reason:
            body["usage"] = _usage(event)
        return body

    def whole(self, text: str, event: Event) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": event.finish_reason}
        return self._envelope("chat.completion", choice, event)

    def first(self) -> dict:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._envelope("chat.completion.chunk", choice, None)

    def chunk(self, event: Event) -> dict:
        delta = {"content": event.text} if event.text else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": event.finish_reason}
        return self._envelope("chat.completion.chunk", choice, event)
