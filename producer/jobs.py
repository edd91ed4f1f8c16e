"""Job handles: follow, wait for and cancel two-stage jobs and batches of them, from any process.

A two-stage job is one Celery chain. The chain's last task id is the job id; stage 1's task id is
derived from it (``<job id>:documents``), so a process that only knows the job id can still find
both stages, their states and their progress. Nothing else needs storing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from celery import Celery, states
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url
from pydantic import BaseModel, ConfigDict, Field

from producer.errors import BrokerUnavailable, JobCancelled, RerankError, RerankTimeout, WorkerError
from producer.schemas import Candidate, Chunk, RerankResult, TwoStageResult

try:  # the Redis backend raises redis-py's own errors, which are not builtin ConnectionErrors
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError:  # pragma: no cover - celery[redis] installs redis

    class RedisConnectionError(Exception):  # type: ignore[no-redef]
        pass

    class RedisTimeoutError(Exception):  # type: ignore[no-redef]
        pass

STAGE1_SUFFIX = ":documents"
READY_STATES = frozenset(states.READY_STATES)
ResultT = TypeVar("ResultT", RerankResult, TwoStageResult)

# Fast tokenizers and one shared model: in-process (embedded) runs go one at a time.
_embedded_lock = threading.Lock()


def stage1_id(job_id: str) -> str:
    """Return the task id of stage 1 of the two-stage job `job_id`."""
    return f"{job_id}{STAGE1_SUFFIX}"


class StageProgress(BaseModel):
    """Where one stage of a job stands, as its task's state and meta tell it."""

    model_config = ConfigDict(frozen=True)

    stage: str
    task_id: str
    state: str = Field(description="Celery state: PENDING, STARTED, SUCCESS, FAILURE, REVOKED, or a custom one.")
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
    """What the client does to a raw result: parse it, apply `min_score`, join documents back."""

    model: type[ResultT]
    min_score: float | None = None
    documents: Sequence[Candidate] | None = None
    chunks: Sequence[Chunk] | None = None

    def __call__(self, raw: Any) -> ResultT:
        result = self.model.model_validate(raw)
        if isinstance(result, TwoStageResult):
            return result.model_copy(
                update={
                    "documents": _finish(result.documents, None, self.documents),
                    "chunks": _finish(result.chunks, self.min_score, self.chunks),
                }
            )
        return _finish(result, self.min_score, self.documents if result.stage == "documents" else self.chunks)


def _finish(result: RerankResult, min_score: float | None, sent: Sequence[Candidate | Chunk] | None) -> RerankResult:
    items = [item for item in result.items if min_score is None or item.score >= min_score]
    if sent is not None:
        items = [item.model_copy(update={"document": sent[item.index]}) for item in items]
    return result.model_copy(update={"items": items})


def translate(error: BaseException, job_id: str, timeout: float | None = None, broker_url: str | None = None) -> RerankError:
    """Map what Celery, kombu or redis raised while waiting on `job_id` to our typed errors."""
    if isinstance(error, RerankError):
        return error
    if isinstance(error, TaskRevokedError):
        return JobCancelled(f"job {job_id} was cancelled before it finished")
    if isinstance(error, (CeleryTimeoutError, TimeoutError)) and not isinstance(error, (ConnectionError, RedisTimeoutError)):
        return RerankTimeout(
            f"job {job_id} gave no result within {timeout}s; it may still finish: "
            "check that workers consume the queue (rerank workers), or raise the timeout"
        )
    if isinstance(error, (OperationalError, ConnectionError, RedisConnectionError, RedisTimeoutError)):
        where = maybe_sanitize_url(broker_url or "") or "the result backend"
        return BrokerUnavailable(
            f"lost the broker or result backend ({where}) while following job {job_id}: {error}; "
            "check RERANK_BROKER_URL / RERANK_RESULT_BACKEND and that Redis is running"
        )
    return WorkerError(f"job {job_id} failed in the worker: {type(error).__name__}: {error}")


