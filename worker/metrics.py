"""Prometheus metrics of a worker: what its pool processes scored, how, and how long jobs waited.

Opt-in with RERANK_METRICS_PORT. The parent serves `/metrics` on one thread with bounded
connections (producer.scrape), rendering at each scrape what every pool process has recorded
(worker/accounting.py): counts of processes that exited are kept (the work was done), their
memory and model are dropped. Nothing here counts; the engine carries no metrics code.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from celery import bootsteps

from contract.names import model_slug
from producer.app import settings_of
from producer.scrape import MetricsServer, read_token
from worker import accounting
from worker.cli import refuse_to_start

log = logging.getLogger(__name__)

LOAD_SECONDS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Upper bounds of the model-load time buckets."""

_COUNTERS = {
    "documents": ("rerank_documents", "Inputs scored: papers in stage 1, chunks in stage 2."),
    "pairs": ("rerank_pairs", "Query-passage pairs scored (stage-1 windows count one each)."),
    "tokens": ("rerank_tokens", "Tokens of the scored pairs, padding excluded."),
    "padded_tokens": ("rerank_padded_tokens", "Tokens the forward passes computed, padding included, a repeated passage once."),
    "batches": ("rerank_batches", "Forward passes (batches)."),
    "forward_seconds": ("rerank_forward_seconds", "Seconds spent in forward passes."),
    "tokenize_seconds": ("rerank_tokenize_seconds", "Seconds spent tokenizing."),
    "cache_hits": ("rerank_score_cache_hits", "Pairs whose logits the score cache served (RERANK_SCORE_CACHE)."),
    "cache_misses": ("rerank_score_cache_misses", "Pairs the score cache did not hold, scored by the model (RERANK_SCORE_CACHE)."),
}
_HISTOGRAMS = {
    "seconds": ("rerank_task_seconds", "Run time of a task on this worker."),
    "queue_wait": ("rerank_queue_wait_seconds", "Seconds from publishing a task's message to the task starting here."),
    "batch_fill": ("rerank_batch_fill_ratio", "Per task: tokens its forward passes computed over batches x RERANK_MAX_BATCH_TOKENS."),
}


