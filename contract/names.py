"""Stable task and queue names shared by producers and workers."""

from __future__ import annotations

import hashlib
import posixpath
import re

TASK_DOCUMENTS = "rerank.documents"
"""Stage 1: score candidate papers by title and abstract."""

TASK_CHUNKS = "rerank.chunks"
"""Stage 2: score chunks, optionally only those of the papers stage 1 kept."""

TASK_PASSAGES = "rerank.passages"
"""Plain pairs: score passages exactly as sent, without the `Title:`/`Section:` templates (the HTTP gateway's form)."""

DEFAULT_QUEUE = "rerank"
"""Prefix of every queue name; also a plain queue name that RERANK_QUEUE can still choose."""

DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"
"""The model producers ask for and workers serve unless RERANK_MODEL says otherwise."""

SENT_AT_HEADER = "rerank_sent_at"
"""Message header holding the Unix time a task message was published (queue wait, oldest message's age)."""

DEVICE_CLASSES = ("gpu", "cpu")
"""Device classes a producer can ask for: `gpu` (any `cuda:N` worker) or `cpu`."""

PRIORITIES = ("interactive", "bulk")
"""Interactive work (a user is waiting) and bulk work (backfills, evaluations)."""

REPORT_COMMAND = "rerank_report"
"""Remote-control (inspect) command that returns each worker's model and throughput report."""

PROGRESS_STATE = "PROGRESS"
"""Task state a running stage reports, with meta `{"done": batches, "total": batches, ...}`."""


_UNSAFE = re.compile(r"[^a-z0-9]+")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MAX_SLUG = 48
"""Longest model slug; longer names keep their start and a hash."""


def model_slug(model: str) -> str:
    """Name `model` safely inside a queue name: `BAAI/bge-reranker-v2-m3` -> `baai-bge-reranker-v2-m3`.

    Lowercase, every run of other characters than a-z and 0-9 becomes `-`. A local directory
    (anything but `name` or `org/name`) keeps only its last component plus 8 hex digits of the
    whole path's hash, and so does a name longer than MAX_SLUG, so distinct models never share
    a queue. Producers and workers must spell RERANK_MODEL the same way to meet on one queue.
    """
    text = model.strip()
    if _HUB_ID.match(text):
        slug = _UNSAFE.sub("-", text.lower()).strip("-")
        if len(slug) <= MAX_SLUG:
            return slug
        base = slug
    else:
        text = posixpath.normpath(text)
        base = _UNSAFE.sub("-", posixpath.basename(text).lower()).strip("-")
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{base[: MAX_SLUG - 9].rstrip('-') or 'model'}-{digest}"


def model_queue(model: str) -> str:
    """The shared queue of one model, `rerank.<model slug>`: any worker serving `model`, now."""
    return f"{DEFAULT_QUEUE}.{model_slug(model)}"


def queue_name(device_class: str, priority: str = "interactive", *, model: str) -> str:
    """Name the queue of one model, device class and priority, e.g. `rerank.baai-bge-reranker-v2-m3.gpu.bulk`."""
    if device_class not in DEVICE_CLASSES:
        raise ValueError(f"unknown device class {device_class!r}; use one of {', '.join(DEVICE_CLASSES)}")
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; use one of {', '.join(PRIORITIES)}")
    return f"{model_queue(model)}.{device_class}.{priority}"


def device_class(device: str) -> str:
    """Return `gpu` for `cuda`/`cuda:N` and `cpu` otherwise."""
    return "gpu" if device.startswith("cuda") else "cpu"


def worker_queues(device: str, queue: str | None = None, model: str = DEFAULT_MODEL) -> list[str]:
    """Queues a worker serving `model` on `device` consumes unless told otherwise, most urgent first.

    Its model's and class's interactive queue, the shared queue (`queue`, RERANK_QUEUE; by default
    the model's `rerank.<slug>`), then its model's and class's bulk queue. Workers fetch in this
    order (kombu's `queue_order_strategy="priority"`, set in `worker.app`), so bulk work runs only
    when nothing more urgent is waiting, and never consume another model's queues.
    """
    cls = device_class(device)
    queues = [queue_name(cls, "interactive", model=model), queue or model_queue(model), queue_name(cls, "bulk", model=model)]
    return list(dict.fromkeys(queues))
