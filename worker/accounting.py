"""What each pool process loaded and what its tasks did, counted once for Prometheus and the remote report.

The work happens in the prefork pool processes; the parent answers remote control and serves
`/metrics`. So the figures travel in two steps, which stays correct with `-c N`:

1. Before the pool forks, the parent creates a private directory (AccountingStep); pool
   processes inherit its path.
2. Each pool process keeps one Ledger: the model it loaded and, per task name, its tasks'
   states, sums and distributions. The task_prerun/task_postrun handlers here read each
   result's `info` once. After the load, and within half a second of a task finishing (once per
   burst of tasks, not per task), the process writes its ledger as a JSON snapshot to its own
   file there (only it can read its GPU memory).
3. The parent reads every snapshot when asked (`snapshots()`), marking those of processes that
   exited. worker/metrics.py renders them as Prometheus metrics, worker/report.py as the
   `rerank_report` answer; neither counts anything itself.

Each task also leaves one INFO line (sizes and timings), in place of Celery's "succeeded" line,
which carries the whole result; the result is logged at DEBUG.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from celery import Task, bootsteps
from celery.app import trace
from celery.signals import task_postrun, task_prerun, worker_process_shutdown

from contract.names import SENT_AT_HEADER, TASK_CHUNKS, TASK_DOCUMENTS, TASK_PASSAGES
from contract.schemas import ScoringInfo

if TYPE_CHECKING:
    from scoring.engine import Scorer

log = logging.getLogger(__name__)

TASKS = (TASK_DOCUMENTS, TASK_CHUNKS, TASK_PASSAGES)
"""The tasks accounted for; Celery's built-in ones are not."""

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Upper bounds of the buckets that task run times and queue waits are counted in."""

RATIO = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
"""Upper bounds of the buckets that batch fill ratios are counted in."""

WRITE_EVERY = 0.5
"""Seconds a pool process's counts may wait before its snapshot file is rewritten: once per burst of tasks, not per task."""

_MB = 1024 * 1024
# Set in the worker's parent before the pool forks; pool processes inherit it.
_directory: Path | None = None
_lock = threading.Lock()
_ledger: Ledger | None = None
_running: dict[str, tuple[float, float | None]] = {}  # task id -> (perf_counter at start, queue wait)


# What one task did -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFigures:
    """One finished task as counted: its state and times and, on success, what its result's `info` says it scored."""

    name: str
    id: str
    state: str
    seconds: float
    queue_wait: float | None
    queue: str | None
    worker: str | None
    scored: int = 0
    info: ScoringInfo | None = None

    @classmethod
    def of(cls, task: Task, task_id: str, state: str | None, retval: Any, started: float, queue_wait: float | None) -> TaskFigures:
        """Read a task's figures from its request and, on success, from its result (parsed here, once)."""
        scored, info = read_result(retval) if state == "SUCCESS" else (0, None)
        delivery = task.request.delivery_info or {}
        return cls(
            name=task.name, id=task_id, state=state or "UNKNOWN", seconds=time.perf_counter() - started, queue_wait=queue_wait,
            queue=delivery.get("routing_key"), worker=task.request.hostname, scored=scored, info=info,
        )


def read_result(retval: Any) -> tuple[int, ScoringInfo | None]:
    """What a task's result says it scored: the inputs it ranked and its `info` (0 and None for no ranking)."""
    if not isinstance(retval, dict):
        return 0, None
    # A chain's stage 2 returns both rankings; stage 1's was counted by stage 1's task.
    result = retval.get("chunks", retval)
    return int(result["scored"]), ScoringInfo.model_validate(result["info"])


def distribution(bounds: Sequence[float]) -> dict[str, Any]:
    """An empty histogram: counts per bucket (not cumulative), keyed by upper bound, and the sum of what was counted."""
    return {"le": {str(float(b)): 0 for b in bounds} | {"+Inf": 0}, "sum": 0.0}


def observe(histogram: dict[str, Any], value: float) -> None:
    """Count `value` in the first bucket whose upper bound it does not pass."""
    bounds = [float(b) for b in histogram["le"]]
    histogram["le"][list(histogram["le"])[bisect.bisect_left(bounds, value)]] += 1
    histogram["sum"] += value


