"""The OpenAI-compatible HTTP API over a `Service`: /v1/models, /v1/completions, /v1/chat/completions.

Request bodies are strict pydantic models (`schema.py`; unknown fields are errors), checked after `guard.Guard`
(API key, body size and read time); responses and errors have OpenAI's shapes, errors as
{"error": {"message", "type", "param", "code"}} with status 400, 401, 404, 408, 413, 429 or 503. `stream: true`
answers with server-sent events (`data: {chunk}` lines, then `data: [DONE]`). Probes: `/health`, `/ready`
(queue depth; 503 when the engine is down or the queue full) and `/metrics` (Prometheus text).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tunelab.errors import TunelabError
from tunelab.serve.engine import GenerationRequest, GenerationResult
from tunelab.serve.errors import Busy, http_fields
from tunelab.serve.guard import BODY_TIMEOUT_S, MAX_BODY_BYTES, Guard
from tunelab.serve.schema import ChatCompletionRequest, CompletionRequest
from tunelab.serve.service import Service

log = logging.getLogger("tunelab.serve")
REQUEST_TIMEOUT_S = 600.0


def create_app(service: Service, *, api_key: str | None = None, docs: bool = False,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving `service`.

    `api_key`: every `/v1` route needs `Authorization: Bearer API_KEY`. `docs`: serve `/docs`, `/redoc` and
    `/openapi.json`. `max_body_bytes`, `body_timeout_s`: request bodies larger or slower are refused (413, 408).
    Generation handlers are async: they wait for the engine without holding a worker thread, so `/health`,
    `/ready` and `/metrics` answer at once under any load.
    """
    kw = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="tunelab serve", **kw)
    app.state.service = service
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
    _add_error_handlers(app)
    _add_probes(app, service)

    @app.get("/v1/models")
    async def models() -> dict:
        """The base model and the adapters loaded now."""
        base = {"id": service.base_name, "object": "model", "created": service.created, "owned_by": "tunelab",
                "root": service.base_name, "parent": None}
        adapters = [{"id": a.name, "object": "model", "created": service.created, "owned_by": "tunelab",
                     "root": service.base_name, "parent": service.base_name, "method": a.method,
                     "served_as": a.served_as}
                    for a in service.registry.loaded()]
        return {"object": "list", "data": [base, *adapters]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        def prepare() -> GenerationRequest:
            return body.generation(service.encode_prompt(body.prompt), body.max_tokens or 16)  # OpenAI's default

        return await _respond(service, body.model, prepare, body.stream, _TextShape(), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        def prepare() -> GenerationRequest:
            ids = service.encode_chat([m.model_dump() for m in body.messages])
            return body.generation(ids, body.max_tokens or body.max_completion_tokens or _room(service, len(ids)))

        return await _respond(service, body.model, prepare, body.stream, _ChatShape(), request)

    return app


def _add_probes(app: FastAPI, service: Service) -> None:
    """`/health` (the process answers), `/ready` (the engine runs and the queue has room), `/metrics`."""

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        engine = service.engine
        depth = engine.queue_depth()
        ok = engine.alive and depth < engine.max_queue
        body = {"status": "ready" if ok else "not ready", "queue_depth": depth, "max_queue": engine.max_queue,
                "running": engine.running}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """Prometheus text: requests, tokens, queue depth, batch sizes, adapter loads/evictions, TTFT, dropped rows."""
        engine = service.engine
        lines = [("tunelab_running_rows", "gauge", "rows in the batch decoding now", engine.running),
                 ("tunelab_dropped_rows_total", "counter", "requests dropped because the client hung up",
                  engine.dropped)]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in lines)
        return PlainTextResponse(engine.metrics.render() + text, media_type="text/plain; version=0.0.4")


def _room(service: Service, prompt_tokens: int) -> int:
    """Chat's default max_tokens: as many as the server limit and the context leave (at least 1)."""
    ctx = service.engine.context_length
    room = service.engine.max_tokens_limit if ctx is None else min(service.engine.max_tokens_limit,
                                                                   ctx - prompt_tokens)
    return max(room, 1)


# --- response shapes ---------------------------------------------------------------------------------------

class _TextShape:
    """OpenAI's text completion objects."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def delta(self, text: str | None, finish: str | None) -> dict:
        return self.choice(text or "", finish)

    def opening(self) -> dict | None:
        return None


class _ChatShape:
    """OpenAI's chat completion objects."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def delta(self, text: str | None, finish: str | None) -> dict:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def opening(self) -> dict:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def _envelope(rid: str, model: str, obj: str) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model}


def _usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


async def _respond(service: Service, model: str, prepare, stream: bool, shape, request: Request):
    """Tokenize and queue the request off the event loop (an adapter may load), then await its result."""
    rid = f"{shape.prefix}-{uuid.uuid4().hex[:24]}"
    req = await run_in_threadpool(prepare)
    if stream:
        return await _stream(service, model, req, shape, rid, request)
    future = await run_in_threadpool(service.submit, model, req)
    async with _watch_disconnect(request, req):
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), REQUEST_TIMEOUT_S)
        except TimeoutError:
            req.cancel()
            raise Busy(f"the request did not finish within {REQUEST_TIMEOUT_S:.0f} s; retry later") from None
    return {**_envelope(rid, model, shape.object), "choices": [shape.choice(result.text, result.finish_reason)],
            "usage": _usage(result)}


