"""The asyncio client: the same methods and result types as `RerankClient`, awaited.

Nothing here blocks the event loop: sending a job and each read of the result backend run in
the default thread executor, and waiting is `asyncio.sleep` between reads (20 ms at first,
growing to `max_poll_interval`). In embedded mode (no broker) the model runs in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from functools import partial
from typing import Any

from producer.chunking import DEFAULT_MAX_CHARS
from producer.client import CandidateLike, ChunkLike, RequestLike, RerankClient
from producer.errors import RerankError, RerankTimeout
from producer.jobs import READY_STATES, BatchProgress, Handle, JobProgress, RerankBatch, RerankJob, ready_ids
from producer.schemas import Chunk, RerankResult, TwoStageResult
from producer.settings import Settings


class AsyncRerankClient:
    """`RerankClient` for asyncio: every method has the same name, arguments and result, awaited."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        chunk_chars: int = DEFAULT_MAX_CHARS,
        poll_interval: float = 0.02,
        max_poll_interval: float = 0.5,
    ) -> None:
        """Create a client from `settings` (default: the ``RERANK_*`` environment)."""
        self.sync = RerankClient(settings, chunk_chars=chunk_chars)
        self.settings = self.sync.settings
        self._poll = (poll_interval, max_poll_interval)

    async def rerank_documents(self, query: str, candidates: Sequence[CandidateLike], top_k: int = 20, *, timeout: float | None = None, **options: Any) -> RerankResult:
        """Stage 1 alone; see `RerankClient.rerank_documents`."""
        handle = await asyncio.to_thread(partial(self.sync.submit_documents, query, candidates, top_k, **options))
        return await wait(handle, timeout, *self._poll)

    async def rerank_chunks(self, query: str, chunks: Sequence[ChunkLike], top_k: int | None = None, *, timeout: float | None = None, **options: Any) -> RerankResult:
        """Stage 2 alone; see `RerankClient.rerank_chunks`."""
        handle = await asyncio.to_thread(partial(self.sync.submit_chunks, query, chunks, top_k, **options))
        return await wait(handle, timeout, *self._poll)

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
        return AsyncRerankJob(job, self._poll)

    async def submit_many(self, requests: Iterable[RequestLike], **options: Any) -> AsyncRerankBatch:
        """Validate and enqueue many two-stage jobs as one Celery group of chains."""
        batch = await asyncio.to_thread(partial(self.sync.submit_many, list(requests), **options))
        return AsyncRerankBatch(batch, self._poll)

    async def two_stage_many(
        self, requests: Iterable[RequestLike], *, timeout: float | None = None, return_exceptions: bool = False, **options: Any
    ) -> list[Any]:
        """Run many two-stage jobs and return their results in input order."""
        batch = await self.submit_many(requests, **options)
        return await batch.results(timeout, return_exceptions=return_exceptions)

    def job(self, job_id: str, candidates: Sequence[CandidateLike] | None = None, **options: Any) -> AsyncRerankJob:
        """Return the handle of a job submitted earlier, from its id (no I/O)."""
        return AsyncRerankJob(self.sync.job(job_id, candidates, **options), self._poll)

    async def batch(self, batch_id: str) -> AsyncRerankBatch:
        """Return the batch `batch_id` sent by `submit_many` in any process."""
        return AsyncRerankBatch(await asyncio.to_thread(self.sync.batch, batch_id), self._poll)

    def chunk_pool(self, candidates: Iterable[Any]) -> list[Chunk]:
        """Return every candidate's chunks, as `RerankClient.chunk_pool` does."""
        return self.sync.chunk_pool(candidates)


