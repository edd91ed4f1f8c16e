"""Where jobs run: on Celery workers through the broker, or inside this process.

`backend_for` chooses once, from the settings; handles, batches and clients then talk to
either through the same calls (send, finished, meta, revoke, ...) and never ask which.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol

from celery import Celery, group, states
from celery.backends.base import BaseKeyValueStoreBackend
from celery.backends.redis import RedisBackend
from celery.canvas import Signature
from celery.result import GroupResult
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contract import errors, tracing
from contract.errors import (
    InvalidRequest,
    JobCancelled,
    ModelLoadError,
    RerankError,
    WorkerError,
)
from contract.names import PROGRESS_STATE
from contract.plain import Budget, plain_json
from contract.settings import Settings
from producer.payloads import key_of, store_for
from producer.reaching import reaching

Meta = dict[str, Any]

log = logging.getLogger(__name__)

KNOWN_STATES = frozenset(states.ALL_STATES | {PROGRESS_STATE})
"""The states a worker stores: Celery's and our PROGRESS. Any other is not a worker's doing."""

MAX_STORED_BYTES = 512 * 1024 * 1024
"""Redis's largest string, so the most a stored value can be."""

READ_AT_ONCE = 1 << 20
"""Stored values up to this many bytes are read in one round trip; longer ones in pieces of this size.

redis-py holds a reply about three times over while parsing it: a 60 MB value read whole would
cost 180 MB before a byte of it is decoded.
"""


def result_bounds(settings: Settings) -> tuple[int, Budget]:
    """The most bytes a task's stored state can take within `settings`' limits, and what decoding it may build.

    A result lists at most every candidate and every chunk, each with two ids of up to 520
    characters (512 and a chunk's `#n`) that JSON escapes to at most 12 bytes each, plus its
    keys and numbers; add the query twice, and a megabyte for an error's traceback, the longest
    string besides the query. The default limits give about 78 MB and 106,000 values.
    """
    items = settings.max_candidates + settings.max_chunks
    size = (1 << 20) + 2 * 12 * settings.max_query_chars + items * (2 * 12 * 520 + 256)
    return min(size, MAX_STORED_BYTES), Budget(values=10_000 + 16 * items, string=max(1 << 20, 12 * settings.max_query_chars))


def stored_meta(raw: bytes | bytearray | str | None, task_id: str, max_bytes: int = MAX_STORED_BYTES, budget: Budget | None = None) -> Meta:
    """Decode the value stored for `task_id` (None: nothing stored yet) into a meta of plain data.

    Celery's own decoding runs kombu's type hooks, inflates compressed payloads and looks up
    exception classes by the names the value gives. Here the value is JSON with no hooks,
    bounded in depth, in size and (with a `budget`) in what decoding it builds, and must have
    the shape a worker writes.

    Raises:
        WorkerError: the value is not one a worker writes (garbage, too large, a foreign shape, an unknown state).
    """
    if raw is None:
        return {"status": states.PENDING, "result": None}
    if isinstance(raw, Oversized):
        raise _foreign(f"task {task_id}", f"the stored value is {raw:,} bytes, over the {max_bytes:,} a result within the limits can be")
    what = "the stored value"
    try:
        meta = plain_json(raw, what, max_bytes=max_bytes, budget=budget)
    except InvalidRequest as e:
        raise _foreign(f"task {task_id}", str(e)) from e
    status = meta.get("status") if isinstance(meta, dict) else None
    if not isinstance(status, str) or status not in KNOWN_STATES:
        raise _foreign(f"task {task_id}", f"{what} is a {type(meta).__name__} with no known task state")
    if status in (states.FAILURE, states.RETRY) and not _is_error(meta.get("result")):
        raise _foreign(f"task {task_id}", f"{what} is in state {status} without the error a worker stores")
    return meta


