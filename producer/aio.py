"""The asyncio client: the same methods and result types as `RerankClient`, awaited.

Nothing here blocks the event loop: sending a job and each read of the result backend run in
the default thread executor, and waiting is `asyncio.sleep` between reads, paced by the same
`Waiter` the synchronous client uses. Without a broker the model runs in that thread too.

Waits do not listen for the result backend's announcements as the synchronous client's do: a
blocking listen would hold one of the executor's few threads (six on a 2-core machine) per
awaited job, and a hundred jobs awaited at once would queue behind each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any

from contract.chunking import DEFAULT_MAX_CHARS
from contract.errors import RerankTimeout
from contract.schemas import Chunk, RerankResult, TwoStageResult
from contract.settings import Settings
from producer.client import CandidateLike, ChunkLike, RequestLike, RerankClient
from producer.jobs import BatchProgress, Handle, JobProgress, RerankBatch, RerankJob
from producer.waiting import Outcomes, Waiter

Nap = Callable[[float], Awaitable[object]]


class AsyncRerankClient:
    """`RerankClient` for asyncio: every method has the same name, arguments and result, awaited."""

    def __init__(self, settings: Settings | None = None, *, chunk_chars: int = DEFAULT_MAX_CHARS) -> None:
        """Create a client from `settings` (default: the ``RERANK_*`` environment)."""
        self.sync = RerankClient(settings, chunk_chars=chunk_chars)
        self.settings = self.sync.settings

    async def rerank_documents(self, query: str, candidates: Sequence[CandidateLike], top_k: int = 20, *, timeout: float | None = None, **options: Any) -> RerankResult:
        """Stage 1 alone; see `RerankClient.rerank_documents`."""
        handle = await asyncio.to_thread(partial(self.sync.submit_documents, query, candidates, top_k, **options))
        return await wait(handle, timeout)

    async def rerank_chunks(self, query: str, chunks: Sequence[ChunkLike], top_k: int | None = None, *, timeout: float | None = None, **options: Any) -> RerankResult:
        """Stage 2 alone; see `RerankClient.rerank_chunks`."""
        handle = await asyncio.to_thread(partial(self.sync.submit_chunks, query, chunks, top_k, **options))
        return await wait(handle, timeout)

    async def rerank_passages(
        self, query: str, passages: Sequence[str], top_k: int | None = None, *, timeout: float | None = None, **options: Any
    ) -> RerankResult:
        """Plain passages scored as sent; see `RerankClient.rerank_passages`."""
        handle = await asyncio.to_thread(partial(self.sync.submit_passages, query, passages, top_k, **options))
        return await wait(handle, timeout)

    async def two_stage(
        self,
        query: str,
        candidates: Sequence[CandidateLike],
        top_k_docs: int = 20,
        top_k_chunks: int | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> TwoStageResult:
        """A two-stage job, awaited; see `RerankClient.two_stage` for the options and errors."""
        job = await self.submit(query, candidates, top_k_docs, top_k_chunks, **options)
        return await job.result(timeout)

    async def submit(
        self, query: str, candidates: Sequence[CandidateLike], top_k_docs: int = 20, top_k_chunks: int | None = None, **options: Any
    ) -> AsyncRerankJob:
        """Validate and enqueue a two-stage job; return its awaitable handle."""
        job = await asyncio.to_thread(partial(self.sync.submit, query, candidates, top_k_docs, top_k_chunks, **options))
        return AsyncRerankJob(job)

    async def submit_many(self, requests: Iterable[RequestLike], **options: Any) -> AsyncRerankBatch:
        """Validate and enqueue many two-stage jobs as one Celery group of chains."""
        batch = await asyncio.to_thread(partial(self.sync.submit_many, list(requests), **options))
        return AsyncRerankBatch(batch)

    async def two_stage_many(
        self, requests: Iterable[RequestLike], *, timeout: float | None = None, return_exceptions: bool = False, **options: Any
    ) -> list[Any]:
        """Run many two-stage jobs and return their results in input order."""
        batch = await self.submit_many(requests, **options)
        return await batch.results(timeout, return_exceptions=return_exceptions)

    def job(self, job_id: str, candidates: Sequence[CandidateLike] | None = None, **options: Any) -> AsyncRerankJob:
        """Return the handle of a job submitted earlier, from its id (no I/O)."""
        return AsyncRerankJob(self.sync.job(job_id, candidates, **options))

    async def batch(self, batch_id: str) -> AsyncRerankBatch:
        """Return the batch `batch_id` sent by `submit_many` in any process."""
        return AsyncRerankBatch(await asyncio.to_thread(self.sync.batch, batch_id))

    def chunk_pool(self, candidates: Iterable[Any]) -> list[Chunk]:
        """Return every candidate's chunks, as `RerankClient.chunk_pool` does."""
        return self.sync.chunk_pool(candidates)


