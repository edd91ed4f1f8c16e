"""Prometheus metrics of a worker: what its pool processes scored, how, and how long jobs waited.

Opt-in with RERANK_METRICS_PORT. The work happens in the prefork pool processes, but only the
parent can serve one port, so this uses prometheus_client's multiprocess mode:

1. Before the pool forks, the parent creates a private directory and points
   PROMETHEUS_MULTIPROC_DIR at it; pool processes inherit it.
2. Each pool process counts into its own memory-mapped files there: after loading the model,
   when a task starts (its queue wait) and when it ends (the figures of its result's `info`).
3. The parent serves `/metrics` by summing every process's files, on one thread with bounded
   connections (producer.scrape). Counters of processes that exited are kept (the work was
   done); their gauges are dropped.

Everything here is computed from what a task already returns, so the engine carries no metrics
code; out-of-memory splits are counted from the engine's own warning.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Task, bootsteps
from celery.signals import task_postrun, task_prerun, worker_process_shutdown

from producer.names import SENT_AT_HEADER, TASK_CHUNKS, TASK_DOCUMENTS, TASK_PASSAGES, model_slug
from producer.scrape import MetricsServer, read_token
from producer.settings import get_settings

log = logging.getLogger(__name__)

_TASKS = (TASK_DOCUMENTS, TASK_CHUNKS, TASK_PASSAGES)
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_LOAD_SECONDS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_RATIO = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
_OOM_WARNING = "out of memory on a batch"  # the start of worker.engine's warning when it splits a batch
_PROCESS_FILE = re.compile(r"_(\d+)\.db$")

# Set in the worker's parent before the pool forks; pool processes inherit them.
_metrics: WorkerMetrics | None = None
_hostname = "worker"
_max_batch_tokens = 0  # of the loaded engine, for the batch fill
_started: dict[str, float] = {}


class WorkerMetrics:
    """The metric objects a pool process updates; label `worker` is the Celery node name, `task` the task name."""

    def __init__(self) -> None:
        """Create every metric (multiprocess mode must already be on)."""
        from functools import partial

        import prometheus_client

        # Registered nowhere: the parent reads every process's files instead (WorkerCollector).
        Counter = partial(prometheus_client.Counter, registry=None)
        Gauge = partial(prometheus_client.Gauge, registry=None)
        Histogram = partial(prometheus_client.Histogram, registry=None)
        per_task = ["worker", "task"]
        self.tasks = Counter("rerank_tasks", "Tasks finished, by final state.", [*per_task, "state"])
        self.documents = Counter("rerank_documents", "Inputs scored: papers in stage 1, chunks in stage 2.", per_task)
        self.pairs = Counter("rerank_pairs", "Query-passage pairs scored (stage-1 windows count one each).", per_task)
        self.tokens = Counter("rerank_tokens", "Tokens of the scored pairs, padding excluded.", per_task)
        self.padded_tokens = Counter(
            "rerank_padded_tokens", "Tokens the forward passes computed, padding included, a repeated passage once.", per_task
        )
        self.batches = Counter("rerank_batches", "Forward passes (batches).", per_task)
        self.forward_seconds = Counter("rerank_forward_seconds", "Seconds spent in forward passes.", per_task)
        self.tokenize_seconds = Counter("rerank_tokenize_seconds", "Seconds spent tokenizing.", per_task)
        self.task_seconds = Histogram("rerank_task_seconds", "Run time of a task on this worker.", per_task, buckets=_SECONDS)
        self.queue_wait = Histogram(
            "rerank_queue_wait_seconds", "Seconds from publishing a task's message to the task starting here.", per_task, buckets=_SECONDS
        )
        self.batch_fill = Histogram(
            "rerank_batch_fill_ratio",
            "Per task: tokens its forward passes computed over batches x RERANK_MAX_BATCH_TOKENS.",
            per_task,
            buckets=_RATIO,
        )
        self.oom_splits = Counter("rerank_oom_splits", "Batches split in two after running out of memory.", ["worker"])
        self.model_load = Histogram(
            "rerank_model_load_seconds", "Seconds a pool process took to load the model; _count is the loads.", ["worker", "model"],
            buckets=_LOAD_SECONDS,
        )
        self.gpu_allocated = Gauge(
            "rerank_gpu_memory_allocated_bytes", "GPU memory held by tensors, summed over live pool processes.",
            ["worker", "device"], multiprocess_mode="livesum",
        )
        self.gpu_reserved = Gauge(
            "rerank_gpu_memory_reserved_bytes", "GPU memory reserved by PyTorch's allocator, summed over live pool processes.",
            ["worker", "device"], multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "rerank_model_info", "1 for the model a worker serves (labels: model, its queue slug, revision, device, dtype).",
            ["worker", "model", "slug", "revision", "device", "dtype"], multiprocess_mode="livemax",
        )


# Pool-process side ---------------------------------------------------------------------------


class _OutOfMemorySplits(logging.Handler):
    """Counts the engine's "out of memory …; splitting it in two" warnings."""

    def emit(self, record: logging.LogRecord) -> None:
        if _metrics is not None and str(record.msg).startswith(_OOM_WARNING):
            _metrics.oom_splits.labels(_hostname).inc()


