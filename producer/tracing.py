"""Where traces meet Celery: a task message carries its sender's W3C context, and a task runs in a span of that trace.

Producers, the gateway (a producer) and workers share these hooks through `producer.app`; no
Celery or FastAPI instrumentation package is needed. A published task gets `traceparent` in its
headers (the producer's `rerank.send` span, or in a worker, stage 1's span for the stage 2 it
sends); a worker opens `rerank.receive` (the message's wait in its queue, the take included) and a
span named after the task, current while the task runs and until Celery has sent the next stage
and stored the result. Off (contract.tracing.ON false), nothing is connected.
"""

from __future__ import annotations

from typing import Any

from celery.signals import task_postrun, task_prerun, worker_process_shutdown

from contract import tracing
from contract.names import SENT_AT_HEADER, TASK_CHUNKS, TASK_DOCUMENTS, TASK_PASSAGES

TASKS = (TASK_DOCUMENTS, TASK_CHUNKS, TASK_PASSAGES)
_HEADERS = ("traceparent", "tracestate")
_begun: dict[str, Any] = {}


def carry(headers: dict[str, Any]) -> None:
    """Put the current trace context into the headers of one of our task messages being published."""
    if tracing.ON and headers.get("task") in TASKS:
        tracing.inject(headers)


def _task_started(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task is None or task.name not in TASKS or task_id is None:
        return
    request = task.request
    carrier = {name: getattr(request, name, None) for name in _HEADERS}
    sent = getattr(request, SENT_AT_HEADER, None)
    queue = (request.delivery_info or {}).get("routing_key")
    _begun[task_id] = tracing.begin(
        task.name, carrier, queued_since=sent if isinstance(sent, (int, float)) else None,
        task_id=task_id, worker=request.hostname, **{"messaging.destination.name": queue},
    )


def _task_finished(task_id: str | None = None, state: str | None = None, retval: Any = None, **_: Any) -> None:
    begun = _begun.pop(task_id, None) if task_id is not None else None
    tracing.end(begun, f"{type(retval).__name__}: {retval}"[:500] if state not in ("SUCCESS", None) else None)


def _flush(**_: Any) -> None:
    tracing.flush()


if tracing.ON:
    task_prerun.connect(_task_started, weak=False)
    task_postrun.connect(_task_finished, weak=False)
    worker_process_shutdown.connect(_flush, weak=False)
