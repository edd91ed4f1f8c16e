"""Turn engine scores into the contract's rankings for stage 1 and stage 2."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

from contract.errors import InvalidRequest
from contract.formats import chunk_passage, document_passage, text_windows
from contract.schemas import (
    ChunksRequest,
    DocumentsRequest,
    PassagesRequest,
    RankedItem,
    RerankResult,
    ScoringInfo,
)
from scoring.engine import Scorer, Scores
from scoring.tokens import Truncation
from worker.runtime import model_loads

OnBatch = Callable[[int, int], None]
_PASSAGE = re.compile(r"^passages\.(\d+)")


def rank_documents(
    engine: Scorer, request: DocumentsRequest, worker: str | None = None, on_batch: OnBatch | None = None
) -> RerankResult:
    """Stage 1: score each paper's title and abstract and keep the best `top_k`.

    With `request.windows` > 1 a long text is scored window by window (the first window is the
    abstract) and each paper keeps its best window's logit. `on_batch(done, total)` follows
    the forward passes.
    """
    owners: list[int] = []
    passages: list[str] = []
    for n, paper in enumerate(request.candidates):
        for window in text_windows(paper.text, request.windows):
            owners.append(n)
            passages.append(document_passage(paper.model_copy(update={"text": window})))
    with _named(lambda n: f"candidate {request.candidates[owners[n]].id[:64]!r}"):
        scored = engine.score(request.query, passages, on_batch, Truncation.of(request))
    best = [float("-inf")] * len(request.candidates)
    for owner, logit in zip(owners, scored.logits):
        best[owner] = max(best[owner], logit)
    scores = replace(scored, logits=best)
    ids = [c.id for c in request.candidates]
    items = _ranked(scores, ids, range(len(ids)), request.top_k, request.return_logits)
    return RerankResult(
        stage="documents", query=request.query, items=items, scored=len(ids), info=_info(engine, scores, len(passages), worker)
    )


def rank_chunks(
    engine: Scorer,
    request: ChunksRequest,
    kept_doc_ids: set[str] | None = None,
    worker: str | None = None,
    on_batch: OnBatch | None = None,
) -> RerankResult:
    """Stage 2: score chunks, only those of `kept_doc_ids` when given; `index` is each chunk's place in the pool.

    The pool is `request.chunks`, or the whole chunk pool of the job when stage 1 sent on only
    some of it (`request.positions`).
    """
    selected = [i for i, c in enumerate(request.chunks) if kept_doc_ids is None or c.doc_id in kept_doc_ids]
    chunks = [request.chunks[i] for i in selected]
    positions = selected if request.positions is None else [request.positions[i] for i in selected]
    with _named(lambda n: f"chunk {chunks[n].id[:64]!r}"):
        scores = engine.score(request.query, [chunk_passage(c) for c in chunks], on_batch, Truncation.of(request))
    items = _ranked(scores, [c.id for c in chunks], positions, request.top_k, request.return_logits, [c.doc_id for c in chunks])
    return RerankResult(
        stage="chunks", query=request.query, items=items, scored=len(chunks), info=_info(engine, scores, len(chunks), worker)
    )


def rank_passages(
    engine: Scorer, request: PassagesRequest, worker: str | None = None, on_batch: OnBatch | None = None
) -> RerankResult:
    """Plain pairs: score each passage exactly as sent (no template); an item's `index` (and `id`) is its place in the request."""
    scores = engine.score(request.query, list(request.passages), on_batch, Truncation.of(request))
    count = len(request.passages)
    items = _ranked(scores, [str(n) for n in range(count)], range(count), request.top_k, request.return_logits)
    return RerankResult(
        stage="passages", query=request.query, items=items, scored=count, info=_info(engine, scores, count, worker)
    )


def _ranked(
    scores: Scores,
    ids: Sequence[str],
    positions: Sequence[int],
    top_k: int | None,
    with_logits: bool,
    doc_ids: Sequence[str] | None = None,
) -> list[RankedItem]:
    probabilities = scores.probabilities
    # Sort on the logit, not the sigmoid: fp32 sigmoid rounds large logits to the same 1.0.
    order = sorted(range(len(ids)), key=lambda i: (-scores.logits[i], i))[:top_k]
    return [
        RankedItem(
            index=positions[i],
            id=ids[i],
            score=probabilities[i],
            logit=scores.logits[i] if with_logits else None,
            doc_id=doc_ids[i] if doc_ids else None,
        )
        for i in order
    ]


def _info(engine: Scorer, scores: Scores, pairs: int, worker: str | None) -> ScoringInfo:
    facts = engine.facts
    return ScoringInfo(
        model=facts.name,
        revision=facts.revision,
        device=facts.device,
        dtype=facts.dtype,
        attention=facts.attention,
        max_length=facts.max_length,
        pairs=pairs,
        tokens=scores.tokens,
        padded_tokens=scores.padded_tokens,
        batches=scores.batches,
        oom_splits=scores.oom_splits,
        tokenize_ms=round(scores.tokenize_seconds * 1000, 3),
        forward_ms=round(scores.forward_seconds * 1000, 3),
        worker=worker or socket.gethostname(),
        pid=os.getpid(),
        model_loads=model_loads(),
        cached_pairs=scores.cached,
    )


@contextmanager
def _named(name_of: Callable[[int], str]) -> Iterator[None]:
    """Re-raise the tokenizer's refusal of `passages.N` (truncate=never) naming the input pair N came from."""
    try:
        yield
    except InvalidRequest as e:
        found = _PASSAGE.match(str(e))
        if found is None:
            raise
        raise InvalidRequest(name_of(int(found.group(1))) + str(e)[found.end() :]) from e
