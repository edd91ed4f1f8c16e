"""The producer-side client: validate, enqueue, collect typed results."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery, chain, uuid
from celery.canvas import Signature
from pydantic import ValidationError
from pydantic_core import to_json

from contract.chunking import DEFAULT_MAX_CHARS
from contract.errors import InvalidRequest, RerankError, WorkerError
from contract.formats import (
    chunk_pool,
    passages_message,
    stage1_message,
    stage2_message,
)
from contract.names import (
    DEFAULT_MODEL,
    TASK_CHUNKS,
    TASK_DOCUMENTS,
    TASK_PASSAGES,
    model_slug,
)
from contract.schemas import (
    Candidate,
    Chunk,
    ChunksRequest,
    DocumentsRequest,
    PassagesRequest,
    RerankResult,
    Truncate,
    TwoStageRequest,
    TwoStageResult,
)
from contract.settings import Settings, get_settings
from contract.validation import parse_request
from producer.app import create_app
from producer.backends import backend_for
from producer.events import describe
from producer.jobs import (
    STAGE1_SUFFIX,
    Finish,
    Handle,
    RerankBatch,
    RerankJob,
    ResultT,
    stage1_id,
)
from producer.payloads import INLINE_BYTES, digest, key_of, pack, store_for
from producer.reaching import reaching

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
        self.backend = backend_for(self.app, self.settings)
        self.store = store_for(self.app)

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
        max_passage_tokens: int | None = None,
        truncate: Truncate | None = None,
        timeout: float | None = None,
    ) -> RerankResult:
        """Score papers by title and abstract (stage 1) and return the best `top_k`.

        `min_score` drops items scoring below it (after `top_k`); `return_documents` sets each
        item's `document` to the candidate you sent; `windows` overrides RERANK_STAGE1_WINDOWS.
        `max_passage_tokens` keeps at most that many tokens of each passage (Cohere's
        `max_tokens_per_doc`); `truncate` cuts a passage too long for its pair at its `"end"`
        (the default) or `"start"`, or (`"never"`) refuses it with `InvalidRequest`. The query is
        never cut unless it takes over 3/4 of RERANK_MAX_LENGTH.

        Raises:
            InvalidRequest: the input is malformed or over a limit; nothing was queued.
            WorkerError: the worker failed; the message names the cause.
            RerankTimeout: no result within `timeout` seconds.
            BrokerUnavailable: the broker or result backend cannot be reached.
        """
        handle = self.submit_documents(
            query, candidates, top_k, return_logits=return_logits, min_score=min_score,
            return_documents=return_documents, windows=windows, max_passage_tokens=max_passage_tokens, truncate=truncate,
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
        max_passage_tokens: int | None = None,
        truncate: Truncate | None = None,
    ) -> Handle[RerankResult]:
        """Validate and enqueue stage 1 alone; return a handle whose `result(timeout)` waits for it."""
        request = self._documents_request(query, candidates, top_k, return_logits, windows, _cut(max_passage_tokens, truncate))
        _check_min_score(min_score)
        finish = self._finish(RerankResult, min_score, request.candidates, join=return_documents)
        return self._send(TASK_DOCUMENTS, stage1_message(request), finish, positional=True)

    def rerank_chunks(
        self,
        query: str,
        chunks: Sequence[ChunkLike],
        top_k: int | None = None,
        *,
        return_logits: bool = False,
        min_score: float | None = None,
        return_documents: bool = False,
        max_passage_tokens: int | None = None,
        truncate: Truncate | None = None,
        timeout: float | None = None,
    ) -> RerankResult:
        """Score passages (stage 2) and return them sorted, all of them unless `top_k` is set.

        Takes the options and raises the errors of `rerank_documents`.
        """
        handle = self.submit_chunks(
            query, chunks, top_k, return_logits=return_logits, min_score=min_score, return_documents=return_documents,
            max_passage_tokens=max_passage_tokens, truncate=truncate,
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
        max_passage_tokens: int | None = None,
        truncate: Truncate | None = None,
    ) -> Handle[RerankResult]:
        """Validate and enqueue stage 2 alone; return a handle whose `result(timeout)` waits for it."""
        request = parse_request(
            ChunksRequest,
            {"query": query, "chunks": _as_list(chunks), "top_k": top_k, "return_logits": return_logits, **_cut(max_passage_tokens, truncate)},
            self.settings,
        )
        _check_min_score(min_score)
        return self._send(TASK_CHUNKS, stage2_message(request), self._finish(RerankResult, min_score, chunks=request.chunks, join=return_documents))

    def rerank_passages(
        self, query: str, passages: Sequence[str], top_k: int | None = None, *, return_logits: bool = False,
        max_passage_tokens: int | None = None, truncate: Truncate | None = None, timeout: float | None = None,
    ) -> RerankResult:
        """Score each passage with the query exactly as sent, with no `Title:`/`Section:` template (as TEI and Cohere do).

        Items come back best first; an item's `index` (and `id`, the same number as text) is its place in `passages`.
        Takes the truncation options and raises the errors of `rerank_documents`.
        """
        handle = self.submit_passages(query, passages, top_k, return_logits=return_logits, max_passage_tokens=max_passage_tokens, truncate=truncate)
        return handle.result(timeout)

    def submit_passages(
        self, query: str, passages: Sequence[str], top_k: int | None = None, *, return_logits: bool = False,
        max_passage_tokens: int | None = None, truncate: Truncate | None = None,
    ) -> Handle[RerankResult]:
        """Validate and enqueue plain passages; return a handle whose `result(timeout)` waits for them."""
        data = {"query": query, "passages": _as_list(passages), "top_k": top_k, "return_logits": return_logits, **_cut(max_passage_tokens, truncate)}
        request = parse_request(PassagesRequest, data, self.settings)
        return self._send(TASK_PASSAGES, passages_message(request), self._finish(RerankResult))

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
        max_passage_tokens: int | None = None,
        truncate: Truncate | None = None,
        timeout: float | None = None,
    ) -> TwoStageResult:
        """Rank papers, then rank the chunks of the `top_k_docs` best, as one Celery chain.

        Papers without chunks are split by the default chunker. Stage-2 `index` values point
        into `chunk_pool(candidates)`, the order this client sends chunks in. `min_score` applies
        to the chunk ranking; `return_documents` joins each item's candidate or chunk back; the
        truncation options (`rerank_documents`) apply to both stages.

        Raises the same errors as `rerank_documents`; a stage-1 failure surfaces with its cause.
        """
        job = self.submit(
            query, candidates, top_k_docs, top_k_chunks, return_logits=return_logits, min_score=min_score,
            return_documents=return_documents, windows=windows, max_passage_tokens=max_passage_tokens, truncate=truncate,
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
        max_passage_tokens: int | None = None,
        truncate: Truncate | None = None,
    ) -> RerankJob:
        """Validate and enqueue a two-stage job; return its handle (`id`, `status()`, `progress()`, `result()`, `cancel()`).

        Raises `InvalidRequest` before anything is queued, and `BrokerUnavailable`.
        """
        request = {
            "query": query, "candidates": _as_list(candidates), "top_k_docs": top_k_docs,
            "top_k_chunks": top_k_chunks, "min_score": min_score, "windows": windows, **_cut(max_passage_tokens, truncate),
        }
        job, signature, parts = self._prepare(request, None, return_logits, return_documents)
        self._keep(key_of(job.id), parts)
        self.backend.send(job.id, signature)
        return job

    def submit_many(
        self,
        requests: Iterable[RequestLike],
        *,
        return_logits: bool = False,
        return_documents: bool = False,
    ) -> RerankBatch:
        """Validate every request, then enqueue them all as one Celery group of chains.

        Each request is a `TwoStageRequest` or a dict with its fields (`query`, `candidates`,
        `top_k_docs`, `top_k_chunks`, `min_score`, `windows`, `max_passage_tokens`, `truncate`). An invalid one raises
        `InvalidRequest` naming its position, and nothing is queued.
        """
        prepared = [self._prepare(r, n, return_logits, return_documents) for n, r in enumerate(requests)]
        if not prepared:
            raise InvalidRequest("submit_many needs at least one request")
        for job, _, parts in prepared:
            self._keep(key_of(job.id), parts)
        batch_id = self.backend.send_many([(job.id, signature) for job, signature, _ in prepared])
        return RerankBatch(batch_id, [job for job, _, _ in prepared])

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
        self._need_durable_jobs("follow a job by id")
        _check_job_id(job_id)
        documents = chunks = None
        if candidates is not None:
            documents = [Candidate.model_validate(c) if not isinstance(c, Candidate) else c for c in candidates]
            chunks = self.chunk_pool(documents)
        return RerankJob(self.backend, job_id, self._finish(TwoStageResult, min_score, documents, chunks, join=candidates is not None))

    def batch(self, batch_id: str) -> RerankBatch:
        """Return the batch `batch_id` sent by `submit_many` in any process (while its results have not expired)."""
        self._need_durable_jobs("follow a batch by id")
        job_ids = self.backend.restore(batch_id)
        jobs = [RerankJob(self.backend, job_id, self._finish(TwoStageResult), index=n) for n, job_id in enumerate(job_ids)]
        return RerankBatch(batch_id, jobs)

    def chunk_pool(self, candidates: Iterable[Candidate]) -> list[Chunk]:
        """Return every candidate's chunks, splitting texts that came without chunks (`contract.formats.chunk_pool`)."""
        return chunk_pool(candidates, self.chunk_chars)

    def validate(self, request: RequestLike) -> TwoStageRequest:
        """Check a two-stage request as `submit` would (schema and limits) without sending it."""
        job, _, _ = self._prepare(request, None, False, False)
        return job.request

    # Internals

    def _prepare(
        self, data: RequestLike, index: int | None, return_logits: bool, return_documents: bool
    ) -> tuple[RerankJob, Signature, dict[str, bytes]]:
        """Validate a two-stage request; return its job handle, the chain that runs it and the parts to store, nothing yet sent."""
        where = "" if index is None else f"request {index}: "
        try:
            request = data if isinstance(data, TwoStageRequest) else TwoStageRequest.model_validate(data)
            documents, chunks = self._two_stage_requests(
                request.query, request.candidates, request.top_k_docs, request.top_k_chunks, return_logits, request.windows,
                _cut(request.max_passage_tokens, request.truncate),
            )
        except InvalidRequest as e:
            raise InvalidRequest(f"{where}{e}") from e
        except ValidationError as e:
            raise InvalidRequest(f"{where}invalid TwoStageRequest: {e}") from e
        finish = self._finish(TwoStageResult, request.min_score, documents.candidates, chunks.chunks, join=return_documents)
        job = RerankJob(self.backend, uuid(), finish, index=index, request=request)
        signature, parts = self._chain(documents, chunks, job.id)
        return job, signature, parts

    def _finish(self, *args: Any, **kwargs: Any) -> Finish:
        return ScoredBy(*args, **kwargs, expected_model=self.settings.model)

    def _send(self, task: str, request: dict[str, Any], finish: Finish, positional: bool = False) -> Handle:
        """Send one stage's request: inside its message when small, else stored beside it (producer.payloads)."""
        task_id = uuid()
        encoded = to_json(request)
        self._check_size(len(encoded))
        if len(encoded) > INLINE_BYTES:
            blob = pack(encoded)
            self._keep(key_of(task_id), {"request": blob})
            request = {"stored": {"key": key_of(task_id), "field": "request", "digest": digest(blob)}}
        stage = task.rpartition(".")[2]
        if positional:
            options: dict[str, Any] = {"args": (request,), "argsrepr": describe(stage, request), "kwargsrepr": "<>"}
        else:
            options = {"kwargs": {"request": request}, "argsrepr": "<>", "kwargsrepr": describe(stage, request)}
        self.backend.send(task_id, self.app.signature(task, **options, queue=self.settings.queue, task_id=task_id))
        return Handle(self.backend, task_id, finish)

    def _keep(self, key: str, parts: dict[str, bytes]) -> None:
        """Store a job's request parts beside its messages, an unreachable or refusing Redis raised as BrokerUnavailable."""
        with reaching(f"storing request {key}", self.settings.result_backend or self.settings.broker_url):
            self.store.put(key, parts, self.settings.request_expires)

    def _check_size(self, size: int) -> None:
        if size > self.settings.max_request_bytes:
            raise InvalidRequest(
                f"the request is {size:,} bytes of JSON, over the limit of {self.settings.max_request_bytes:,} "
                "(RERANK_MAX_REQUEST_BYTES); send fewer or shorter texts per request"
            )

    def _two_stage_requests(
        self,
        query: str,
        candidates: Sequence[CandidateLike],
        top_k_docs: int,
        top_k_chunks: int | None,
        return_logits: bool,
        windows: int | None,
        cut: dict[str, Any],
    ) -> tuple[DocumentsRequest, ChunksRequest]:
        documents = self._documents_request(query, candidates, top_k_docs, return_logits, windows, cut)
        chunks = parse_request(
            ChunksRequest,
            {
                "query": query,
                "chunks": self.chunk_pool(documents.candidates),
                "top_k": top_k_chunks,
                "return_logits": return_logits,
                "candidate_ids": [c.id for c in documents.candidates],
                **cut,
            },
            self.settings,
        )
        return documents, chunks

    def _chain(self, documents: DocumentsRequest, chunks: ChunksRequest, job_id: str) -> tuple[Signature, dict[str, bytes]]:
        """The chain that runs a two-stage job, and the parts it reads from the store: stage 1's request and each paper's chunks."""
        key = key_of(job_id)
        by_paper: dict[str, list[dict[str, Any]]] = {c.id: [] for c in documents.candidates}
        for chunk in chunks.chunks or ():
            by_paper[chunk.doc_id].append(chunk.model_dump(mode="json"))
        counts = {paper: len(paper_chunks) for paper, paper_chunks in by_paper.items()}
        encoded = {"documents": to_json(stage1_message(documents))} | {str(n): to_json(c) for n, c in enumerate(by_paper.values())}
        self._check_size(sum(len(part) for part in encoded.values()))
        parts = {field: pack(part) for field, part in encoded.items()}
        pool = {"key": key, "counts": list(counts.values()), "digests": [digest(parts[str(n)]) for n in range(len(by_paper))]}
        stage2 = {**stage2_message(chunks.model_copy(update={"chunks": None})), "pool": pool}
        stage1 = {"stored": {"key": key, "field": "documents", "digest": digest(parts["documents"])}}
        # The job id is stage 2's task id and stage 1's is derived from it, so any process that
        # knows the job id finds both stages. The queue travels with each signature: stage 2 is
        # sent by the worker, whose own routing would otherwise pick the worker's default queue.
        signature = chain(
            self.app.signature(TASK_DOCUMENTS, args=(stage1,), immutable=True, queue=self.settings.queue, task_id=stage1_id(job_id),
                               argsrepr=describe("documents", stage1), kwargsrepr="<>"),
            self.app.signature(TASK_CHUNKS, kwargs={"request": stage2}, queue=self.settings.queue, task_id=job_id,
                               argsrepr="<>", kwargsrepr=describe("chunks", stage2)),
        )
        return signature, parts

    def _documents_request(
        self, query: str, candidates: Sequence[CandidateLike], top_k: int, return_logits: bool, windows: int | None = None,
        cut: dict[str, Any] | None = None,
    ) -> DocumentsRequest:
        data = {
            "query": query, "candidates": _as_list(candidates), "top_k": top_k, "return_logits": return_logits,
            "windows": self.settings.stage1_windows if windows is None else windows, **(cut or {}),
        }
        return parse_request(DocumentsRequest, data, self.settings)

    def _need_durable_jobs(self, what: str) -> None:
        if not self.backend.durable:
            raise RerankError(
                f"cannot {what} without a broker: in-process jobs are stored nowhere but in their handles; "
                "set RERANK_BROKER_URL, or keep the handle that submit() returned"
            )


