"""`rerank-worker`: start a Celery worker pinned to one device, one per device, or print reports.

    rerank-worker --device cuda:0              one worker, named gpu0@%h
    rerank-worker --devices cuda:0,cuda:1,cpu  one pinned worker process per listed device
    rerank-worker report [--json]              print every worker's model and throughput report
    rerank-worker alive [--max-age S]          liveness probe: exit 0 if the worker's heartbeat is fresh

This module never imports torch: the `--devices` supervisor starts each worker as a fresh
process (not a fork) with CUDA_VISIBLE_DEVICES set before the worker imports anything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from contract.names import DEFAULT_MODEL, REPORT_COMMAND, worker_queues

EXIT_STOPPED = 0
EXIT_FAILED = 1
EXIT_SETTINGS = 2
EXIT_CODES = {
    EXIT_STOPPED: "stopped when asked (SIGTERM: running tasks finish first)",
    EXIT_FAILED: "failed while starting or serving (a device that is not there, a device process that died, an unrecoverable "
    "error); the tasks it held go back to their queues: restart it",
    EXIT_SETTINGS: "refused to start, before serving anything, over its settings: an invalid RERANK_*/OTEL_* value or option, a "
    "RERANK_MODEL it cannot find, read or download, a Redis that refuses its password, a command it needs or may evict queued jobs; "
    "restarting will not help: fix what the one line it printed names",
}
"""What `rerank-worker` exits with (also in `rerank-worker --help`); docs/operations.md#workers lists the same."""