async def _stream(service: Service, model: str, req: GenerationRequest, shape, rid: str,
                  request: Request) -> StreamingResponse:
    """Server-sent events: one chunk per piece of final text, a last chunk with finish_reason, `[DONE]`.

    A client that hangs up cancels the request: the engine drops its row at the next decode step.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    req.on_text = lambda text: loop.call_soon_threadsafe(events.put_nowait, ("text", text))
    future = await run_in_threadpool(service.submit, model, req)  # errors before generation are plain errors
    future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", f)))

    def chunk(choice: dict, **extra) -> str:
        body = {**_envelope(rid, model, shape.chunk_object), "choices": [choice], **extra}
        return f"data: {json.dumps(body)}\n\n"

    async def lines():
        async with _watch_disconnect(request, req):
            if shape.opening() is not None:  # chat streams open with the assistant role
                yield chunk(shape.opening())
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), REQUEST_TIMEOUT_S)
                except TimeoutError:
                    yield _sse_error(Busy(f"no output within {REQUEST_TIMEOUT_S:.0f} s"))
                    break
                if kind == "text":
                    yield chunk(shape.delta(value, None))
                    continue
                err = value.exception()
                if err is not None:
                    yield _sse_error(err)
                    break
                result = value.result()
                yield chunk(shape.delta(None, result.finish_reason), usage=_usage(result))
                break
            yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


@contextlib.asynccontextmanager
async def _watch_disconnect(request: Request, req: GenerationRequest):
    """While inside, a client that hangs up cancels `req`; leaving early (an error, a cancelled stream) does too.

    After the body, the ASGI `receive` answers only when the client disconnects (or the response is done).
    """
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        req.cancel()

    watcher = asyncio.ensure_future(watch())
    finished = False
    try:
        yield
        finished = True
    finally:
        watcher.cancel()
        if not finished:
            req.cancel()


def _sse_error(err: BaseException) -> str:
    body = http_fields(err)[1] if isinstance(err, TunelabError) else _internal(err)
    return f"data: {json.dumps(body)}\n\n"


# --- errors ------------------------------------------------------------------------------------------------

def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def _internal(err: BaseException) -> dict:
    return {"error": {"message": f"internal error ({type(err).__name__}); the server keeps running",
                      "type": "server_error", "param": None, "code": None}}


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic names union branches in `loc`


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line for the first invalid field: the field, what was expected, what was found."""
    errors = exc.errors()
    err = errors[0]
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", None
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if not loc:
        return f"request body: expected a JSON object ({err['msg']})", None
    # of a union's errors for one field, the branch that matched the type says what is wrong
    same = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1] == loc[:1]]
    err = next((e for e in same if not e.get("type", "").endswith("_type")), err)
    field = ".".join(str(p) for p in err["loc"] if p != "body" and str(p) not in _UNION_TAGS and "[" not in str(p))
    got = err.get("input")
    found = "" if err.get("type") == "missing" or isinstance(got, (dict, list)) else f" (found {got!r:.80})"
    return f"field '{field}': {err['msg']}{found}", loc[0]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(TunelabError)
    async def _tunelab(request: Request, exc: TunelabError):
        status, body = http_fields(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("request %s failed", request.url.path)
        return JSONResponse(_internal(exc), status_code=500)
