"""Between the stages of a chained job: what stage 2 checks before it scores (that the stage-1 result it received belongs
to its request), and what a revoked stage 1 means for the job.

Only workers run these, so they live here rather than in the producer's contract.
"""

from __future__ import annotations

from typing import Any

from celery.signals import task_revoked
from pydantic import ValidationError

from contract.errors import InvalidRequest
from contract.names import TASK_DOCUMENTS
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


@task_revoked.connect
def _cancel_the_job(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A revoked stage 1 (anyone may revoke its id alone) never sends stage 2: record the job itself as cancelled, so its owner
    hears JobCancelled instead of waiting for a result that cannot come."""
    chain = getattr(request, "chain", None)
    step = chain[-1] if isinstance(chain, list) and chain else None
    job_id = (step.get("options") or {}).get("task_id") if isinstance(step, dict) else None
    if getattr(sender, "name", None) == TASK_DOCUMENTS and isinstance(job_id, str) and 0 < len(job_id) <= 255:
        sender.backend.mark_as_revoked(job_id, "its stage 1 was revoked")
