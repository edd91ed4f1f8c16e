"""What each worker serves and how busy it is: its model's architecture and memory, made remote.

Each pool process records its model, memory and work (worker/accounting.py); the parent renders
every process's figures when asked, refreshes their resident memory from /proc, and adds totals.
It answers `celery inspect rerank_report` (and `rerank-worker report`), and puts the same report
under `rerank` in `celery inspect stats`, which Flower shows on the worker's "Other" tab.

A task sent to the worker (`rerank.report`) would reach only one of its N processes; a
remote-control command alone would see only the parent, which never loads the model.
"""

from __future__ import annotations

import os
from typing import Any

from celery import bootsteps
from celery.worker.control import inspect_command

from contract.names import REPORT_COMMAND
from worker import accounting
from worker.accounting import rss_mb

_MB = 1024 * 1024


def process_report(snapshot: dict[str, Any]) -> dict[str, Any]:
    """One pool process: the model it serves, its architecture, memory and work done."""
    model = snapshot["model"] or {}
    weights = model.get("weights") or {}
    memory = snapshot["memory"]
    work = accounting.add_up(snapshot["tasks"].values())
    busy = work.get("busy_seconds", 0.0)
    documents = work.get("documents", 0)
    stats: dict[str, Any] = {
        "weights_mb": _mb(weights.get("bytes")),
        "rss_mb": rss_mb(snapshot["pid"]) if snapshot["alive"] else memory["rss_mb"],
    }
    for key in ("allocated", "reserved", "max_allocated"):
        if f"gpu_{key}_bytes" in memory:
            stats[f"gpu_{key}_mb"] = _mb(memory[f"gpu_{key}_bytes"])
    if "gpu_name" in memory:
        stats["gpu_name"] = memory["gpu_name"]
    return {
        "pid": snapshot["pid"],
        "alive": snapshot["alive"],
        "model": model.get("name"),
        "revision": model.get("revision"),
        "path": weights.get("path"),
        "device": model.get("device"),
        "cuda_visible_devices": snapshot["cuda_visible_devices"],
        "dtype": model.get("dtype"),
        "attention": model.get("attention"),
        "max_length": model.get("max_length"),
        "max_batch_tokens": model.get("max_batch_tokens"),
        "device_process_pid": model["pid"] if model.get("pid", snapshot["pid"]) != snapshot["pid"] else None,
        "architecture": weights.get("architecture"),
        "memory": stats,
        "tasks": work.get("states", {}).get("SUCCESS", 0),
        "documents": documents,
        "pairs": work.get("pairs", 0),
        "busy_seconds": round(busy, 3),
        "documents_per_second": round(documents / busy, 2) if busy > 0 else None,
        "updated": snapshot["updated"],
    }


def _mb(size: int | None) -> float | None:
    return None if size is None else round(size / _MB, 2)


def worker_report(hostname: str | None = None) -> dict[str, Any]:
    """Every pool process's report, with their RSS refreshed, and totals."""
    snapshots = accounting.snapshots()
    processes = [process_report(snapshot) for snapshot in snapshots]
    live = [p for p in processes if p["alive"]]
    gpu = accounting.gpu_memory(snapshots)
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
        "parameters": (first.get("architecture") or {}).get("parameters"),
        "architecture": first.get("architecture"),
        "processes": processes,
        "loaded_processes": len(live),
        "memory": {
            "parent_rss_mb": rss_mb(os.getpid()),
            "rss_mb": round(sum(p["memory"]["rss_mb"] or 0 for p in live), 2),
            "gpu_allocated_mb": _mb(sum(held.get("allocated", 0) for held in gpu.values())) if gpu else None,
            "gpu_reserved_mb": _mb(sum(held.get("reserved", 0) for held in gpu.values())) if gpu else None,
        },
        "tasks": sum(p["tasks"] for p in processes),
        "documents": documents,
        "pairs": sum(p["pairs"] for p in processes),
        "busy_seconds": round(busy, 3),
        "documents_per_second": round(documents / busy, 2) if busy > 0 else None,
    }


class ReportStep(bootsteps.StartStopStep):
    """Adds the report to `inspect stats`."""

    requires = {"worker.accounting:AccountingStep"}

    def info(self, parent: Any) -> dict[str, Any]:
        """Shown by `celery inspect stats` and Flower's worker page."""
        return {"rerank": worker_report(getattr(parent, "hostname", None))}


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