class AsyncRerankJob:
    """A two-stage job for asyncio: `id`, `await status()`, `progress()`, `result(timeout)`, `cancel()`."""

    def __init__(self, job: RerankJob, poll: tuple[float, float] = (0.02, 0.5)) -> None:
        self.sync = job
        self.id = job.id
        self.index = job.index
        self._poll = poll

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
        return await wait(self.sync, timeout, *self._poll)

    async def cancel(self) -> bool:
        """Revoke both stages; False when the job had already finished."""
        return await asyncio.to_thread(self.sync.cancel)


class AsyncRerankBatch:
    """Many jobs for asyncio: `async for job in batch.as_completed()`, or `await batch.results()`."""

    def __init__(self, batch: RerankBatch, poll: tuple[float, float] = (0.02, 0.5)) -> None:
        self.sync = batch
        self.id = batch.id
        self.jobs = [AsyncRerankJob(job, poll) for job in batch.jobs]
        self._poll = poll

    def __len__(self) -> int:
        return len(self.jobs)

    async def as_completed(self, timeout: float | None = None) -> AsyncIterator[AsyncRerankJob]:
        """Yield each job as soon as it finished; `await job.result()` then returns at once.

        Raises:
            RerankTimeout: `timeout` seconds passed with jobs unfinished.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pending = list(self.jobs)
        delay, most = self._poll
        while pending:
            if pending[0].sync.embedded:
                job = pending.pop(0)
                await _within(asyncio.to_thread(job.sync._run_here), deadline, loop, f"batch {self.id}")
                yield job
                continue
            finished = await asyncio.to_thread(ready_ids, pending[0].sync.app, [job.id for job in pending])
            for job in [job for job in pending if job.id in finished]:
                pending.remove(job)
                yield job
            if not pending:
                return
            if deadline is not None and loop.time() >= deadline:
                raise RerankTimeout(f"{len(pending)} of {len(self.jobs)} jobs of batch {self.id} gave no result within {timeout}s")
            await asyncio.sleep(delay if deadline is None else min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 1.5, most)

    async def results(self, timeout: float | None = None, *, return_exceptions: bool = False) -> list[Any]:
        """Every job's result in input order; with `return_exceptions`, errors in place of failed jobs."""
        outcomes: dict[int, Any] = {}
        try:
            async for job in self.as_completed(timeout):
                try:
                    outcomes[job.index] = await job.result(timeout=5)
                except RerankError as e:
                    if not return_exceptions:
                        raise
                    outcomes[job.index] = e
        except RerankTimeout as e:
            if not return_exceptions:
                raise
            for job in self.jobs:
                outcomes.setdefault(job.index, e)
        return [outcomes[job.index] for job in self.jobs]

    async def progress(self) -> BatchProgress:
        """Count the batch's jobs by state."""
        return await asyncio.to_thread(self.sync.progress)

    async def cancel(self) -> int:
        """Cancel every unfinished job; return how many were cancelled."""
        return await asyncio.to_thread(self.sync.cancel)


async def wait(handle: Handle, timeout: float | None, poll: float = 0.02, max_poll: float = 0.5) -> Any:
    """Await `handle`'s result: backend reads in a thread, `asyncio.sleep` in between."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    if handle.embedded:
        return await _within(asyncio.to_thread(handle.result), deadline, loop, f"job {handle.id}")
    delay = poll
    while True:
        meta = await asyncio.to_thread(handle.meta)
        if meta["status"] in READY_STATES:
            return handle.result_from_meta(meta)
        if deadline is not None and loop.time() >= deadline:
            raise RerankTimeout(
                f"job {handle.id} gave no result within {timeout}s; it may still finish: "
                "check that workers consume the queue (rerank workers), or raise the timeout"
            )
        await asyncio.sleep(delay if deadline is None else min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 1.5, max_poll)


async def _within(awaitable: Any, deadline: float | None, loop: asyncio.AbstractEventLoop, what: str) -> Any:
    if deadline is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, max(0.0, deadline - loop.time()))
    except asyncio.TimeoutError as e:
        raise RerankTimeout(f"{what} gave no result in time; it keeps running in this process's thread") from e
