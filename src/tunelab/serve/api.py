"""The OpenAI-compatible HTTP API over a `Service`: /v1/models, /v1/completions, /v1/chat/completions.

Request bodies are pydantic models (unknown fields are errors); responses and errors have OpenAI's shapes,
errors as {"error": {"message", "type", "param", "code"}} with status 400, 404, 429 or 503. `stream: true`
answers with server-sent events (`data: {chunk}` lines, then `data: [DONE]`).
"""

from __future__ import annotations

import json
import logging
import queue
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from tunelab.errors import TunelabError
from tunelab.serve.engine import GenerationRequest, GenerationResult
from tunelab.serve.errors import Busy, http_fields
from tunelab.serve.service import Service

log = logging.getLogger("tunelab.serve")
REQUEST_TIMEOUT_S = 600.0


class _Params(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # OpenAI allows up to 4
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1
    user: str | None = None

    def generation(self, prompt_ids: list[int], max_tokens: int) -> GenerationRequest:
        """The engine request for these parameters, generating at most `max_tokens`."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationRequest(prompt_ids, max_tokens=max_tokens,
                                 temperature=self.temperature, top_p=self.top_p, stop=stops, seed=self.seed)


class CompletionRequest(_Params):
    """POST /v1/completions."""

    prompt: str


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatCompletionRequest(_Params):
    """POST /v1/chat/completions (`max_completion_tokens` is OpenAI's newer name for `max_tokens`)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def create_app(service: Service) -> FastAPI:
    """The FastAPI app serving `service`."""
    app = FastAPI(title="tunelab serve")
    app.state.service = service
    _add_error_handlers(app)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        """Prometheus text: requests, tokens, queue depth, batch sizes, adapter loads/evictions, TTFT."""
        return PlainTextResponse(service.engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict:
        """The base model and the adapters loaded now."""
        base = {"id": service.base_name, "object": "model", "created": service.created, "owned_by": "tunelab",
                "root": service.base_name, "parent": None}
        adapters = [{"id": a.name, "object": "model", "created": service.created, "owned_by": "tunelab",
                     "root": service.base_name, "parent": service.base_name, "method": a.method,
                     "served_as": a.served_as}
                    for a in service.registry.loaded()]
        return {"object": "list", "data": [base, *adapters]}

    @app.post("/v1/completions")
    def completions(body: CompletionRequest):
        req = body.generation(service.encode_prompt(body.prompt), body.max_tokens or 16)  # OpenAI's default
        return _respond(service, body.model, req, body.stream, _TextShape())

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest):
        ids = service.encode_chat([m.model_dump() for m in body.messages])
        req = body.generation(ids, body.max_tokens or body.max_completion_tokens or _room(service, len(ids)))
        return _respond(service, body.model, req, body.stream, _ChatShape())

    return app


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


def _respond(service: Service, model: str, req: GenerationRequest, stream: bool, shape):
    rid = f"{shape.prefix}-{uuid.uuid4().hex[:24]}"
    if stream:
        return _stream(service, model, req, shape, rid)
    future = service.submit(model, req)
    try:
        result = future.result(timeout=REQUEST_TIMEOUT_S)
    except TimeoutError:
        raise Busy(f"the request did not finish within {REQUEST_TIMEOUT_S:.0f} s; retry later") from None
    return {**_envelope(rid, model, shape.object), "choices": [shape.choice(result.text, result.finish_reason)],
            "usage": _usage(result)}


def _stream(service: Service, model: str, req: GenerationRequest, shape, rid: str) -> StreamingResponse:
    """Server-sent events: one chunk per piece of final text, a last chunk with finish_reason, `[DONE]`."""
    events: queue.Queue = queue.Queue()
    req.on_text = lambda text: events.put(("text", text))
    future = service.submit(model, req)  # errors before generation starts are ordinary error responses
    future.add_done_callback(lambda f: events.put(("done", f)))

    def chunk(choice: dict, **extra) -> str:
        body = {**_envelope(rid, model, shape.chunk_object), "choices": [choice], **extra}
        return f"data: {json.dumps(body)}\n\n"

    def lines():
        if shape.opening() is not None:  # chat streams open with the assistant role
            yield chunk(shape.opening())
        while True:
            try:
                kind, value = events.get(timeout=REQUEST_TIMEOUT_S)
            except queue.Empty:
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