class Handle(Generic[ResultT]):
    """A submitted task or chain: wait for its typed result; the base of `RerankJob`.

    With a broker the work is already queued; in embedded mode `run` holds it and it runs in
    this process the first time its result is asked for.
    """

    def __init__(
        self,
        app: Celery,
        task_id: str,
        finish: Finish[ResultT],
        *,
        run: Callable[[], Any] | None = None,
        broker_url: str | None = None,
    ) -> None:
        self.id = task_id
        self.app = app
        self.finish = finish
        self._run = run
        self._broker_url = broker_url
        self._outcome: tuple[Any, BaseException | None] | None = None
        self._cancelled = False

    @property
    def embedded(self) -> bool:
        """True when the work runs in this process rather than on workers."""
        return self._run is not None

    def result(self, timeout: float | None = None) -> ResultT:
        """Wait up to `timeout` seconds (None: forever) and return the result.

        Raises:
            InvalidRequest: a worker refused the request.
            WorkerError: a worker failed; the message names the cause.
            JobCancelled: the job was cancelled.
            RerankTimeout: no result within `timeout`; the job may still finish.
            BrokerUnavailable: the broker or result backend cannot be reached.
        """
        if self.embedded:
            value, error = self._run_here()
        else:
            try:
                value, error = AsyncResult(self.id, app=self.app).get(timeout=timeout, propagate=True), None
            except BaseException as e:  # noqa: BLE001 - translated and re-raised below
                if not isinstance(e, Exception):
                    raise
                value, error = None, e
        if error is not None:
            raise translate(error, self.id, timeout, self._broker_url) from error
        return self.finish(value)

    def meta(self) -> dict[str, Any]:
        """Return the final task's meta (``status``, ``result``) from the backend: one read, no waiting."""
        if self.embedded:
            return self._embedded_meta(self.id)
        try:
            return self.app.backend.get_task_meta(self.id, cache=False)
        except Exception as e:
            raise translate(e, self.id, broker_url=self._broker_url) from e

    def result_from_meta(self, meta: dict[str, Any]) -> ResultT:
        """Turn a ready meta (from `meta`) into the result, or raise its typed error."""
        if self.embedded:
            return self.result()
        if meta["status"] == states.SUCCESS:
            return self.finish(meta["result"])
        raw = meta["result"]
        error = raw if isinstance(raw, BaseException) else self.app.backend.exception_to_python(raw)
        if not isinstance(error, BaseException):
            error = WorkerError(f"job {self.id} ended in state {meta['status']}: {meta['result']!r}")
        raise translate(error, self.id, broker_url=self._broker_url) from error

    def _run_here(self) -> tuple[Any, BaseException | None]:
        with _embedded_lock:
            if self._outcome is None:
                if self._cancelled:
                    self._outcome = (None, JobCancelled(f"job {self.id} was cancelled before it ran"))
                else:
                    try:
                        self._outcome = (self._run().get(), None)
                    except Exception as e:  # noqa: BLE001 - kept and raised by result()
                        self._outcome = (None, e)
            return self._outcome

    def _embedded_meta(self, task_id: str) -> dict[str, Any]:
        if self._outcome is None:
            return {"status": states.REVOKED if self._cancelled else states.PENDING, "result": None}
        value, error = self._outcome
        if error is None:
            return {"status": states.SUCCESS, "result": value}
        status = states.REVOKED if isinstance(error, JobCancelled) else states.FAILURE
        return {"status": status, "result": {"exc_type": type(error).__name__, "exc_message": str(error)}}


