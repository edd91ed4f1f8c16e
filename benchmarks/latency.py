"""Where a small task's latency goes: our client and task next to a no-op Celery task.

    python -m benchmarks.latency --shape tiny

Runs Redis and one worker, sends 1-doc stage-1 requests and no-op tasks, and splits each round
trip into compute (tokenize + forward, from the result), the task's runtime as Celery logs it
("succeeded in"), and the rest (client, broker, result delivery). Medians in ms.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.corpus import QUERY, model_dir, papers
from benchmarks.through_redis import running_system
from worker.synthetic import SHAPES


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


def _runtimes(log: str, task: str, last: int) -> list[float]:
    return [float(x) for x in re.findall(rf"Task {re.escape(task)}\[[^\]]+\] succeeded in ([0-9.e-]+)s", log)][-last:]


def main() -> None:
    """Time 1-doc requests and no-op tasks on one worker and print where the milliseconds go."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()

    paper = papers(1)
    log = Path(tempfile.mkdtemp(prefix="rerank-latency-")) / "worker.log"
    with running_system(model_dir(args.shape), "cpu", "fp32", None, worker_log=log) as client:
        for _ in range(10):
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
    ours, floor = _runtimes(text, "rerank.documents", args.samples), _runtimes(text, "bench.noop", args.samples)
    print(f"1-doc request ({args.shape}): round trip {_median_ms(trips)} ms = compute {_median_ms(compute)} + "
          f"rest of the task {_median_ms(ours) - _median_ms(compute):.2f} + outside the task {_median_ms(trips) - _median_ms(ours):.2f}")
    print(f"no-op task:            round trip {_median_ms(noops)} ms = task {_median_ms(floor)} + "
          f"outside the task {_median_ms(noops) - _median_ms(floor):.2f}")


if __name__ == "__main__":
    main()
