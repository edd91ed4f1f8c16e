"""What a worker does between the two stages of a chained job: trim what stage 2 is sent, and check what it received.

Only workers run these (stage 1 before Celery sends the chain on, stage 2 before it scores),
so they live here rather than in the producer's contract.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from pydantic import ValidationError

from contract.errors import InvalidRequest
from contract.formats import chunk_digest
from contract.names import TASK_CHUNKS
from contract.schemas import Chunk, ChunksRequest, RerankResult
from contract.validation import summarize


def send_on_kept_chunks(chain: Any, kept: Collection[str]) -> None:
    """Cut the chained stage-2 request down to the chunks of the papers stage 1 kept, before Celery sends it.

    `chain` is stage 1's `request.chain` (the steps still to run, the next one last). The chunk
    pool of every candidate travels with stage 1, but stage 2 scores only the kept papers' chunks:
    sending it the rest (about four fifths) cost an encode, a transfer and a decode of each.
    The chunks keep their places in the pool (`positions`), so results index the same pool
    either way, and their `digests`, which bind each chunk to its place, go with them. A step
    not shaped like our stage-2 request is left alone, for stage 2 to refuse.
    """
    step = chain[-1] if isinstance(chain, list) and chain else None
    kwargs = step.get("kwargs") if isinstance(step, dict) and step.get("task") == TASK_CHUNKS else None
    request = kwargs.get("request") if isinstance(kwargs, dict) else None
    chunks = request.get("chunks") if isinstance(request, dict) and request.get("positions") is None else None
    if not isinstance(chunks, list) or not all(isinstance(c, dict) for c in chunks):
        return
    positions = [n for n, chunk in enumerate(chunks) if isinstance(chunk.get("doc_id"), str) and chunk["doc_id"] in kept]
    if not positions:  # the kept papers have no chunks: a request needs one, and stage 2 scores none anyway
        return
    digests = request.get("digests")
    if digests is None:
        # A producer older than digests: name the kept chunks here, so stage 2 still checks every place.
        try:
            digests = [chunk_digest(Chunk.model_validate(chunks[n]), n) for n in positions]
        except ValidationError:
            return
    elif isinstance(digests, list) and len(digests) == len(chunks):
        digests = [digests[n] for n in positions]
    kwargs["request"] = {**request, "chunks": [chunks[n] for n in positions], "positions": positions, "digests": digests}


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
    if problem is None and not {c.doc_id for c in request.chunks} <= set(candidates):
        problem = "some chunks belong to no candidate of this request"
    if problem is not None:
        raise InvalidRequest(f"stage 2 received a stage-1 result that does not belong to its request: {problem}")
    return documents
