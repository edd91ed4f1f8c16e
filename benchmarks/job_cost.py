"""What one job costs around the model: host CPU per process and per step, latency, and Redis's own work and bytes.

    python -m benchmarks.job_cost --jobs 40 --hosts 1

Runs a private Redis and one worker whose device process scores on the simulated H200
(benchmarks/simulated_device.py: the host side is real, the GPU's time is slept), and sends, one at
a time from this process, a 1-document request, a 10-passage request (the HTTP gateway's form)
and a 100-paper two-stage job (examples/af_ckd_job.json). For each kind it reports per job:
- CPU of every process, from /proc (worker parent, host processes, device process) and from this
  process (the producer: validating and encoding, publishing, waiting and decoding);
- where the worker's CPU goes, step by step, from py-spy samples of its processes (if installed);
- Redis's own CPU (INFO `used_cpu_user` + `used_cpu_sys`), bytes in and out, and commands by name
  (INFO `commandstats`), each net of what the same seconds cost idle;
- the round trip beside a no-op Celery task's on the same worker and Redis, and the simulated compute.
Writes benchmarks/results/job-cost-<shape>.md and .json.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.corpus import QUERY, ROOT, cpu_features, cpu_name, model_dir
from benchmarks.fleet_throughput import process_tree_cpu
from benchmarks.output import RESULTS, write_results
from benchmarks.through_redis import running_system

JOB_FILE = ROOT / "examples" / "af_ckd_job.json"

STEPS: list[tuple[str, str]] = [
    # (step, a regular expression matched against "function (file)" of each sampled frame, innermost first)
    ("forward (simulated GPU)", r"run_batch \(.*simulated_device"),
    ("tokenize", r"\(.*scoring/tokens\.py"),
    ("device channel", r"(_send_request|_wait|_grow|_admit|_pairs|_send_outcome|_send_finished|_read) \(.*scoring/device\.py|scoring/wire\.py"),
    ("schedule", r"\(.*scoring/(scheduler|loop)\.py"),
    ("validate in the worker", r"(parse_request|check_limits|check_pool|check_stage1|_check_characters) \("),
    ("rank", r"\(.*worker/ranking\.py"),
    ("take (atomic take, decode)", r"(_brpop_read|_brpop_start|_checked|_deliver_taken|_get) \(.*worker/transport\.py"),
    ("gate and decode the body", r"\(.*worker/consumer\.py|plain_json \("),
    ("acknowledge", r"(ack|reject|_remove_from_indices) \(.*(worker/transport|kombu/transport)"),
    ("store result", r"(store_result|mark_as_done|_store_result|set_with_state) \("),
    ("events", r"\(.*celery/events/"),
    ("accounting", r"\(.*worker/accounting\.py"),
    ("stage 1 to stage 2", r"\(.*worker/chaining\.py|_dispatch_callbacks_and_chain \("),
    ("Celery and kombu, other", r"\(.*/(celery|kombu|billiard|vine|redis)/"),
]


def kinds(job: dict[str, Any]) -> dict[str, Callable[[Any], Any]]:
    """The jobs, by name: each a function of the client that submits one and waits for it."""
    passages = [f"{c['title']}\n\n{c['text'][:1000]}" for c in job["candidates"][:10]]
    return {
        "1 document": lambda client: client.rerank_passages(QUERY, passages[:1], timeout=60),
        "10 passages": lambda client: client.rerank_passages(QUERY, passages, timeout=60),
        "100-paper two-stage": lambda client: client.two_stage(
            job["query"], job["candidates"], top_k_docs=job["top_k_docs"], top_k_chunks=job["top_k_chunks"], timeout=120
        ),
    }


def submit_only(client: Any, kind: str, job: dict[str, Any]) -> Callable[[], Any]:
    """What the client does before the wait: validate, encode, publish; returns the handle."""
    passages = [f"{c['title']}\n\n{c['text'][:1000]}" for c in job["candidates"][:10]]
    if kind == "100-paper two-stage":
        return lambda: client.submit(job["query"], job["candidates"], top_k_docs=job["top_k_docs"], top_k_chunks=job["top_k_chunks"])
    return lambda: client.submit_passages(QUERY, passages[: 1 if kind == "1 document" else 10])


def validate_only(client: Any, kind: str, job: dict[str, Any]) -> Callable[[], Any]:
    """What the client does before it encodes: parse and check the request."""
    from contract.schemas import PassagesRequest
    from contract.validation import parse_request

    if kind == "100-paper two-stage":
        return lambda: client.validate({k: job[k] for k in ("query", "candidates", "top_k_docs", "top_k_chunks")})
    passages = [f"{c['title']}\n\n{c['text'][:1000]}" for c in job["candidates"][: 1 if kind == "1 document" else 10]]
    return lambda: parse_request(PassagesRequest, {"query": QUERY, "passages": passages}, client.settings)


def redis_counters(client: Any) -> dict[str, Any]:
    """Redis's CPU seconds, bytes in and out, and calls per command, as its INFO says now."""
    info = client.backend.app.backend.client.info("all")
    calls = {key.removeprefix("cmdstat_"): value["calls"] for key, value in info.items() if key.startswith("cmdstat_")}
    usec = {key.removeprefix("cmdstat_"): value["usec"] for key, value in info.items() if key.startswith("cmdstat_")}
    return {
        "cpu": info["used_cpu_user"] + info["used_cpu_sys"], "in": info["total_net_input_bytes"],
        "out": info["total_net_output_bytes"], "calls": calls, "usec": usec,
    }