def add_up(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum records of the same shape (numbers, and dicts of them, such as histograms) key by key."""
    total: dict[str, Any] = {}
    for record in records:
        for key, value in record.items():
            total[key] = add_up([total.get(key, {}), value]) if isinstance(value, dict) else total.get(key, 0) + value
    return total


def _new_record() -> dict[str, Any]:
    return {
        "states": {}, "documents": 0, "pairs": 0, "tokens": 0, "padded_tokens": 0, "batches": 0, "oom_splits": 0,
        "cache_hits": 0, "cache_misses": 0,
        "forward_seconds": 0.0, "tokenize_seconds": 0.0, "busy_seconds": 0.0,
        "seconds": distribution(SECONDS), "queue_wait": distribution(SECONDS), "batch_fill": distribution(RATIO),
    }


# Pool-process side -------------------------------------------------------------------------------


class Ledger:
    """What this process loaded and what its tasks did; written to its snapshot file after each change."""

    def __init__(self) -> None:
        """Start empty, with a file name of its own (a later process may get the same pid)."""
        self.pid = os.getpid()
        self.file = f"{self.pid}-{time.time_ns()}.json"
        self.model: dict[str, Any] | None = None
        self.scorer: Any = None
        self.tasks: dict[str, dict[str, Any]] = {}
        self._due = False

    def loaded(self, engine: Scorer, seconds: float) -> None:
        """Record the model this process loaded (its facts), and how long it took."""
        with _lock:
            self.scorer = engine
            self.model = {**msgspec.to_builtins(engine.facts), "load_seconds": seconds}

    def count(self, task: TaskFigures) -> None:
        """Add one finished task to its task name's record."""
        with _lock:
            record = self.tasks.setdefault(task.name, _new_record())
            record["states"][task.state] = record["states"].get(task.state, 0) + 1
            record["busy_seconds"] += task.seconds
            observe(record["seconds"], task.seconds)
            if task.queue_wait is not None:
                observe(record["queue_wait"], task.queue_wait)
            info = task.info
            if info is None:
                return
            record["documents"] += task.scored
            for key in ("pairs", "tokens", "padded_tokens", "batches", "oom_splits"):
                record[key] += getattr(info, key)
            if _cache_of(self.scorer) is not None:
                record["cache_hits"] += info.cached_pairs
                record["cache_misses"] += info.pairs - info.cached_pairs
            record["forward_seconds"] += info.forward_ms / 1000
            record["tokenize_seconds"] += info.tokenize_ms / 1000
            capacity = info.batches * (self.model or {}).get("max_batch_tokens", 0)
            if capacity:
                observe(record["batch_fill"], info.padded_tokens / capacity)

    def snapshot(self) -> dict[str, Any]:
        """This process's figures as plain JSON data, with its memory as of now."""
        with _lock:
            tasks = json.loads(json.dumps(self.tasks))
            model = dict(self.model) if self.model else None
        return {
            "pid": self.pid,
            "updated": time.time(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "model": model,
            "memory": memory(self.scorer),
            "tasks": tasks,
            "score_cache": _cache_counts(self.scorer),
        }

    def write_soon(self) -> None:
        """Write the snapshot within WRITE_EVERY seconds, once for every task that finishes meanwhile."""
        with _lock:
            if self._due:
                return
            self._due = True
        timer = threading.Timer(WRITE_EVERY, self._write_due)
        timer.daemon = True
        timer.start()

    def flush(self) -> None:
        """Write now what is due (at the process's clean exit)."""
        if self._due:
            self._write_due()

    def _write_due(self) -> None:
        with _lock:
            self._due = False
        self.write()

    def write(self) -> None:
        """Replace this process's snapshot file (no-op outside a worker, where no directory was made)."""
        if _directory is None:
            return
        try:
            target = _directory / self.file
            scratch = target.with_suffix(f".{threading.get_ident()}.tmp")  # one per thread: batching workers write from several
            scratch.write_text(json.dumps(self.snapshot()))
            os.replace(scratch, target)  # readers never see half a file
        except OSError:
            # Diagnostics: never fail a task because its figures could not be written.
            log.warning("could not write this process's figures to %s", _directory, exc_info=True)


def _cache_of(scorer: Any) -> Any:
    return getattr(scorer, "cache", None)


def _cache_counts(scorer: Any) -> dict[str, int] | None:
    """What this process's score cache counted (hits, misses, refused entries), or None without one."""
    cache = _cache_of(scorer)
    return dict(cache.counts) if cache is not None else None


def ledger() -> Ledger:
    """This process's ledger (a forked pool process starts its own)."""
    global _ledger
    with _lock:
        if _ledger is None or _ledger.pid != os.getpid():
            _ledger = Ledger()
        return _ledger


def memory(scorer: Any) -> dict[str, Any]:
    """Memory this process uses (its resident set) and what its scorer's model holds on a GPU.

    A host process reports its device process's GPU memory as of its last result (model
    `device_process_pid` says whose it is), never touching the GPU itself.
    """
    stats: dict[str, Any] = {"rss_mb": rss_mb(os.getpid())}
    if scorer is not None:
        stats.update(scorer.device_memory())
    return stats


def model_loaded(engine: Scorer, seconds: float) -> None:
    """Record that this process loaded `engine` in `seconds`, and write its first snapshot."""
    book = ledger()
    try:
        book.loaded(engine, seconds)
    except Exception:  # diagnostics: never stop a worker over them
        log.warning("could not record the model load", exc_info=True)
    book.write()


@task_prerun.connect
def _task_started(task_id: str | None = None, task: Task | None = None, **_: Any) -> None:
    if task is None or task.name not in TASKS or not task_id:
        return
    sent = getattr(task.request, SENT_AT_HEADER, None)
    # Clocks of the publishing host and this one may differ a little; never a negative wait.
    wait = max(0.0, time.time() - sent) if isinstance(sent, (int, float)) and not isinstance(sent, bool) else None
    _running[task_id] = (time.perf_counter(), wait)


@task_postrun.connect
def _task_finished(task_id: str | None = None, task: Task | None = None, retval: Any = None, state: str | None = None, **_: Any) -> None:
    started = _running.pop(task_id or "", None)
    if started is None or task is None or task_id is None:
        return
    try:
        figures = TaskFigures.of(task, task_id, state, retval, *started)
        book = ledger()
        book.count(figures)
        book.write_soon()
    except Exception:
        log.warning("could not account for task %s", task_id, exc_info=True)
        return
    if figures.info is not None:
        _log_task(figures, figures.info, retval)


@worker_process_shutdown.connect
def _flush(**_: Any) -> None:
    """A pool process leaving cleanly writes what it counted since its last snapshot."""
    if _ledger is not None and _ledger.pid == os.getpid():
        _ledger.flush()


def _log_task(task: TaskFigures, info: ScoringInfo, retval: Any) -> None:
    # Starts as Celery's own "succeeded" line did, which tools and tests match.
    wait = "-" if task.queue_wait is None else f"{task.queue_wait * 1000:.1f}"
    log.info(
        "Task %s[%s] succeeded in %.4fs: scored=%d pairs=%d tokens=%d batches=%d oom_splits=%d "
        "queue_wait_ms=%s tokenize_ms=%.1f forward_ms=%.1f total_ms=%.1f queue=%s worker=%s cached_pairs=%d",
        task.name, task.id, task.seconds, task.scored, info.pairs, info.tokens, info.batches, info.oom_splits,
        wait, info.tokenize_ms, info.forward_ms, task.seconds * 1000, task.queue, task.worker, info.cached_pairs,
    )
    if log.isEnabledFor(logging.DEBUG):
        log.debug("Task %s[%s] result: %s", task.name, task.id, json.dumps(retval))


# Parent side -------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """Resident memory of `pid` in MB, read from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 2)
    except OSError:
        return None
    return None


def alive(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gpu_memory(snapshots: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Bytes PyTorch holds per GPU (`{device: {"allocated": n, "reserved": n}}`) over the live processes holding a model.

    Each holder counts once: the host processes of one device process all report its memory.
    """
    by_holder: dict[int, tuple[str, dict[str, Any]]] = {}
    for snapshot in snapshots:
        model = snapshot["model"]
        if snapshot["alive"] and model:
            by_holder[model["pid"]] = (model["device"], snapshot["memory"])
    held: dict[str, dict[str, int]] = {}
    for device, memory in by_holder.values():
        for key in ("allocated", "reserved"):
            if f"gpu_{key}_bytes" in memory:
                held.setdefault(device, {}).setdefault(key, 0)
                held[device][key] += memory[f"gpu_{key}_bytes"]
    return held


def snapshots() -> list[dict[str, Any]]:
    """Every pool process's latest snapshot, each with `alive` set; empty outside a worker."""
    found = []
    if _directory is not None and _directory.is_dir():
        for path in sorted(_directory.glob("*.json")):
            try:
                snapshot = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            snapshot["alive"] = alive(snapshot["pid"])
            found.append(snapshot)
    return found


class _NoResultAtInfo(logging.Filter):
    """Drops Celery's "Task … succeeded in …: <result>" line for our tasks: _log_task logs one without the result."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        return not (record.msg == trace.LOG_SUCCESS and isinstance(data, dict) and data.get("name") in TASKS)


class AccountingStep(bootsteps.StartStopStep):
    """Creates the snapshot directory before the pool forks, and puts our one line per task in place of Celery's."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Make a private directory the pool processes will write to."""
        global _directory
        super().__init__(parent, **kwargs)
        _directory = Path(tempfile.mkdtemp(prefix="rerank-accounting-"))
        if not any(isinstance(f, _NoResultAtInfo) for f in trace.logger.filters):
            trace.logger.addFilter(_NoResultAtInfo())

    def shutdown(self, parent: Any) -> None:
        """Remove the snapshots when the worker stops."""
        if _directory is not None:
            shutil.rmtree(_directory, ignore_errors=True)