def stored_error(status: str, raw: Any, what: str) -> RerankError:
    """The error a finished task's stored `raw` result stands for, built from plain data.

    Only this project's own error classes are recreated by name; anything else becomes a
    `WorkerError` naming the type, so a stored value never chooses what code runs here.
    """
    if status == states.REVOKED:
        return JobCancelled(f"{what}: the job was cancelled before it finished")
    if not _is_error(raw):
        return WorkerError(f"{what} ended in state {status} with no error a worker stores; resubmit it")
    name, args = raw["exc_type"], raw.get("exc_message")
    args = [args] if not isinstance(args, list) else args
    message = str(args[0]) if len(args) == 1 else str(tuple(args))
    if name == "TaskRevokedError":
        return JobCancelled(f"{what}: the job was cancelled before it finished")
    cls = getattr(errors, name, None) if raw.get("exc_module") in ("contract.errors", "producer.errors", None) else None
    if isinstance(cls, type) and issubclass(cls, RerankError):
        return cls(message)
    return WorkerError(f"{what}: {name[:100]}: {message}")


def _is_error(raw: Any) -> bool:
    """Whether `raw` has the shape Celery stores an exception in: a type name, a module name or None, plain arguments."""
    if not isinstance(raw, dict) or not isinstance(raw.get("exc_type"), str):
        return False
    args = raw.get("exc_message")
    plain = (str, int, float, bool, type(None))
    return isinstance(raw.get("exc_module"), (str, type(None))) and all(isinstance(a, plain) for a in (args if isinstance(args, list) else [args]))


def _batch_ids(raw: bytes | str, batch_id: str) -> list[str]:
    # Celery stores a group as {"result": [[group id, parent], [[[task id, parent], None], ...]]}.
    try:
        saved = plain_json(raw, "the stored batch", max_bytes=MAX_STORED_BYTES)
    except InvalidRequest as e:
        raise _foreign(f"batch {batch_id}", str(e)) from e
    members = saved.get("result") if isinstance(saved, dict) else None
    members = members[1] if isinstance(members, list) and len(members) == 2 else None
    ids = [m[0][0] for m in members if _is_member(m)] if isinstance(members, list) else []
    if not ids or len(ids) != len(members):
        raise _foreign(f"batch {batch_id}", "the stored batch does not list its jobs as Celery does")
    return ids


def _is_member(member: Any) -> bool:
    head = member[0] if isinstance(member, list) and member else None
    return isinstance(head, list) and bool(head) and isinstance(head[0], str) and 0 < len(head[0]) <= 255


def _foreign(what: str, problem: str) -> WorkerError:
    return WorkerError(
        f"{what}: {problem}; no worker writes that, so something else wrote it into the result backend or it is "
        "corrupt: submit the job again, and find out who else writes to this Redis"
    )


class Watch(Protocol):
    """Something to wait on between reads of the result backend; `wakes` while a finished task ends its wait at once."""

    wakes: bool

    def wait(self, seconds: float) -> None:
        """Return when a watched task's state may have changed, or after `seconds`."""

    def close(self) -> None:
        """Stop watching."""


