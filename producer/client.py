"""The producer-side client: validate, enqueue, collect typed results."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery import Celery, chain
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from producer.app import create_app
from producer.chunking import DEFAULT_MAX_CHARS, chunk_text
from producer.errors import BrokerUnavailable, ModelLoadError, RerankError, RerankTimeout, WorkerError
from producer.names import TASK_CHUNKS, TASK_DOCUMENTS
from producer.schemas import (
    Candidate,
    Chunk,
    ChunksRequest,
    DocumentsRequest,
    RerankResult,
    TwoStageResult,
)
from producer.settings import Settings, get_settings
from producer.validation import parse_request

CandidateLike = Candidate | Mapping[str, Any]
ChunkLike = Chunk | Mapping[str, Any]


class RerankClient:
    """Submit re-ranking jobs to Celery workers, or run them in-process when no broker is set."""

    def __init__(self, settings: Settings | None = None, *, chunk_chars: int = DEFAULT_MAX_CHARS) -> None:
        """Create a client from `settings` (default: the ``RERANK_*`` environment)."""
        self.settings = settings or get_settings()
        self.chunk_chars = chunk_chars
        self.app: Celery = create_app(self.settings)
        if self.settings.embedded:
            _register_worker_tasks()

    def rerank_documents(
        self,
        query: str,
        candidates: Sequence[CandidateLike],
        top_k: int = 20,
        *,
        return_logits: bool = False,
        timeout: float | None = None,
    ) -> RerankResult:
        """Score papers by title and abstract (stage 1) and return the best `top_k`.

        Raises:
            InvalidRequest: the input is malformed or over a limit; nothing was queued.
            WorkerError: the worker failed; the message names the cause.
            RerankTimeout: no result within `timeout` seconds.
            BrokerUnavailable: the broker or result backend cannot be reached.
        """
        request = self._documents_request(query, candidates, top_k, return_logits)
        signature = self.app.signature(TASK_DOCUMENTS, args=(request.model_dump(mode="json"),), queue=self.settings.queue)
        return RerankResult.model_validate(self._collect(self._send(signature.apply_async), timeout))

    def rerank_chunks(
        self,
        query: str,
        chunks: Sequence[ChunkLike],
        top_k: int | None = None,
        *,
        return_logits: bool = False,
        timeout: float | None = None,
    ) -> RerankResult:
        """Score passages (stage 2) and return them sorted, all of them unless `top_k` is set.

        Raises the same errors as `rerank_documents`.
        """
        request = parse_request(
            ChunksRequest,
            {"query": query, "chunks": list(chunks), "top_k": top_k, "return_logits": return_logits},
            self.settings,
        )
        signature = self.app.signature(TASK_CHUNKS, kwargs={"request": request.model_dump(mode="json")}, queue=self.settings.queue)
        return RerankResult.model_validate(self._collect(self._send(signature.apply_async), timeout))

    def two_stage(
        self,
        query: str,
        candidates: Sequence[CandidateLike],
        top_k_docs: int = 20,
        top_k_chunks: int | None = None,
        *,
        return_logits: bool = False,
        timeout: float | None = None,
    ) -> TwoStageResult:
        """Rank papers, then rank the chunks of the `top_k_docs` best, as one Celery chain.

        Papers without chunks are split by the default chunker. Stage-2 `index` values point
        into `chunk_pool(candidates)`, the order this client sends chunks in.

        Raises the same errors as `rerank_documents`; a stage-1 failure surfaces with its cause.
        """
        result = self.submit_two_stage(query, candidates, top_k_docs, top_k_chunks, return_logits=return_logits)
        return TwoStageResult.model_validate(self._collect(result, timeout))

    def submit_two_stage(
        self,
        query: str,
        candidates: Sequence[CandidateLike],
        top_k_docs: int = 20,
        top_k_chunks: int | None = None,
        *,
        return_logits: bool = False,
    ) -> AsyncResult:
        """Validate and enqueue a two-stage chain; return its Celery result handle."""
        documents = self._documents_request(query, candidates, top_k_docs, return_logits)
        chunks = parse_request(
            ChunksRequest,
            {
                "query": query,
                "chunks": self.chunk_pool(documents.candidates),
                "top_k": top_k_chunks,
                "return_logits": return_logits,
            },
            self.settings,
        )
        # The queue travels with each signature: stage 2 is sent by the worker, whose own
        # routing would otherwise pick the worker's default queue rather than the producer's.
        job = chain(
            self.app.signature(TASK_DOCUMENTS, args=(_slim(documents),), immutable=True, queue=self.settings.queue),
            self.app.signature(TASK_CHUNKS, kwargs={"request": chunks.model_dump(mode="json")}, queue=self.settings.queue),
        )
        return self._send(job.apply_async)

    def chunk_pool(self, candidates: Iterable[Candidate]) -> list[Chunk]:
        """Return every candidate's chunks, splitting texts that came without chunks."""
        pool: list[Chunk] = []
        for paper in candidates:
            if paper.chunks:
                pieces = [(c.id, c.section, c.text) for c in paper.chunks]
            else:
                pieces = [(None, c.section, c.text) for c in chunk_text(paper.text, self.chunk_chars)]
            for n, (chunk_id, section, text) in enumerate(pieces):
                pool.append(
                    Chunk(id=chunk_id or f"{paper.id}#{n}", doc_id=paper.id, title=paper.title, section=section, text=text)
                )
        return pool

    def _documents_request(
        self, query: str, candidates: Sequence[CandidateLike], top_k: int, return_logits: bool
    ) -> DocumentsRequest:
        data = {"query": query, "candidates": list(candidates), "top_k": top_k, "return_logits": return_logits}
        return parse_request(DocumentsRequest, data, self.settings)

    def _send(self, apply_async: Any) -> AsyncResult:
        try:
            return apply_async()
        except RerankError:
            raise
        except OperationalError as e:
            raise BrokerUnavailable(
                f"cannot reach the broker at {_redact(self.settings.broker_url)}: {e}; "
                "check RERANK_BROKER_URL and that the broker is running"
            ) from e

    def _collect(self, result: AsyncResult, timeout: float | None) -> dict[str, Any]:
        try:
            return result.get(timeout=timeout, propagate=True)
        except RerankError:
            raise
        except CeleryTimeoutError as e:
            raise RerankTimeout(
                f"job {result.id} gave no result within {timeout}s; it may still finish: "
                "check that workers consume the queue, or raise the timeout"
            ) from e
        except (OperationalError, ConnectionError) as e:
            raise BrokerUnavailable(
                f"lost the result backend while waiting for job {result.id}: {e}; check RERANK_RESULT_BACKEND"
            ) from e
        except Exception as e:
            raise WorkerError(f"job {result.id} failed in the worker: {type(e).__name__}: {e}") from e


def _slim(request: DocumentsRequest) -> dict[str, Any]:
    """Drop what stage 1 does not read (chunks, metadata) to keep the message small."""
    return request.model_dump(mode="json", exclude={"candidates": {"__all__": {"chunks", "metadata"}}})


def _register_worker_tasks() -> None:
    """Import the worker's tasks so they run in this process (the embedded mode)."""
    try:
        importlib.import_module("worker.tasks")
    except ImportError as e:
        raise ModelLoadError(
            "no RERANK_BROKER_URL is set, so tasks run in this process, which needs the worker "
            f"extra: pip install 'bge-rerank-celery[worker]' ({e}); or set RERANK_BROKER_URL"
        ) from e


def _redact(url: str | None) -> str:
    """Hide the password in a broker URL before it reaches a message or a log."""
    return maybe_sanitize_url(url or "") or "<unset>"
