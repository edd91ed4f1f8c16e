"""CPU workers: one process with N threads, or N single-threaded processes? Measured on one machine.

    python -m benchmarks.cpu_processes --shape bge-reranker-base --tasks 4

Each layout scores the same `--tasks` requests of `--docs` docs (a queue of equal tasks, as `-c N`
pool processes would take them) and reports the wall time and docs/s, and what each process ran
(its torch threads, the tasks it took). Writes <out>/cpu-processes-<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import time
from pathlib import Path

from benchmarks.corpus import QUERY, model_dir, shape_name, stage1_texts

ROOT = Path(__file__).parents[1]


def _serve(
    path: str, threads: int, passages: list[str], tasks: multiprocessing.Queue, ready: multiprocessing.Barrier,
    report: multiprocessing.Queue,
) -> None:
    """One pool process: load the engine with `threads` threads, score tasks until the queue is empty, then report what it ran."""
    import torch

    from scoring.engine import CrossEncoderEngine

    torch.set_num_threads(threads)
    engine = CrossEncoderEngine.load(path)
    engine.score(QUERY, passages[:8])
    ready.wait()
    served = 0
    while True:
        try:
            tasks.get_nowait()
        except queue.Empty:
            break
        engine.score(QUERY, passages)
        served += 1
    report.put({"pid": os.getpid(), "torch_threads": torch.get_num_threads(), "tasks": served})


def run_layout(path: str, processes: int, threads: int, passages: list[str], tasks: int) -> tuple[float, list[dict]]:
    """Wall seconds for `processes` processes of `threads` threads to score `tasks` requests, and each process's report."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for n in range(tasks):
        queue.put(n)
    time.sleep(0.2)  # let the feeder thread flush, so get_nowait sees every task
    ready = context.Barrier(processes + 1)
    report = context.Queue()
    pool = [context.Process(target=_serve, args=(path, threads, passages, queue, ready, report)) for _ in range(processes)]
    for process in pool:
        process.start()
    ready.wait()
    started = time.perf_counter()
    # Each process reports when its last task is done: the time stops there, not after the
    # interpreters' exit (a second each), and its report is read before it is joined.
    reports = [report.get(timeout=3600) for _ in pool]
    seconds = time.perf_counter() - started
    for process in pool:
        process.join()
    return seconds, sorted(reports, key=lambda r: r["pid"])


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=shape_name, default="bge-reranker-base", help="A worker/synthetic.py shape.")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def main() -> None:
    """Time each layout that fills the machine's cores and write the results."""
    args = parser().parse_args()

    cores = os.cpu_count() or 1
    path = str(model_dir(args.shape))
    passages = stage1_texts(args.docs)
    layouts = sorted({(1, cores), (cores, 1)} | ({(2, cores // 2)} if cores >= 4 else set()))
    rows = []
    for processes, threads in layouts:
        seconds, reports = run_layout(path, processes, threads, passages, args.tasks)
        rows.append({"processes": processes, "threads": threads, "tasks": args.tasks, "seconds": round(seconds, 2),
                     "docs_per_s": round(args.tasks * args.docs / seconds, 3), "ran": reports})
        print(f"{processes} process(es) x {threads} thread(s): {seconds:7.1f} s for {args.tasks} tasks, "
              f"{rows[-1]['docs_per_s']:.2f} docs/s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cpu-processes-{args.shape}.json").write_text(json.dumps({
        "command": f"python -m benchmarks.cpu_processes --shape {args.shape} --docs {args.docs} --tasks {args.tasks}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": cores, "rows": rows,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
