"""Celery tasks: validate the message, call the engine, dump the result. Nothing else."""

from __future__ import annotations

import gc
import inspect
from typing import Any

from celery import Task, shared_task, states
from celery.exceptions import SoftTimeLimitExceeded

from contract.errors import InvalidRequest, TaskTimedOut
from contract.names import TASK_CHUNKS, TASK_DOCUMENTS, TASK_PASSAGES
from contract.schemas import ChunksRequest, DocumentsRequest, PassagesRequest
from contract.validation import RequestT, check_limits, parse_request
from producer.app import settings_of
from worker import ranking, stored
from worker.chaining import check_stage1
from worker.progress import TaskProgress
from worker.runtime import load_engine


class RerankTask(Task):
    """Turns what a message can get wrong into typed errors; tasks never retry (invalid input stays invalid)."""

    max_retries = 0
    # Expected failures: logged as one line, without a traceback, so hostile input cannot flood the log.
    throws = (InvalidRequest,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        global _failed_before
        if _failed_before:
            # Celery keeps a failed task's exception, traceback and frames in a reference cycle,
            # and the frames hold the request: a rejected 60 MB message stayed in memory until a
            # rare full collection (+115 MB per message). Collected here, the next task after it.
            _failed_before = False
            gc.collect()
        # A message sent straight to the queue may carry any arguments: refuse them by name
        # instead of letting Python raise a bare TypeError from the call.
        signature = inspect.signature(self.run)
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InvalidRequest(
                f"{self.name} takes ({', '.join(signature.parameters)}), but the message had "
                f"{len(args)} positional and {sorted(kwargs)} keyword arguments: {e}"
            ) from e
        try:
            return super().__call__(*args, **kwargs)
        except SoftTimeLimitExceeded as e:
            limit = settings_of(self.app).task_time_limit
            raise TaskTimedOut(
                f"{self.name} ran past its time limit (RERANK_TASK_TIME_LIMIT={limit}s) and was stopped; "
                "send fewer or shorter texts per request, or raise the limit"
            ) from e

    def after_return(self, status: str, *_: Any) -> None:
        """Drop what the job keeps in Redis once nothing will read it; remember a failure, whose reference cycles the next task collects."""
        global _failed_before
        if status != states.SUCCESS:
            _failed_before = True
        if status != states.SUCCESS or not self.request.chain:
            stored.drop(self)


_failed_before = False


def _parsed(task: Task, model: type[RequestT], request: Any) -> RequestT:
    """The task's request (inline or stored beside its message), validated against this worker's limits."""
    return parse_request(model, stored.request_of(task, request), settings_of(task.app))


def _ranked(task: Task, stage: str, rank: Any, request: Any, *extra: Any) -> dict[str, Any]:
    """`rank` run on this process's scorer, progress reported as `stage`, the ranking as plain data."""
    settings = settings_of(task.app)
    progress = TaskProgress(task, stage, settings.progress_interval)
    return rank(load_engine(settings, task.app), request, *extra, task.request.hostname, progress).model_dump(mode="json")


@shared_task(name=TASK_DOCUMENTS, bind=True, base=RerankTask)
def rerank_documents(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Stage 1: rank candidate papers by title and abstract."""
    return _ranked(self, "documents", ranking.rank_documents, _parsed(self, DocumentsRequest, request))


@shared_task(name=TASK_CHUNKS, bind=True, base=RerankTask)
def rerank_chunks(self: Task, stage1: dict[str, Any] | None = None, *, request: dict[str, Any]) -> dict[str, Any]:
    """Stage 2: rank chunks; in a chain, only those of the papers stage 1 kept, returning both stages."""
    parsed = _parsed(self, ChunksRequest, request)
    documents = None if stage1 is None else check_stage1(stage1, parsed)
    kept = None if documents is None else {item.id for item in documents.items}
    if parsed.pool is not None:
        if kept is None:
            raise InvalidRequest("a stage-2 request with a pool reads the papers stage 1 kept: it runs only chained after stage 1")
        parsed = stored.kept_chunks(self, parsed, kept)
        check_limits(parsed, settings_of(self.app))
    chunks = _ranked(self, "chunks", ranking.rank_chunks, parsed, kept)
    return chunks if documents is None else {"documents": documents.model_dump(mode="json"), "chunks": chunks}


@shared_task(name=TASK_PASSAGES, bind=True, base=RerankTask)
def rerank_passages(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Plain pairs: rank passages scored exactly as sent, without a template."""
    return _ranked(self, "passages", ranking.rank_passages, _parsed(self, PassagesRequest, request))
