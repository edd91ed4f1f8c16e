"""Build the Celery app that producers and workers share."""

from __future__ import annotations

import ssl
import time
from typing import Any
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

from celery import Celery
from celery.signals import before_task_publish

from contract.names import SENT_AT_HEADER, TASK_CHUNKS, TASK_DOCUMENTS, TASK_PASSAGES
from contract.settings import Settings
from producer import tracing

_settings_by_app: WeakKeyDictionary[Celery, Settings] = WeakKeyDictionary()


PRODUCER_RETRY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
"""How long a producer retries an unreachable result backend before raising BrokerUnavailable."""


def create_app(settings: Settings) -> Celery:
    """Return a Celery app configured for safe, observable re-ranking."""
    backend = settings.result_backend or settings.broker_url
    # Task events name their arguments' sizes, not their texts (producer/events.py).
    app = Celery("rerank", broker=settings.broker_url or "memory://", backend=backend or "cache+memory://", events="producer.events:TextlessEvents")
    transport_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if settings.sentinel_master:
        transport_options["master_name"] = settings.sentinel_master
    broker_options = {
        **transport_options,
        # Workers' atomic takes (worker/transport.py); other transports ignore them.
        "worker_lease": settings.worker_lease,
        # kombu >= 5.7 sweeps Redis for unacked messages older than the visibility timeout every
        # interval x throttle seconds (10 x 10 by default). Sweeping every tenth of the timeout
        # (1-60 s) bounds a dead worker's task's redelivery at about 1.1 visibility timeouts;
        # each sweep is one ZRANGE under a mutex. Other transports ignore these options.
        "unacked_restore_interval": max(1, min(60, settings.visibility_timeout // 10)),
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        # JSON only: a pickled message can run code on the worker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Ack after the task returns, so a crash mid-task leaves the message to be redelivered.
        task_acks_late=True,
        # A pool child killed mid-task (OOM, SIGKILL) requeues its message instead of acking it.
        task_reject_on_worker_lost=True,
        # Reserve one message per process: nothing waits behind a long task, nothing sits unacked.
        worker_prefetch_multiplier=1,
        # Flower and `celery events` need task events, including "sent" for queued work.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        task_track_started=True,
        # Results are small but unbounded in number; the Redis backend expires them itself.
        result_expires=settings.result_expires,
        # Redis redelivers unacked messages after this long; it must outlast a reserved task.
        broker_transport_options=broker_options,
        # A producer whose Redis is down learns it within about 1.5 s (3 reconnects) instead of
        # Celery's 20; workers wait longer (worker/app.py), since a restart must not fail a job.
        result_backend_transport_options={**transport_options, "retry_policy": PRODUCER_RETRY},
        # Loading a 568M-parameter model takes far longer than the default 4 s start-up window.
        worker_proc_alive_timeout=settings.worker_start_timeout,
        # A stuck forward pass is killed rather than holding the GPU forever.
        task_time_limit=settings.task_time_limit,
        # The soft limit raises inside the task first, so it fails as a typed TaskTimedOut and
        # the process lives on; the hard limit then only kills a task stuck outside Python.
        task_soft_time_limit=settings.task_time_limit - max(1, min(5, settings.task_time_limit // 10)),
        task_default_queue=settings.queue,
        task_routes={name: {"queue": settings.queue} for name in (TASK_DOCUMENTS, TASK_CHUNKS, TASK_PASSAGES)},
        # TLS that checks whom it talks to; see _verified_tls.
        broker_use_ssl=_verified_tls(settings.broker_url),
        redis_backend_use_ssl=_verified_tls(backend),
        # Keep retrying the broker at start-up instead of exiting while Redis comes up.
        broker_connection_retry_on_startup=True,
        # Without a broker, producer.backends.InProcessBackend applies the same tasks and chains
        # here; their states and results go to the in-memory result backend as a worker's would.
        task_store_eager_result=True,
        task_eager_propagates=False,
    )
    _settings_by_app[app] = settings
    return app


@before_task_publish.connect
def _stamp_sent_time(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Stamp each of our task messages with the time it is published (and the trace it belongs to), in producers and in workers sending stage 2.

    Neither Celery nor kombu's Redis transport records when a message was queued: workers read
    this header for their queue-wait metric and `rerank metrics` for the age of a queue's oldest
    message.
    """
    if headers is not None and headers.get("task") in (TASK_DOCUMENTS, TASK_CHUNKS, TASK_PASSAGES):
        headers[SENT_AT_HEADER] = time.time()
        tracing.carry(headers)


def _verified_tls(url: str | None) -> dict[str, Any] | None:
    """For a ``rediss://`` URL that names no ``ssl_*`` option, verify the server against the system CAs.

    Left alone, kombu would connect with CERT_NONE (encrypted, but to anyone) and Celery's Redis
    result backend would refuse the URL. A URL that sets ``ssl_cert_reqs``/``ssl_ca_certs`` is
    used as written.
    """
    if not url or urlsplit(url).scheme != "rediss" or "ssl_" in urlsplit(url).query:
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def settings_of(app: Celery) -> Settings:
    """Return the settings `app` was created with."""
    try:
        return _settings_by_app[app]
    except KeyError as e:
        raise LookupError(f"{app!r} was not created by producer.app.create_app") from e
