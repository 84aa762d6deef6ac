"""Run the OpenAI-compatible server with uvicorn: `serve` (blocking, for `tunelab serve`) and `running`
(a server on a background thread, for tests and notebooks).

Both run uvicorn with limits on what a connection may hold (`uvicorn_config`): request headers must arrive
within `HEADER_TIMEOUT_S` of a connection's (or a request's) first byte and fit in 16 KiB (h11's incomplete-event
limit), an idle keep-alive connection closes after 5 s, and at most `MAX_CONNECTIONS` connections and tasks run
at once (uvicorn answers 503 beyond). Bodies have their own size and time limits (`guard.Guard`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tunelab.serve.api import create_app
from tunelab.serve.guard import is_loopback
from tunelab.serve.registry import SLOT_WAIT_S
from tunelab.serve.engine import PREFILL_CHUNK
from tunelab.serve.service import build_service

log = logging.getLogger("tunelab.serve")
HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 16 * 1024
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 512
API_KEY_ENV = "TUNELAB_API_KEY"


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers, which uvicorn lacks: a connection that opens
    and sends nothing, or sends part of a request line or headers and stalls, is closed after `HEADER_TIMEOUT_S`.
    The deadline runs from the connection's first moment, then from each request's first byte."""

    header_timeout_s = HEADER_TIMEOUT_S
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._cancel_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, host: str, port: int, log_level: str):
    """The uvicorn `Config` for `app` with tunelab's connection limits (see the module docstring)."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                          http=HeaderDeadlineProtocol, timeout_keep_alive=KEEP_ALIVE_S,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=MAX_CONNECTIONS)


def serve(model: str, adapters: dict[str, Path], *, host: str = "127.0.0.1", port: int = 8000,
          adapter_root: Path | None = None, max_adapters: int = 8, max_rank: int = 64,
          max_batch_size: int = 16, max_tokens_limit: int = 512, merge: str | None = None,
          api_key: str | None = None, docs: bool = False, served_model_name: str | None = None,
          dtype: str = "auto", device: str = "auto", slot_wait_s: float = SLOT_WAIT_S,
          chat_template: str | None = None, prefill_chunk: int = PREFILL_CHUNK, cuda_graphs: bool = True) -> None:
    """Serve `model` (local HF dir or alias) with `adapters` (name -> adapter dir) until interrupted.

    Args:
        model: the base model, loaded once and frozen.
        adapters: adapters attached at start (`--adapter NAME=DIR`); requests name them in `model`.
        host, port: where to listen (127.0.0.1 by default: only this machine).
        adapter_root: a directory whose sub-directories are loaded by name on demand; None: none are.
        max_adapters: adapters loaded at once; one more evicts the least recently used idle one.
        max_rank: adapters with a larger LoRA rank are refused.
        max_batch_size: rows decoded together in one batch.
        max_tokens_limit: the largest `max_tokens` a request may ask for.
        prefill_chunk: prompt tokens (over the rows joining a running batch) prefilled between two of its
            decode steps.
        cuda_graphs: on a GPU, replay each decode step as a CUDA graph (`serve/slots.py`); False: eager steps.
        merge: fold this adapter (one of `adapters`, of a mergeable method) into the base at start.
        api_key: every `/v1` route needs `Authorization: Bearer API_KEY`; None: the `TUNELAB_API_KEY`
            environment variable, if set. Without a key on a non-loopback `host`, one warning line is logged.
        docs: serve `/docs`, `/redoc` and `/openapi.json`.
        served_model_name: the name requests give for the base (default: the alias or the directory's name).
        dtype, device: as for `load_model` (`auto`: bfloat16 on a GPU that has it, else float32; CUDA if present).
        slot_wait_s: how long a request for a non-resident adapter waits for a slot when all are held (then 503).
        chat_template: a Jinja file, or a template shipped with tunelab, for a base whose tokenizer has none.

    Bad arguments or adapters raise `TunelabError`s naming them before the server listens.
    """
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not api_key and not is_loopback(host):
        log.warning("--host %s accepts connections from other machines and no --api-key (or %s) is set: "
                    "anyone who can reach it may generate and load adapters", host, API_KEY_ENV)
    service = build_service(model, adapters, adapter_root=adapter_root, max_adapters=max_adapters,
                            max_rank=max_rank, max_batch_size=max_batch_size, max_tokens_limit=max_tokens_limit,
                            merge=merge, served_model_name=served_model_name, dtype=dtype, device=device,
                            slot_wait_s=slot_wait_s, chat_template=chat_template, prefill_chunk=prefill_chunk,
                            cuda_graphs=cuda_graphs)
    try:
        uvicorn.Server(uvicorn_config(create_app(service, api_key=api_key, docs=docs), host, port, "info")).run()
    finally:
        service.close()


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0) -> Iterator[str]:
    """Run `app` with uvicorn on a daemon thread; yield its base URL (`port=0`: a free port), then stop it."""
    server = uvicorn.Server(uvicorn_config(app, host, port, "warning"))
    thread = threading.Thread(target=server.run, name="tunelab-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the HTTP server did not start on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
