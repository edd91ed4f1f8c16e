"""Stable task and queue names shared by producers and workers."""

from __future__ import annotations

TASK_DOCUMENTS = "rerank.documents"
"""Stage 1: score candidate papers by title and abstract."""

TASK_CHUNKS = "rerank.chunks"
"""Stage 2: score chunks, optionally only those of the papers stage 1 kept."""

DEFAULT_QUEUE = "rerank"
"""Queue both tasks go to unless settings route them elsewhere; every worker consumes it by default."""

DEVICE_CLASSES = ("gpu", "cpu")
"""Device classes a producer can ask for: `gpu` (any `cuda:N` worker) or `cpu`."""

PRIORITIES = ("interactive", "bulk")
"""Interactive work (a user is waiting) and bulk work (backfills, evaluations)."""

REPORT_COMMAND = "rerank_report"
"""Remote-control (inspect) command that returns each worker's model and throughput report."""

PROGRESS_STATE = "PROGRESS"
"""Task state a running stage reports, with meta `{"done": batches, "total": batches, ...}`."""


def queue_name(device_class: str, priority: str = "interactive") -> str:
    """Name the queue of one device class and priority, e.g. `rerank.gpu.bulk`."""
    if device_class not in DEVICE_CLASSES:
        raise ValueError(f"unknown device class {device_class!r}; use one of {', '.join(DEVICE_CLASSES)}")
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; use one of {', '.join(PRIORITIES)}")
    return f"{DEFAULT_QUEUE}.{device_class}.{priority}"


def device_class(device: str) -> str:
    """Return `gpu` for `cuda`/`cuda:N` and `cpu` otherwise."""
    return "gpu" if device.startswith("cuda") else "cpu"


def worker_queues(device: str, default_queue: str = DEFAULT_QUEUE) -> list[str]:
    """Queues a worker on `device` consumes unless told otherwise, most urgent first.

    Its class's interactive queue, the shared queue, then its class's bulk queue. Workers fetch
    in this order (kombu's `queue_order_strategy="priority"`, set in `worker.app`), so bulk work
    runs only when nothing more urgent is waiting.
    """
    cls = device_class(device)
    queues = [queue_name(cls, "interactive"), default_queue, queue_name(cls, "bulk")]
    return list(dict.fromkeys(queues))
