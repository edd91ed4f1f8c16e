"""Many producers, one worker: what the host side of a GPU worker costs, open loop and closed loop.

    python -m benchmarks.fleet_throughput --simulated                 # simulated H200, any machine
    python -m benchmarks.fleet_throughput --shape bge-reranker-v2-m3 --device cuda:0

Worker shapes, side by side in one run:
- `threads`: one process on Celery's threads pool, 8 tasks in hand, one device thread
  (RERANK_BATCH_TASKS=8; the GPU shape before the device process);
- `device+N`: N host processes (prefork) feeding one device process (RERANK_HOST_PROCESSES=N).

Jobs: stage-1 requests of 10 passages (k10) and 100-paper two-stage jobs (two100), every job its
own query. Open loop: producer processes submit at a fixed total arrival rate for `--seconds`;
each rate of `--rates` is run until a rate misses (p99 over the bound, or fewer than 97% of jobs
back within the bound after the last arrival). Each row reports completed jobs/s, p50/p99
latency from arrival, the device's busy share (with --simulated: simulated GPU compute time over
wall time) and host CPU per job (user+sys of every worker process, device process included, over
jobs, and split into the worker's parent, its pool processes and its device process). Closed loop: 8 producer threads, each sending its next job when the last returns.
Writes benchmarks/results/fleet-<device>-<shape>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.corpus import QUERY, cpu_features, cpu_name, model_dir, papers
from benchmarks.output import write_results
from benchmarks.through_redis import running_system

ROOT = Path(__file__).parents[1]
KINDS = {"k10": 10, "two100": 100}
BOUND_S = {"k10": 0.25, "two100": 2.0}
DEFAULT_RATES = {"k10": "25,50,75,100,125,150,200", "two100": "1,2,3,4,5,6,8"}
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def one_job(client: Any, kind: str, n: int) -> Any:
    """Submit job `n` of `kind`; return its handle."""
    query = f"{QUERY} (question {n})"
    docs = papers(KINDS[kind], seed=n % 50)
    if kind == "two100":
        return client.submit(query, docs, top_k_docs=20)
    return client.submit_documents(query, docs, top_k=5)


def producer(settings_json: str, kind: str, rate: float, seconds: float, first: int, out: Any) -> None:
    """One producer process: submit at `rate` jobs/s for `seconds`, wait for each; send back latencies from arrival."""
    from producer import RerankClient, Settings

    client = RerankClient(Settings.model_validate_json(settings_json))
    latencies: list[float | None] = []
    lock = threading.Lock()

    def wait(handle: Any, arrival: float) -> None:
        try:
            handle.result(timeout=60)
            value: float | None = time.perf_counter() - arrival
        except Exception:  # noqa: BLE001 - a job not back counts as missed
            value = None
        with lock:
            latencies.append(value)

    count = max(1, round(rate * seconds))
    start = time.perf_counter() + 0.2
    with ThreadPoolExecutor(max_workers=256) as waiters:
        for n in range(count):
            arrival = start + n / rate
            delay = arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            waiters.submit(wait, one_job(client, kind, first + n), arrival)
    out.send(latencies)


def process_tree_cpu(pid: int) -> dict[str, float]:
    """User+sys CPU seconds of a worker's processes by role: `parent` (`pid`), `device` (its device process), `hosts` (the rest below it)."""
    totals, todo = {"parent": 0.0, "hosts": 0.0, "device": 0.0}, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            role = "parent" if current == pid else "device" if b"scoring.device" in Path(f"/proc/{current}/cmdline").read_bytes() else "hosts"
            totals[role] += (int(fields[11]) + int(fields[12])) / CLOCK_TICK
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return totals


def cpu_per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, float]:
    """Milliseconds of CPU per job, in all and by role."""
    split = {role: round((after[role] - before[role]) * 1000 / max(1, jobs), 2) for role in before}
    return {"host_cpu_ms_per_job": round(sum(split.values()), 2), "cpu_ms_per_job_by_process": split}


