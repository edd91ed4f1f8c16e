"""CPU workers lose nothing: this tree against an earlier revision, in alternation, in one run.

    python -m benchmarks.cpu_regression --baseline 736c628

Scores `--docs` stage-1 papers (100) with the bge-reranker-base shape (random weights), fp32 and bf16,
in-process (a producer without a broker) and through Redis (a real worker), with the code of
`--baseline` (exported with `git archive`) and of this working tree, alternating A, B, A, B... so
that the drift of a shared CPU falls on both. Each measurement runs in a fresh interpreter whose
PYTHONPATH is that tree. Reports the median seconds per request of each and the ratio, and writes
benchmarks/results/cpu-regression-bge-reranker-base.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.corpus import cpu_features, cpu_name, model_dir
from benchmarks.output import write_results

ROOT = Path(__file__).parents[1]

PROBE = r'''
import json, sys, time
from benchmarks.corpus import QUERY, papers
from producer import RerankClient, Settings
model, dtype, mode, repeats, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
docs = papers(count)
def timed(client):
    client.rerank_documents(QUERY, docs, top_k=20, timeout=600)
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        client.rerank_documents(QUERY, docs, top_k=20, timeout=600)
        out.append(time.perf_counter() - started)
    return out
if mode == "in-process":
    import os
    os.environ.update({"RERANK_MODEL": model, "RERANK_DTYPE": dtype})
    print(json.dumps(timed(RerankClient(Settings(model=model, dtype=dtype)))))
else:
    from benchmarks.through_redis import running_system
    with running_system(__import__("pathlib").Path(model), "cpu", dtype, None) as client:
        print(json.dumps(timed(client)))
'''


def measure(tree: Path, model: Path, dtype: str, mode: str, repeats: int, docs: int) -> list[float]:
    """Seconds per request of `repeats` warm requests, with the code of `tree`, in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(tree), "RERANK_DTYPE": dtype, "RERANK_MODEL": str(model)}
    env.pop("RERANK_BROKER_URL", None)
    done = subprocess.run([sys.executable, "-c", PROBE, str(model), dtype, mode, str(repeats), str(docs)], cwd=tree, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Alternate the two trees over every (dtype, mode) and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="Git revision to compare with.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternations per row.")
    parser.add_argument("--repeats", type=int, default=3, help="Warm requests per measurement.")
    parser.add_argument("--docs", type=int, default=100, help="Stage-1 papers per request.")
    parser.add_argument("--rows", default="fp32/in-process,fp32/through Redis,bf16/in-process,bf16/through Redis",
                        help="Comma-separated dtype/path rows.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    model = model_dir("bge-reranker-base")
    baseline = Path(tempfile.mkdtemp(prefix="rerank-baseline-"))
    archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
    trees = {f"@{args.baseline}": baseline, "this tree": ROOT}
    rows = []
    for wanted in args.rows.split(","):
        dtype, mode = wanted.split("/")
        seconds: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                seconds[name] += measure(tree, model, dtype, mode, args.repeats, args.docs)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        old, new = medians[f"@{args.baseline}"], medians["this tree"]
        row = {"dtype": dtype, "mode": mode, "baseline_s": round(old, 4), "this_tree_s": round(new, 4),
               "ratio": round(new / old, 4), "samples": {k: [round(v, 4) for v in vs] for k, vs in seconds.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    host = f"{cpu_name()}, {cpu_features()}, {os.cpu_count()} cores"
    lines = [
        f"# CPU workers before and after: bge-reranker-base shape, {args.docs} stage-1 docs, {host}",
        "",
        f"Median seconds per request over {args.rounds} alternations x {args.repeats} warm requests; "
        f"`python -m benchmarks.cpu_regression --baseline {args.baseline} --docs {args.docs} --rounds {args.rounds} "
        f"--repeats {args.repeats} --rows '{args.rows}'`. Ratio > 1: this tree is slower.",
        "",
        f"| dtype | path | @{args.baseline} s | this tree s | ratio |",
        "|---|---|---:|---:|---:|",
        *[f"| {r['dtype']} | {r['mode']} | {r['baseline_s']:.3f} | {r['this_tree_s']:.3f} | {r['ratio']:.3f} |" for r in rows],
    ]
    write_results(args.out, "cpu-regression-bge-reranker-base", "\n".join(lines), {"host": host, "baseline": args.baseline, "rows": rows})


if __name__ == "__main__":
    main()