def redis_per_job(before: dict[str, Any], after: dict[str, Any], idle: dict[str, Any], seconds: float, jobs: int) -> dict[str, Any]:
    """Redis's work per job, net of `idle` (what a second of the same system costs with no job)."""
    net = {key: (after[key] - before[key] - idle[key] * seconds) / jobs for key in ("cpu", "in", "out")}
    names = set(after["calls"]) | set(before["calls"])
    calls = {name: (after["calls"].get(name, 0) - before["calls"].get(name, 0) - idle["calls"].get(name, 0) * seconds) / jobs for name in names}
    calls = {name: round(count, 2) for name, count in sorted(calls.items(), key=lambda item: -item[1]) if count >= 0.05}
    usec = {name: (after["usec"].get(name, 0) - before["usec"].get(name, 0) - idle["usec"].get(name, 0) * seconds) / jobs for name in names}
    return {"cpu_ms": round(net["cpu"] * 1000, 3), "bytes_in": round(net["in"]), "bytes_out": round(net["out"]),
            "commands": round(sum(calls.values()), 1), "calls": calls,
            "command_ms": round(sum(usec.values()) / 1000, 3),
            "usec": {name: round(value, 1) for name, value in sorted(usec.items(), key=lambda item: -item[1]) if value >= 1}}


def idle_rates(client: Any, seconds: float) -> dict[str, Any]:
    """What a second of the running system costs Redis and the worker with no job."""
    redis0, cpu0 = redis_counters(client), process_tree_cpu(client.worker_pid)
    time.sleep(seconds)
    redis1, cpu1 = redis_counters(client), process_tree_cpu(client.worker_pid)
    rates = {key: (redis1[key] - redis0[key]) / seconds for key in ("cpu", "in", "out")}
    rates["calls"] = {name: (count - redis0["calls"].get(name, 0)) / seconds for name, count in redis1["calls"].items()}
    rates["usec"] = {name: (count - redis0["usec"].get(name, 0)) / seconds for name, count in redis1["usec"].items()}
    rates["worker"] = {role: (cpu1[role] - cpu0[role]) / seconds for role in cpu0}
    return rates