def open_loop(client: Any, kind: str, rate: float, seconds: float, producers: int, stats: str | None, first: int) -> dict[str, Any]:
    """Run `rate` jobs/s of `kind` for `seconds` from `producers` processes; the row's figures."""
    # Here, not at the top: producer processes import this module and need no torch.
    from benchmarks.simulated_device import RATE, read_stats

    cpu0, sim0, started = process_tree_cpu(client.worker_pid), read_stats(stats) if stats else None, time.perf_counter()
    pipes, procs = [], []
    context = multiprocessing.get_context("spawn")
    for p in range(producers):
        receive, send = context.Pipe(duplex=False)
        proc = context.Process(target=producer, args=(client.settings.model_dump_json(), kind, rate / producers, seconds,
                                                     first + p * 100_000, send))
        proc.start()
        pipes.append(receive)
        procs.append(proc)
    latencies = [value for pipe in pipes for value in pipe.recv()]
    for proc in procs:
        proc.join()
    elapsed = time.perf_counter() - started
    cpu1 = process_tree_cpu(client.worker_pid)
    done = sorted(v for v in latencies if v is not None)
    row: dict[str, Any] = {
        "kind": kind, "offered_per_s": rate, "jobs": len(latencies), "completed": len(done),
        "completed_per_s": round(len(done) / seconds, 2),
        "p50_ms": round(statistics.median(done) * 1000, 1) if done else None,
        "p99_ms": round(done[min(len(done) - 1, round(0.99 * (len(done) - 1)))] * 1000, 1) if done else None,
        **cpu_per_job(cpu0, cpu1, len(done)),
    }
    if stats:
        sim = read_stats(stats)
        row["device_busy"] = round((sim[2] - sim0[2]) / RATE / elapsed, 3)
        row["batches"] = int(sim[0] - sim0[0])
    bound = BOUND_S[kind] * 1000
    row["held"] = bool(done) and len(done) >= 0.97 * len(latencies) and row["p99_ms"] <= bound
    return row


def closed_loop(client: Any, kind: str, jobs: int, threads: int) -> dict[str, Any]:
    """`threads` producer threads each sending its next job when the last returned; jobs/s and latency."""
    latencies: list[float] = []
    counter = iter(range(jobs))
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            began = time.perf_counter()
            one_job(client, kind, 900_000 + n).result(timeout=600)
            with lock:
                latencies.append(time.perf_counter() - began)

    cpu0, began = process_tree_cpu(client.worker_pid), time.perf_counter()
    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    return {"kind": kind, "closed_loop_threads": threads, "jobs": jobs, "jobs_per_s": round(jobs / elapsed, 2),
            "p50_ms": round(statistics.median(ordered) * 1000, 1), "p99_ms": round(ordered[-1 if jobs < 100 else round(0.99 * (jobs - 1))] * 1000, 1),
            **cpu_per_job(cpu0, process_tree_cpu(client.worker_pid), jobs)}


