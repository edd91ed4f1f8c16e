"""Parse untrusted requests into models and enforce the configured limits."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from producer.errors import InvalidRequest
from producer.schemas import ChunksRequest, DocumentsRequest
from producer.settings import Settings

RequestT = TypeVar("RequestT", DocumentsRequest, ChunksRequest)


def parse_request(model: type[RequestT], data: Any, settings: Settings) -> RequestT:
    """Validate `data` as `model` and check it against the limits in `settings`."""
    if isinstance(data, model):
        request = data
    else:
        try:
            request = model.model_validate(data)
        except ValidationError as e:
            raise InvalidRequest(f"invalid {model.__name__}: {_summarize(e)}") from e
    check_limits(request, settings)
    return request


def check_limits(request: BaseModel, settings: Settings) -> None:
    """Raise `InvalidRequest` when a request exceeds a size limit from the settings."""
    query = getattr(request, "query")
    if len(query) > settings.max_query_chars:
        raise InvalidRequest(
            f"query has {len(query)} characters, over the limit of {settings.max_query_chars} "
            "(RERANK_MAX_QUERY_CHARS); shorten the query"
        )
    if isinstance(request, DocumentsRequest):
        _check_count("candidates", len(request.candidates), settings.max_candidates, "RERANK_MAX_CANDIDATES")
        texts = ((c.id, f) for c in request.candidates for f in (c.title, c.text))
    else:
        _check_count("chunks", len(request.chunks), settings.max_chunks, "RERANK_MAX_CHUNKS")
        texts = ((c.id, f) for c in request.chunks for f in (c.title, c.section or "", c.text))
    for item_id, text in texts:
        if len(text) > settings.max_text_chars:
            raise InvalidRequest(
                f"{item_id!r} has a field of {len(text)} characters, over the limit of "
                f"{settings.max_text_chars} (RERANK_MAX_TEXT_CHARS); split or trim it"
            )


def _check_count(what: str, count: int, limit: int, env: str) -> None:
    if count > limit:
        raise InvalidRequest(f"{count} {what}, over the limit of {limit} ({env}); send fewer per request")


def _summarize(error: ValidationError, most: int = 5) -> str:
    problems = [
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()[:most]
    ]
    more = error.error_count() - len(problems)
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")