def model_loaded(engine: Any, seconds: float) -> None:
    """Record a pool process's model load: its time, the model it serves, its GPU memory (no-op without metrics)."""
    global _max_batch_tokens
    if _metrics is None:
        return
    try:
        _max_batch_tokens = engine.max_batch_tokens
        from worker.ranking import model_revision

        revision = model_revision(engine.name, get_settings().model_revision) or ""
        dtype = str(engine.dtype).removeprefix("torch.")
        _metrics.model_load.labels(_hostname, engine.name).observe(seconds)
        _metrics.model_info.labels(_hostname, engine.name, model_slug(engine.name), revision, str(engine.device), dtype).set(1)
        logging.getLogger("worker.engine").addHandler(_OutOfMemorySplits(logging.WARNING))
        _gpu_memory(engine.device)
    except Exception:  # metrics are diagnostics: never stop a worker over them
        log.warning("could not record the model load in the metrics", exc_info=True)


def _gpu_memory(device: Any) -> None:
    import torch

    device = torch.device(device)
    if _metrics is not None and device.type == "cuda":
        _metrics.gpu_allocated.labels(_hostname, str(device)).set(torch.cuda.memory_allocated(device))
        _metrics.gpu_reserved.labels(_hostname, str(device)).set(torch.cuda.memory_reserved(device))


@task_prerun.connect
def _task_started(task_id: str | None = None, task: Task | None = None, **_: Any) -> None:
    if _metrics is None or task is None or task.name not in _TASKS or not task_id:
        return
    now = time.time()
    _started[task_id] = time.perf_counter()
    sent = getattr(task.request, SENT_AT_HEADER, None)
    if isinstance(sent, (int, float)) and not isinstance(sent, bool):
        # Clocks of the publishing host and this one may differ a little; never a negative wait.
        _metrics.queue_wait.labels(_hostname, task.name).observe(max(0.0, now - sent))


@task_postrun.connect
def _task_finished(task_id: str | None = None, task: Task | None = None, retval: Any = None, state: str | None = None, **_: Any) -> None:
    started = _started.pop(task_id or "", None)
    if _metrics is None or task is None or started is None:
        return
    try:
        _metrics.tasks.labels(_hostname, task.name, state or "UNKNOWN").inc()
        _metrics.task_seconds.labels(_hostname, task.name).observe(time.perf_counter() - started)
        if state == "SUCCESS" and isinstance(retval, dict):
            # A chain's stage 2 returns both rankings; stage 1's was counted by stage 1's task.
            _count_result(_metrics, task.name, retval.get("chunks", retval))
    except Exception:
        log.warning("could not record task %s in the metrics", task_id, exc_info=True)


def _count_result(metrics: WorkerMetrics, task: str, result: dict[str, Any]) -> None:
    info = result["info"]
    labels = (_hostname, task)
    metrics.documents.labels(*labels).inc(result["scored"])
    metrics.pairs.labels(*labels).inc(info["pairs"])
    metrics.tokens.labels(*labels).inc(info["tokens"])
    metrics.padded_tokens.labels(*labels).inc(info["padded_tokens"])
    metrics.batches.labels(*labels).inc(info["batches"])
    metrics.forward_seconds.labels(*labels).inc(info["forward_ms"] / 1000)
    metrics.tokenize_seconds.labels(*labels).inc(info["tokenize_ms"] / 1000)
    capacity = info["batches"] * _max_batch_tokens
    if capacity:
        metrics.batch_fill.labels(*labels).observe(info["padded_tokens"] / capacity)
    _gpu_memory(info["device"])