def worker_shape(name: str) -> dict[str, int]:
    """`threads` (8 tasks on the threads pool) or `device+N` (N host processes) as running_system options."""
    if name == "threads":
        return {"tasks_in_hand": 8, "hosts": 0}
    if name.startswith("device+") and name[7:].isdigit():
        return {"tasks_in_hand": 1, "hosts": int(name[7:])}
    raise SystemExit(f"unknown worker shape {name!r}: use threads or device+N")


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", help="Model shape whose tokenizer (and, without --simulated, weights) to use.")
    parser.add_argument("--simulated", action="store_true", help="Score on the simulated H200 (benchmarks/simulated_device.py).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kinds", default="k10,two100")
    parser.add_argument("--shapes", default="threads,device+1,device+2", help="Comma-separated worker shapes: threads, device+N.")
    parser.add_argument("--seconds", type=float, default=8.0, help="Seconds of arrivals per open-loop rate.")
    parser.add_argument("--producers", type=int, default=2, help="Producer processes.")
    parser.add_argument("--closed-jobs", type=int, default=32, help="Jobs per closed-loop row (0: none).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    for kind, rates in DEFAULT_RATES.items():
        parser.add_argument(f"--rates-{kind}", default=rates, help=f"Open-loop arrival rates of {kind} jobs (jobs/s), tried in order.")
    return parser


def main() -> None:
    """Measure every worker shape on every kind of job, open and closed loop, and write the tables."""
    args = parser().parse_args()

    import torch

    card = "simulated H200" if args.simulated else (torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU")
    host = f"{cpu_name()}, {cpu_features()}, {os.cpu_count()} cores"
    rows = []
    for name in args.shapes.split(","):
        stats = tempfile.mktemp(prefix="rerank-sim-") if args.simulated else None
        env = {"RERANK_DEVICE_RUNNER": "benchmarks.simulated_device:runner", "RERANK_SIM_STATS": stats} if args.simulated else {}
        with running_system(model_dir(args.shape), args.device, "auto", None, env={**env, "RERANK_TASK_TIME_LIMIT": "120"},
                            **worker_shape(name)) as client:
            for kind in args.kinds.split(","):
                one_job(client, kind, 0).result(timeout=120)  # warm
                if args.closed_jobs:
                    row = {"shape": name, "loop": "closed", **closed_loop(client, kind, args.closed_jobs, 8)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                for rate in [float(r) for r in getattr(args, f"rates_{kind}").split(",")]:
                    row = {"shape": name, "loop": "open", **open_loop(client, kind, rate, args.seconds, args.producers, stats, len(rows) * 1000)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    if not row["held"]:
                        break
    stem = f"fleet-{'simulated-h200' if args.simulated else args.device.split(':')[0]}-{args.shape}"
    write_results(args.out, stem, render(rows, args, card, host), {"card": card, "host": host, "torch": torch.__version__, "rows": rows})


def render(rows: list[dict[str, Any]], args: argparse.Namespace, card: str, host: str) -> str:
    """The results as Markdown: the highest rate each shape held, then every row."""
    lines = [
        f"# Fleet throughput: {card}, {args.shape} tokenizer, host {host}",
        "",
        f"Open loop: {args.producers} producer processes, {args.seconds:g} s of arrivals per rate; a rate is held when p99 "
        f"(from arrival) stays under {BOUND_S['k10'] * 1000:g} ms for k10 and {BOUND_S['two100']:g} s for two100 and 97% of jobs "
        "come back. Host CPU: user+sys of every worker process (device process included) per job.",
        "",
        "## Highest rate held",
        "",
        "| jobs | shape | held jobs/s | p50 ms | p99 ms | device busy | host CPU ms/job | of it: parent / hosts / device |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for kind in args.kinds.split(","):
        for name in args.shapes.split(","):
            held = [r for r in rows if r["shape"] == name and r["kind"] == kind and r["loop"] == "open" and r["held"]]
            if held:
                best = max(held, key=lambda r: r["offered_per_s"])
                busy = f"{best['device_busy']:.0%}" if "device_busy" in best else "–"
                split = best["cpu_ms_per_job_by_process"]
                lines.append(f"| {kind} | {name} | {best['completed_per_s']:.1f} | {best['p50_ms']:.0f} | {best['p99_ms']:.0f} | {busy} | "
                             f"{best['host_cpu_ms_per_job']:.1f} | {split['parent']:.1f} / {split['hosts']:.1f} / {split['device']:.1f} |")
            else:
                lines.append(f"| {kind} | {name} | none held | | | | | |")
    lines += ["", "## Every row", "", "| jobs | shape | loop | offered/s | completed/s | p50 ms | p99 ms | device busy | host CPU ms/job | held |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["loop"] == "open":
            busy = f"{r['device_busy']:.0%}" if "device_busy" in r else "–"
            lines.append(f"| {r['kind']} | {r['shape']} | open | {r['offered_per_s']:g} | {r['completed_per_s']:.1f} | {r['p50_ms']} | {r['p99_ms']} | {busy} | {r['host_cpu_ms_per_job']:.1f} | {'yes' if r['held'] else 'no'} |")
        else:
            lines.append(f"| {r['kind']} | {r['shape']} | closed (8 threads) | – | {r['jobs_per_s']:.1f} | {r['p50_ms']} | {r['p99_ms']} | – | {r['host_cpu_ms_per_job']:.1f} | – |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
