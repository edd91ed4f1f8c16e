"""The worker's message consumer: Celery's, plus a FAILURE result for our task messages it cannot read."""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

from producer.errors import InvalidRequest
from producer.names import TASK_CHUNKS, TASK_DOCUMENTS

log = logging.getLogger(__name__)


class RerankConsumer(Consumer):
    """Celery drops a message it cannot decode (or may not: pickle); this also fails its task's result.

    Without the result, whoever waits on the task id waits until their timeout for a task that
    will never run. Only our own task names are answered, and only by id from the headers, which
    are readable even when the body is not.
    """

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """Log and drop the message as Celery does, then fail its task."""
        super().on_decode_error(message, exc)
        self._fail(message, f"its body is not valid {message.content_type or 'content'}: {exc}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Log and drop the message as Celery does, then fail its task."""
        super().on_invalid_task(body, message, exc)
        self._fail(message, str(exc))

    def _fail(self, message: Any, reason: str) -> None:
        headers = getattr(message, "headers", None) or {}
        task_id, name = headers.get("id"), headers.get("task")
        if not isinstance(task_id, str) or name not in (TASK_DOCUMENTS, TASK_CHUNKS):
            return
        error = InvalidRequest(
            f"{name} message {task_id} could not be read and was dropped: {reason}; "
            "send requests as JSON through producer.RerankClient"
        )
        try:
            self.app.backend.mark_as_failure(task_id, error)
        except Exception:  # the message is already gone; failing to report it must not stop the worker
            log.warning("could not store the failure of unreadable task %s", task_id, exc_info=True)