@dataclass(frozen=True)
class ScoredBy(Finish[ResultT]):
    """Finishes a result like `Finish`, and raises `WorkerError` when a stage was scored by another model than asked."""

    expected_model: str = DEFAULT_MODEL

    def __call__(self, raw: Any) -> ResultT:
        """Parse `raw`, then check that every stage names the expected model."""
        result = super().__call__(raw)
        for stage in (result.documents, result.chunks) if isinstance(result, TwoStageResult) else (result,):
            if model_slug(stage.info.model) != model_slug(self.expected_model):
                raise WorkerError(
                    f"the {stage.stage} stage was scored by {stage.info.model!r} (worker {stage.info.worker}), not by "
                    f"{self.expected_model!r} as asked (RERANK_MODEL): a worker serving another model consumes the queue "
                    "this job went to; leave RERANK_QUEUE unset so each model has its own queues, or set the same "
                    "RERANK_MODEL on producers and workers"
                )
        return result


def _check_job_id(job_id: Any) -> None:
    if not isinstance(job_id, str) or not 0 < len(job_id) <= 255 or not job_id.isprintable():
        raise InvalidRequest(f"{str(job_id)[:80]!r} is not a job id: ids are printable strings of 1 to 255 characters")
    if job_id.endswith(STAGE1_SUFFIX):
        job = job_id.removesuffix(STAGE1_SUFFIX)
        raise InvalidRequest(f"{job_id!r} is the id of stage 1 of job {job!r}; follow the job by its own id")


def _check_min_score(min_score: float | None) -> None:
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise InvalidRequest(f"min_score={min_score} is outside [0, 1]; scores are sigmoids")


def _cut(max_passage_tokens: int | None, truncate: str | None) -> dict[str, Any]:
    """The truncation fields of a request, only those that differ from the default (so a worker that predates them reads the rest)."""
    return {k: v for k, v in (("max_passage_tokens", max_passage_tokens), ("truncate", truncate)) if v not in (None, "end")}


def _as_list(items: Any) -> Any:
    """Materialise an iterable of inputs; anything else (None, a string) is left for validation to refuse."""
    if items is None or isinstance(items, (str, bytes, Mapping)):
        return items
    try:
        return list(items)
    except TypeError:
        return items
