"""The OpenAI-compatible HTTP API over a `Service`: /v1/models, /v1/models/{id}, /v1/completions,
/v1/chat/completions.

A request becomes one engine request per choice (prompts x `n`), queued together (`Service.submit_all`); its
response objects are built in `responses.py`.

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
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tunelab.errors import TunelabError
from tunelab.serve.errors import Busy, ModelNotFound, http_fields
from tunelab.serve.guard import BODY_TIMEOUT_S, MAX_BODY_BYTES, Guard
from tunelab.serve.logits import TokenLogprob
from tunelab.serve.request import GenerationRequest, GenerationResult
from tunelab.serve.responses import (
    ChatShape,
    TextShape,
    chat_logprobs,
    completion_logprobs,
    envelope,
    usage,
)
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
        return {"object": "list", "data": _model_cards(service)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        """One model of `/v1/models`: the base or a loaded adapter; 404 otherwise."""
        card = next((c for c in _model_cards(service) if c["id"] == model_id), None)
        if card is None:
            served = ", ".join(c["id"] for c in _model_cards(service))
            raise ModelNotFound(f"model {model_id!r} not found; loaded now: {served}")
        return card

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _respond(service, body, lambda: _prepare_completion(service, body), TextShape(), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _respond(service, body, lambda: _prepare_chat(service, body), ChatShape(), request)

    return app


def _model_cards(service: Service) -> list[dict]:
    """The model objects of the base, then of each loaded adapter (most recently used first)."""
    base = {"id": service.base_name, "object": "model", "created": service.created, "owned_by": "tunelab",
            "root": service.base_name, "parent": None}
    adapters = [{"id": a.name, "object": "model", "created": service.created, "owned_by": "tunelab",
                 "root": service.base_name, "parent": service.base_name, "method": a.method,
                 "served_as": a.served_as}
                for a in service.registry.loaded()]
    return [base, *adapters]


@dataclass
class _Prepared:
    """A request's engine requests (`per_prompt` choices per prompt, in choice order), how a result becomes a
    choice, the text a choice's answer opens with (echo), and how a streamed piece's logprobs read (None: the
    request asks for none)."""

    requests: list[GenerationRequest]
    per_prompt: int
    choice: Callable[[int, GenerationResult], dict]
    opening: Callable[[int], str] = lambda i: ""
    piece_logprobs: Callable[[int, list[TokenLogprob]], dict] | None = None


def _prepare_completion(service: Service, body: CompletionRequest) -> _Prepared:
    """Tokenize each prompt; `n` engine requests per prompt."""
    prompts = body.prompts()
    body.check(len(prompts))
    k, shape, words = body.logprobs, TextShape(), service.token_text
    requests, echoes = [], []
    for prompt in prompts:
        ids = service.encode_prompt(prompt) if isinstance(prompt, str) else prompt
        echoes.append(prompt if isinstance(prompt, str) else service.tokenizer.decode(ids))
        requests += body.generations(ids, 16 if body.max_tokens is None else body.max_tokens,  # OpenAI's default
                                     logprobs=k, prompt_logprobs=k if body.echo else None)

    def opening(i: int) -> str:
        return echoes[i // body.n] if body.echo else ""

    def choice(i: int, result: GenerationResult) -> dict:
        logprobs = None
        if k is not None:
            req = requests[i]
            ids = [e.token for e in result.logprobs]
            if body.echo:
                logprobs = completion_logprobs(req.prompt_ids + ids, result.prompt_logprobs + result.logprobs,
                                               words)
            else:
                logprobs = completion_logprobs(ids, result.logprobs, words, offset=len(echoes[i // body.n]))
        return shape.choice(i, opening(i) + result.text, result.finish_reason, logprobs)

    offsets = [len(echoes[i // body.n]) for i in range(len(requests))]  # where each choice's next piece starts

    def piece(i: int, entries: list[TokenLogprob]) -> dict:
        found = completion_logprobs([e.token for e in entries], entries, words, offset=offsets[i])
        offsets[i] += sum(len(t) for t in found["tokens"])
        return found

    return _Prepared(requests, body.n, choice, opening, piece if k is not None else None)


def _prepare_chat(service: Service, body: ChatCompletionRequest) -> _Prepared:
    """Render the messages with the chat template; `n` engine requests."""
    body.check()
    ids = service.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
    max_tokens = body.max_tokens or body.max_completion_tokens or _room(service, len(ids))
    requests = body.generations(ids, max_tokens, logprobs=body.logprobs_k())

    def choice(i: int, result: GenerationResult) -> dict:
        logprobs = chat_logprobs(result.logprobs, service.token_text) if body.logprobs else None
        return ChatShape().choice(i, result.text, result.finish_reason, logprobs)

    def piece(i: int, entries: list[TokenLogprob]) -> dict:
        return chat_logprobs(entries, service.token_text)

    return _Prepared(requests, body.n, choice, piece_logprobs=piece if body.logprobs else None)


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


async def _respond(service: Service, body, prepare: Callable[[], _Prepared], shape, request: Request):
    """Tokenize and queue the request off the event loop (an adapter may load, or wait for a slot), then await
    every choice's result."""
    rid = f"{shape.prefix}-{uuid.uuid4().hex[:24]}"
    plan = await run_in_threadpool(prepare)
    if body.stream:
        return await _stream(service, body, plan, shape, rid, request)
    futures = await run_in_threadpool(service.submit_all, body.model, plan.requests)
    async with _watch_disconnect(request, plan.requests):
        try:
            results = await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures)), REQUEST_TIMEOUT_S)
        except TimeoutError:
            raise Busy(f"the request did not finish within {REQUEST_TIMEOUT_S:.0f} s; retry later") from None
    return {**envelope(rid, body.model, shape.object),
            "choices": [plan.choice(i, result) for i, result in enumerate(results)],
            "usage": usage(results, plan.per_prompt)}


