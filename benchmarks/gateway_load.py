"""Many connections against one gateway and a few CPU workers, for a bounded time: what fails, what waits, what memory does.

    python -m benchmarks.gateway_load --connections 500 --seconds 60

Starts a private Redis, --workers `rerank-worker` processes (2; the tiny random-weight model, one
process each) and one `rerank-gateway`, all on 127.0.0.1; then each connection posts the same Cohere
`/v2/rerank` request of --docs documents (20) in a loop until the time is up, waiting `Retry-After`
after a 429 as a well-behaved client does. It reports the statuses, whether any 5xx other than
503/504 came back, whether every 429 came with the queue past RERANK_GATEWAY_MAX_QUEUE_DEPTH (the
depth each 429 names), whether every request sent was answered, what the gateway's own /metrics
counted, and the gateway's resident memory over time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.corpus import QUERY, ROOT, cpu_name, model_dir, stage1_texts
from benchmarks.through_redis import _free_port

KEY = "load-key"


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def load(url: str, body: dict, connections: int, seconds: float, pid: int) -> dict:
    """Drive `connections` loops for `seconds`; return statuses, latencies, refused depths and memory samples."""
    statuses: collections.Counter[str] = collections.Counter()
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    depths: list[int] = []
    memory: list[tuple[float, float]] = []
    sent = answered = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    started = time.monotonic()
    deadline = started + seconds
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, limits=limits, timeout=120) as http:

        async def one_connection() -> None:
            nonlocal sent, answered
            while time.monotonic() < deadline:
                sent += 1
                begun = time.perf_counter()
                try:
                    response = await http.post("/v2/rerank", json=body)
                except httpx.TransportError as e:
                    statuses[type(e).__name__] += 1
                    continue
                answered += 1
                statuses[str(response.status_code)] += 1
                latencies[str(response.status_code)].append(time.perf_counter() - begun)
                if response.status_code == 429:
                    found = re.search(r"holds (\d+) waiting jobs", response.json()["message"])
                    depths.append(int(found.group(1)) if found else -1)
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))

        async def sample_memory() -> None:
            while time.monotonic() < deadline + 5:
                memory.append((round(time.monotonic() - started, 1), round(rss_mb(pid), 1)))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample_memory())
        await asyncio.gather(*(one_connection() for _ in range(connections)))
        sampler.cancel()
    return {"statuses": statuses, "latencies": latencies, "depths": depths, "memory": memory, "sent": sent, "answered": answered,
            "wall": time.monotonic() - started}


def gateway_answers(url: str, route: str, sent: int) -> dict[str, int]:
    """How many requests to `route` the gateway at `url` says it answered, by status (its /metrics page), once it counts `sent` or 5 s pass.

    The gateway counts a request after its last byte is sent, so the client may hold the last
    answer a moment before the gateway has counted it.
    """
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 5
    while True:
        counts: dict[str, int] = {}
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
            for sample in family.samples:
                if sample.name == "rerank_gateway_requests_total" and sample.labels.get("route") == route:
                    counts[sample.labels["status"]] = int(sample.value)
        if sum(counts.values()) >= sent or time.monotonic() > deadline:
            return dict(sorted(counts.items()))
        time.sleep(0.05)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--queue-bound", type=int, default=50, help="RERANK_GATEWAY_MAX_QUEUE_DEPTH")
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="CPU worker processes (one pool process each).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def main() -> None:
    """Start the fleet and the gateway, run the load, write the summary to --out."""
    args = parser().parse_args()
    if not (1 <= args.connections <= 2000 and 1 <= args.seconds <= 600):
        raise SystemExit("bounded on purpose: 1-2000 connections, 1-600 seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_dir("tiny")
    workdir = Path(tempfile.mkdtemp(prefix="rerank-load-"))
    port, gateway_port = _free_port(), _free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "RERANK_BROKER_URL": broker, "RERANK_MODEL": str(model), "RERANK_TORCH_THREADS": "1",
           "RERANK_GATEWAY_API_KEYS": KEY, "RERANK_GATEWAY_PORT": str(gateway_port),
           "RERANK_GATEWAY_MAX_QUEUE_DEPTH": str(args.queue_bound)}
    processes = [subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                   "--save", "", "--dir", str(workdir)], stdout=subprocess.DEVNULL)]
    try:
        for n in range(args.workers):
            log = (workdir / f"worker{n}.log").open("wb")
            processes.append(subprocess.Popen([sys.executable, "-m", "worker.cli", "-n", f"cpu{n}@%h", "-c", "1"], env=env, stdout=log, stderr=subprocess.STDOUT))
        gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--log-level", "warning"], env=env,
                                   stdout=(workdir / "gateway.log").open("wb"), stderr=subprocess.STDOUT)
        processes.append(gateway)
        url = f"http://127.0.0.1:{gateway_port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                ready = httpx.get(f"{url}/ready").json()
                if ready.get("ready") and all("model loaded:" in (workdir / f"worker{n}.log").read_text() for n in range(args.workers)):
                    break
            except (httpx.TransportError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the fleet did not get ready; logs in {workdir}")
            time.sleep(0.5)
        body = {"model": str(model), "query": QUERY, "documents": stage1_texts(args.docs)}
        run = asyncio.run(load(url, body, args.connections, args.seconds, gateway.pid))
        counted = gateway_answers(url, "/v2/rerank", run["sent"])
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            process.wait(timeout=60)

    statuses = dict(sorted(run["statuses"].items()))
    bad_5xx = {s: n for s, n in statuses.items() if s.isdigit() and int(s) >= 500 and s not in ("503", "504")}
    early_429 = [d for d in run["depths"] if d <= args.queue_bound]
    ok = run["latencies"].get("200", [])
    after_warmup = [mb for t, mb in run["memory"] if t >= 5]
    summary = {
        "command": f"python -m benchmarks.gateway_load --connections {args.connections} --seconds {args.seconds:g} --queue-bound {args.queue_bound} "
                   f"--docs {args.docs} --workers {args.workers}",
        "connections": args.connections, "seconds": args.seconds, "queue_bound": args.queue_bound, "docs": args.docs, "workers": args.workers,
        "cpu": cpu_name(), "cores": os.cpu_count(), "statuses": statuses, "sent": run["sent"], "answered": run["answered"],
        "wall_s": round(run["wall"], 1), "answered_per_s": round(run["answered"] / run["wall"], 1),
        "ok_latency_ms": {"p50": round(1000 * statistics.median(ok), 1), "p99": round(1000 * sorted(ok)[int(0.99 * (len(ok) - 1))], 1)} if ok else None,
        "unexpected_5xx": bad_5xx, "429_below_bound": len(early_429), "429_depths_min_max": [min(run["depths"]), max(run["depths"])] if run["depths"] else None,
        "gateway_rss_mb_after_5s": {"first": after_warmup[0], "last": after_warmup[-1], "max": max(after_warmup)} if after_warmup else None,
        "gateway_counted": counted, "memory_samples": run["memory"],
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "memory_samples"}, indent=2))
    name = f"gateway-load-cpu-tiny-{args.connections}c-{args.seconds:g}s"
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
