"""Run our system end to end: a private redis-server and a real `rerank-worker` process."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from producer import RerankClient, Settings
from worker.cli import celery_argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_system(
    model: Path, device: str, dtype: str, max_batch_tokens: int | None, worker_log: Path | None = None,
    tasks_in_hand: int = 1, env: dict[str, str] | None = None, app: str = "benchmarks.noop_worker", queues: list[str] | None = None,
    hosts: int = 0,
) -> Iterator[RerankClient]:
    """Start Redis and one worker and yield a client bound to them.

    One task at a time on one prefork process; with `tasks_in_hand` > 1, batching on one process
    of the threads pool; with `hosts` > 0, that many prefork host processes feeding a device
    process. The client's `worker_pid` is the worker's parent process. The worker logs to `worker_log` when given (kept
    afterwards), else to a scratch file; `env` adds RERANK_* settings. `app` is the Celery app
    module the worker runs, `queues` what it consumes (default: the model's queue).
    """
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        raise SystemExit("the end-to-end benchmark needs redis-server on PATH")
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    redis = subprocess.Popen(
        [redis_binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    log_path = worker_log or workdir / "worker.log"
    log = log_path.open("wb")
    settings = Settings(broker_url=url, model=str(model))
    environment = {
        **os.environ, "RERANK_BROKER_URL": url, "RERANK_MODEL": str(model), "RERANK_DEVICE": device, "RERANK_DTYPE": dtype,
        "RERANK_BATCH_TASKS": str(tasks_in_hand), "RERANK_HOST_PROCESSES": str(hosts), **(env or {}),
    }
    if max_batch_tokens:
        environment["RERANK_MAX_BATCH_TOKENS"] = str(max_batch_tokens)
    queue_list = ",".join(queues or [settings.queue])
    if app == "benchmarks.noop_worker":
        # rerank-worker as users start it, importing the module that adds the no-op task to its app.
        command = [sys.executable, "-m", "worker.cli", "--hostname=bench@%h", f"--queues={queue_list}", f"--include={app}"]
    else:
        # Another app (another transport): the arguments `rerank-worker` would give `celery worker`.
        options = argparse.Namespace(concurrency=None, hostname="bench@%h", queues=queue_list, loglevel="INFO")
        command = [sys.executable, "-m", "celery", "-A", app, *celery_argv(options, [], settings.queue, device, tasks_in_hand=tasks_in_hand, hosts=hosts)]
    worker = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while log_path.read_text(errors="replace").count("model loaded:") < max(1, hosts):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log_path.read_text(errors="replace"))
            time.sleep(0.2)
        client = RerankClient(settings)
        client.worker_pid = worker.pid
        yield client
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        redis.terminate()
        redis.wait(timeout=10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
