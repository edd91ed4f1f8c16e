"""Where a two-stage job's time goes besides the model: a timeline of one job through Redis.

    python -m benchmarks.chain_overhead                       # tiny model: almost all of it is overhead
    python -m benchmarks.chain_overhead --shape bge-reranker-v2-m3 --device cuda:0

One worker (one task at a time) and one producer on this machine; 100-paper two-stage jobs sent
one after another. Each job's timeline comes from the producer's clock and the worker's log
(Celery's "received" and "succeeded in" lines, same host, millisecond stamps): submitting,
reaching stage 1, stage 1 besides compute, between the stages (stage 1's result and ack, stage
2's message), stage 2 besides compute, and the result back to the producer. Medians of --runs
jobs; writes benchmarks/results/chain-<device>-<shape>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from datetime import datetime
from pathlib import Path

from benchmarks.corpus import (
    QUERY,
    cpu_features,
    cpu_name,
    model_dir,
    papers,
    shape_name,
)
from benchmarks.output import write_results
from benchmarks.through_redis import running_system
from contract.formats import chunk_pool

ROOT = Path(__file__).parents[1]
PHASES = {
    "submit": "producer: validate, build the chunk pool, encode, publish",
    "to_stage1": "published until the worker has received stage 1",
    "stage1_besides_compute": "stage 1 in the worker, besides tokenizing and forward passes",
    "between_stages": "stage 1 received to stage 2 received, less stage 1's run",
    "stage2_besides_compute": "stage 2 in the worker, besides tokenizing and forward passes",
    "back_to_producer": "stage 2 done until the producer holds the result",
}


def log_time(log: str, line: str) -> float:
    """Seconds since the epoch of the worker-log line that contains `line` (Celery's stamp, UTC on this host)."""
    found = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]*\] " + re.escape(line), log)
    if found is None:
        raise LookupError(f"no worker log line with {line!r}")
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()


def run_seconds(log: str, task: str) -> float:
    """How long Celery says task `task` (name[id]) ran."""
    found = re.search(re.escape(f"Task {task} succeeded in ") + r"([\d.e-]+)s", log)
    if found is None:
        raise LookupError(f"no 'succeeded' line for {task}")
    return float(found.group(1))


def timeline(log: str, job_id: str, sent: float, queued: float, done: float, compute: tuple[float, float]) -> dict[str, float]:
    """One job's phases in milliseconds."""
    stage1, stage2 = f"rerank.documents[{job_id}:documents]", f"rerank.chunks[{job_id}]"
    received1, received2 = log_time(log, f"Task {stage1} received"), log_time(log, f"Task {stage2} received")
    run1, run2 = run_seconds(log, stage1), run_seconds(log, stage2)
    phases = {
        "submit": queued - sent,
        "to_stage1": received1 - queued,
        "stage1_besides_compute": run1 - compute[0],
        "between_stages": received2 - received1 - run1,
        "stage2_besides_compute": run2 - compute[1],
        "back_to_producer": done - received2 - run2,
    }
    row = {name: 1000 * seconds for name, seconds in phases.items()}
    row["compute"] = 1000 * sum(compute)
    row["wall"] = 1000 * (done - sent)
    return row


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=shape_name, default="tiny", help="A worker/synthetic.py shape.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2, help="Untimed jobs first: first batches, connections, the backend's subscriptions.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def main() -> None:
    """Time --runs two-stage jobs one after another and print where the time went."""
    args = parser().parse_args()

    candidates = papers(args.docs)
    pool_bytes = len(json.dumps([c.model_dump(mode="json") for c in chunk_pool(candidates)]))
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f".chain-worker-{args.device.replace(':', '')}.log"
    with running_system(model_dir(args.shape), args.device, args.dtype, None, worker_log=log_path) as client:
        for _ in range(args.warmup):
            client.two_stage(QUERY, candidates, top_k_docs=20, timeout=600)
        jobs = []
        for _ in range(args.runs):
            sent = time.time()
            job = client.submit(QUERY, candidates, top_k_docs=20)
            queued = time.time()
            result = job.result(600)
            done = time.time()
            compute = tuple((r.info.tokenize_ms + r.info.forward_ms) / 1000 for r in (result.documents, result.chunks))
            ran = {r.stage: {"device": r.info.device, "dtype": r.info.dtype, "pid": r.info.pid, "scored": r.scored}
                   for r in (result.documents, result.chunks)}
            jobs.append((job.id, sent, queued, done, compute, result.chunks.scored, ran))
        time.sleep(0.5)  # the worker's last log lines
    log = log_path.read_text(errors="replace")
    log_path.unlink()
    rows = [{**timeline(log, job_id, sent, queued, done, compute), "ran": ran} for job_id, sent, queued, done, compute, _, ran in jobs]
    medians = {name: statistics.median(r[name] for r in rows) for name in rows[0] if name != "ran"}
    overhead = medians["wall"] - medians["compute"]

    if args.device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name(0)
    else:
        device = f"{cpu_name()} ({cpu_features()})"
    lines = [
        f"Device: {device}; producer, Redis and worker on this host ({cpu_name()}). Model: random weights, {args.shape} shape, "
        f"dtype {args.dtype}. {args.docs}-paper two-stage jobs ({jobs[0][5]} chunks scored of a {pool_bytes / 1e3:.0f} KB chunk pool), "
        f"one at a time, median of {args.runs}.",
        "",
        "| phase | ms | what |",
        "|---|---:|---|",
        *[f"| {name} | {medians[name]:.1f} | {what} |" for name, what in PHASES.items()],
        f"| compute (both stages) | {medians['compute']:.1f} | tokenizing and forward passes, from each stage's `info` |",
        f"| **wall** | **{medians['wall']:.1f}** | **{medians['wall'] / medians['compute']:.2f}× compute; {overhead:.1f} ms besides it** |",
    ]
    write_results(args.out, f"chain-{args.device.split(':')[0]}-{args.shape}", "\n".join(lines), {
        "device": device, "shape": args.shape, "dtype": args.dtype, "docs": args.docs, "pool_bytes": pool_bytes,
        "median_ms": medians, "runs_ms": rows, "runs": args.runs,
        "command": f"python -m benchmarks.chain_overhead --shape {args.shape} --device {args.device} --dtype {args.dtype} --docs {args.docs} "
                   f"--runs {args.runs} --warmup {args.warmup}",
    })


if __name__ == "__main__":
    main()
