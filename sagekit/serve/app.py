"""The HTTP side: Starlette routes for the OpenAI endpoints, the API key, the body size limit, and SSE.

Every refusal is a JSON error in OpenAI's shape, and nothing a client sends can stop the server: each
request is checked in full before it is queued, and a failure inside one request ends that request only.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sagekit.api import Model
from sagekit.serve import protocol
from sagekit.serve.protocol import ApiError, Limits
from sagekit.serve.worker import Job, Worker

log = logging.getLogger("sagekit.serve")
DRAIN_LIMIT = 64 * 2 ** 20  # an oversized body is read (and dropped) up to this, so the client sees the 413


@dataclass(frozen=True)
class Settings:
    model_id: str
    api_key: str | None
    limits: Limits
    max_queue: int = 16
    max_body: int = 2 ** 20  # bytes of a request body


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(request: HttpRequest, exc: Exception) -> Response:
    """Starlette's own refusals (unknown path, wrong method) in OpenAI's shape too."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = exc.detail if isinstance(exc, HTTPException) else "internal server error"
    return _error(ApiError(status, f"{request.method} {request.url.path}: {message}", code=None))


async def _read_json(request: HttpRequest, limit: int) -> Any:
    """The body as JSON, refused with 413 past `limit` bytes (a lying or absent Content-Length included)."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > DRAIN_LIMIT:
        raise too_big
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_LIMIT:
            raise too_big
        if size <= limit:
            body += chunk
    if size > limit:
        raise too_big
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Server:
    """The routes of one served model."""

    def __init__(self, model: Model, settings: Settings):
        self.model, self.settings = model, settings
        self.worker = Worker(model, settings.max_queue)
        self.started = int(time.time())

    def _authorize(self, request: HttpRequest) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "model": self.settings.model_id, "busy": self.worker.in_flight > 0,
                             "waiting": self.worker.waiting})

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_id, "object": "model", "created": self.started, "owned_by": "sagekit"}

    async def list_models(self, request: HttpRequest) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: HttpRequest) -> Response:
        try:
            self._authorize(request)
            if request.path_params["name"] != self.settings.model_id:
                raise ApiError(404, f"the model '{request.path_params['name']}' does not exist here",
                               param="model", code="model_not_found")
        except ApiError as e:
            return _error(e)
        return JSONResponse(self._model_card())

    async def chat(self, request: HttpRequest) -> Response:
        return await self._complete(request, "chat")

    async def text(self, request: HttpRequest) -> Response:
        return await self._complete(request, "text")

    async def _complete(self, request: HttpRequest, kind: str) -> Response:
        try:
            self._authorize(request)
            body = await _read_json(request, self.settings.max_body)
            req = protocol.parse(body, kind, self.model, self.settings.model_id, self.settings.limits)
            job = self.worker.submit(req)
        except ApiError as e:
            return _error(e)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody to answer
        if req.stream:
            return StreamingResponse(self._stream(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async for _, value in _events(job):
                reply = value  # the last event is ("done", reply)
        except ApiError as e:
            return _error(e)
        return JSONResponse(protocol.completion(req, self.settings.model_id, reply))

    async def _stream(self, job: Job) -> AsyncIterator[str]:
        req, model_id = job.request, self.settings.model_id
        opener = protocol.first_chunk(req, model_id)
        if opener is not None:
            yield _sse(opener)
        try:
            async for kind, value in _events(job):
                if kind == "piece":
                    yield _sse(protocol.chunk(req, model_id, value))
                else:
                    yield _sse(protocol.chunk(req, model_id, None, protocol.finish_reason(value)))
                    if req.include_usage:
                        yield _sse(protocol.usage_chunk(req, model_id, value))
        except ApiError as e:  # headers are sent: the error goes in the stream, as OpenAI's does
            yield _sse(e.body())
        yield "data: [DONE]\n\n"


async def _events(job: Job) -> AsyncIterator[tuple[str, Any]]:
    """The job's pieces, then ("done", reply); an error in the worker becomes a 500 ApiError.

    If the reader goes away (a closed stream, a cancelled request), the job is cancelled, and the worker
    stops at its next token.
    """
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                raise ApiError(500, f"generation failed: {value}", type="server_error", code="internal_error")
            yield kind, value
            if kind == "done":
                return
    finally:
        job.cancelled = True


def create_app(model: Model, settings: Settings) -> Starlette:
    """The ASGI app serving `model` (uvicorn runs it: `sagekit serve`)."""
    s = Server(model, settings)
    routes = [
        Route("/health", s.health, methods=["GET"]),
        Route("/v1/models", s.list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", s.get_model, methods=["GET"]),
        Route("/v1/chat/completions", s.chat, methods=["POST"]),
        Route("/v1/completions", s.text, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _http_error})