async def _stream(service: Service, body, plan: _Prepared, shape, rid: str, request: Request) -> StreamingResponse:
    """Server-sent events: per choice, pieces of final text as they come and a chunk with its finish_reason; then
    the usage (a chunk of its own with `stream_options.include_usage`, else on the last finishing chunk), `[DONE]`.

    A client that hangs up cancels the request: the engine drops its rows at the next decode step.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    for i, req in enumerate(plan.requests):
        req.on_text = lambda text, i=i: loop.call_soon_threadsafe(events.put_nowait, ("text", i, text))
        if plan.piece_logprobs is not None:
            req.on_logprobs = lambda got, i=i: loop.call_soon_threadsafe(events.put_nowait, ("logprobs", i, got))
    futures = await run_in_threadpool(service.submit_all, body.model, plan.requests)  # errors before: plain errors
    for i, future in enumerate(futures):
        future.add_done_callback(lambda f, i=i: loop.call_soon_threadsafe(events.put_nowait, ("done", i, f)))

    def chunk(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**envelope(rid, body.model, shape.chunk_object), 'choices': choices, **extra})}\n\n"

    async def lines():
        async with _watch_disconnect(request, plan.requests):
            for i in range(len(plan.requests)):
                if shape.opening(i) is not None:  # chat streams open with the assistant role
                    yield chunk([shape.opening(i)])
                if plan.opening(i):  # echo: the prompt comes first
                    yield chunk([shape.delta(i, plan.opening(i), None)])
            results: dict[int, GenerationResult] = {}
            pending: dict[int, list[TokenLogprob]] = {}  # logprobs of the tokens behind a choice's next piece

            def logprobs_of(i: int) -> dict | None:
                got = pending.pop(i, None)
                return plan.piece_logprobs(i, got) if got else None

            while len(results) < len(futures):
                try:
                    kind, i, value = await asyncio.wait_for(events.get(), REQUEST_TIMEOUT_S)
                except TimeoutError:
                    _cancel(plan.requests)
                    yield _sse_error(service, Busy(f"no output within {REQUEST_TIMEOUT_S:.0f} s"))
                    break
                if kind == "logprobs":
                    pending.setdefault(i, []).extend(value)
                    continue
                if kind == "text":
                    yield chunk([shape.delta(i, value, None, logprobs_of(i))])
                    continue
                if value.exception() is not None:  # one choice failed: the answer is over, its other rows stop
                    _cancel(plan.requests)
                    yield _sse_error(service, value.exception())
                    break
                results[i] = value.result()
                done = [results[j] for j in sorted(results)] if len(results) == len(futures) else None
                extra = {"usage": usage(done, plan.per_prompt)} if done and not body.include_usage else {}
                yield chunk([shape.delta(i, None, results[i].finish_reason, logprobs_of(i))], **extra)
            if len(results) == len(futures) and body.include_usage:
                yield chunk([], usage=usage([results[j] for j in sorted(results)], plan.per_prompt))
            yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


@contextlib.asynccontextmanager
async def _watch_disconnect(request: Request, requests: list[GenerationRequest]):
    """While inside, a client that hangs up cancels `requests`; leaving early (an error, a cancelled stream, a
    failed choice) does too.

    After the body, the ASGI `receive` answers only when the client disconnects (or the response is done).
    """
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        _cancel(requests)

    watcher = asyncio.ensure_future(watch())
    finished = False
    try:
        yield
        finished = True
    finally:
        watcher.cancel()
        if not finished:
            _cancel(requests)


def _cancel(requests: list[GenerationRequest]) -> None:
    for req in requests:
        req.cancel()


def _sse_error(service: Service, err: BaseException) -> str:
    body = _public_fields(service, err)[1] if isinstance(err, TunelabError) else _internal(err)
    return f"data: {json.dumps(body)}\n\n"


def _public_fields(service: Service, err: TunelabError) -> tuple[int, dict]:
    """`http_fields` of `err`, adapters named as clients name them (never by their internal keys)."""
    status, body = http_fields(err)
    body["error"]["message"] = service.registry.public_text(body["error"]["message"])
    return status, body


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
        status, body = _public_fields(request.app.state.service, exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("request %s failed", request.url.path)
        return JSONResponse(_internal(exc), status_code=500)