def profile_steps(pid: int, work: Callable[[], Any], out: Path) -> dict[str, float] | None:
    """Share of the worker's sampled CPU per step (STEPS), from py-spy over its processes while `work()` runs; None without py-spy."""
    spy = shutil.which("py-spy")
    if spy is None:
        return None
    folded = out / "worker.folded"
    folded.unlink(missing_ok=True)
    recording = subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "500", "--format", "raw",
                                  "--nonblocking", "--output", str(folded)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached to every process
    work()
    recording.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
    recording.wait(timeout=60)
    if not folded.exists():
        return None
    counts: collections.Counter[str] = collections.Counter()
    patterns = [(step, re.compile(pattern)) for step, pattern in STEPS]
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")[::-1]  # innermost first
        step = next((name for frame in frames for name, pattern in patterns if pattern.search(frame)), "other Python")
        counts[step] += int(count)
    total = sum(counts.values()) or 1
    return {step: round(count / total, 3) for step, count in counts.most_common()}


def measure(client: Any, kind: str, run: Callable[[Any], Any], args: argparse.Namespace, job: dict[str, Any], out: Path) -> dict[str, Any]:
    """One row: `args.jobs` jobs of `kind`, one at a time, and what each cost."""
    for _ in range(args.warmup):
        run(client)
    idle = idle_rates(client, args.idle_seconds)
    submit = submit_only(client, kind, job)
    redis0, cpu0, mine0, started = redis_counters(client), process_tree_cpu(client.worker_pid), time.process_time(), time.perf_counter()
    trips, compute, submitting, waiting = [], [], 0.0, 0.0
    for _ in range(args.jobs):
        began, cpu_began = time.perf_counter(), time.process_time()
        handle = submit()
        submitted = time.process_time()
        result = handle.result(120)
        trips.append(time.perf_counter() - began)
        submitting, waiting = submitting + submitted - cpu_began, waiting + time.process_time() - submitted
        stages = (result.documents, result.chunks) if hasattr(result, "chunks") else (result,)
        compute.append(sum(stage.info.forward_ms for stage in stages) / 1000)
    elapsed, mine = time.perf_counter() - started, time.process_time() - mine0
    redis1, cpu1 = redis_counters(client), process_tree_cpu(client.worker_pid)
    worker = {role: round(((cpu1[role] - cpu0[role]) - idle["worker"][role] * elapsed) * 1000 / args.jobs, 2) for role in cpu0}
    validate = cpu_ms(validate_only(client, kind, job), args.jobs)
    steps = profile_steps(client.worker_pid, lambda: [run(client) for _ in range(args.jobs)], out) if args.profile else None
    per_job = 1000 / args.jobs
    producer = {"validate": round(validate, 2), "encode and publish": round(max(submitting * per_job - validate, 0.0), 2),
                "wait and decode": round(waiting * per_job, 2)}
    return {
        "kind": kind, "jobs": args.jobs, "round_trip_ms": ms(trips), "compute_ms": ms(compute),
        "host_cpu_ms": round(sum(worker.values()), 2), "worker_cpu_ms": worker, "producer_cpu_ms": producer,
        "producer_cpu_ms_total": round(mine * 1000 / args.jobs, 2), "redis": redis_per_job(redis0, redis1, idle, elapsed, args.jobs),
        "worker_steps": steps,
    }


def cpu_ms(call: Callable[[], Any], times: int) -> float:
    """CPU milliseconds this process spends per `call()` (the jobs it submits are left to the worker)."""
    started = time.process_time()
    for _ in range(times):
        call()
    return (time.process_time() - started) * 1000 / times


def ms(values: list[float]) -> float:
    """Median of seconds, in milliseconds."""
    return round(statistics.median(values) * 1000, 2)


def noop_round_trip(client: Any, samples: int) -> float:
    """Median round trip of Celery's own no-op task on the same worker and Redis, in ms."""
    trips = []
    for _ in range(samples + 3):
        began = time.perf_counter()
        client.app.send_task("bench.noop", args=(1,), queue=client.settings.queue).get(timeout=60)
        trips.append(time.perf_counter() - began)
    return ms(trips[3:])


