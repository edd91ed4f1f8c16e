"""The score cache on the shipped job: model time and wall time of the same two-stage job, cold and then warm.

    python -m benchmarks.score_cache                                   # bge-reranker-base shape, CPU
    python -m benchmarks.score_cache --shape tiny --warm 3              # seconds

Runs a private Redis and one worker with RERANK_SCORE_CACHE on (a fresh fleet secret), and sends
examples/af_ckd_job.json (100 papers, top 20, then their chunks) once on an empty cache and then
--warm times. Model time is each stage's `forward_ms` (forward passes) and `tokenize_ms`, from
the results' `info`; wall is the producer's clock from submit to result. Every warm run's logits
must equal the cold run's bit for bit, or the benchmark fails. Writes
benchmarks/results/score-cache-<device>-<shape>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.corpus import ROOT, cpu_features, cpu_name, model_dir, shape_name
from benchmarks.output import write_results
from benchmarks.through_redis import running_system

JOB_FILE = ROOT / "examples" / "af_ckd_job.json"


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=shape_name, default="bge-reranker-base", help="A worker/synthetic.py shape.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--warm", type=int, default=5, help="Runs of the job after the cold one.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def measure(client: Any, job: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """One run of the job: its figures, and each stage's (index, logit) pairs to compare runs by."""
    started = time.perf_counter()
    result = client.two_stage(job["query"], job["candidates"], top_k_docs=job["top_k_docs"], top_k_chunks=job["top_k_chunks"],
                              return_logits=True, timeout=600)
    wall = time.perf_counter() - started
    stages = (result.documents, result.chunks)
    row = {
        "wall_ms": 1000 * wall,
        "forward_ms": sum(s.info.forward_ms for s in stages),
        "tokenize_ms": sum(s.info.tokenize_ms for s in stages),
        "batches": sum(s.info.batches for s in stages),
        "pairs": sum(s.info.pairs for s in stages),
        "cached_pairs": sum(s.info.cached_pairs for s in stages),
        "by_stage": {s.stage: {"pairs": s.info.pairs, "cached_pairs": s.info.cached_pairs, "forward_ms": s.info.forward_ms} for s in stages},
    }
    return row, [[(item.index, item.logit) for item in s.items] for s in stages]


def main() -> None:
    """Run the shipped job cold, then warm, and write the figures."""
    args = parser().parse_args()
    job = json.loads(JOB_FILE.read_text())
    key = Path(tempfile.mkdtemp(prefix="rerank-cache-key-")) / "fleet-key"
    key.write_text(secrets.token_hex(32))
    # A cold stage 2 of a base-sized model on a busy 2-core CPU outlasts the default 300 s limit.
    env = {"RERANK_SCORE_CACHE": "true", "RERANK_SCORE_CACHE_KEY_FILE": str(key), "RERANK_TASK_TIME_LIMIT": "3600",
           "RERANK_VISIBILITY_TIMEOUT": "7200"}
    with running_system(model_dir(args.shape), args.device, args.dtype, None, env=env) as client:
        cold, reference = measure(client, job)
        warm = []
        for _ in range(args.warm):
            row, logits = measure(client, job)
            if logits != reference:
                raise SystemExit("a warm run's logits differ from the cold run's: the cache served something else")
            warm.append(row)
    key.unlink()
    median = {name: statistics.median(r[name] for r in warm) for name in ("wall_ms", "forward_ms", "tokenize_ms", "batches", "cached_pairs")}
    model_cold = cold["forward_ms"]
    model_warm = median["forward_ms"]
    ratio = model_cold / model_warm if model_warm else float("inf")
    device = f"{cpu_name()} ({cpu_features()})" if args.device == "cpu" else args.device
    lines = [
        (f"Device: {device}; producer, Redis and one worker (RERANK_SCORE_CACHE on) on this host. Model: random weights, "
         f"{args.shape} shape, dtype {args.dtype}. The shipped job ({JOB_FILE.relative_to(ROOT)}: {len(job['candidates'])} papers, "
         f"top {job['top_k_docs']}, {cold['pairs']} pairs over both stages) once on an empty cache, then {args.warm} times "
         "(medians); every warm run's logits equal the cold run's bit for bit."),
        "",
        "| run | pairs from the cache | batches | model (forward) ms | tokenize ms | wall ms |",
        "|---|---:|---:|---:|---:|---:|",
        f"| cold | {cold['cached_pairs']} of {cold['pairs']} | {cold['batches']} | {cold['forward_ms']:.1f} | {cold['tokenize_ms']:.1f} | {cold['wall_ms']:.1f} |",
        (f"| warm | {median['cached_pairs']:.0f} of {cold['pairs']} | {median['batches']:.0f} | {median['forward_ms']:.1f} | "
         f"{median['tokenize_ms']:.1f} | {median['wall_ms']:.1f} |"),
        "",
        (f"Model time warm vs cold: {'no forward pass at all' if not model_warm else f'{ratio:.1f}x less'}; "
         f"wall time {cold['wall_ms'] / median['wall_ms']:.1f}x less."),
    ]
    write_results(args.out, f"score-cache-{args.device.split(':')[0]}-{args.shape}", "\n".join(lines), {
        "device": device, "shape": args.shape, "dtype": args.dtype, "job": str(JOB_FILE.relative_to(ROOT)),
        "cold": cold, "warm": warm, "warm_median": median, "identical_logits": True,
        "model_time_ratio": None if not model_warm else ratio,
        "command": f"python -m benchmarks.score_cache --shape {args.shape} --device {args.device} --dtype {args.dtype} --warm {args.warm}",
    })


if __name__ == "__main__":
    main()