class WorkerCollector:
    """Renders every pool process's figures (worker/accounting.py) as metric families; label `worker` is the Celery node name."""

    def __init__(self, hostname: str) -> None:
        """Label every sample with `hostname`."""
        self.hostname = hostname

    def collect(self) -> Iterator[Any]:
        """Yield every metric family, summed over this worker's pool processes."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        processes = accounting.snapshots()
        live = [p for p in processes if p["alive"]]
        worker = self.hostname
        per_task = {
            task: accounting.add_up(p["tasks"][task] for p in processes if task in p["tasks"])
            for task in sorted({task for p in processes for task in p["tasks"]})
        }
        tasks = CounterMetricFamily("rerank_tasks", "Tasks finished, by final state.", labels=["worker", "task", "state"])
        for task, record in per_task.items():
            for state, count in sorted(record["states"].items()):
                tasks.add_metric([worker, task, state], count)
        yield tasks
        for key, (name, documentation) in _COUNTERS.items():
            family = CounterMetricFamily(name, documentation, labels=["worker", "task"])
            for task, record in per_task.items():
                family.add_metric([worker, task], record[key])
            yield family
        for key, (name, documentation) in _HISTOGRAMS.items():
            family = _histogram(name, documentation, ["worker", "task"])
            for task, record in per_task.items():
                _add_histogram(family, [worker, task], record[key])
            yield family
        splits = CounterMetricFamily("rerank_oom_splits", "Batches split in two after running out of memory.", labels=["worker"])
        if per_task:
            splits.add_metric([worker], sum(record["oom_splits"] for record in per_task.values()))
        yield splits
        share = GaugeMetricFamily(
            "rerank_padded_token_share",
            "1 - tokens / padded tokens since the worker started: the padding share, exact when no passage repeats in a request.",
            labels=["worker", "task"],
        )
        for task, record in per_task.items():
            if record["padded_tokens"] > 0:
                share.add_metric([worker, task], 1.0 - record["tokens"] / record["padded_tokens"])
        yield share
        refused = CounterMetricFamily(
            "rerank_score_cache_refused", "Score-cache entries that failed authentication (written into Redis by someone without the fleet's secret) and were scored afresh.",
            labels=["worker"],
        )
        counts = [p["score_cache"] for p in processes if p.get("score_cache")]
        if counts:
            refused.add_metric([worker], sum(c["refused"] for c in counts))
        yield refused
        yield from _model_families(worker, processes, live)


def _model_families(worker: str, processes: list[dict[str, Any]], live: list[dict[str, Any]]) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    loads = _histogram("rerank_model_load_seconds", "Seconds a pool process took to load the model; _count is the loads.", ["worker", "model"])
    by_model: dict[str, list[float]] = defaultdict(list)
    for p in processes:
        if p["model"]:
            by_model[p["model"]["name"]].append(p["model"]["load_seconds"])
    for model, seconds in sorted(by_model.items()):
        histogram = accounting.distribution(LOAD_SECONDS)
        for value in seconds:
            accounting.observe(histogram, value)
        _add_histogram(loads, [worker, model], histogram)
    yield loads
    gpu = {
        key: GaugeMetricFamily(f"rerank_gpu_memory_{key}_bytes", documentation, labels=["worker", "device"])
        for key, documentation in (
            ("allocated", "GPU memory held by tensors, summed over the live processes that hold a model."),
            ("reserved", "GPU memory reserved by PyTorch's allocator, summed over the live processes that hold a model."),
        )
    }
    info = GaugeMetricFamily(
        "rerank_model_info", "1 for the model a worker serves (labels: model, its queue slug, revision, device, dtype).",
        labels=["worker", "model", "slug", "revision", "device", "dtype"],
    )
    served = {
        (model["name"], model_slug(model["name"]), model["revision"] or "", model["device"], model["dtype"])
        for model in (p["model"] for p in live) if model
    }
    for device, held in sorted(accounting.gpu_memory(live).items()):
        for key, value in held.items():
            gpu[key].add_metric([worker, device], value)
    for labels in sorted(served):
        info.add_metric([worker, *labels], 1)
    yield from gpu.values()
    yield info


def _histogram(name: str, documentation: str, labels: list[str]) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    return HistogramMetricFamily(name, documentation, labels=labels)


def _add_histogram(family: Any, labels: list[str], histogram: dict[str, Any]) -> None:
    from prometheus_client.utils import floatToGoString

    buckets, seen = [], 0
    for bound, count in sorted(histogram["le"].items(), key=lambda item: float(item[0])):
        seen += count
        buckets.append((floatToGoString(float(bound)), seen))
    family.add_metric(labels, buckets, histogram["sum"])


class MetricsStep(bootsteps.StartStopStep):
    """With RERANK_METRICS_PORT set: serves `/metrics`.

    Served by producer.scrape.MetricsServer: one thread, bounded connections and time, so peers on
    the network cannot exhaust this process; on RERANK_METRICS_ADDRESS, behind a bearer token
    when RERANK_METRICS_TOKEN_FILE is set.
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Bind the port (a taken port or unreadable token stops the worker with exit code 1)."""
        super().__init__(parent, **kwargs)
        settings = settings_of(parent.app)
        port = settings.metrics_port
        self.enabled = port is not None
        self.server: MetricsServer | None = None
        if port is None:
            return
        from prometheus_client import CollectorRegistry

        try:
            token = read_token(settings.metrics_token_file) if settings.metrics_token_file else None
        except (OSError, ValueError) as e:
            log.critical("cannot read RERANK_METRICS_TOKEN_FILE: %s", e)
            refuse_to_start(f"cannot read RERANK_METRICS_TOKEN_FILE: {e}; point it at a file holding the token")
        registry = CollectorRegistry()
        registry.register(WorkerCollector(getattr(parent, "hostname", None) or "worker"))
        address = settings.metrics_address
        try:
            self.server = MetricsServer(registry, port, address, token=token)
        except OSError as e:
            log.critical("cannot serve metrics on %s port %d: %s", address, port, e)
            refuse_to_start(
                f"cannot serve metrics on RERANK_METRICS_ADDRESS={address} RERANK_METRICS_PORT={port}: {e}; "
                "choose a free port and an address of this host"
            )
        self.server.start()
        log.info("serving Prometheus metrics on %s port %d%s", address, port, " (bearer token required)" if token else "")

    def stop(self, parent: Any) -> None:
        """Stop serving when the worker stops."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    terminate = stop