def refuse_to_start(reason: str) -> NoReturn:
    """Stop a worker that cannot serve with these settings: one line naming what to fix, then exit code 2."""
    print(f"rerank-worker: {reason}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_SETTINGS)

_ENV_OPTIONS = {
    "broker_url": "RERANK_BROKER_URL",
    "model": "RERANK_MODEL",
    "device": "RERANK_DEVICE",
    "dtype": "RERANK_DTYPE",
    "max_length": "RERANK_MAX_LENGTH",
    "max_batch_tokens": "RERANK_MAX_BATCH_TOKENS",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser; options override the matching RERANK_* variables."""
    parser = argparse.ArgumentParser(
        prog="rerank-worker",
        description="Start a re-ranking worker. Unknown options are passed on to `celery worker`. "
        "`rerank-worker report` prints what each running worker serves.",
        epilog="exit codes:\n" + "\n".join(
            textwrap.fill(meaning, 78, initial_indent=f"  {code}  ", subsequent_indent=" " * 5) for code, meaning in EXIT_CODES.items()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--broker-url", help="Celery broker URL (RERANK_BROKER_URL).")
    parser.add_argument("--model", help="Hub id or local directory (RERANK_MODEL).")
    parser.add_argument("--device", help="cpu or cuda:N (RERANK_DEVICE).")
    parser.add_argument(
        "--devices",
        help="Comma-separated devices, e.g. cuda:0,cuda:1,cpu: start one pinned worker process per device "
        "(CUDA_VISIBLE_DEVICES=N, --device cuda:0, named gpuN@%%h) and supervise them.",
    )
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="RERANK_DTYPE.")
    parser.add_argument("--max-length", type=int, help="Tokens per pair (RERANK_MAX_LENGTH).")
    parser.add_argument("--max-batch-tokens", type=int, help="Padded tokens per forward pass (RERANK_MAX_BATCH_TOKENS).")
    parser.add_argument(
        "-Q", "--queues",
        help="Comma-separated queues to consume, most urgent first (default: rerank.<model>.<gpu|cpu>.interactive, "
        "RERANK_QUEUE or rerank.<model>, rerank.<model>.<gpu|cpu>.bulk).",
    )
    parser.add_argument(
        "-c", "--concurrency", type=int, help="Prefork pool processes, each with its own model copy (default 1; not with batching)."
    )
    parser.add_argument("-n", "--hostname", help="Worker name; default <device>@%%h, e.g. gpu0@host.")
    parser.add_argument("-l", "--loglevel", default="INFO")
    return parser


def default_hostname(device: str) -> str:
    """Name workers after their device: `cpu@%h`, `gpu0@%h`."""
    if device.startswith("cuda"):
        return f"gpu{device.partition(':')[2] or '0'}@%h"
    return "cpu@%h"


def celery_argv(
    args: argparse.Namespace, passthrough: list[str], queue: str, device: str, model: str = DEFAULT_MODEL,
    tasks_in_hand: int = 1, hosts: int = 0,
) -> list[str]:
    """Translate our options into `celery worker` arguments.

    One task at a time: the prefork pool, which alone requeues a task whose process was killed and
    enforces hard time limits. Host processes (`hosts` > 0): that many prefork processes feeding
    one device process (scoring/device.py). Batching on threads (`tasks_in_hand` > 1): one
    process, Celery's threads pool with a thread per task in hand, all feeding one device thread
    (scoring/threaded.py).
    """
    batching = hosts or (tasks_in_hand if tasks_in_hand > 1 else 0)
    if batching and (args.concurrency or 1) > 1:
        refuse_to_start(
            f"-c/--concurrency sets prefork processes that each load the model, but this worker batches {batching} "
            "tasks across one device (RERANK_HOST_PROCESSES or RERANK_BATCH_TASKS); set those instead, or both to 0/1 for -c"
        )
    if hosts:
        pool = ["--pool=prefork", f"--concurrency={hosts}"]
    elif tasks_in_hand > 1:
        pool = ["--pool=threads", f"--concurrency={tasks_in_hand}"]
    else:
        pool = ["--pool=prefork", f"--concurrency={args.concurrency or 1}"]
    return [
        "worker",
        *pool,
        f"--hostname={args.hostname or default_hostname(device)}",
        f"--queues={args.queues or ','.join(worker_queues(device, queue, model))}",
        f"--loglevel={args.loglevel}",  # task events follow RERANK_TASK_EVENTS (worker.app)
        *passthrough,
    ]


# One pinned worker per device ------------------------------------------------------------------


@dataclass(frozen=True)
class PinnedWorker:
    """One child worker of `--devices`: the device it was given, what it sees, how it is started."""

    device: str
    hostname: str
    env: dict[str, str]
    argv: list[str]


def pinned_workers(devices: str, argv: list[str], environ: Mapping[str, str] = os.environ) -> list[PinnedWorker]:
    """Plan one worker per listed device: `cuda:N` sees only GPU N (as its cuda:0), `cpu` sees none.

    `argv` is this command's arguments without `--devices`; each child gets them plus its own
    `--device` and `--hostname`, so any `--device`/`-n` the user gave is overridden. With
    RERANK_METRICS_PORT=P in `environ`, the Nth worker serves its metrics on P+N, and with
    RERANK_HEARTBEAT_FILE=F each touches its own F.gpuN or F.cpu.
    """
    names = [d.strip() for d in devices.split(",") if d.strip()]
    if not names:
        refuse_to_start("--devices needs at least one device, e.g. cuda:0,cuda:1")
    if len(set(names)) != len(names):
        refuse_to_start(f"--devices lists a device twice: {devices}")
    plan = []
    for device in names:
        if device == "cpu":
            visible, inside, hostname = "", "cpu", "cpu@%h"
        elif device.startswith("cuda:") and device[5:].isdigit():
            index = device[5:]
            visible, inside, hostname = index, "cuda:0", f"gpu{index}@%h"
        else:
            refuse_to_start(f"--devices takes cpu or cuda:N, not {device!r}")
        env = {"CUDA_VISIBLE_DEVICES": visible, "RERANK_DEVICE": inside}
        if environ.get("RERANK_METRICS_PORT", "").isdigit():
            env["RERANK_METRICS_PORT"] = str(int(environ["RERANK_METRICS_PORT"]) + len(plan))
        if environ.get("RERANK_HEARTBEAT_FILE"):
            env["RERANK_HEARTBEAT_FILE"] = f"{environ['RERANK_HEARTBEAT_FILE']}.{hostname.partition('@')[0]}"
        plan.append(PinnedWorker(device, hostname, env, [*argv, "--device", inside, "--hostname", hostname]))
    return plan


def _strip_devices(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            out.append(arg)
    return out


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies (Linux), so no worker is orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(plan: list[PinnedWorker], spawn: Callable[..., Any] = subprocess.Popen) -> int:
    """Start every planned worker as a fresh process and wait; stop them all when one exits.

    SIGTERM/SIGINT are passed on (a warm shutdown: running tasks finish). The exit code is the
    first child's to exit, so a process manager restarts the set.
    """
    children = []
    for worker in plan:
        env = {**os.environ, **worker.env}
        # Own session: a terminal's Ctrl+C reaches only this process, which passes it on once
        # (a second SIGINT would make Celery kill running tasks).
        children.append(
            spawn([sys.executable, "-m", "worker.cli", *worker.argv], env=env, start_new_session=True, preexec_fn=_die_with_parent)
        )
        print(f"rerank-worker: started {worker.hostname} on {worker.device} "
              f"(CUDA_VISIBLE_DEVICES={worker.env['CUDA_VISIBLE_DEVICES']!r}) pid {children[-1].pid}", flush=True)

    def forward(signum: int, _: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = None
        while code is None:
            for child in children:
                if child.poll() is not None:
                    code = child.returncode
                    break
            else:
                time.sleep(0.2)
        forward(signal.SIGTERM, None)
        for child in children:
            child.wait()
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# Reports -----------------------------------------------------------------------------------------


def report_main(argv: list[str]) -> int:
    """`rerank-worker report`: ask every worker (or `-d NAME`) for its report and print it."""
    parser = argparse.ArgumentParser(prog="rerank-worker report", description="Print what each worker serves.")
    parser.add_argument("--broker-url", help="Celery broker URL (RERANK_BROKER_URL).")
    parser.add_argument("-d", "--destination", help="Comma-separated worker names (default: all).")
    parser.add_argument("--timeout", type=float, default=5.0, help="Seconds to wait for replies.")
    parser.add_argument("--json", action="store_true", help="Print the reports as JSON.")
    args = parser.parse_args(argv)
    if args.broker_url:
        os.environ["RERANK_BROKER_URL"] = args.broker_url
    from contract.settings import Settings
    from producer.app import create_app

    settings = Settings()
    if not settings.broker_url:
        print("rerank-worker report: set RERANK_BROKER_URL (or --broker-url) to reach the workers", file=sys.stderr)
        return 2
    app = create_app(settings)
    destination = args.destination.split(",") if args.destination else None
    replies = app.control.broadcast(REPORT_COMMAND, reply=True, timeout=args.timeout, destination=destination)
    reports = {name: body for reply in replies for name, body in reply.items()}
    if not reports:
        print("rerank-worker report: no worker replied", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reports, indent=2, sort_keys=True))
    else:
        from worker.report import format_report

        print("\n\n".join(format_report(name, reports[name]) for name in sorted(reports)))
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of `rerank-worker`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        sys.exit(report_main(argv[1:]))
    if argv[:1] == ["alive"]:
        from worker.health import alive_main

        sys.exit(alive_main(argv[1:]))
    args, passthrough = build_parser().parse_known_args(argv)
    if args.devices:
        sys.exit(supervise(pinned_workers(args.devices, _strip_devices(argv))))
    for option, variable in _ENV_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            os.environ[variable] = str(value)
    # Imported only now: the app reads its settings from the environment set above.
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker as worker_command
    from pydantic import ValidationError

    try:
        from worker.app import app, settings
    except ValidationError as e:
        refuse_to_start(f"invalid settings: {e}")
    except ValueError as e:  # tracing's OTEL_* settings
        refuse_to_start(str(e))
    # `celery -A worker.app worker …`'s own command, called without the `celery` group around it: the
    # group loads every CLI plugin (Flower among them) and the REPL, about a second of CPU per start.
    # app.worker_main and app.start would drop the exit code, so a worker that stops on an error would
    # exit 0 and no process manager would restart it.
    worker_command.params.extend(app.user_options.get("worker", []))
    argv = celery_argv(args, passthrough, settings.queue, settings.device, settings.model, settings.tasks_in_hand, settings.hosts)
    worker_command.main(argv[1:], prog_name="rerank-worker", obj=CLIContext(app=app, no_color=None, workdir=None))


if __name__ == "__main__":
    main()
