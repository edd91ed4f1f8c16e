"""What stage 2 of a chained job checks before it scores: that the stage-1 result it received belongs to its request.

Only workers run this, so it lives here rather than in the producer's contract.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from contract.errors import InvalidRequest
from contract.schemas import ChunksRequest, RerankResult
from contract.validation import summarize


def check_stage1(stage1: Any, request: ChunksRequest) -> RerankResult:
    """Parse the stage-1 result a chained stage 2 received and check it refers only to its own request.

    A message straight from the queue may carry any "result": ids never sent, indexes out of
    range, another query's ranking. Each item must be the candidate at its index, once.
    """
    try:
        documents = RerankResult.model_validate(stage1)
    except ValidationError as e:
        raise InvalidRequest(f"stage 2 received something other than a stage-1 result: {summarize(e)}") from e
    candidates = request.candidate_ids
    if candidates is None:
        raise InvalidRequest("a chained stage-2 request must list the candidate_ids its stage-1 result refers to")
    problem = None
    if documents.stage != "documents" or documents.query != request.query:
        problem = "it is not a stage-1 ranking of this request's query"
    elif documents.scored != len(candidates) or len(documents.items) > len(candidates):
        problem = f"it scored {documents.scored} candidates and kept {len(documents.items)}, but the request has {len(candidates)}"
    elif len({item.id for item in documents.items}) != len(documents.items):
        problem = "it lists a candidate more than once"
    else:
        strangers = [item for item in documents.items if not 0 <= item.index < len(candidates) or candidates[item.index] != item.id]
        if strangers:
            problem = f"item {strangers[0].id[:64]!r} at index {strangers[0].index} is not that candidate of this request"
    if problem is None and not {c.doc_id for c in request.chunks or ()} <= set(candidates):
        problem = "some chunks belong to no candidate of this request"
    if problem is not None:
        raise InvalidRequest(f"stage 2 received a stage-1 result that does not belong to its request: {problem}")
    return documents