@worker_process_shutdown.connect
def _process_exits(**_: Any) -> None:
    """Drop this pool process's gauges as it exits; its counters stay in the totals."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if _metrics is not None and directory:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), directory)


# Parent side ---------------------------------------------------------------------------------


class WorkerCollector:
    """Sums every pool process's files, drops gauges of processes that died unannounced, and adds the padded-token share."""

    def __init__(self, directory: Path) -> None:
        """Read the multiprocess files under `directory`."""
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = directory
        self.files = MultiProcessCollector(None, str(directory))

    def collect(self) -> Iterator[Any]:
        """Yield every metric family, plus `rerank_padded_token_share` per worker and task."""
        from prometheus_client import multiprocess
        from prometheus_client.core import GaugeMetricFamily

        for path in self.directory.glob("gauge_live*.db"):
            match = _PROCESS_FILE.search(path.name)
            if match and not _alive(int(match.group(1))):
                multiprocess.mark_process_dead(int(match.group(1)), str(self.directory))  # a SIGKILLed pool process
        tokens: dict[tuple[str, str], float] = {}
        padded: dict[tuple[str, str], float] = {}
        for family in self.files.collect():
            for sample in family.samples:
                key = (sample.labels.get("worker", ""), sample.labels.get("task", ""))
                if sample.name == "rerank_tokens_total":
                    tokens[key] = sample.value
                elif sample.name == "rerank_padded_tokens_total":
                    padded[key] = sample.value
            yield family
        share = GaugeMetricFamily(
            "rerank_padded_token_share",
            "1 - tokens / padded tokens since the worker started: the padding share, exact when no passage repeats in a request.",
            labels=["worker", "task"],
        )
        for key, total in sorted(padded.items()):
            if total > 0:
                share.add_metric(list(key), 1.0 - tokens.get(key, 0.0) / total)
        yield share


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MetricsStep(bootsteps.StartStopStep):
    """With RERANK_METRICS_PORT set: turns on multiprocess metrics before the pool forks and serves `/metrics`.

    Served by producer.scrape.MetricsServer: one thread, bounded connections and time, so peers on
    the network cannot exhaust this process; on RERANK_METRICS_ADDRESS, behind a bearer token
    when RERANK_METRICS_TOKEN_FILE is set.
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Create the private metrics directory and bind the port (a taken port or unreadable token stops the worker with exit code 1)."""
        global _metrics, _hostname
        super().__init__(parent, **kwargs)
        settings = get_settings()
        port = settings.metrics_port
        self.enabled = port is not None
        self.directory: Path | None = None
        self.server: MetricsServer | None = None
        if port is None:
            return
        from prometheus_client import CollectorRegistry, values

        try:
            token = read_token(settings.metrics_token_file) if settings.metrics_token_file else None
        except (OSError, ValueError) as e:
            log.critical("cannot read RERANK_METRICS_TOKEN_FILE: %s", e)
            raise SystemExit(f"rerank-worker: cannot read RERANK_METRICS_TOKEN_FILE: {e}; point it at a file holding the token") from e
        self.directory = Path(tempfile.mkdtemp(prefix="rerank-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.directory)
        # prometheus_client picks its value class when first imported; pick again now that the
        # directory is set, so the metrics below are written to files the parent can read.
        values.ValueClass = values.get_value_class()
        _hostname = getattr(parent, "hostname", None) or _hostname
        _metrics = WorkerMetrics()
        registry = CollectorRegistry()
        registry.register(WorkerCollector(self.directory))
        address = settings.metrics_address
        try:
            self.server = MetricsServer(registry, port, address, token=token)
        except OSError as e:
            log.critical("cannot serve metrics on %s port %d: %s", address, port, e)
            raise SystemExit(
                f"rerank-worker: cannot serve metrics on RERANK_METRICS_ADDRESS={address} RERANK_METRICS_PORT={port}: {e}; "
                "choose a free port and an address of this host"
            ) from e
        self.server.start()
        log.info("serving Prometheus metrics on %s port %d%s", address, port, " (bearer token required)" if token else "")

    def stop(self, parent: Any) -> None:
        """Stop serving and remove the metrics files when the worker stops."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    terminate = stop
