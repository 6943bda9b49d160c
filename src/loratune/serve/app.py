"""The HTTP side: OpenAI-compatible routes, adapter management, the playground page and the limits.

Every refusal is a 4xx JSON body in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`,
so the official client raises its usual exceptions.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import AdapterFileError, AdapterNameError, LoratuneError
from .bodies import AdapterRequest, APIError, ChatRequest, CompletionRequest, error_body
from .completions import Limits, chat_ids, generate, single_prompt
from .registry import AdapterLimitError, AdapterRegistry, check_name, resolve_under_root
from .scheduler import Engine


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
        prompt = single_prompt(body)
        with engine.tokenizer_lock:
            ids = engine.tokenizer(prompt).input_ids
        return await generate(engine, registry, settings.limits, body, ids, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest):
        ids = chat_ids(engine, body)
        return await generate(engine, registry, settings.limits, body, ids, chat=True)

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