class AsyncRerankJob:
    """A two-stage job for asyncio: `id`, `await status()`, `progress()`, `result(timeout)`, `cancel()`."""

    def __init__(self, job: RerankJob) -> None:
        """Wrap the synchronous handle `job`."""
        self.sync = job
        self.id = job.id
        self.index = job.index

    def __repr__(self) -> str:
        return f"AsyncRerankJob(id={self.id!r}, index={self.index})"

    async def status(self) -> str:
        """The job's state: PENDING, STARTED, SUCCESS, FAILURE or REVOKED."""
        return await asyncio.to_thread(self.sync.status)

    async def progress(self) -> JobProgress:
        """Both stages' states and meta."""
        return await asyncio.to_thread(self.sync.progress)

    async def result(self, timeout: float | None = None) -> TwoStageResult:
        """Wait up to `timeout` seconds without blocking the loop; raises what `RerankJob.result` raises."""
        return await wait(self.sync, timeout)

    async def cancel(self) -> bool:
        """Revoke both stages; False when the job had already finished."""
        return await asyncio.to_thread(self.sync.cancel)


class AsyncRerankBatch:
    """Many jobs for asyncio: `async for job in batch.as_completed()`, or `await batch.results()`."""

    def __init__(self, batch: RerankBatch) -> None:
        """Wrap the synchronous batch `batch`."""
        self.sync = batch
        self.id = batch.id
        self.jobs = [AsyncRerankJob(job) for job in batch.jobs]

    def __len__(self) -> int:
        return len(self.jobs)

    async def as_completed(self, timeout: float | None = None) -> AsyncIterator[AsyncRerankJob]:
        """Yield each job as soon as it finished; `await job.result()` then returns at once.

        Raises:
            RerankTimeout: `timeout` seconds passed with jobs unfinished.
        """
        by_id = {job.id: job for job in self.jobs}
        async for handle in completed(self.sync.jobs, timeout, f"batch {self.id}"):
            yield by_id[handle.id]

    async def results(self, timeout: float | None = None, *, return_exceptions: bool = False) -> list[Any]:
        """Every job's result in input order; with `return_exceptions`, errors in place of failed jobs."""
        outcomes = Outcomes(self.sync.jobs, return_exceptions)
        try:
            async for job in self.as_completed(timeout):
                outcomes.add(job.sync)
        except RerankTimeout as e:
            outcomes.timed_out(e)
        return outcomes.in_order()

    async def progress(self) -> BatchProgress:
        """Count the batch's jobs by state."""
        return await asyncio.to_thread(self.sync.progress)

    async def cancel(self) -> int:
        """Cancel every unfinished job; return how many were cancelled."""
        return await asyncio.to_thread(self.sync.cancel)


async def wait(handle: Handle, timeout: float | None, nap: Nap = asyncio.sleep, announced: bool = False) -> Any:
    """Await `handle`'s result: backend reads in a thread, `nap(seconds)` (a sleep) in between."""
    async for _ in completed([handle], timeout, f"job {handle.id}", nap, announced):
        pass
    return handle.decode()


async def completed(
    handles: Iterable[Handle], timeout: float | None, what: str, nap: Nap = asyncio.sleep, announced: bool = False
) -> AsyncIterator[Any]:
    """Yield `handles` as they finish: `producer.jobs.completed` for asyncio.

    `nap(seconds)` waits between reads; with `announced`, it returns as soon as the result backend
    announces a new state of the task (as the HTTP gateway's shared subscriber does), so reads are
    paced for a safety net only.
    """
    handles = list(handles)
    waiter = Waiter(handles, timeout, what)
    for handle in waiter.ready:
        yield handle
    while waiter.pending:
        for handle in waiter.settle(await asyncio.to_thread(handles[0].backend.finished, waiter.ids())):
            yield handle
        if waiter.pending:
            await nap(waiter.pause(announced))
