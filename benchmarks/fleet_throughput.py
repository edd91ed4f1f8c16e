"""Many producers, one worker: jobs/s and latency with batching across tasks on and off.

    python -m benchmarks.fleet_throughput --shape tiny
    python -m benchmarks.fleet_throughput --shape bge-reranker-base --kinds k10,k50 --jobs 16

8 producer threads send jobs to one worker through Redis, each thread sending its next job as
soon as the last one returned: stage-1 jobs of k passages (k10, k50: a RAG request) and 100-doc
two-stage jobs (two100), every job its own query. The worker runs one task at a time (prefork,
`RERANK_BATCH_TASKS=1`) or batches across tasks (threads pool, `RERANK_BATCH_TASKS=8`). Prints
jobs/s and p50/p99 latency side by side and writes benchmarks/results/fleet-<device>-<shape>.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.corpus import QUERY, cpu_features, cpu_name, model_dir, papers
from benchmarks.through_redis import running_system
from worker.synthetic import SHAPES

ROOT = Path(__file__).parents[1]
KINDS = {"k10": 10, "k50": 50, "two100": 100}


def one_job(client: Any, kind: str, n: int) -> None:
    """Send job `n` of `kind` and wait for it."""
    query = f"{QUERY} (question {n})"
    docs = papers(KINDS[kind], seed=n)
    if kind == "two100":
        client.two_stage(query, docs, top_k_docs=20, timeout=1800)
    else:
        client.rerank_documents(query, docs, top_k=5, timeout=1800)


def drive(client: Any, kind: str, jobs: int, threads: int) -> dict[str, float]:
    """Run `jobs` jobs from `threads` producer threads; jobs/s and latency percentiles."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(jobs))

    def producer() -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            started = time.perf_counter()
            one_job(client, kind, 1000 + n)
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    workers = [threading.Thread(target=producer) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "jobs": jobs,
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(jobs / elapsed, 3),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000, 1),
    }


def main() -> None:
    """Measure every kind of job with batching off and on, and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kinds", default="k10,k50,two100", help=f"Comma-separated, of {', '.join(KINDS)}.")
    parser.add_argument("--jobs", type=int, default=64, help="Jobs per kind and mode.")
    parser.add_argument("--threads", type=int, default=8, help="Producer threads.")
    parser.add_argument("--batch-tasks", type=int, default=8, help="Tasks in hand with batching on.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{cpu_name()}, {cpu_features()}"
    rows = []
    for mode, tasks in (("one task at a time", 1), (f"batching {args.batch_tasks} tasks", args.batch_tasks)):
        with running_system(model_dir(args.shape), args.device, args.dtype, None, tasks_in_hand=tasks) as client:
            for kind in args.kinds.split(","):
                one_job(client, kind, 0)  # warm: the first request of this kind on this worker
                row = {"kind": kind, "mode": mode, "tasks_in_hand": tasks, **drive(client, kind, args.jobs, args.threads)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    lines = [
        f"# Fleet throughput: {args.shape} shape, {args.device} ({card})",
        "",
        f"{args.threads} producer threads, {args.jobs} jobs per row, one worker; torch {torch.__version__}.",
        "",
        "| jobs | mode | jobs/s | vs one at a time | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for kind, pair in by_kind.items():
        base = pair[0]["jobs_per_s"]
        for row in pair:
            lines.append(f"| {kind} | {row['mode']} | {row['jobs_per_s']:.2f} | {row['jobs_per_s'] / base:.2f}x | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"fleet-{args.device.split(':')[0]}-{args.shape}"
    (args.out / f"{stem}.json").write_text(json.dumps({"shape": args.shape, "device": args.device, "card": card, "rows": rows}, indent=2))
    (args.out / f"{stem}.md").write_text(table)


if __name__ == "__main__":
    main()
