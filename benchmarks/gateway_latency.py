"""What the HTTP gateway adds to a request: the same 20-document job through the Python client and through
`rerank-gateway` (Cohere `/v2/rerank` over HTTP, keep-alive), one after the other in one run, p50 and p99.

    python -m benchmarks.gateway_latency --runs 200

One private Redis, one CPU worker (the tiny random-weight model unless --shape says otherwise),
one gateway process on this host. Each round sends the job once each way, alternating which goes
first; the difference of the two latencies' percentiles is what the gateway and HTTP add.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.corpus import (
    QUERY,
    ROOT,
    cpu_features,
    cpu_name,
    model_dir,
    stage1_texts,
)
from benchmarks.gateway_load import gateway_answers
from benchmarks.output import write_results
from benchmarks.through_redis import _free_port, running_system

KEY = "bench-key"


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10, help="Untimed rounds first: connections, subscriptions, first batches.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def main() -> None:
    """Time --runs rounds of the same job both ways and write the percentiles to --out."""
    args = parser().parse_args()
    documents = stage1_texts(args.docs)
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.shape)

    with running_system(model, "cpu", "auto", None) as client:
        port = _free_port()
        env = {
            **os.environ, "RERANK_BROKER_URL": client.settings.broker_url, "RERANK_MODEL": str(model),
            "RERANK_GATEWAY_API_KEYS": KEY, "RERANK_GATEWAY_PORT": str(port),
        }
        log = (args.out / ".gateway-bench.log").open("wb")
        gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if http.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise SystemExit(f"the gateway did not get ready; see {args.out / '.gateway-bench.log'}")
                time.sleep(0.2)
            body = {"model": str(model), "query": QUERY, "documents": documents}

            def by_client() -> float:
                started = time.perf_counter()
                client.rerank_passages(QUERY, documents, timeout=60)
                return time.perf_counter() - started

            def by_gateway() -> float:
                started = time.perf_counter()
                response = http.post("/v2/rerank", json=body)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise SystemExit(f"the gateway answered {response.status_code}: {response.text[:300]}")
                return elapsed

            for _ in range(args.warmup):
                by_client()
                by_gateway()
            direct, through = [], []
            for n in range(args.runs):
                pair = (by_client, by_gateway) if n % 2 == 0 else (by_gateway, by_client)
                first, second = pair[0](), pair[1]()
                a, b = (first, second) if n % 2 == 0 else (second, first)
                direct.append(a * 1000)
                through.append(b * 1000)
            counted = gateway_answers(str(http.base_url).rstrip("/"), "/v2/rerank", args.warmup + args.runs)
        finally:
            http.close()
            gateway.terminate()
            gateway.wait(timeout=30)
            log.close()

    stats = {
        name: {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99), "mean": statistics.fmean(values)}
        for name, values in (("python_client", direct), ("gateway_http", through))
    }
    added = {q: stats["gateway_http"][q] - stats["python_client"][q] for q in ("p50", "p99", "mean")}
    # Rounds run back to back: the difference within a round cancels most of the machine's drift.
    paired = [b - a for a, b in zip(direct, through)]
    within = {"p50": percentile(paired, 0.5), "p99": percentile(paired, 0.99), "mean": statistics.fmean(paired)}
    device = f"{cpu_name()} ({cpu_features()})"
    command = f"python -m benchmarks.gateway_latency --shape {args.shape} --docs {args.docs} --runs {args.runs} --warmup {args.warmup}"
    lines = [
        f"`{command}`: {device}, {os.cpu_count()} cores; Redis, one CPU worker (prefork, 1 process) and one gateway on this host. "
        f"Model: random weights, {args.shape} shape. The same {args.docs}-document job {args.runs} times each way, alternating; ms.",
        "",
        "| path | p50 | p99 | mean |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {s['p50']:.2f} | {s['p99']:.2f} | {s['mean']:.2f} |" for name, s in stats.items()],
        f"| **added by the gateway** (difference of the columns) | **{added['p50']:.2f}** | **{added['p99']:.2f}** | **{added['mean']:.2f}** |",
        f"| added within each round (gateway minus client, same round) | {within['p50']:.2f} | {within['p99']:.2f} | {within['mean']:.2f} |",
        "",
        f"Load average during the run: {os.getloadavg()[0]:.2f} (other processes share these cores).",
    ]
    write_results(args.out, f"gateway-latency-cpu-{args.shape}", "\n".join(lines), {
        "device": device, "shape": args.shape, "docs": args.docs, "runs": args.runs, "ms": stats, "added_ms": added,
        "added_within_round_ms": within, "python_client_ms": direct, "gateway_http_ms": through, "warmup": args.warmup,
        "gateway_counted": counted, "command": command,
    })
    (args.out / ".gateway-bench.log").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
