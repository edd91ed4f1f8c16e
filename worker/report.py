"""What each worker serves and how busy it is: its model's architecture and memory, made remote.

The model lives in the prefork pool processes, not in the parent process that answers remote
control, so the report travels in two steps, which stays correct with `-c N`:

1. Each pool process writes a snapshot (model, architecture, memory, counters) to its own file
   in a directory the parent created before forking: after loading the model and after every
   task. Only the pool process can read its GPU memory or its counters.
2. The parent reads every snapshot when asked, refreshes each process's resident memory from
   /proc, and adds totals. It answers `celery inspect rerank_report` (and `rerank-worker
   report`), and puts the same report under `rerank` in `celery inspect stats`, which Flower
   shows on the worker's "Other" tab.

A task sent to the worker (`rerank.report`) would reach only one of its N processes; a
remote-control command alone would see only the parent, which never loads the model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from celery import Task, bootsteps
from celery.signals import task_postrun, task_prerun
from celery.worker.control import inspect_command

from producer.names import REPORT_COMMAND, TASK_CHUNKS, TASK_DOCUMENTS, TASK_PASSAGES

log = logging.getLogger(__name__)

_MB = 1024 * 1024
# Set in the worker's parent process before the pool forks; pool processes inherit it.
_report_dir: Path | None = None
_lock = threading.Lock()
_counters = {"tasks": 0, "documents": 0, "pairs": 0, "busy_seconds": 0.0}
_started: dict[str, float] = {}
_engine: Any = None


# Pool-process side ---------------------------------------------------------------------------


def architecture(model: Any) -> dict[str, Any]:
    """Summarise the model's architecture and size."""
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "parameters": parameters,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "attention_heads": getattr(config, "num_attention_heads", None),
        "intermediate_size": getattr(config, "intermediate_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "modules": [f"{name}: {type(module).__name__}" for name, module in model.named_children()],
    }


