"""Errors of the serving layer, each carrying the HTTP status and OpenAI error `type`/`code` it maps to.

They are `TunelabError` subclasses, so the same one-line messages reach the CLI (exit 2) when they happen at
start-up (a bad `--adapter`), and the API's error body when they happen on a request.
"""

from __future__ import annotations

from tunelab.errors import ArtifactError, ConfigError, ResourceError, TunelabError


class BadRequest(ConfigError):
    """A request field or adapter that cannot be served: HTTP 400."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class AdapterRejected(ArtifactError):
    """An adapter directory that is unsafe, corrupt, too large or of a method that cannot be served: 400."""

    status = 400
    type = "invalid_request_error"
    param = "model"
    code = "adapter_rejected"


class ModelNotFound(ArtifactError):
    """A `model` that is neither the base nor a known or loadable adapter: 404."""

    status = 404
    type = "invalid_request_error"
    param = "model"
    code = "model_not_found"


class Busy(ResourceError):
    """Every adapter slot is held by in-flight requests: 503, retry later."""

    status = 503
    type = "server_error"
    param = "model"
    code = "adapter_slots_busy"


class QueueFull(ResourceError):
    """Too many requests are waiting: 429, retry later."""

    status = 429
    type = "rate_limit_error"
    param = None
    code = "queue_full"


class ClientGone(TunelabError):
    """The client hung up before its request finished; nobody reads the answer."""

    status = 499  # nginx's "client closed request"
    type = "invalid_request_error"
    param = None
    code = "client_disconnected"


def http_fields(err: TunelabError) -> tuple[int, dict]:
    """The HTTP status and OpenAI error body for `err` (other `TunelabError`s are 400s)."""
    status = getattr(err, "status", 400)
    body = {"message": str(err), "type": getattr(err, "type", "invalid_request_error"),
            "param": getattr(err, "param", None), "code": getattr(err, "code", None)}
    return status, {"error": body}
