"""The producer-side client: validate, enqueue, collect typed results."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery import Celery, chain, group, uuid
from celery.result import AsyncResult, GroupResult
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from producer.app import create_app
from producer.chunking import DEFAULT_MAX_CHARS, chunk_text, windows_extent
from producer.errors import BrokerUnavailable, InvalidRequest, ModelLoadError, RerankError
from producer.jobs import Finish, Handle, RedisConnectionError, RedisTimeoutError, RerankBatch, RerankJob, stage1_id, translate
from producer.names import TASK_CHUNKS, TASK_DOCUMENTS
from producer.schemas import (
    Candidate,
    Chunk,
    ChunksRequest,
    DocumentsRequest,
    RerankResult,
    TwoStageRequest,
    TwoStageResult,
)
from producer.settings import Settings, get_settings
from producer.validation import parse_request

CandidateLike = Candidate | Mapping[str, Any]
ChunkLike = Chunk | Mapping[str, Any]
RequestLike = TwoStageRequest | Mapping[str, Any]


class RerankClient:
    """Submit re-ranking jobs to Celery workers, or run them in-process when no broker is set."""

    def __init__(self, settings: Settings | None = None, *, chunk_chars: int = DEFAULT_MAX_CHARS) -> None:
        """Create a client from `settings` (default: the ``RERANK_*`` environment)."""
        self.settings = settings or get_settings()
        self.chunk_chars = chunk_chars
        self.app: Celery = create_app(self.settings)
        if self.settings.embedded:
            _register_worker_tasks()

    # One stage at a time

    def rerank_documents(
        self,
        query: str,
        candidates: Sequence[CandidateLike],
        top_k: int = 20,
        *,
        return_logits: bool = False,
        min_score: float | None = None,
        return_documents: bool = False,
        windows: int | None = None,
        timeout: float | None = None,
    ) -> RerankResult:
        """Score papers by title and abstract (stage 1) and return the best `top_k`.

        `min_score` drops items scoring below it (after `top_k`); `return_documents` sets each
        item's `document` to the candidate you sent; `windows` overrides RERANK_STAGE1_WINDOWS.

        Raises:
            InvalidRequest: the input is malformed or over a limit; nothing was queued.
            WorkerError: the worker failed; the message names the cause.
            RerankTimeout: no result within `timeout` seconds.
            BrokerUnavailable: the broker or result backend cannot be reached.
        """
        handle = self.submit_documents(
            query, candidates, top_k, return_logits=return_logits, min_score=min_score,
            return_documents=return_documents, windows=windows,
        )
        return handle.result(timeout)

    def submit_documents(
        self,
        query: str,
        candidates: Sequence[CandidateLike],
        top_k: int = 20,
        *,
        return_logits: bool = False,
        min_score: float | None = None,
        return_documents: bool = False,
        windows: int | None = None,
    ) -> Handle[RerankResult]:
        """Validate and enqueue stage 1 alone; return a handle whose `result(timeout)` waits for it."""
        request = self._documents_request(query, candidates, top_k, return_logits, windows)
        _check_min_score(min_score)
        signature = self.app.signature(TASK_DOCUMENTS, args=(_slim(request),), queue=self.settings.queue)
        finish = Finish(RerankResult, min_score, request.candidates if return_documents else None)
        return self._handle(Handle, signature.freeze().id, signature.apply_async, finish)

    def rerank_chunks(
        self,
        query: str,
        chunks: Sequence[ChunkLike],
        top_k: int | None = None,
        *,
        return_logits: bool = False,
        min_score: float | None = None,
        return_documents: bool = False,
        timeout: float | None = None,
    ) -> RerankResult:
        """Score passages (stage 2) and return them sorted, all of them unless `top_k` is set.

        Raises the same errors as `rerank_documents`.
        """
        handle = self.submit_chunks(
            query, chunks, top_k, return_logits=return_logits, min_score=min_score, return_documents=return_documents
        )
        return handle.result(timeout)

    def submit_chunks(
        self,
        query: str,
        chunks: Sequence[ChunkLike],
        top_k: int | None = None,
        *,
        return_logits: bool = False,
        min_score: float | None = None,
        return_documents: bool = False,
    ) -> Handle[RerankResult]:
        """Validate and enqueue stage 2 alone; return a handle whose `result(timeout)` waits for it."""
        request = parse_request(
            ChunksRequest,
            {"query": query, "chunks": _as_list(chunks), "top_k": top_k, "return_logits": return_logits},
            self.settings,
        )
        _check_min_score(min_score)
        signature = self.app.signature(TASK_CHUNKS, kwargs={"request": request.model_dump(mode="json")}, queue=self.settings.queue)
        finish = Finish(RerankResult, min_score, chunks=request.chunks if return_documents else None)
        return self._handle(Handle, signature.freeze().id, signature.apply_async, finish)

    # Two-stage jobs

    def two_stage(
        self,
        query: str,
        candidates: Sequence[CandidateLike],
        top_k_docs: int = 20,
        top_k_chunks: int | None = None,
        *,
        return_logits: bool = False,
        min_score: float | None = None,
        return_documents: bool = False,
        windows: int | None = None,
        timeout: float | None = None,
    ) -> TwoStageResult:
        """Rank papers, then rank the chunks of the `top_k_docs` best, as one Celery chain.

        Papers without chunks are split by the default chunker. Stage-2 `index` values point
        into `chunk_pool(candidates)`, the order this client sends chunks in. `min_score` applies
        to the chunk ranking; `return_documents` joins each item's candidate or chunk back.

        Raises the same errors as `rerank_documents`; a stage-1 failure surfaces with its cause.
        """
        job = self.submit(
            query, candidates, top_k_docs, top_k_chunks, return_logits=return_logits, min_score=min_score,
            return_documents=return_documents, windows=windows,
        )
        return job.result(timeout)

    def submit(
        self,
        query: str,
        candidates: Sequence[CandidateLike],
        top_k_docs: int = 20,
        top_k_chunks: int | None = None,
        *,
        return_logits: bool = False,
        min_score: float | None = None,
        return_documents: bool = False,
        windows: int | None = None,
    ) -> RerankJob:
        """Validate and enqueue a two-stage job; return its handle (`id`, `status()`, `progress()`, `result()`, `cancel()`).

        Raises `InvalidRequest` before anything is queued, and `BrokerUnavailable`.
        """
        request = {
            "query": query, "candidates": _as_list(candidates), "top_k_docs": top_k_docs,
            "top_k_chunks": top_k_chunks, "min_score": min_score, "windows": windows,
        }
        return self._job(request, None, return_logits, return_documents, send=True)

    def submit_two_stage(
        self,
        query: str,
        candidates: Sequence[CandidateLike],
        top_k_docs: int = 20,
        top_k_chunks: int | None = None,
        *,
        return_logits: bool = False,
    ) -> AsyncResult:
        """Validate and enqueue a two-stage chain; return its raw Celery result handle (see `submit`)."""
        documents, chunks = self._two_stage_requests(query, candidates, top_k_docs, top_k_chunks, return_logits, None)
        return self._send(self._chain(documents, chunks, uuid()).apply_async)

    def submit_many(
        self,
        requests: Iterable[RequestLike],
        *,
        return_logits: bool = False,
        return_documents: bool = False,
    ) -> RerankBatch:
        """Validate every request, then enqueue them all as one Celery group of chains.

        Each request is a `TwoStageRequest` or a dict with its fields (`query`, `candidates`,
        `top_k_docs`, `top_k_chunks`, `min_score`, `windows`). An invalid one raises
        `InvalidRequest` naming its position, and nothing is queued.
        """
        jobs = [self._job(r, n, return_logits, return_documents, send=False) for n, r in enumerate(requests)]
        if not jobs:
            raise InvalidRequest("submit_many needs at least one request")
        if self.settings.embedded:
            return RerankBatch(uuid(), jobs)
        # A group of chains, never a chord: chords on Redis have known bugs (celery #3538, #6220).
        batch = self._send(group([job._signature for job in jobs]).apply_async)
        try:
            batch.save()  # so that `client.batch(id)` finds the jobs from another process
        except Exception as e:
            raise translate(e, batch.id, broker_url=self.settings.broker_url) from e
        for job, sent in zip(jobs, batch.results):
            assert sent.id == job.id, "the group kept the job ids we chose"
        return RerankBatch(batch.id, jobs)

    def two_stage_many(
        self,
        requests: Iterable[RequestLike],
        *,
        return_logits: bool = False,
        return_documents: bool = False,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Run many two-stage jobs at once and return their results in input order.

        With `return_exceptions`, a job that failed gives its `RerankError` in its place.
        """
        batch = self.submit_many(requests, return_logits=return_logits, return_documents=return_documents)
        return batch.results(timeout, return_exceptions=return_exceptions)

    # Resuming

    def job(
        self,
        job_id: str,
        candidates: Sequence[CandidateLike] | None = None,
        *,
        min_score: float | None = None,
    ) -> RerankJob:
        """Return the handle of a job submitted earlier, by any process, from its id.

        Pass the same `candidates` to get `document` joined back into the items. An id nobody
        submitted looks PENDING forever: Celery cannot tell it from a queued job.
        """
        self._need_broker("follow a job by id")
        documents = chunks = None
        if candidates is not None:
            documents = [Candidate.model_validate(c) if not isinstance(c, Candidate) else c for c in candidates]
            chunks = self.chunk_pool(documents)
        finish = Finish(TwoStageResult, min_score, documents, chunks)
        return RerankJob(self.app, job_id, finish, broker_url=self.settings.broker_url)

    def batch(self, batch_id: str) -> RerankBatch:
        """Return the batch `batch_id` sent by `submit_many` in any process (while its results have not expired)."""
        self._need_broker("follow a batch by id")
        try:
            saved = GroupResult.restore(batch_id, app=self.app)
        except Exception as e:
            raise translate(e, batch_id, broker_url=self.settings.broker_url) from e
        if saved is None:
            raise InvalidRequest(f"no batch {batch_id!r} in the result backend: wrong id, or its results expired")
        jobs = [
            RerankJob(self.app, r.id, Finish(TwoStageResult), index=n, broker_url=self.settings.broker_url)
            for n, r in enumerate(saved.results)
        ]
        return RerankBatch(batch_id, jobs)

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

    def validate(self, request: RequestLike) -> TwoStageRequest:
        """Check a two-stage request as `submit` would (schema and limits) without sending it."""
        parsed = self._job(request, None, False, False, send=False)
        return parsed.request

    # Internals

    def _job(self, data: RequestLike, index: int | None, return_logits: bool, return_documents: bool, *, send: bool) -> RerankJob:
        try:
            request = data if isinstance(data, TwoStageRequest) else TwoStageRequest.model_validate(data)
        except ValueError as e:
            where = "" if index is None else f"request {index}: "
            raise InvalidRequest(f"{where}invalid TwoStageRequest: {e}") from e
        try:
            documents, chunks = self._two_stage_requests(
                request.query, request.candidates, request.top_k_docs, request.top_k_chunks, return_logits, request.windows
            )
        except InvalidRequest as e:
            if index is None:
                raise
            raise InvalidRequest(f"request {index}: {e}") from e
        finish = Finish(
            TwoStageResult,
            request.min_score,
            documents.candidates if return_documents else None,
            chunks.chunks if return_documents else None,
        )
        job_id = uuid()
        signature = self._chain(documents, chunks, job_id)
        if self.settings.embedded:
            job = RerankJob(self.app, job_id, finish, run=lambda: self._send(signature.apply_async), index=index)
        elif send:
            self._send(signature.apply_async)
            job = RerankJob(self.app, job_id, finish, index=index, broker_url=self.settings.broker_url)
        else:
            job = RerankJob(self.app, job_id, finish, index=index, broker_url=self.settings.broker_url)
        job._signature = signature
        job.request = request
        return job

    def _handle(self, kind: type[Handle], task_id: str, apply_async: Any, finish: Finish) -> Handle:
        if self.settings.embedded:
            return kind(self.app, task_id, finish, run=lambda: self._send(apply_async))
        self._send(apply_async)
        return kind(self.app, task_id, finish, broker_url=self.settings.broker_url)

    def _two_stage_requests(
        self,
        query: str,
        candidates: Sequence[CandidateLike],
        top_k_docs: int,
        top_k_chunks: int | None,
        return_logits: bool,
        windows: int | None,
    ) -> tuple[DocumentsRequest, ChunksRequest]:
        documents = self._documents_request(query, candidates, top_k_docs, return_logits, windows)
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
        return documents, chunks

    def _chain(self, documents: DocumentsRequest, chunks: ChunksRequest, job_id: str) -> Any:
        # The job id is stage 2's task id and stage 1's is derived from it, so any process that
        # knows the job id finds both stages. The queue travels with each signature: stage 2 is
        # sent by the worker, whose own routing would otherwise pick the worker's default queue.
        return chain(
            self.app.signature(
                TASK_DOCUMENTS, args=(_slim(documents),), immutable=True, queue=self.settings.queue, task_id=stage1_id(job_id)
            ),
            self.app.signature(
                TASK_CHUNKS, kwargs={"request": chunks.model_dump(mode="json")}, queue=self.settings.queue, task_id=job_id
            ),
        )

    def _documents_request(
        self, query: str, candidates: Sequence[CandidateLike], top_k: int, return_logits: bool, windows: int | None = None
    ) -> DocumentsRequest:
        data = {
            "query": query, "candidates": _as_list(candidates), "top_k": top_k, "return_logits": return_logits,
            "windows": windows or self.settings.stage1_windows,
        }
        return parse_request(DocumentsRequest, data, self.settings)

    def _need_broker(self, what: str) -> None:
        if self.settings.embedded:
            raise RerankError(
                f"cannot {what} without a broker: in-process (embedded) jobs are not stored anywhere; "
                "set RERANK_BROKER_URL, or keep the handle that submit() returned"
            )

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
        except (ConnectionError, RedisConnectionError, RedisTimeoutError, RuntimeError) as e:
            # Celery subscribes to the result before publishing; with the Redis result backend
            # down it retries for about 20 s, then raises redis-py's error or a RuntimeError.
            if isinstance(e, RuntimeError) and "result store" not in str(e):
                raise
            backend = self.settings.result_backend or self.settings.broker_url
            raise BrokerUnavailable(
                f"cannot reach the result backend at {_redact(backend)}: {e}; "
                "check RERANK_RESULT_BACKEND (or RERANK_BROKER_URL) and that Redis is running"
            ) from e

    def _collect(self, result: AsyncResult, timeout: float | None) -> dict[str, Any]:
        try:
            return result.get(timeout=timeout, propagate=True)
        except Exception as e:
            raise translate(e, result.id, timeout, self.settings.broker_url) from e


def _check_min_score(min_score: float | None) -> None:
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise InvalidRequest(f"min_score={min_score} is outside [0, 1]; scores are sigmoids")


def _as_list(items: Any) -> Any:
    """Materialise an iterable of inputs; anything else (None, a string) is left for validation to refuse."""
    if items is None or isinstance(items, (str, bytes, Mapping)):
        return items
    try:
        return list(items)
    except TypeError:
        return items


def _slim(request: DocumentsRequest) -> dict[str, Any]:
    """Drop what stage 1 does not read (chunks, metadata, text past its windows) to keep the message small.

    `windows` is left out at its default, so workers that predate it accept the message.
    """
    exclude: dict[str, Any] = {"candidates": {"__all__": {"chunks", "metadata"}}}
    if request.windows == 1:
        exclude["windows"] = True
    message = request.model_dump(mode="json", exclude=exclude)
    extent = windows_extent(request.windows)
    for candidate in message["candidates"]:
        candidate["text"] = candidate["text"][:extent]
    return message


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
