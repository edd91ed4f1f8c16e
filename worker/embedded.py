"""The no-broker mode: jobs run inside the calling process, on the same Celery tasks a worker runs, applied eagerly.

Producers reach it by name, never by import: `producer.backends.backend_for` loads the
`in-process` entry point of the `bge_rerank_celery.backends` group (pyproject.toml), so the
torch-free client has no arrow into the worker.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from celery import Celery, uuid
from celery.canvas import Signature

from contract.settings import Settings
from producer.backends import Meta, Sleep, Watch, WorkerBackend
from worker import tasks  # noqa: F401  (registers the tasks this mode applies)


class InProcessBackend(WorkerBackend):
    """Jobs run inside this process, one at a time, when first waited on; states live in memory.

    The same Celery tasks and chains run here as on workers (applied eagerly), and store their
    states in the app's in-memory result backend, so reading them is the same code.
    """

    durable = False

    def __init__(self, app: Celery, settings: Settings) -> None:
        """Run `app`'s tasks here (importing this module registered them)."""
        super().__init__(app, settings)
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
