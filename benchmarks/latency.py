"""Where a small task's latency goes: our client and task next to a no-op Celery task.

    python -m benchmarks.latency --shape tiny

Runs Redis and one worker, sends 1-doc stage-1 requests and no-op tasks, and splits each round
trip into compute (tokenize + forward, from the result), the task's runtime as Celery logs it
("succeeded in"), and the rest (client, broker, result delivery). Medians in ms; writes
<out>/latency-cpu-<shape>.{md,json}.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.corpus import QUERY, cpu_name, model_dir, papers, shape_name
from benchmarks.output import write_results
from benchmarks.through_redis import running_system

ROOT = Path(__file__).parents[1]


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


def _runtimes(log: str, task: str) -> list[float]:
    return [float(x) for x in re.findall(rf"Task {re.escape(task)}\[[^\]]+\] succeeded in ([0-9.e-]+)s", log)]


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=shape_name, default="tiny", help="A worker/synthetic.py shape.")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="Untimed 1-doc requests first.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def main() -> None:
    """Time 1-doc requests and no-op tasks on one worker, print where the milliseconds go and write them to --out."""
    args = parser().parse_args()
    paper = papers(1)
    workdir = Path(tempfile.mkdtemp(prefix="rerank-latency-"))
    log = workdir / "worker.log"
    with running_system(model_dir(args.shape), "cpu", "fp32", None, worker_log=log) as client:
        for _ in range(args.warmup):
            client.rerank_documents(QUERY, paper, top_k=1, timeout=60)
        trips, compute = [], []
        for _ in range(args.samples):
            started = time.perf_counter()
            result = client.rerank_documents(QUERY, paper, top_k=1, timeout=60)
            trips.append(time.perf_counter() - started)
            compute.append((result.info.tokenize_ms + result.info.forward_ms) / 1000)
        noops = []
        for _ in range(args.samples):
            started = time.perf_counter()
            client.app.send_task("bench.noop", args=(1,), queue=client.settings.queue).get(timeout=60)
            noops.append(time.perf_counter() - started)
        time.sleep(0.5)
        text = log.read_text(errors="replace")
    shutil.rmtree(workdir, ignore_errors=True)
    every = {"request": _runtimes(text, "rerank.documents"), "noop": _runtimes(text, "bench.noop")}
    ours, floor = every["request"][-args.samples:], every["noop"][-args.samples:]
    lines = [
        (f"1-doc request ({args.shape}): round trip {_median_ms(trips)} ms = compute {_median_ms(compute)} + "
         f"rest of the task {_median_ms(ours) - _median_ms(compute):.2f} + outside the task {_median_ms(trips) - _median_ms(ours):.2f}"),
        (f"no-op task:            round trip {_median_ms(noops)} ms = task {_median_ms(floor)} + "
         f"outside the task {_median_ms(noops) - _median_ms(floor):.2f}"),
    ]
    write_results(args.out, f"latency-cpu-{args.shape}", "\n".join(lines), {
        "command": f"python -m benchmarks.latency --shape {args.shape} --samples {args.samples} --warmup {args.warmup}",
        "cpu": cpu_name(), "shape": args.shape, "samples": args.samples,
        "request_ms": {"round_trip": _median_ms(trips), "compute": _median_ms(compute), "task": _median_ms(ours)},
        "noop_ms": {"round_trip": _median_ms(noops), "task": _median_ms(floor)},
        # Every "succeeded in" line of each task in the worker's log: warm-up and timed requests, timed no-ops.
        "succeeded_lines": {kind: len(runtimes) for kind, runtimes in every.items()},
    })


if __name__ == "__main__":
    main()