def render(rows: list[dict[str, Any]], noop: float, args: argparse.Namespace, host: str) -> str:
    """The results as Markdown tables."""
    lines = [
        f"# What one job costs ({args.shape} tokenizer, simulated H200 device process, {args.hosts} host process(es); {host})",
        "",
        f"`{command(args)}`. Jobs one at a time; per job, medians for times, means for CPU; Redis and worker CPU net of "
        f"idle. A no-op Celery task's round trip on the same worker and Redis: {noop} ms. The producer's validation is "
        "timed on its own, after the jobs; encode+publish is the rest of each submit (0 where the difference is within the noise).",
        "",
        "| job | round trip ms | compute ms | over no-op + compute ms | worker CPU ms (parent / hosts / device) | producer CPU ms (validate / encode+publish / wait+decode) | Redis CPU ms | Redis bytes in / out | Redis commands |",
        "|---|---:|---:|---:|---|---|---:|---|---:|",
    ]
    for r in rows:
        w, p, redis = r["worker_cpu_ms"], r["producer_cpu_ms"], r["redis"]
        lines.append(
            f"| {r['kind']} | {r['round_trip_ms']} | {r['compute_ms']} | {r['round_trip_ms'] - r['compute_ms'] - noop:.2f} | "
            f"{r['host_cpu_ms']} ({w['parent']} / {w['hosts']} / {w['device']}) | {r['producer_cpu_ms_total']} "
            f"({p['validate']} / {p['encode and publish']} / {p['wait and decode']}) | {redis['cpu_ms']} | "
            f"{redis['bytes_in']:,} / {redis['bytes_out']:,} | {redis['commands']} |"
        )
    lines += ["", "Redis commands per job (calls), and the microseconds Redis spent in each command per job (its `commandstats`; "
              "the rest of its CPU is reading, parsing and writing the network):", ""]
    for r in rows:
        lines.append(f"- {r['kind']}: " + ", ".join(f"{name} {count:g}" for name, count in r["redis"]["calls"].items()))
        lines.append(f"  - {r['redis']['command_ms']} ms in commands: " + ", ".join(f"{name} {us:g} µs" for name, us in r["redis"]["usec"].items()))
    if any(r["worker_steps"] for r in rows):
        lines += ["", "Where the worker's CPU goes (share of py-spy samples of all its processes, and ms per job):", ""]
        for r in rows:
            if r["worker_steps"]:
                lines.append(f"- {r['kind']}: " + ", ".join(
                    f"{step} {share:.0%} ({share * r['host_cpu_ms']:.2f})" for step, share in r["worker_steps"].items()))
    return "\n".join(lines)


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces these figures."""
    return (f"python -m benchmarks.job_cost --shape {args.shape} --hosts {args.hosts} --jobs {args.jobs}"
            + ("" if args.profile else " --no-profile"))


def main() -> None:
    """Measure each kind of job on one worker with a simulated device and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", help="Model shape whose tokenizer the worker uses (the device is simulated).")
    parser.add_argument("--hosts", type=int, default=1, help="Host processes feeding the device process.")
    parser.add_argument("--jobs", type=int, default=40, help="Jobs of each kind measured.")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="Seconds of idle measured to net out background work.")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="Skip the py-spy step split.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    job = json.loads(JOB_FILE.read_text())
    host = f"{cpu_name()} ({cpu_features()}), no GPU"
    scratch = Path(tempfile.mkdtemp(prefix="rerank-job-cost-"))
    env = {"RERANK_DEVICE_RUNNER": "benchmarks.simulated_device:runner", "RERANK_PROGRESS_INTERVAL": "5"}
    rows = []
    with running_system(model_dir(args.shape), "cpu", "fp32", None, hosts=args.hosts, env=env, worker_log=scratch / "worker.log") as client:
        noop = noop_round_trip(client, args.jobs)
        for kind, run in kinds(job).items():
            rows.append(measure(client, kind, run, args, job, scratch))
            print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    write_results(args.out, f"job-cost-{args.shape}", render(rows, noop, args, host),
                  {"command": command(args), "host": host, "noop_round_trip_ms": noop, "rows": rows})


if __name__ == "__main__":
    main()
