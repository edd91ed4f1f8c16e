"""CPU workers: one process with N threads, or N single-threaded processes? Measured on one machine.

    python -m benchmarks.cpu_processes --shape bge-reranker-base --tasks 4

Each layout scores the same `--tasks` 100-doc requests (a queue of equal tasks, as `-c N` pool
processes would take them) and reports the wall time and docs/s. Writes
benchmarks/results/cpu-processes-<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import time
from pathlib import Path

from benchmarks.corpus import QUERY, model_dir, stage1_texts
from worker.synthetic import SHAPES

ROOT = Path(__file__).parents[1]


def _serve(path: str, threads: int, passages: list[str], tasks: multiprocessing.Queue, ready: multiprocessing.Barrier) -> None:
    """One pool process: load the engine with `threads` threads, then score tasks until the queue is empty."""
    import torch

    from scoring.engine import CrossEncoderEngine

    torch.set_num_threads(threads)
    engine = CrossEncoderEngine.load(path)
    engine.score(QUERY, passages[:8])
    ready.wait()
    while True:
        try:
            tasks.get_nowait()
        except queue.Empty:
            return
        engine.score(QUERY, passages)


def run_layout(path: str, processes: int, threads: int, passages: list[str], tasks: int) -> float:
    """Wall seconds for `processes` processes of `threads` threads to score `tasks` requests."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for n in range(tasks):
        queue.put(n)
    time.sleep(0.2)  # let the feeder thread flush, so get_nowait sees every task
    ready = context.Barrier(processes + 1)
    pool = [context.Process(target=_serve, args=(path, threads, passages, queue, ready)) for _ in range(processes)]
    for process in pool:
        process.start()
    ready.wait()
    started = time.perf_counter()
    for process in pool:
        process.join()
    return time.perf_counter() - started


def main() -> None:
    """Time each layout that fills the machine's cores and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bge-reranker-base")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    path = str(model_dir(args.shape))
    passages = stage1_texts(args.docs)
    layouts = sorted({(1, cores), (cores, 1)} | ({(2, cores // 2)} if cores >= 4 else set()))
    rows = []
    for processes, threads in layouts:
        seconds = run_layout(path, processes, threads, passages, args.tasks)
        rows.append({"processes": processes, "threads": threads, "tasks": args.tasks, "seconds": round(seconds, 2),
                     "docs_per_s": round(args.tasks * args.docs / seconds, 3)})
        print(f"{processes} process(es) x {threads} thread(s): {seconds:7.1f} s for {args.tasks} tasks, "
              f"{rows[-1]['docs_per_s']:.2f} docs/s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cpu-processes-{args.shape}.json").write_text(json.dumps({
        "command": f"python -m benchmarks.cpu_processes --shape {args.shape} --docs {args.docs} --tasks {args.tasks}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": cores, "rows": rows,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
