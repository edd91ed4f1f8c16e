"""What the gateway refuses, as errors of the producer's hierarchy, and the one table from errors to HTTP statuses.

Error bodies carry `message` (Cohere's field) and `error`/`error_type` (TEI's), never a secret
or a document: messages come from our own code, and validation errors leave out the input.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
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


class NotFound(RerankError):
    """No such job for this API key (unknown, expired, forgotten, or another key's), or no such model served."""


class NotServed(RerankError):
    """No worker serves the gateway's models, or the broker is unreachable; the message says which."""




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
    (NotFound, 404, "not_found"),
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
        kind = {400: "invalid", 408: "slow_client", 413: "too_large"}.get(error.status_code, "http")
        # FastAPI's 400 says only "There was an error parsing the body".
        message = "the body is not JSON that can be read: not UTF-8, or nested too deeply; send UTF-8 JSON" if error.status_code == 400 else str(error.detail)
        # Starlette's 405 names the allowed methods in `Allow` (RFC 9110); keep its headers.
        return _response(error.status_code, message, kind, dict(error.headers or {})), kind
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
    problems = [
        {"field": "body" if e.get("type") == "json_invalid" else _field(e.get("loc", ())), "reason": e.get("msg", "invalid")}
        for e in error.errors()[:most]
    ]
    message = "; ".join(f"{p['field']}: {p['reason']}" for p in problems) or "invalid request"
    return _response(422, message, "invalid", errors=problems)


def _field(loc: Any) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    # pydantic names union members (`documents.3.str`); the field is what the client wrote.
    return ".".join(p for p in parts if p not in ("str", "TextDocument", "function-after[_has_content()]")) or "body"


class ErrorBody(BaseModel):
    """Every error the gateway answers: Cohere's `message`, TEI's `error` and `error_type`, and what else helps."""

    message: str = Field(description="What went wrong and what to do.")
    error: str = Field(description="The same as `message` (TEI's field).")
    error_type: str = Field(description="The kind of error, as counted in `rerank_gateway_errors_total`.")
    errors: list[dict[str, str]] | None = Field(None, description="On 422: each bad `field` and its `reason`.")
    job_id: str | None = Field(None, description="On 504: the job still runs; fetch it at `status_url`.")
    status_url: str | None = None


WHEN = {
    400: "The body is not JSON, or not UTF-8.",
    401: "No `Authorization: Bearer <key>` with a key the gateway was given.",
    404: "No such job for this API key (unknown, expired, deleted, or another key's), or no worker serves the model named.",
    408: "The request body did not arrive within RERANK_GATEWAY_BODY_TIMEOUT seconds.",
    409: "The job was cancelled before it finished.",
    413: "The body is over RERANK_GATEWAY_MAX_BODY_BYTES.",
    422: "A field is invalid (`errors` names each) or breaks a limit (RERANK_MAX_*, RERANK_GATEWAY_MAX_DOCUMENTS); nothing was queued.",
    429: "The model's queue is deeper than RERANK_GATEWAY_MAX_QUEUE_DEPTH; retry after `Retry-After` seconds.",
    502: "A worker failed on the job.",
    503: "The broker is unreachable, or no worker serves any model yet.",
    504: "No answer within RERANK_GATEWAY_WAIT_TIMEOUT; the job still runs: `job_id` and `status_url` say where to fetch it.",
}
"""What each error status of the gateway means, for its OpenAPI document."""


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entry of a route that can answer `statuses`, each with `ErrorBody`."""
    documented: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody, "description": WHEN[status]} for status in statuses}
    if 429 in documented:
        documented[429]["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
    if 401 in documented:
        documented[401]["headers"] = {"WWW-Authenticate": {"description": "`Bearer`.", "schema": {"type": "string"}}}
    return documented


def _response(status: int, message: str, kind: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"message": message, "error": message, "error_type": kind, **extra}, status_code=status, headers=headers)
