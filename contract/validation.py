"""Parse untrusted requests into models and enforce the configured limits and character policy.

The producer runs this before anything is queued and the worker runs it again on every message
(workers never trust a message: it may come from an older producer or straight from the queue).

Character policy: C0 control characters other than tab, newline and carriage return (NUL, form
feed, escape, ...) and lone surrogates are rejected in the query, ids, titles, sections and texts.
They carry no meaning for the model, a surrogate cannot even be encoded as UTF-8, and rejecting
(rather than silently stripping) keeps what was scored identical to what the caller sent and
joins back. Bytes that are not valid UTF-8 never get this far: pydantic refuses to decode them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from contract.errors import InvalidRequest
from contract.formats import chunk_digest
from contract.plain import impurity
from contract.schemas import (
    Candidate,
    Chunk,
    ChunksRequest,
    DocumentsRequest,
    PassagesRequest,
    RerankResult,
    TwoStageResult,
)
from contract.settings import Settings

RequestT = TypeVar("RequestT", DocumentsRequest, ChunksRequest, PassagesRequest)

MAX_TOP_K = 1_000_000
"""The largest `top_k` accepted: above the highest RERANK_MAX_CANDIDATES and RERANK_MAX_CHUNKS allowed."""

MAX_PASSAGE_TOKENS = 1_000_000
"""The largest `max_passage_tokens` accepted: far above any RERANK_MAX_LENGTH, so only a caller's bug is refused."""

MAX_METADATA_DEPTH = 32
"""How deeply a candidate's passthrough `metadata` may nest; deeper breaks JSON encoders."""

_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


def parse_request(model: type[RequestT], data: Any, settings: Settings) -> RequestT:
    """Validate `data` as `model` and check it against the limits in `settings`."""
    if isinstance(data, model):
        request = data
    else:
        if not isinstance(data, dict):
            raise InvalidRequest(f"invalid {model.__name__}: expected a JSON object, got {type(data).__name__}")
        try:
            request = model.model_validate(data)
        except ValidationError as e:
            raise InvalidRequest(f"invalid {model.__name__}: {summarize(e)}") from e
        except RecursionError as e:  # metadata nested deeper than the interpreter can walk
            raise InvalidRequest(f"invalid {model.__name__}: nested too deeply to validate") from e
    check_limits(request, settings)
    if isinstance(request, ChunksRequest):
        check_pool(request)
    return request


def check_limits(request: BaseModel, settings: Settings) -> None:
    """Raise `InvalidRequest` when a request exceeds a limit from the settings or holds forbidden characters."""
    query = getattr(request, "query")
    if len(query) > settings.max_query_chars:
        raise InvalidRequest(
            f"query has {len(query)} characters, over the limit of {settings.max_query_chars} "
            "(RERANK_MAX_QUERY_CHARS); shorten the query"
        )
    _check_characters("query", query)
    limit = getattr(request, "max_passage_tokens", None)
    if limit is not None and limit > MAX_PASSAGE_TOKENS:
        raise InvalidRequest(
            f"max_passage_tokens={limit} is over {MAX_PASSAGE_TOKENS:,}; no model reads that many: leave it unset to keep "
            "as much of each passage as RERANK_MAX_LENGTH allows"
        )
    if isinstance(request, DocumentsRequest):
        _check_count("candidates", len(request.candidates), settings.max_candidates, "RERANK_MAX_CANDIDATES")
        _check_top_k(request.top_k)
    elif isinstance(request, PassagesRequest):
        # Plain passages are chunks without a template: they share the chunk limit.
        _check_count("passages", len(request.passages), settings.max_chunks, "RERANK_MAX_CHUNKS")
        if request.top_k is not None:
            _check_top_k(request.top_k)
    else:
        chunks = len(request.chunks) if request.chunks is not None else sum(request.pool.counts)
        _check_count("chunks", chunks, settings.max_chunks, "RERANK_MAX_CHUNKS")
        _check_count("candidate_ids", len(request.candidate_ids or ()), settings.max_candidates, "RERANK_MAX_CANDIDATES")
        if request.positions and request.positions[-1] >= settings.max_chunks:
            raise InvalidRequest(
                f"position {request.positions[-1]} lies beyond a chunk pool of at most {settings.max_chunks} "
                "(RERANK_MAX_CHUNKS); positions number the chunks of the job's pool from 0"
            )
        if request.top_k is not None:
            _check_top_k(request.top_k)
    if isinstance(request, DocumentsRequest):
        for c in request.candidates:
            _check_metadata(c.id, c.metadata)
    texts = list(_texts(request))
    for item_id, _, text in texts:
        if len(text) > settings.max_text_chars:
            raise InvalidRequest(
                f"{item_id!r} has a field of {len(text)} characters, over the limit of "
                f"{settings.max_text_chars} (RERANK_MAX_TEXT_CHARS); split or trim it"
            )
    # One scan of every text (joined by a tab, which is allowed); the field is looked for only on a find.
    if _FORBIDDEN.search("\t".join(text for _, _, text in texts)) is not None:
        for item_id, field, text in texts:
            _check_characters(f"{field} of {item_id!r}", text)


