"""What a request must pass before the API sees it: the API key, the body size and the body read time.

`Guard` is plain ASGI middleware, so a refused request costs no parsing:
- with an API key, every `/v1` route needs `Authorization: Bearer KEY` (401 otherwise, as OpenAI and vLLM
  answer); `/health`, `/ready` and `/metrics` stay open for probes;
- a body over `max_body_bytes` is a 413, before any of it is read when `Content-Length` says so, and as soon
  as the count passes the limit otherwise (chunked bodies);
- a body that does not arrive within `body_timeout_s` is a 408, so a slow client cannot hold a request open.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time

MAX_BODY_BYTES = 4 * 2**20  # far above a full context of text, far below what hurts the server's memory
BODY_TIMEOUT_S = 30.0
OPEN_PATHS = ("/health", "/ready", "/metrics")


class Refused(Exception):
    """A request refused before the app: its status, message and OpenAI error `type`/`code`."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


class Guard:
    """ASGI middleware: API key on `/v1` routes, body size and read-time limits (see the module docstring)."""

    def __init__(self, app, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 body_timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check_key(scope)
            body = await self._read_body(scope, receive)
        except Refused as err:
            return await _refuse(send, err)
        replayed = False

        async def replay():  # the body once, then the client's own messages (a later disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _check_key(self, scope) -> None:
        if self.expected is None or not scope["path"].startswith("/v1"):
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            what = "no API key was given" if not given else "the API key is not valid"
            raise Refused(401, f"{what}; expected the header 'Authorization: Bearer KEY' with the server's key",
                          "invalid_api_key")

    async def _read_body(self, scope, receive) -> bytes:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Refused(400, f"Content-Length {declared[:40]!r}: expected a number of bytes", "bad_length")
            self._check_size(int(declared))
        chunks, size, deadline = [], 0, time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise Refused(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                              "body_timeout") from None
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client disconnected while sending the body", "client_disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            self._check_size(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _check_size(self, size: int) -> None:
        if size > self.max_body_bytes:
            raise Refused(413, f"request body: more than {self.max_body_bytes} bytes, the server limit",
                          "body_too_large")


async def _refuse(send, err: Refused) -> None:
    kind = "authentication_error" if err.status == 401 else "invalid_request_error"
    body = json.dumps({"error": {"message": str(err), "type": kind, "param": None, "code": err.code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
