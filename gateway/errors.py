"""What the gateway refuses, as errors of the producer's hierarchy, and the one table from errors to HTTP statuses.

Error bodies carry `message` (Cohere's field) and `error`/`error_type` (TEI's), never a secret
or a document: messages come from our own code, and validation errors leave out the input.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from contract.errors import (
    BrokerUnavailable,
    InvalidRequest,
    JobCancelled,
    ModelLoadError,
    RerankError,
    RerankTimeout,
    WorkerError,
)


class Unauthorized(RerankError):
    """No valid API key was sent; send `Authorization: Bearer <key>`."""


class TooLarge(InvalidRequest):
    """The request is over the gateway's size limits; split it."""


class Unprocessable(InvalidRequest):
    """A field of the request is invalid; `field` names it (dotted, e.g. `documents.3`)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        """Refuse `field` for the reason `message`."""
        super().__init__(message)
        self.field = field


class NotServed(RerankError):
    """No worker serves the requested model on the queue the gateway sends to; the message lists the models served."""


class Overloaded(RerankError):
    """The model's queue is deeper than RERANK_GATEWAY_MAX_QUEUE_DEPTH; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        """Refuse for now; the client may retry after `retry_after` seconds."""
        super().__init__(message)
        self.retry_after = retry_after


class ClientGone(RerankError):
    """The client disconnected before its answer; its job was revoked (nobody reads this response)."""


class WaitTimedOut(RerankTimeout):
    """The job outlived the request's wait; it still runs, and `GET /v1/jobs/{job_id}` fetches it."""

    def __init__(self, message: str, job_id: str) -> None:
        """The wait for `job_id` ended."""
        super().__init__(message)
        self.job_id = job_id


# First match wins: subclasses before their bases.
STATUSES: list[tuple[type[BaseException], int, str]] = [
    (Unauthorized, 401, "unauthorized"),
    (ClientGone, 499, "client_gone"),
    (TooLarge, 413, "too_large"),
    (InvalidRequest, 422, "invalid"),
    (Overloaded, 429, "overloaded"),
    (NotServed, 503, "not_served"),
    (BrokerUnavailable, 503, "broker_unavailable"),
    (RerankTimeout, 504, "timeout"),
    (JobCancelled, 409, "cancelled"),
    (WorkerError, 502, "worker"),
    (ModelLoadError, 502, "worker"),
    (RerankError, 500, "internal"),
]


def status_of(error: BaseException) -> tuple[int, str]:
    """The HTTP status and error kind (a metrics label) of `error`."""
    for kind, status, name in STATUSES:
        if isinstance(error, kind):
            return status, name
    return 500, "internal"


def error_response(error: BaseException) -> tuple[JSONResponse, str]:
    """The response for `error`, and its kind."""
    if isinstance(error, RequestValidationError):
        return validation_response(error), "invalid"
    if isinstance(error, HTTPException):
        kind = "too_large" if error.status_code == 413 else "http"
        return _response(error.status_code, str(error.detail), kind), kind
    status, kind = status_of(error)
    message = str(error) if isinstance(error, RerankError) else "internal error; see the gateway's log"
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if isinstance(error, Unprocessable) and error.field:
        extra["errors"] = [{"field": error.field, "reason": message}]
    if isinstance(error, WaitTimedOut):
        extra.update(job_id=error.job_id, status_url=f"/v1/jobs/{error.job_id}")
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return _response(status, message, kind, headers, **extra), kind


def validation_response(error: RequestValidationError, most: int = 10) -> JSONResponse:
    """422 naming each bad field and why, without echoing the input (it may be a whole document)."""
    problems = [{"field": _field(e.get("loc", ())), "reason": e.get("msg", "invalid")} for e in error.errors()[:most]]
    message = "; ".join(f"{p['field']}: {p['reason']}" for p in problems) or "invalid request"
    return _response(422, message, "invalid", errors=problems)


def _field(loc: Any) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    # pydantic names union members (`documents.3.str`); the field is what the client wrote.
    return ".".join(p for p in parts if p not in ("str", "TextDocument", "function-after[_has_content()]")) or "body"


def _response(status: int, message: str, kind: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"message": message, "error": message, "error_type": kind, **extra}, status_code=status, headers=headers)
