"""`rerank-worker`: start a Celery worker pinned to one device, with the right options."""

from __future__ import annotations

import argparse
import os
import sys

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
        description="Start a re-ranking worker. Unknown options are passed on to `celery worker`.",
    )
    parser.add_argument("--broker-url", help="Celery broker URL (RERANK_BROKER_URL).")
    parser.add_argument("--model", help="Hub id or local directory (RERANK_MODEL).")
    parser.add_argument("--device", help="cpu or cuda:N (RERANK_DEVICE).")
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="RERANK_DTYPE.")
    parser.add_argument("--max-length", type=int, help="Tokens per pair (RERANK_MAX_LENGTH).")
    parser.add_argument("--max-batch-tokens", type=int, help="Padded tokens per forward pass (RERANK_MAX_BATCH_TOKENS).")
    parser.add_argument("-Q", "--queues", help="Comma-separated queues to consume (default: RERANK_QUEUE).")
    parser.add_argument("-c", "--concurrency", type=int, default=1, help="Pool processes, each with its own model copy.")
    parser.add_argument("-n", "--hostname", help="Worker name; default <device>@%%h, e.g. gpu0@host.")
    parser.add_argument("-l", "--loglevel", default="INFO")
    return parser


def default_hostname(device: str) -> str:
    """Name workers after their device: `cpu@%h`, `gpu0@%h`."""
    if device.startswith("cuda"):
        return f"gpu{device.partition(':')[2] or '0'}@%h"
    return "cpu@%h"


def celery_argv(args: argparse.Namespace, passthrough: list[str], queue: str, device: str) -> list[str]:
    """Translate our options into `celery worker` arguments (prefork pool: it alone requeues killed tasks)."""
    return [
        "worker",
        "--pool=prefork",
        f"--concurrency={args.concurrency}",
        f"--hostname={args.hostname or default_hostname(device)}",
        f"--queues={args.queues or queue}",
        f"--loglevel={args.loglevel}",
        "--task-events",
        *passthrough,
    ]


def main(argv: list[str] | None = None) -> None:
    """Entry point of `rerank-worker`."""
    args, passthrough = build_parser().parse_known_args(argv)
    for option, variable in _ENV_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            os.environ[variable] = str(value)
    # Imported only now: the app reads its settings from the environment set above.
    from pydantic import ValidationError

    try:
        from worker.app import app, settings
    except ValidationError as e:
        sys.exit(f"rerank-worker: invalid settings: {e}")
    app.worker_main(celery_argv(args, passthrough, settings.queue, settings.device))


if __name__ == "__main__":
    main()
