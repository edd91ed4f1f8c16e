"""A running task's progress: pairs scored of total, as its Celery state and a Flower event."""

from __future__ import annotations

import logging
import time

from celery import Task

from contract.names import PROGRESS_STATE

log = logging.getLogger(__name__)


class TaskProgress:
    """`on_batch(done, total)` callback that records "pairs scored of total" as the task's PROGRESS state.

    Writes at most once per `interval` seconds, so a short task writes nothing extra. The state
    goes to the result backend (the producer's `job.progress()`, Flower's task result) and, as a
    `task-progress` event, to Flower's live task view.
    """

    def __init__(self, task: Task, stage: str, interval: float) -> None:
        """Report for `task`, running `stage`, at most every `interval` seconds."""
        self.task = task
        self.stage = stage
        self.interval = interval
        self._last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        """Record that `done` of `total` pairs are scored."""
        now = time.monotonic()
        if now - self._last < self.interval or done >= total or self.task.request.is_eager:
            return
        self._last = now
        meta = {"stage": self.stage, "done": done, "total": total}
        self.task.update_state(state=PROGRESS_STATE, meta={**meta, "worker": self.task.request.hostname})
        try:
            # Event fields become attributes of Flower's task; "worker" there is the worker object.
            self.task.send_event("task-progress", **meta)
        except Exception:  # events are best effort; the backend already has the state
            log.debug("could not send task-progress", exc_info=True)
