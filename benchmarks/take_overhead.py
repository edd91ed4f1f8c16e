"""What the atomic take costs per task: our transport beside kombu's own, in alternation, in one run.

    python -m benchmarks.take_overhead --rounds 3 --samples 200

Each round starts Redis and one worker per transport (ours: `worker.transport`, one Lua take and a
wait per queue; kombu's: BRPOP, then a second command to record), the worker consuming three
queues as a GPU worker does (interactive, the model's own, bulk), and times, one after another,
1-document requests and no-op tasks sent to the model's own queue, the second in the worker's
order. The order of the two transports alternates by round, since this shared machine drifts.
Records, per round, the taking commands Redis ran (BRPOP, BLMOVE, EVAL) from its INFO commandstats.
Writes <out>/take-overhead-cpu-<shape>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.corpus import QUERY, cpu_name, model_dir, papers, shape_name
from benchmarks.output import write_results
from benchmarks.through_redis import running_system

TRANSPORTS = {"ours": "benchmarks.noop_worker", "kombu": "benchmarks.kombu_transport_worker"}
ROOT = Path(__file__).parents[1]


TAKING_COMMANDS = ("brpop", "blmove", "eval", "evalsha")


def taking_calls(url: str) -> dict[str, int]:
    """How often Redis at `url` has run each command a transport takes or waits with (its INFO commandstats)."""
    import redis

    stats = redis.Redis.from_url(url).info("commandstats")
    return {command: stats.get(f"cmdstat_{command}", {}).get("calls", 0) for command in TAKING_COMMANDS}


def time_one(app: str, model: Path, samples: int, warmup: int) -> dict[str, list[float] | dict[str, int]]:
    """Round trips (s) of 1-doc requests and no-op tasks through a fresh Redis and worker running `app`, and the taking commands Redis ran for them."""
    from contract.names import model_queue
    from producer import Settings

    queue = model_queue(str(model))
    queues = [f"{queue}.gpu.interactive", queue, f"{queue}.gpu.bulk"]
    paper = papers(1)
    with running_system(model, "cpu", "fp32", None, app=app, queues=queues) as client:
        assert isinstance(client.settings, Settings)
        for _ in range(warmup):
            client.rerank_documents(QUERY, paper, top_k=1, timeout=60)
        before = taking_calls(client.settings.broker_url)
        # Requests first, then no-ops, as benchmarks.latency does.
        requests, noops = [], []
        for _ in range(samples):
            started = time.perf_counter()
            client.rerank_documents(QUERY, paper, top_k=1, timeout=60)
            requests.append(time.perf_counter() - started)
        for _ in range(samples):
            started = time.perf_counter()
            client.app.send_task("bench.noop", args=(1,), queue=queue).get(timeout=60)
            noops.append(time.perf_counter() - started)
        after = taking_calls(client.settings.broker_url)
    return {"request": requests, "noop": noops, "redis_calls": {command: after[command] - before[command] for command in TAKING_COMMANDS}}


def summary(values: list[float]) -> dict[str, float]:
    """Median and 90th percentile in ms."""
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3), "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 3)}


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=shape_name, default="tiny", help="A worker/synthetic.py shape.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10, help="Untimed 1-doc requests first, per worker.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def main() -> None:
    """Time both transports in alternation and write the results files."""
    args = parser().parse_args()
    model = model_dir(args.shape)
    runs: dict[str, dict[str, list[float]]] = {name: {"request": [], "noop": []} for name in TRANSPORTS}
    taken: dict[str, list[dict[str, int]]] = {name: [] for name in TRANSPORTS}
    for round_ in range(args.rounds):
        order = list(TRANSPORTS) if round_ % 2 == 0 else list(reversed(TRANSPORTS))
        for name in order:
            measured = time_one(TRANSPORTS[name], model, args.samples, args.warmup)
            taken[name].append(measured.pop("redis_calls"))
            for kind, values in measured.items():
                runs[name][kind].extend(values)
            print(f"round {round_ + 1}: {name} done; Redis ran {taken[name][-1]}", flush=True)
    table = {name: {kind: summary(values) for kind, values in kinds.items()} for name, kinds in runs.items()}
    delta = {kind: round(table["ours"][kind]["p50_ms"] - table["kombu"][kind]["p50_ms"], 3) for kind in ("request", "noop")}
    ratio = {kind: round(table["ours"][kind]["p50_ms"] / table["kombu"][kind]["p50_ms"], 3) for kind in ("request", "noop")}
    record = {
        "cpu": cpu_name(), "shape": args.shape, "rounds": args.rounds, "samples_per_round": args.samples,
        "queues": "interactive, the model's own (sent to), bulk", "results": table,
        "ours_minus_kombu_p50_ms": delta, "ours_over_kombu_p50": ratio, "redis_calls_per_round": taken,
        "command": f"python -m benchmarks.take_overhead --shape {args.shape} --rounds {args.rounds} --samples {args.samples} --warmup {args.warmup}",
    }
    lines = [
        f"# Per-task cost of the atomic take ({args.shape} model, {record['cpu']})",
        "",
        f"`{record['command']}`: {args.rounds} rounds x {args.samples} samples per transport, alternating order; "
        "the worker consumes three queues, jobs go to the second.",
        "",
        "| transport | 1-doc request p50 | p90 | no-op task p50 | p90 |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {t['request']['p50_ms']} ms | {t['request']['p90_ms']} ms | {t['noop']['p50_ms']} ms | {t['noop']['p90_ms']} ms |"
            for name, t in table.items()
        ),
        "",
        f"Ours minus kombu's, p50: request {delta['request']:+} ms ({ratio['request']}x), no-op {delta['noop']:+} ms ({ratio['noop']}x).",
    ]
    write_results(args.out, f"take-overhead-cpu-{args.shape}", "\n".join(lines), record)


if __name__ == "__main__":
    main()
