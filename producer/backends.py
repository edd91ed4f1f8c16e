"""Where jobs run: on Celery workers through the broker, or inside this process.

`backend_for` chooses once, from the settings; handles, batches and clients then talk to
either through the same calls (send, finished, meta, revoke, ...) and never ask which.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from celery import Celery, group, states, uuid
from celery.backends.redis import RedisBackend
from celery.canvas import Signature
from celery.result import GroupResult

from producer.errors import InvalidRequest, ModelLoadError, reaching
from producer.settings import Settings

Meta = dict[str, Any]


class Watch(Protocol):
    """Something to wait on between reads of the result backend."""

    def wait(self, seconds: float) -> None:
        """Return when a watched task's state may have changed, or after `seconds`."""

    def close(self) -> None:
        """Stop watching."""


class Sleep:
    """Waits out the pause: for a backend that announces nothing, and in-process, where nothing runs meanwhile."""

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`."""
        time.sleep(seconds)

    def close(self) -> None:
        """Nothing to release."""


class Announcements:
    """Waits for the Redis result backend to announce a watched task's new state (it publishes every state it stores)."""

    def __init__(self, backend: RedisBackend, task_ids: Sequence[str], url: str | None) -> None:
        """Subscribe to the tasks' channels; a state stored after this wakes `wait`."""
        self._url = url
        with reaching("watching tasks", url):
            self._pubsub = backend.client.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(*[backend.get_key_for_task(task_id) for task_id in task_ids])

    def wait(self, seconds: float) -> None:
        """Return on the first announcement, or after `seconds` (the poll goes on as a safety net)."""
        with reaching("watching tasks", self._url):
            self._pubsub.get_message(timeout=seconds)

    def close(self) -> None:
        """Unsubscribe and give the connection back."""
        self._pubsub.close()


class WorkerBackend:
    """Jobs go through the broker to Celery workers; their states come from the result backend."""

    durable = True
    """Jobs outlive this process: any process can follow them by id."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        """Send with `app`, configured from `settings`."""
        self.app = app
        self.broker_url = settings.broker_url
        self.results_url = settings.result_backend or settings.broker_url

    def send(self, task_id: str, signature: Signature) -> None:
        """Queue a task or chain whose last task id is `task_id`."""
        with reaching(f"sending job {task_id}", self.broker_url):
            signature.apply_async()

    def send_many(self, signatures: Sequence[tuple[str, Signature]]) -> str:
        """Queue many jobs as one group (never a chord: chords on Redis have known bugs) and return its id."""
        with reaching(f"sending a batch of {len(signatures)} jobs", self.broker_url):
            batch = group([signature for _, signature in signatures]).apply_async()
            batch.save()  # so that another process finds the jobs by the batch id
        return batch.id

    def restore(self, batch_id: str) -> list[str]:
        """The job ids of a batch sent by `send_many`, from any process."""
        with reaching(f"reading batch {batch_id}", self.results_url):
            saved = GroupResult.restore(batch_id, app=self.app)
        if saved is None:
            raise InvalidRequest(f"no batch {batch_id!r} in the result backend: wrong id, or its results expired")
        return [result.id for result in saved.results]

    def meta(self, task_id: str) -> Meta:
        """One task's state and result or meta (one read, no waiting)."""
        with reaching(f"reading task {task_id}", self.results_url):
            return self.app.backend.get_task_meta(task_id, cache=False)

    def finished(self, task_ids: Sequence[str]) -> dict[str, Meta]:
        """The final metas of those of `task_ids` that finished (one read)."""
        with reaching(f"reading {len(task_ids)} tasks", self.results_url):
            return dict(self.app.backend.get_many(list(task_ids), interval=0, max_iterations=1))

    def watch(self, task_ids: Sequence[str]) -> Watch:
        """What to wait on between reads of these tasks: the Redis backend's announcements, else a sleep."""
        if isinstance(self.app.backend, RedisBackend):
            return Announcements(self.app.backend, task_ids, self.results_url)
        return Sleep()

    def revoke(self, task_ids: Sequence[str]) -> None:
        """Stop the tasks from running and record them as REVOKED for every process to see."""
        with reaching("cancelling tasks", self.broker_url):
            self.app.control.revoke(list(task_ids))
        self._mark_revoked(task_ids)

    def _mark_revoked(self, task_ids: Sequence[str]) -> None:
        # A queued stage 2 is only marked by a worker when it arrives, which never happens once
        # stage 1 is dropped, so record the cancellation here.
        with reaching("cancelling tasks", self.results_url):
            for task_id in task_ids:
                if self.app.backend.get_task_meta(task_id, cache=False)["status"] not in states.READY_STATES:
                    self.app.backend.mark_as_revoked(task_id, "cancelled by the client")


class InProcessBackend(WorkerBackend):
    """Jobs run inside this process, one at a time, when first waited on; states live in memory.

    The same Celery tasks and chains run here as on workers (applied eagerly), and store their
    states in the app's in-memory result backend, so reading them is the same code.
    """

    durable = False

    def __init__(self, app: Celery, settings: Settings) -> None:
        """Load the worker's tasks into this process (they need the `worker` extra)."""
        super().__init__(app, settings)
        try:
            importlib.import_module("worker.tasks")
        except ImportError as e:
            raise ModelLoadError(
                "no RERANK_BROKER_URL is set, so tasks run in this process, which needs the worker "
                f"extra: pip install 'bge-rerank-celery[worker]' ({e}); or set RERANK_BROKER_URL"
            ) from e
        self._queued: dict[str, Signature] = {}

    def send(self, task_id: str, signature: Signature) -> None:
        """Hold the job until someone waits for it."""
        self._queued[task_id] = signature

    def send_many(self, signatures: Sequence[tuple[str, Signature]]) -> str:
        """Hold every job; the batch id only names it in messages."""
        for task_id, signature in signatures:
            self.send(task_id, signature)
        return uuid()

    def finished(self, task_ids: Sequence[str]) -> dict[str, Meta]:
        """Run the first held job among `task_ids`, then report which of them finished."""
        task_id = next((t for t in task_ids if t in self._queued), None)
        signature = self._queued.pop(task_id, None) if task_id is not None else None
        if signature is not None:
            with _one_at_a_time:
                try:
                    signature.apply()
                except Exception as e:  # noqa: BLE001 - a chain stops at its first failed stage; the job fails with it
                    self.app.backend.mark_as_failure(task_id, e)
        return super().finished(task_ids)

    def watch(self, task_ids: Sequence[str]) -> Watch:
        """Nothing runs here while a caller waits: the next read runs the next held job."""
        return Sleep()

    def revoke(self, task_ids: Sequence[str]) -> None:
        """Drop held jobs and record them as REVOKED."""
        for task_id in task_ids:
            self._queued.pop(task_id, None)
        self._mark_revoked(task_ids)


# The model and its tokenizer are shared by the whole process: in-process jobs run one at a time.
_one_at_a_time = threading.Lock()


def backend_for(app: Celery, settings: Settings) -> WorkerBackend:
    """Workers when a broker is configured, else this process."""
    return WorkerBackend(app, settings) if settings.broker_url else InProcessBackend(app, settings)
