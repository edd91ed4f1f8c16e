"""Reading what a job keeps in Redis beside its messages (producer.payloads): a stage's request, and the kept papers' chunks.

Everything read here is untrusted: each part's digest must be the one its message names, and it
must inflate to plain JSON within RERANK_MAX_REQUEST_BYTES; anything else is an `InvalidRequest`.
A part that is gone because its job already ended (a message delivered again after the job's last
stage dropped them, or a stage that starts after the job was cancelled and its parts dropped, before
the worker heard of the cancel) ends the task quietly instead (`Ignore`): failing it would overwrite
the job's stored success or cancellation.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore
from pydantic import ValidationError

from contract.errors import InvalidRequest
from contract.schemas import Chunk, ChunksRequest, Stored
from contract.validation import summarize
from producer.app import settings_of
from producer.payloads import store_for, unpack

log = logging.getLogger(__name__)


def request_of(task: Task, argument: Any) -> Any:
    """The request a task's argument stands for: the argument itself, or the stored request it names (`{"stored": ...}`)."""
    if not (isinstance(argument, dict) and set(argument) == {"stored"}):
        return argument
    try:
        stored = Stored.model_validate(argument["stored"])
    except ValidationError as e:
        raise InvalidRequest(f"the task names its stored request wrongly: {summarize(e)}") from e
    task.request.rerank_key = stored.key  # dropped when the job ends (tasks.RerankTask.after_return)
    (blob,) = _read(task, stored.key, [stored.field])
    return unpack(blob, stored.digest, f"the stored request {stored.key}/{stored.field}", settings_of(task.app).max_request_bytes)


def kept_chunks(task: Task, request: ChunksRequest, kept: set[str]) -> ChunksRequest:
    """`request` with the chunks of the `kept` papers read from its pool (and their places in the job's whole pool)."""
    pool, candidates = request.pool, request.candidate_ids
    if pool is None or candidates is None:
        return request
    task.request.rerank_key = pool.key
    wanted = [n for n, paper in enumerate(candidates) if paper in kept]
    starts = [0]
    for count in pool.counts:
        starts.append(starts[-1] + count)
    chunks, positions = [], []
    limit = settings_of(task.app).max_request_bytes
    for n, blob in zip(wanted, _read(task, pool.key, [str(n) for n in wanted]) if wanted else []):
        what = f"the stored chunks of candidate {candidates[n][:64]!r} ({pool.key}/{n})"
        stored = unpack(blob, pool.digests[n], what, limit)
        try:
            paper = [Chunk.model_validate(chunk) for chunk in stored] if isinstance(stored, list) else None
        except ValidationError as e:
            raise InvalidRequest(f"{what} are not chunks: {summarize(e)}") from e
        if paper is None or len(paper) != pool.counts[n] or any(chunk.doc_id != candidates[n] for chunk in paper):
            raise InvalidRequest(f"{what} are not the {pool.counts[n]} chunks of that candidate the producer stored; submit the job again")
        chunks += paper
        positions += range(starts[n], starts[n] + len(paper))
    return request.model_copy(update={"chunks": chunks, "positions": positions, "pool": None})


def drop(task: Task) -> None:
    """Forget what this task's job keeps in Redis: its last stage finished, or a stage failed and nothing will read it."""
    key = getattr(task.request, "rerank_key", None)
    if key is not None:
        store_for(task.app).drop(key)


def _read(task: Task, key: str, fields: list[str]) -> list[bytes | None]:
    parts = store_for(task.app).get(key, fields)
    if all(part is None for part in parts) and _ended(task):
        log.info("Task %s[%s] came after its job ended (finished, failed or cancelled) and dropped %s; nothing to do", task.name, task.request.id, key)
        raise Ignore()
    return parts


def _ended(task: Task) -> bool:
    try:
        return task.backend.get_task_meta(task.request.id).get("status") in states.READY_STATES
    except Exception:  # noqa: BLE001 - an unreadable state is no proof the job ended: the caller reports the missing part
        return False