class RerankJob(Handle[TwoStageResult]):
    """A two-stage job: `id`, `status()`, `progress()`, `result(timeout)`, `cancel()`.

    `index` is the job's position in its batch (None outside a batch).
    """

    def __init__(self, *args: Any, index: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.index = index
        self._signature: Any = None  # the chain, until submit_many sends it in a group
        self.request: Any = None  # the TwoStageRequest, when this process submitted the job

    def __repr__(self) -> str:
        return f"RerankJob(id={self.id!r}, index={self.index})"

    @property
    def task_ids(self) -> dict[str, str]:
        """The Celery task id of each stage."""
        return {"documents": stage1_id(self.id), "chunks": self.id}

    def status(self) -> str:
        """Return the job's state: PENDING, STARTED, SUCCESS, FAILURE or REVOKED."""
        return self.progress().state

    def ready(self) -> bool:
        """True once the job finished (succeeded, failed or was cancelled)."""
        return self.meta()["status"] in READY_STATES

    def progress(self) -> JobProgress:
        """Read both stages' states and meta from the result backend (two reads, no waiting)."""
        stages = [self._stage(stage, task_id) for stage, task_id in self.task_ids.items()]
        return JobProgress(job_id=self.id, state=overall_state(stages), stages=stages, fraction=_fraction(stages))

    def cancel(self) -> bool:
        """Revoke both stages; return False when the job had already finished.

        A stage already running on a worker finishes (killing it would cost a model reload), but
        what follows it is dropped and `result()` raises `JobCancelled`.
        """
        if self.embedded:
            with _embedded_lock:
                if self._outcome is not None:
                    return False
                self._cancelled = True
                return True
        try:
            if self.ready():
                return False
            ids = list(self.task_ids.values())
            self.app.control.revoke(ids)
            # Record the cancellation now: a queued stage 2 is only marked by a worker when it
            # arrives, which never happens if stage 1 was dropped, and other processes must see it.
            for task_id in ids:
                if self.app.backend.get_task_meta(task_id, cache=False)["status"] not in READY_STATES:
                    self.app.backend.mark_as_revoked(task_id, "cancelled by the client")
        except RerankError:
            raise
        except Exception as e:
            raise translate(e, self.id, broker_url=self._broker_url) from e
        return True

    def _stage(self, stage: str, task_id: str) -> StageProgress:
        if self.embedded:
            meta = self._embedded_meta(task_id)
        else:
            try:
                meta = self.app.backend.get_task_meta(task_id, cache=False)
            except Exception as e:
                raise translate(e, self.id, broker_url=self._broker_url) from e
        state, raw = meta["status"], meta.get("result")
        info = raw if state not in READY_STATES and isinstance(raw, dict) else None
        error = None
        if state in states.PROPAGATE_STATES:
            error = _describe(raw)
        return StageProgress(stage=stage, task_id=task_id, state=state, info=info, error=error)


def _describe(raw: Any) -> str:
    if isinstance(raw, BaseException):
        return f"{type(raw).__name__}: {raw}"
    if isinstance(raw, dict) and "exc_type" in raw:
        return f"{raw['exc_type']}: {raw.get('exc_message')}"
    return repr(raw)


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
        self.id = batch_id
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[RerankJob]:
        return iter(self.jobs)

    def __getitem__(self, index: int) -> RerankJob:
        return self.jobs[index]

    def as_completed(self, timeout: float | None = None, *, poll: float = 0.05, max_poll: float = 0.5) -> Iterator[RerankJob]:
        """Yield each job as soon as it finished; call `job.result()` on it (it no longer waits).

        Raises:
            RerankTimeout: `timeout` seconds passed with jobs unfinished; they may still finish.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(self.jobs)
        delay = poll
        while pending:
            if pending[0].embedded:
                job = pending.pop(0)
                job._run_here()
                yield job
                continue
            finished = ready_ids(pending[0].app, [job.id for job in pending])
            for job in [job for job in pending if job.id in finished]:
                pending.remove(job)
                yield job
            if not pending:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise RerankTimeout(
                    f"{len(pending)} of {len(self.jobs)} jobs of batch {self.id} gave no result within {timeout}s; "
                    "they may still finish"
                )
            nap = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(nap)
            delay = min(delay * 1.5, max_poll)

    def results(self, timeout: float | None = None, *, return_exceptions: bool = False) -> list[Any]:
        """Return every job's result in input order.

        With `return_exceptions` a failed (or, past `timeout`, unfinished) job gives its
        `RerankError` in its place instead of raising the first one.
        """
        outcomes: dict[int, Any] = {}
        try:
            for job in self.as_completed(timeout):
                try:
                    outcomes[job.index] = job.result(timeout=5)
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

    def progress(self) -> BatchProgress:
        """Count the batch's jobs by state (one backend read per job; nothing waits)."""
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


def ready_ids(app: Celery, task_ids: Sequence[str]) -> set[str]:
    """Return which of `task_ids` are finished, in one round trip where the backend allows it."""
    backend = app.backend
    try:
        if hasattr(backend, "get_many"):
            return {task_id for task_id, _ in backend.get_many(list(task_ids), interval=0, max_iterations=1)}
        return {t for t in task_ids if backend.get_task_meta(t, cache=False)["status"] in READY_STATES}
    except Exception as e:
        raise translate(e, f"{len(task_ids)} jobs") from e
