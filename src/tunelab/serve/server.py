"""Run the OpenAI-compatible server with uvicorn: `serve` (blocking, for `tunelab serve`) and `running`
(a server on a background thread, for tests and notebooks)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from tunelab.serve.api import create_app
from tunelab.serve.service import build_service


def serve(model: str, adapters: dict[str, Path], *, host: str = "127.0.0.1", port: int = 8000,
          adapter_root: Path | None = None, max_adapters: int = 8, max_rank: int = 64,
          max_batch_size: int = 16, max_tokens_limit: int = 512, merge: str | None = None) -> None:
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
        merge: fold this adapter (one of `adapters`, of a mergeable method) into the base at start.

    Bad arguments or adapters raise `TunelabError`s naming them before the server listens.
    """
    service = build_service(model, adapters, adapter_root=adapter_root, max_adapters=max_adapters,
                            max_rank=max_rank, max_batch_size=max_batch_size, max_tokens_limit=max_tokens_limit,
                            merge=merge)
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="info")
    finally:
        service.close()


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0) -> Iterator[str]:
    """Run `app` with uvicorn on a daemon thread; yield its base URL (`port=0`: a free port), then stop it."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
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