def memory(engine: Any) -> dict[str, Any]:
    """Memory this process uses: weights, resident set, and GPU memory if any."""
    import torch

    stats: dict[str, Any] = {"weights_mb": _static(engine)["weights_mb"], "rss_mb": rss_mb(os.getpid())}
    if engine.device.type == "cuda":
        stats["gpu_allocated_mb"] = round(torch.cuda.memory_allocated(engine.device) / _MB, 2)
        stats["gpu_reserved_mb"] = round(torch.cuda.memory_reserved(engine.device) / _MB, 2)
        stats["gpu_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(engine.device) / _MB, 2)
        stats["gpu_name"] = torch.cuda.get_device_name(engine.device)
    return stats


def _static(engine: Any) -> dict[str, Any]:
    # What never changes after load, computed once: walking every parameter after each task
    # costs about a millisecond on the base model, time the next task waits for.
    cached = getattr(engine, "_report_static", None)
    if cached is None:
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        cached = {"architecture": architecture(engine.model), "weights_mb": round(weights / _MB, 2)}
        engine._report_static = cached
    return cached


def process_report(engine: Any, settings: Any) -> dict[str, Any]:
    """Everything one pool process knows about itself: model, architecture, memory, work done."""
    with _lock:
        counters = dict(_counters)
    busy = counters["busy_seconds"]
    return {
        "pid": os.getpid(),
        "model": engine.name,
        "revision": settings.model_revision,
        "path": str(getattr(engine.model.config, "_name_or_path", engine.name)),
        "device": str(engine.device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "attention": engine.attention,
        "max_length": engine.max_length,
        "max_batch_tokens": engine.max_batch_tokens,
        "architecture": _static(engine)["architecture"],
        "memory": memory(engine),
        "tasks": counters["tasks"],
        "documents": counters["documents"],
        "pairs": counters["pairs"],
        "busy_seconds": round(busy, 3),
        "documents_per_second": round(counters["documents"] / busy, 2) if busy > 0 else None,
        "updated": time.time(),
    }


def publish(engine: Any, settings: Any) -> None:
    """Write this pool process's snapshot where its parent reads it (no-op outside a worker)."""
    global _engine
    _engine = (engine, settings)
    if _report_dir is None:
        return
    try:
        data = json.dumps(process_report(engine, settings))
        target = _report_dir / f"{os.getpid()}.json"
        scratch = target.with_suffix(f".{threading.get_ident()}.tmp")  # one per thread: batching workers publish from several
        scratch.write_text(data)
        os.replace(scratch, target)  # readers never see half a file
    except OSError:
        # The report is diagnostics: never fail a task because it could not be written.
        log.warning("could not write the worker report to %s", _report_dir, exc_info=True)


@task_prerun.connect
def _task_started(task_id: str | None = None, task: Task | None = None, **_: Any) -> None:
    if task is not None and task.name in (TASK_DOCUMENTS, TASK_CHUNKS, TASK_PASSAGES) and task_id:
        _started[task_id] = time.perf_counter()


@task_postrun.connect
def _task_finished(task_id: str | None = None, task: Task | None = None, retval: Any = None, state: str | None = None, **_: Any) -> None:
    started = _started.pop(task_id or "", None)
    if started is None or task is None:
        return
    with _lock:
        _counters["busy_seconds"] += time.perf_counter() - started
        if state == "SUCCESS" and isinstance(retval, dict):
            result = retval.get("chunks", retval)
            _counters["tasks"] += 1
            _counters["documents"] += int(result.get("scored", 0))
            _counters["pairs"] += int(result.get("info", {}).get("pairs", 0))
    if _engine is not None:
        publish(*_engine)


# Parent side ---------------------------------------------------------------------------------


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_report(hostname: str | None = None) -> dict[str, Any]:
    """Collect every pool process's snapshot, refresh their RSS, and add totals."""
    processes = []
    if _report_dir is not None and _report_dir.is_dir():
        for path in sorted(_report_dir.glob("*.json")):
            try:
                snapshot = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            snapshot["alive"] = _alive(snapshot["pid"])
            if snapshot["alive"]:
                snapshot["memory"]["rss_mb"] = rss_mb(snapshot["pid"])
            processes.append(snapshot)
    live = [p for p in processes if p["alive"]]
    documents = sum(p["documents"] for p in processes)
    busy = sum(p["busy_seconds"] for p in processes)
    first = live[0] if live else (processes[0] if processes else {})
    return {
        "hostname": hostname,
        "pid": os.getpid(),
        "model": first.get("model"),
        "revision": first.get("revision"),
        "path": first.get("path"),
        "device": first.get("device"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "dtype": first.get("dtype"),
        "attention": first.get("attention"),
        "max_length": first.get("max_length"),
        "parameters": first.get("architecture", {}).get("parameters"),
        "architecture": first.get("architecture"),
        "processes": processes,
        "loaded_processes": len(live),
        "memory": {
            "parent_rss_mb": rss_mb(os.getpid()),
            "rss_mb": round(sum(p["memory"]["rss_mb"] or 0 for p in live), 2),
            "gpu_allocated_mb": _sum_gpu(live, "gpu_allocated_mb"),
            "gpu_reserved_mb": _sum_gpu(live, "gpu_reserved_mb"),
        },
        "tasks": sum(p["tasks"] for p in processes),
        "documents": documents,
        "pairs": sum(p["pairs"] for p in processes),
        "busy_seconds": round(busy, 3),
        "documents_per_second": round(documents / busy, 2) if busy > 0 else None,
    }


def _sum_gpu(processes: list[dict[str, Any]], key: str) -> float | None:
    values = [p["memory"][key] for p in processes if key in p["memory"]]
    return round(sum(values), 2) if values else None


class ReportStep(bootsteps.StartStopStep):
    """Creates the snapshot directory before the pool forks and adds the report to `inspect stats`."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Make a private directory the pool processes will write to."""
        global _report_dir
        super().__init__(parent, **kwargs)
        _report_dir = Path(tempfile.mkdtemp(prefix="rerank-report-"))

    def info(self, parent: Any) -> dict[str, Any]:
        """Shown by `celery inspect stats` and Flower's worker page."""
        return {"rerank": worker_report(getattr(parent, "hostname", None))}

    def shutdown(self, parent: Any) -> None:
        """Remove the snapshots when the worker stops."""
        if _report_dir is not None:
            shutil.rmtree(_report_dir, ignore_errors=True)


@inspect_command(name=REPORT_COMMAND)
def rerank_report(state: Any) -> dict[str, Any]:
    """Report the model this worker serves, its memory, and the work its processes have done."""
    return worker_report(state.consumer.hostname)


def format_report(name: str, report: dict[str, Any]) -> str:
    """Render one worker's report as text for `rerank-worker report`."""
    arch = report.get("architecture") or {}
    mem = report.get("memory") or {}
    lines = [
        f"{name}",
        f"  model: {report.get('model')}  revision: {report.get('revision') or '-'}",
        f"  path: {report.get('path')}",
        f"  device: {report.get('device')}  CUDA_VISIBLE_DEVICES: {report.get('cuda_visible_devices')!r}"
        f"  dtype: {report.get('dtype')}  attention: {report.get('attention')}  max_length: {report.get('max_length')}",
        f"  architecture: {', '.join(arch.get('architectures', []))} ({arch.get('model_type')}), "
        f"{arch.get('layers')} layers, hidden {arch.get('hidden_size')}, {arch.get('attention_heads')} heads, "
        f"vocab {arch.get('vocab_size')}, {arch.get('max_position_embeddings')} positions",
        f"  parameters: {report.get('parameters') or 0:,}",
        f"  modules: {'; '.join(arch.get('modules', []))}",
        f"  memory: RSS {mem.get('rss_mb')} MB in {report.get('loaded_processes')} pool process(es), "
        f"parent {mem.get('parent_rss_mb')} MB"
        + (f", GPU allocated {mem['gpu_allocated_mb']} MB, reserved {mem['gpu_reserved_mb']} MB" if mem.get("gpu_allocated_mb") is not None else ""),
        f"  work: {report.get('tasks')} tasks, {report.get('documents')} documents, "
        f"{report.get('documents_per_second') or 0} documents/s while busy",
    ]
    for p in report.get("processes", []):
        lines.append(
            f"    pid {p['pid']}{'' if p['alive'] else ' (exited)'}: {p['tasks']} tasks, {p['documents']} documents, "
            f"RSS {p['memory']['rss_mb']} MB"
        )
    return "\n".join(lines)
