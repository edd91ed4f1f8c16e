"""Job handles: follow, wait for and cancel jobs and batches of them, from any process.

A two-stage job is one Celery chain. The chain's last task id is the job id; stage 1's task id is
derived from it (``<job id>:documents``), so a process that only knows the job id can still find
both stages, their states and their progress. Nothing else needs storing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from celery import states
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract.errors import InvalidRequest, RerankTimeout
from contract.schemas import (
    Candidate,
    Chunk,
    RerankResult,
    TwoStageRequest,
    TwoStageResult,
)
from contract.validation import check_ranking, check_two_stage
from producer.backends import Meta, WorkerBackend, stored_error
from producer.waiting import Outcomes, Waiter

STAGE1_SUFFIX = ":documents"
READY_STATES = frozenset(states.READY_STATES)
ResultT = TypeVar("ResultT", RerankResult, TwoStageResult)


def stage1_id(job_id: str) -> str:
    """Return the task id of stage 1 of the two-stage job `job_id`."""
    return f"{job_id}{STAGE1_SUFFIX}"


class StageProgress(BaseModel):
    """Where one stage of a job stands, as its task's state and meta tell it."""

    model_config = ConfigDict(frozen=True)

    stage: str
    task_id: str
    state: str = Field(description="Celery state: PENDING, STARTED, PROGRESS, SUCCESS, FAILURE or REVOKED.")
    info: dict[str, Any] | None = Field(None, description="The task's meta while it runs (e.g. hostname, pid, done/total).")
    error: str | None = Field(None, description="The failure's type and message, when the stage failed.")


class JobProgress(BaseModel):
    """Where a two-stage job stands: its overall state, each stage, and a fraction done."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    state: str
    stages: list[StageProgress]
    fraction: float = Field(ge=0.0, le=1.0, description="Finished stages, plus the running stage's done/total when it reports one.")


class BatchProgress(BaseModel):
    """How many jobs of a batch are in each state."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    total: int
    states: dict[str, int]
    done: int = Field(description="Jobs that finished, whether they succeeded, failed or were cancelled.")
    failed: int

    @property
    def fraction(self) -> float:
        """Share of the batch that has finished."""
        return self.done / self.total if self.total else 1.0


@dataclass(frozen=True)
class Finish(Generic[ResultT]):
    """What the client does to a raw result: parse it, check its indexes, apply `min_score`, join documents back.

    `documents` and `chunks` are what was sent (the candidates, the chunk pool), when known:
    every returned index is checked against them, and with `join` each item gets its input back.
    """

    model: type[ResultT]
    min_score: float | None = None
    documents: Sequence[Candidate] | None = None
    chunks: Sequence[Chunk] | None = None
    join: bool = False

    def __call__(self, raw: Any) -> ResultT:
        """Parse `raw` (a task's return value) into the result the caller asked for.

        Raises `ValidationError` when `raw` is not a `model`, `InvalidRequest` when an index does not match what was sent.
        """
        result = self.model.model_validate(raw)
        if isinstance(result, TwoStageResult):
            check_two_stage(result, self.documents, self.chunks)
            return result.model_copy(
                update={
                    "documents": self._finish(result.documents, None, self.documents),
                    "chunks": self._finish(result.chunks, self.min_score, self.chunks),
                }
            )
        sent = self.documents if result.stage == "documents" else self.chunks
        check_ranking(result, sent)
        return self._finish(result, self.min_score, sent)

    def _finish(self, result: RerankResult, min_score: float | None, sent: Sequence[Candidate | Chunk] | None) -> RerankResult:
        items = [item for item in result.items if min_score is None or item.score >= min_score]
        if self.join and sent is not None:
            items = [item.model_copy(update={"document": sent[item.index]}) for item in items]
        return result.model_copy(update={"items": items})


class Handle(Generic[ResultT]):
    """A submitted task or chain: wait for its typed result; the base of `RerankJob`."""

    def __init__(self, backend: WorkerBackend, task_id: str, finish: Finish[ResultT]) -> None:
        """Follow `task_id` through `backend`; `finish` turns its raw result into the typed one."""
        self.id = task_id
        self.backend = backend
        self.finish = finish
        self.final: Meta | None = None

    def result(self, timeout: float | None = None) -> ResultT:
        """Wait up to `timeout` seconds (None: forever) and return the result.

        Raises:
            InvalidRequest: a worker refused the request.
            WorkerError: a worker failed; the message names the cause.
            JobCancelled: the job was cancelled.
            RerankTimeout: no result within `timeout`; the job may still finish.
            BrokerUnavailable: the broker or result backend cannot be reached.
        """
        for _ in completed([self], timeout, f"job {self.id}"):
            pass
        return self.decode()

    def ready(self) -> bool:
        """True once the job finished (succeeded, failed or was cancelled); one read, no waiting."""
        return self.final is not None or self.backend.meta(self.id)["status"] in READY_STATES

    def decode(self) -> ResultT:
        """Turn the final meta into the result, or raise the typed error it holds."""
        if self.final is None:
            raise RuntimeError(f"job {self.id} has not finished; call result() to wait for it")
        status, raw = self.final["status"], self.final["result"]
        if status == states.SUCCESS:
            try:
                return self.finish(raw)
            except ValidationError as e:
                raise InvalidRequest(
                    f"task {self.id} did not return a {self.finish.model.__name__}: it is not a job of this kind "
                    "(a single-stage task followed as a two-stage job, or not ours)"
                ) from e
        raise stored_error(status, raw, f"job {self.id}")


