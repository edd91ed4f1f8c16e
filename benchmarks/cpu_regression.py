"""CPU workers lose nothing: this tree against an earlier revision, in alternation, in one run.

    python -m benchmarks.cpu_regression --baseline 736c628

Scores `--docs` stage-1 papers (100) with the `--shape` shape (bge-reranker-base; random weights),
fp32 and bf16, in-process (a producer without a broker) and through Redis (a real worker), with the
code of `--baseline` (exported with `git archive`) and of this working tree, alternating A, B, A,
B... so that the drift of a shared CPU falls on both. Each measurement runs in a fresh interpreter
whose PYTHONPATH is that tree. Reports the median seconds per request of each and the ratio, and
what scored each measurement (dtype, process, tree), and writes <out>/cpu-regression-<shape>.md and
.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.corpus import cpu_features, cpu_name, model_dir, shape_name
from benchmarks.output import write_results

ROOT = Path(__file__).parents[1]

# Prints the timings and what scored the last request: its dtype, its process, and the tree that
# process runs (the in-process producer's import path; a worker's working directory, which
# `python -m celery` puts first on its path).
PROBE = r'''
import json, os, sys, time
from pathlib import Path
import producer
from benchmarks.corpus import QUERY, papers
from producer import RerankClient, Settings
model, dtype, mode, repeats, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
docs = papers(count)
def timed(client):
    client.rerank_documents(QUERY, docs, top_k=20, timeout=600)
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = client.rerank_documents(QUERY, docs, top_k=20, timeout=600)
        out.append(time.perf_counter() - started)
    info = result.info
    ran = {"dtype": info.dtype, "pid": info.pid, "in_this_process": info.pid == os.getpid(), "worker": info.worker}
    ran["tree"] = str(Path(producer.__file__).parents[1]) if ran["in_this_process"] else os.readlink(f"/proc/{info.pid}/cwd")
    return {"seconds": out, "ran": ran}
if mode == "in-process":
    os.environ.update({"RERANK_MODEL": model, "RERANK_DTYPE": dtype})
    print(json.dumps(timed(RerankClient(Settings(model=model, dtype=dtype)))))
else:
    from benchmarks.through_redis import running_system
    with running_system(Path(model), "cpu", dtype, None) as client:
        print(json.dumps(timed(client)))
'''


def measure(tree: Path, model: Path, dtype: str, mode: str, repeats: int, docs: int) -> dict:
    """Seconds per request of `repeats` warm requests, with the code of `tree`, in a fresh interpreter; and what scored them."""
    env = {**os.environ, "PYTHONPATH": str(tree), "RERANK_DTYPE": dtype, "RERANK_MODEL": str(model)}
    env.pop("RERANK_BROKER_URL", None)
    done = subprocess.run([sys.executable, "-c", PROBE, str(model), dtype, mode, str(repeats), str(docs)], cwd=tree, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="Git revision to compare with.")
    parser.add_argument("--shape", type=shape_name, default="bge-reranker-base", help="A worker/synthetic.py shape.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternations per row.")
    parser.add_argument("--repeats", type=int, default=3, help="Warm requests per measurement.")
    parser.add_argument("--docs", type=int, default=100, help="Stage-1 papers per request.")
    parser.add_argument("--rows", default="fp32/in-process,fp32/through Redis,bf16/in-process,bf16/through Redis",
                        help="Comma-separated dtype/path rows.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def main() -> None:
    """Alternate the two trees over every (dtype, mode) and write the table."""
    args = parser().parse_args()
    model = model_dir(args.shape)
    baseline = Path(tempfile.mkdtemp(prefix="rerank-baseline-"))
    archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
    trees = {f"@{args.baseline}": baseline, "this tree": ROOT}
    rows = []
    for wanted in args.rows.split(","):
        dtype, mode = wanted.split("/")
        seconds: dict[str, list[float]] = {name: [] for name in trees}
        ran: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                measured = measure(tree, model, dtype, mode, args.repeats, args.docs)
                seconds[name] += measured["seconds"]
                ran[name].append(measured["ran"])
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        old, new = medians[f"@{args.baseline}"], medians["this tree"]
        row = {"dtype": dtype, "mode": mode, "baseline_s": round(old, 4), "this_tree_s": round(new, 4),
               "ratio": round(new / old, 4), "samples": {k: [round(v, 4) for v in vs] for k, vs in seconds.items()}, "ran": ran}
        print(json.dumps(row), flush=True)
        rows.append(row)
    host = f"{cpu_name()}, {cpu_features()}, {os.cpu_count()} cores"
    command = (f"python -m benchmarks.cpu_regression --baseline {args.baseline} --shape {args.shape} --docs {args.docs} "
               f"--rounds {args.rounds} --repeats {args.repeats} --rows '{args.rows}'")
    lines = [
        f"# CPU workers before and after: {args.shape} shape, {args.docs} stage-1 docs, {host}",
        "",
        f"Median seconds per request over {args.rounds} alternations x {args.repeats} warm requests; "
        f"`{command}`. Ratio > 1: this tree is slower.",
        "",
        f"| dtype | path | @{args.baseline} s | this tree s | ratio |",
        "|---|---|---:|---:|---:|",
        *[f"| {r['dtype']} | {r['mode']} | {r['baseline_s']:.3f} | {r['this_tree_s']:.3f} | {r['ratio']:.3f} |" for r in rows],
    ]
    write_results(args.out, f"cpu-regression-{args.shape}", "\n".join(lines), {
        "host": host, "baseline": args.baseline, "shape": args.shape, "trees": {name: str(tree) for name, tree in trees.items()},
        "command": command, "rows": rows,
    })
    shutil.rmtree(baseline, ignore_errors=True)


if __name__ == "__main__":
    main()