class Sleep:
    """Waits out the pause: for a backend that announces nothing, and in-process, where nothing runs meanwhile."""

    wakes = False

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`."""
        time.sleep(seconds)

    def close(self) -> None:
        """Nothing to release."""


class Announcements:
    """Waits for the Redis result backend to announce that a watched task finished (it publishes every state it stores).

    An announcement only ends a pause early; the stored value, read next, is what counts. So
    nothing on a channel is decoded: a message wakes the wait only when its first bytes are
    those of a final state as Celery writes them (`{"status": "SUCCESS", ...`), and anything
    else (progress, garbage, a third party's JSON) is ignored. Redis drops a subscriber whose
    output buffer passes `client-output-buffer-limit pubsub` (32 MB by default): a large result,
    or anyone's large message, disconnects the listener. The wait then ends at once so the
    stored value is read, redis-py resubscribes on the next wait, and after `MAX_DROPS` drops the
    waits only sleep (the reads go on, paced as before).
    """

    MAX_DROPS = 3

    def __init__(self, backend: RedisBackend, task_ids: Sequence[str], url: str | None) -> None:
        """Subscribe to the tasks' channels; a state stored after this wakes `wait`."""
        self._url = url
        self._drops = 0
        with reaching("watching tasks", url):
            self._pubsub = backend.client.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(*[backend.get_key_for_task(task_id) for task_id in task_ids])

    @property
    def wakes(self) -> bool:
        """Whether announcements still wake the waits (not after MAX_DROPS dropped subscriptions)."""
        return self._drops <= self.MAX_DROPS

    def wait(self, seconds: float) -> None:
        """Return on the first announcement of a final state, on a dropped subscription, or after `seconds`."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._drops > self.MAX_DROPS:
                time.sleep(remaining)
                return
            try:
                message = self._pubsub.get_message(timeout=remaining)
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                self._dropped(e)
                return
            if message is not None and _announces_final_state(message.get("data")):
                return

    def close(self) -> None:
        """Unsubscribe and give the connection back."""
        try:
            self._pubsub.close()
        except (RedisConnectionError, RedisTimeoutError, OSError):
            pass  # the connection is gone already

    def _dropped(self, error: Exception) -> None:
        # Redis closes a subscriber whose output buffer overflowed; so does a restart. Either
        # way the next read of the stored value tells (and raises BrokerUnavailable if it is down).
        self._drops += 1
        if self._drops > self.MAX_DROPS:
            log.warning("result announcements dropped %d times (%s); polling the stored results instead", self._drops, error)
            self.close()


_FINAL_HEAD = re.compile(rb'\{"status": "(%s)"' % b"|".join(s.encode() for s in sorted(states.READY_STATES)))


def _announces_final_state(data: Any) -> bool:
    return isinstance(data, bytes) and _FINAL_HEAD.match(data, 0, 32) is not None


class Oversized(int):
    """The size of a stored value too large to be a result; the value itself was left unread."""


class WorkerBackend:
    """Jobs go through the broker to Celery workers; their states come from the result backend."""

    durable = True
    """Jobs outlive this process: any process can follow them by id."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        """Send with `app`, configured from `settings`."""
        self.app = app
        self.broker_url = settings.broker_url
        self.results_url = settings.result_backend or settings.broker_url
        self.max_stored, self.budget = result_bounds(settings)

    def send(self, task_id: str, signature: Signature) -> None:
        """Queue a task or chain whose last task id is `task_id`."""
        with tracing.span("rerank.send", kind="producer", root=True, job_id=task_id), reaching(f"sending job {task_id}", self.broker_url):
            signature.apply_async()

    def send_many(self, signatures: Sequence[tuple[str, Signature]]) -> str:
        """Queue many jobs as one group (never a chord: chords on Redis have known bugs) and return its id."""
        sending = tracing.span("rerank.send", kind="producer", root=True, jobs=len(signatures))
        with sending, reaching(f"sending a batch of {len(signatures)} jobs", self.broker_url):
            batch = group([signature for _, signature in signatures]).apply_async()
            batch.save()  # so that another process finds the jobs by the batch id
        return batch.id

    def restore(self, batch_id: str) -> list[str]:
        """The job ids of a batch sent by `send_many`, from any process; read as plain data, like `meta`."""
        backend = self.app.backend
        if not isinstance(backend, BaseKeyValueStoreBackend):  # not one this project configures; Celery decodes
            with reaching(f"reading batch {batch_id}", self.results_url):
                saved = GroupResult.restore(batch_id, app=self.app)
            ids = None if saved is None else [result.id for result in saved.results]
        else:
            key = backend.get_key_for_group(batch_id)
            with reaching(f"reading batch {batch_id}", self.results_url):
                raw = backend.mget([key])
            raw = raw.get(key) if isinstance(raw, dict) else raw[0]
            ids = None if raw is None else _batch_ids(raw, batch_id)
        if ids is None:
            raise InvalidRequest(f"no batch {batch_id!r} in the result backend: wrong id, or its results expired")
        return ids

    def meta(self, task_id: str) -> Meta:
        """One task's state and result or meta, as plain data (one read, no waiting).

        Raises `WorkerError` when the stored value is not one a worker writes (`stored_meta`).
        """
        return self._read([task_id])[task_id]

    def finished(self, task_ids: Sequence[str]) -> dict[str, Meta]:
        """The final metas of those of `task_ids` that finished (one read); raises as `meta` does."""
        return {task_id: meta for task_id, meta in self._read(task_ids).items() if meta["status"] in states.READY_STATES}

    def _read(self, task_ids: Sequence[str]) -> dict[str, Meta]:
        backend = self.app.backend
        if not isinstance(backend, BaseKeyValueStoreBackend):  # not one this project configures; Celery decodes
            with reaching(f"reading {len(task_ids)} tasks", self.results_url):
                return {task_id: backend.get_task_meta(task_id, cache=False) for task_id in task_ids}
        keys = [backend.get_key_for_task(task_id) for task_id in task_ids]
        with reaching(f"reading {len(task_ids)} tasks", self.results_url):
            values = self._values(backend, keys)
        return {task_id: stored_meta(raw, task_id, self.max_stored, self.budget) for task_id, raw in zip(task_ids, values)}

    def _values(self, backend: BaseKeyValueStoreBackend, keys: list[str]) -> list[bytes | Oversized | None]:
        """The values at `keys`; None for no value (or a key of another type), `Oversized` for one not worth reading."""
        if not isinstance(backend, RedisBackend):
            values = backend.mget(keys)
            if isinstance(values, dict):  # the in-memory cache answers a mapping of the keys it holds
                values = [values.get(key) for key in keys]
            return [Oversized(len(v)) if v is not None and len(v) > self.max_stored else v for v in values]
        # One round trip for every key, at most READ_AT_ONCE + 1 bytes of each; a key of another type errs, alone.
        with backend.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.getrange(key, 0, READ_AT_ONCE)
            heads = pipe.execute(raise_on_error=False)
        values: list[bytes | Oversized | None] = []
        for key, head in zip(keys, heads):
            if isinstance(head, ResponseError) and "WRONGTYPE" in str(head):
                head = None  # a key of another type reads as not stored yet, as MGET answers it
            elif isinstance(head, Exception):
                raise head
            values.append(head if not head or len(head) <= READ_AT_ONCE else self._read_long(backend.client, key))
        return [value or None for value in values]

    def _read_long(self, client: Any, key: str) -> bytes | Oversized | None:
        """A long value, refused unread past `max_stored`, else read in pieces (bytes: the decoder copies a bytearray)."""
        size = client.strlen(key)
        if size > self.max_stored:
            return Oversized(size)
        pieces = []
        for start in range(0, size, READ_AT_ONCE):
            pieces.append(client.getrange(key, start, min(start + READ_AT_ONCE, size) - 1))
            if len(pieces[-1]) < min(READ_AT_ONCE, size - start):  # changed or expired meanwhile: what was read fails to decode
                break
        return b"".join(pieces)

    def watch(self, task_ids: Sequence[str]) -> Watch:
        """What to wait on between reads of these tasks: the Redis backend's announcements, else a sleep."""
        if isinstance(self.app.backend, RedisBackend):
            return Announcements(self.app.backend, task_ids, self.results_url)
        return Sleep()

    def revoke(self, task_ids: Sequence[str]) -> None:
        """Stop the tasks from running, record them as REVOKED for every process to see, and drop what they keep stored."""
        with reaching("cancelling tasks", self.broker_url):
            self.app.control.revoke(list(task_ids))
        self._mark_revoked(task_ids)

    def _mark_revoked(self, task_ids: Sequence[str]) -> None:
        # A queued stage 2 is only marked by a worker when it arrives, which never happens once
        # stage 1 is dropped, so record the cancellation here.
        with reaching("cancelling tasks", self.results_url):
            for task_id, meta in self._read(task_ids).items():
                if meta["status"] not in states.READY_STATES:
                    self.app.backend.mark_as_revoked(task_id, "cancelled by the client")
            store = store_for(self.app)
            for task_id in task_ids:
                store.drop(key_of(task_id))


BACKENDS = "bge_rerank_celery.backends"
"""Entry-point group of the places jobs can run besides the broker; the worker side registers `in-process` (pyproject.toml)."""


def backend_for(app: Celery, settings: Settings) -> WorkerBackend:
    """Workers when a broker is configured, else this process (the worker side's `in-process` backend, found by entry point)."""
    if settings.broker_url:
        return WorkerBackend(app, settings)
    need = "no RERANK_BROKER_URL is set, so jobs run in this process, which needs the worker extra: pip install 'bge-rerank-celery[worker]'"
    found = entry_points(group=BACKENDS, name="in-process")
    if not found:
        raise ModelLoadError(f"{need} (no `in-process` backend is installed); or set RERANK_BROKER_URL")
    try:
        in_process = next(iter(found)).load()
    except ImportError as e:
        raise ModelLoadError(f"{need} ({e}); or set RERANK_BROKER_URL") from e
    return in_process(app, settings)
