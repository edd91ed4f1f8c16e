"""The worker's Celery app: `celery -A worker.app worker` or `rerank-worker` start it."""

from __future__ import annotations

import logging
import os
import signal
import time
from multiprocessing.sharedctypes import RawValue
from typing import Any
from urllib.parse import urlsplit

from billiard.process import current_process
from celery import bootsteps
from celery.signals import worker_process_init, worker_shutdown

from contract import tracing
from contract.errors import ModelLoadError
from contract.settings import get_settings
from producer.app import create_app
from scoring.model import check_model, import_architecture
from worker import accounting, metrics, report, runtime, score_cache, tasks  # noqa: F401  (registers the tasks, their accounting and the report command)
from worker.backend import backend_url
from worker.cli import refuse_to_start
from worker.control import restrict_remote_control
from worker.device_process import DeviceProcess
from worker.health import HeartbeatStep
from worker.redis_check import RedisCheck
from worker.runtime import load_engine

log = logging.getLogger(__name__)

WORKER_RETRY = {"max_retries": 20, "interval_start": 0, "interval_step": 1, "interval_max": 1}
"""Celery's own reconnect policy for the result backend, which workers keep (producers use less)."""

settings = get_settings()
tracing.configure("rerank-worker")
app = create_app(settings)
# Workers fetch from their queues in the order given (-Q), not round robin, so a worker that
# consumes `rerank.<model>.gpu.interactive,rerank.<model>,rerank.<model>.gpu.bulk` runs bulk work only when nothing
# more urgent waits. This only changes how this worker reads; producers are unaffected.
app.conf.broker_transport_options = {**app.conf.broker_transport_options, "queue_order_strategy": "priority"}
# Only our tasks, well formed, reach Celery's task handling; the rest is dropped and, where it
# has an id, failed (worker/consumer.py). On Redis, queue items that are not kombu messages are
# dropped before kombu parses them (worker/transport.py).
app.conf.worker_consumer = "worker.consumer:RerankConsumer"
# On Redis, messages are taken and recorded in one step, under a lease (worker/transport.py).
TRANSPORTS = {"redis": "worker.transport:Transport", "rediss": "worker.transport:Transport", "sentinel": "worker.transport:SentinelTransport"}
if urlsplit(settings.broker_url or "").scheme in TRANSPORTS:
    app.conf.broker_transport = TRANSPORTS[urlsplit(settings.broker_url or "").scheme]
# A full Redis refusing a state write is retried like a lost connection (worker/backend.py).
if urlsplit(app.conf.result_backend or "").scheme in ("redis", "rediss", "sentinel"):
    app.conf.result_backend = backend_url(app.conf.result_backend)
# A task that finishes while Redis restarts would otherwise fail its job with a ConnectionError
# when storing the result: retry result-backend writes for about 10 s (at most ~18 s: 20 tries,
# jittered backoff up to 1 s). Only workers wait; producers report BrokerUnavailable instead.
app.conf.update(
    # A message delivered again after its worker died between storing the result and acknowledging
    # is dropped when its task already succeeded (Celery checks the result backend), so a job runs
    # at most twice even when two such deaths hit it (docs/reliability.md, "At most twice").
    worker_deduplicate_successful_tasks=True,
    result_backend_transport_options={**app.conf.result_backend_transport_options, "retry_policy": WORKER_RETRY},
    result_backend_always_retry=True,
    result_backend_max_retries=20,
    result_backend_base_sleep_between_retries_ms=50,
    result_backend_max_sleep_between_retries_ms=1000,
)


# Set by a pool process that could not load the model; shared memory, inherited by every fork.
_load_failed = RawValue("b", 0)