def check_pool(request: ChunksRequest) -> None:
    """Raise `InvalidRequest` unless each chunk is the one the producer sent at its place in the pool (`digests`).

    Without this a forged or corrupted stage-2 request (chunks reordered, positions shifted,
    duplicated or pointing at another paper's chunk) would be scored, and every `index` of the
    result would name another chunk than the one scored.
    """
    if request.digests is None:
        if request.positions is not None:
            raise InvalidRequest(
                "a stage-2 request with positions must carry a digest of each chunk at its place; "
                "positions come only from stage 1 of a two-stage job: submit the job through the client"
            )
        return
    if len(request.digests) != len(request.chunks):
        raise InvalidRequest(f"{len(request.digests)} digests for {len(request.chunks)} chunks; send one per chunk")
    places: Sequence[int] = range(len(request.chunks)) if request.positions is None else request.positions
    for chunk, place, digest in zip(request.chunks, places, request.digests):
        if chunk_digest(chunk, place) != digest:
            raise InvalidRequest(
                f"chunk {chunk.id[:64]!r} is not the chunk the producer sent at position {place} of the pool (its digest "
                "differs): the request was altered on its way; submit the job again"
            )


def check_ranking(result: RerankResult, sent: Sequence[Candidate | Chunk] | None) -> None:
    """Raise `InvalidRequest` unless every item of `result` names, at its `index`, what was `sent` there, once.

    A worker that predates the stage-2 check, or anyone who can write the result into Redis,
    could otherwise hand back indexes that point at other inputs (and `return_documents` would
    join the wrong texts). Without `sent` (a job followed by id only) indexes must still be
    distinct and not negative.
    """
    seen: set[int] = set()
    problem = None
    for item in result.items:
        expected = sent[item.index] if sent is not None and 0 <= item.index < len(sent) else None
        if item.index in seen:
            problem = f"index {item.index} appears more than once"
        elif item.index < 0 or (sent is not None and expected is None):
            problem = f"index {item.index} is outside the {len(sent) if sent is not None else 'sent'} inputs"
        elif expected is not None and (item.id != expected.id or (isinstance(expected, Chunk) and item.doc_id != expected.doc_id)):
            problem = f"item {item.id[:64]!r} at index {item.index} is not the input sent there ({expected.id[:64]!r})"
        if problem is not None:
            break
        seen.add(item.index)
    if problem is None and len(result.items) > result.scored:
        problem = f"it lists {len(result.items)} items but scored {result.scored}"
    if problem is not None:
        raise InvalidRequest(
            f"the {result.stage} ranking does not match what was sent: {problem}; it was altered in Redis or computed by a "
            "worker that does not check its chunks (older than this client): submit the job again, and upgrade the workers"
        )


def check_two_stage(result: TwoStageResult, documents: Sequence[Candidate] | None, chunks: Sequence[Chunk] | None) -> None:
    """`check_ranking` on both stages, and the chunks must belong to the papers stage 1 kept."""
    check_ranking(result.documents, documents)
    check_ranking(result.chunks, chunks)
    kept = {item.id for item in result.documents.items}
    strangers = [item for item in result.chunks.items if item.doc_id is not None and item.doc_id not in kept]
    if strangers:
        raise InvalidRequest(
            f"the chunks ranking does not match what was sent: chunk {strangers[0].id[:64]!r} belongs to "
            f"{strangers[0].doc_id[:64]!r}, a paper stage 1 did not keep; submit the job again"
        )


def _texts(request: BaseModel) -> Iterator[tuple[str, str, str]]:
    if isinstance(request, DocumentsRequest):
        for c in request.candidates:
            yield c.id, "id", c.id
            yield c.id, "title", c.title
            yield c.id, "text", c.text
            for n, chunk in enumerate(c.chunks or ()):
                yield c.id, f"chunk {n} id", chunk.id or ""
                yield c.id, f"chunk {n} section", chunk.section or ""
                yield c.id, f"chunk {n} text", chunk.text
    elif isinstance(request, PassagesRequest):
        for n, text in enumerate(request.passages):
            yield f"passages.{n}", "text", text
    else:
        for c in request.chunks or ():
            yield c.id, "id", c.id
            yield c.id, "doc_id", c.doc_id
            yield c.id, "title", c.title
            yield c.id, "section", c.section or ""
            yield c.id, "text", c.text


def _check_metadata(item_id: str, metadata: Any) -> None:
    problem = impurity(metadata, MAX_METADATA_DEPTH)
    if problem is not None:
        raise InvalidRequest(f"metadata of {item_id!r} {problem}; it is passed through untouched and must be plain JSON data")


def _check_characters(where: str, text: str) -> None:
    found = _FORBIDDEN.search(text)
    if found is not None:
        char = found.group()
        kind = "a lone surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
        raise InvalidRequest(
            f"{where} contains {kind} U+{ord(char):04X} at position {found.start()}; remove or replace it "
            "(of the control characters only tab, newline and carriage return are allowed; surrogates are not text)"
        )


def _check_count(what: str, count: int, limit: int, env: str) -> None:
    if count > limit:
        raise InvalidRequest(f"{count} {what}, over the limit of {limit} ({env}); send fewer per request")


def _check_top_k(top_k: int) -> None:
    # A top_k larger than the request is fine (all items come back), but one no request can
    # ever reach (10**30) is a bug on the caller's side, and such numbers break JSON readers
    # that hold integers in doubles (Flower, JavaScript).
    if top_k > MAX_TOP_K:
        raise InvalidRequest(f"top_k={top_k} is over {MAX_TOP_K:,}, more items than any request may hold")


def summarize(error: ValidationError, most: int = 5) -> str:
    """One line naming the first `most` problems of `error`, and how many more there are."""
    problems = [
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()[:most]
    ]
    more = error.error_count() - len(problems)
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")