class RerankJob(Handle[TwoStageResult]):
    """A two-stage job: `id`, `status()`, `progress()`, `result(timeout)`, `cancel()`."""

    def __init__(
        self,
        backend: WorkerBackend,
        job_id: str,
        finish: Finish[TwoStageResult],
        *,
        index: int | None = None,
        request: TwoStageRequest | None = None,
    ) -> None:
        """Follow job `job_id`; `index` is its place in a batch, `request` what this process sent (if it did)."""
        super().__init__(backend, job_id, finish)
        self.index = index
        self.request = request

    def __repr__(self) -> str:
        return f"RerankJob(id={self.id!r}, index={self.index})"

    @property
    def task_ids(self) -> dict[str, str]:
        """The Celery task id of each stage."""
        return {"documents": stage1_id(self.id), "chunks": self.id}

    def status(self) -> str:
        """Return the job's state: PENDING, STARTED, SUCCESS, FAILURE or REVOKED."""
        return self.progress().state

    def progress(self) -> JobProgress:
        """Read both stages' states and meta from the result backend (two reads, no waiting)."""
        stages = [_stage(stage, task_id, self.backend.meta(task_id)) for stage, task_id in self.task_ids.items()]
        return JobProgress(job_id=self.id, state=overall_state(stages), stages=stages, fraction=_fraction(stages))

    def cancel(self) -> bool:
        """Revoke both stages; return False when the job had already finished.

        A stage already running on a worker finishes (killing it would cost a model reload), but
        what follows it is dropped and `result()` raises `JobCancelled`.
        """
        if self.ready():
            return False
        self.backend.revoke(list(self.task_ids.values()))
        return True


def _stage(stage: str, task_id: str, meta: Meta) -> StageProgress:
    state, raw = meta["status"], meta.get("result")
    info = raw if state not in READY_STATES and isinstance(raw, dict) else None
    error = _describe(raw) if state in states.PROPAGATE_STATES else None
    return StageProgress(stage=stage, task_id=task_id, state=state, info=info, error=error)


def _describe(raw: Any) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("exc_type"), str):
        args = raw.get("exc_message")
        message = args[0] if isinstance(args, list) and len(args) == 1 else args
        return f"{raw['exc_type'][:100]}: {message}"
    return repr(raw)[:1000]


def overall_state(stages: Sequence[StageProgress]) -> str:
    """One state for a chain of stages: the last one's once it finished, else the first failure, else running or pending."""
    last = stages[-1].state
    if last in READY_STATES:
        return last
    for stage in stages:
        if stage.state in states.PROPAGATE_STATES:
            return stage.state
    if all(stage.state == states.PENDING for stage in stages):
        return states.PENDING
    return states.STARTED


def _fraction(stages: Sequence[StageProgress]) -> float:
    done = 0.0
    for stage in stages:
        if stage.state in READY_STATES:
            done += 1
        elif stage.info:
            # Tasks may report progress in their meta; read the usual spellings, ignore the rest.
            finished = stage.info.get("done", stage.info.get("current"))
            total = stage.info.get("total")
            if isinstance(finished, (int, float)) and isinstance(total, (int, float)) and total > 0:
                done += min(max(finished / total, 0.0), 1.0)
    return done / len(stages)


class RerankBatch:
    """Many two-stage jobs sent together: collect them in input order or as they complete."""

    def __init__(self, batch_id: str, jobs: list[RerankJob]) -> None:
        """A batch named `batch_id` holding `jobs` in input order."""
        self.id = batch_id
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[RerankJob]:
        return iter(self.jobs)

    def __getitem__(self, index: int) -> RerankJob:
        return self.jobs[index]

    def as_completed(self, timeout: float | None = None) -> Iterator[RerankJob]:
        """Yield each job as soon as it finished; `job.result()` then returns without waiting.

        Raises:
            RerankTimeout: `timeout` seconds passed with jobs unfinished; they may still finish.
        """
        return completed(self.jobs, timeout, f"batch {self.id}")

    def results(self, timeout: float | None = None, *, return_exceptions: bool = False) -> list[Any]:
        """Return every job's result in input order.

        With `return_exceptions` a failed (or, past `timeout`, unfinished) job gives its
        `RerankError` in its place instead of raising the first one.
        """
        outcomes = Outcomes(self.jobs, return_exceptions)
        try:
            for job in self.as_completed(timeout):
                outcomes.add(job)
        except RerankTimeout as e:
            outcomes.timed_out(e)
        return outcomes.in_order()

    def progress(self) -> BatchProgress:
        """Count the batch's jobs by state (two backend reads per job; nothing waits)."""
        counts: dict[str, int] = {}
        for job in self.jobs:
            state = job.status()
            counts[state] = counts.get(state, 0) + 1
        done = sum(n for state, n in counts.items() if state in READY_STATES)
        failed = sum(n for state, n in counts.items() if state in states.PROPAGATE_STATES)
        return BatchProgress(batch_id=self.id, total=len(self.jobs), states=counts, done=done, failed=failed)

    def cancel(self) -> int:
        """Cancel every unfinished job; return how many were cancelled."""
        return sum(job.cancel() for job in self.jobs)


def completed(handles: Iterable[Handle], timeout: float | None, what: str) -> Iterator[Any]:
    """Yield `handles` as they finish, reading their backend and waiting between reads as the `Waiter` says."""
    handles = list(handles)
    waiter = Waiter(handles, timeout, what)
    yield from waiter.ready
    if not waiter.pending:
        return
    backend = handles[0].backend
    watch = backend.watch(waiter.ids())  # before the first read, so no state change slips between
    try:
        while waiter.pending:
            yield from waiter.settle(backend.finished(waiter.ids()))
            if waiter.pending:
                watch.wait(waiter.pause(watch.wakes))
    finally:
        watch.close()