class ModelCheck(bootsteps.StartStopStep):
    """Stops the worker with exit code 2 (settings), before any pool process forks, when the model cannot serve."""

    requires = {"celery.worker.components:Hub"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Check the model in the parent (config, tokenizer, weight files): no tensors loaded, no CUDA."""
        super().__init__(parent, **kwargs)
        try:
            config, _ = check_model(settings.model, settings.model_revision, settings.max_length)
        except ModelLoadError as e:
            log.critical("%s", e)
            refuse_to_start(str(e))
        if not settings.hosts:  # pool processes load the model themselves: they inherit the import
            import_architecture(config)


class BatchingLoad(bootsteps.StartStopStep):
    """With several tasks in hand: one process on Celery's threads pool, a thread per task, the model loaded here once."""

    requires = {"worker.accounting:AccountingStep", "worker.score_cache:ScoreCacheStep"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Check the pool fits RERANK_BATCH_TASKS, then load the model and start the device thread before consuming."""
        super().__init__(parent, **kwargs)
        in_hand = settings.tasks_in_hand
        threads = "thread" in parent.pool_cls.__module__
        if in_hand > 1 and not (threads and parent.concurrency == in_hand):
            refuse_to_start(
                f"RERANK_BATCH_TASKS={in_hand} batches tasks in one process: start it with rerank-worker, "
                f"or with celery worker -P threads -c {in_hand}"
            )
        if in_hand == 1 and threads:
            refuse_to_start("one task at a time runs on the prefork pool (-P prefork); set RERANK_BATCH_TASKS to batch on threads")
        if in_hand > 1:
            try:
                _load_model()
            except Exception as e:
                log.critical("model failed to load in pid %d; stopping the worker", os.getpid(), exc_info=True)
                raise SystemExit(f"rerank-worker: the model failed to load: {e}") from e


class DeviceProcessStart(bootsteps.StartStopStep):
    """With RERANK_HOST_PROCESSES > 0: start the device process before the pool forks, so every pool process can connect."""

    requires = {"worker.accounting:AccountingStep", "worker.score_cache:ScoreCacheStep"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Start the device process and wait until it has loaded the model; stop the worker if it cannot."""
        super().__init__(parent, **kwargs)
        if not settings.hosts:
            return
        if "thread" in parent.pool_cls.__module__:
            refuse_to_start("RERANK_HOST_PROCESSES runs host processes on the prefork pool (-P prefork)")
        try:
            runtime.device_process = DeviceProcess(settings)
        except ModelLoadError as e:
            log.critical("%s", e)
            raise SystemExit(f"rerank-worker: {e}") from e


restrict_remote_control()
app.steps["worker"].add(ModelCheck)
app.steps["worker"].add(RedisCheck)
app.steps["worker"].add(accounting.AccountingStep)
app.steps["worker"].add(report.ReportStep)
app.steps["worker"].add(metrics.MetricsStep)
app.steps["worker"].add(HeartbeatStep)
app.steps["worker"].add(score_cache.ScoreCacheStep)
app.steps["worker"].add(BatchingLoad)
app.steps["worker"].add(DeviceProcessStart)


@worker_shutdown.connect
def _stop_the_device_process(**_: Any) -> None:
    """End the device process once the pool has stopped."""
    if runtime.device_process is not None:
        runtime.device_process.stop()


@worker_shutdown.connect
def _release_the_lease(**_: Any) -> None:
    """Put back at once what this worker took and did not finish (a cold shutdown), instead of when its lease lapses."""
    if urlsplit(settings.broker_url or "").scheme not in TRANSPORTS:
        return
    try:
        with app.connection_for_write() as connection:
            connection.default_channel.release_lease()
    except Exception:  # noqa: BLE001 - the lease lapses and another worker puts them back
        log.warning("could not give up this worker's lease at shutdown; its messages come back when it lapses", exc_info=True)


@worker_shutdown.connect
def _exit_1_after_a_failed_load(sender: Any = None, **_: Any) -> None:
    """Make the exit code say that a pool process failed to load the model, so a process manager restarts the worker."""
    if _load_failed.value and sender is not None:
        sender.exitcode = 1


def _load_model() -> None:
    started = time.perf_counter()
    engine = load_engine(settings, app)
    accounting.model_loaded(engine, time.perf_counter() - started)


@worker_process_init.connect
def _load_model_in_process(**_: Any) -> None:
    """Load the model in each pool process (after fork, so the parent never touches CUDA)."""
    try:
        _load_model()
    except Exception:
        # Celery logs and ignores exceptions from signal handlers, which would leave a worker
        # consuming tasks it cannot score; stop the whole worker instead.
        log.critical("model failed to load in pid %d; stopping the worker", os.getpid(), exc_info=True)
        if current_process().name != "MainProcess":
            _load_failed.value = 1
            os.kill(os.getppid(), signal.SIGTERM)
        os._exit(1)
