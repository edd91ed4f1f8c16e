"""Fault-suite fixtures: a private Redis per test (append-only, restartable) and short limits.

Every fault test owns its Redis, so killing or restarting it cannot disturb other tests, and
nothing a killed worker left behind leaks into the next test.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from producer import RerankClient, Settings
from tests.conftest import CORPUS, RedisServer, WorkerFleet

# Short limits for the tests that need a fast redelivery: a task is stopped after 5 s and Redis
# redelivers a message nobody acknowledged after 10 s (the validator wants at least two time
# limits); kombu sweeps every visibility_timeout // 10 = 1 s. Production keeps 300 s / 900 s
# (README, Reliability). A message also waits, unacknowledged, while a replacement pool process
# loads the model (about 10 s on a busy 2-core machine), so tests that kill a pool process use
# RELAXED, or the visibility timeout would expire during the reload and deliver the task twice.
TIME_LIMIT = 5
VISIBILITY_TIMEOUT = 10
FAST = {"RERANK_TASK_TIME_LIMIT": str(TIME_LIMIT), "RERANK_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)}
RELAXED = {"RERANK_TASK_TIME_LIMIT": "30", "RERANK_VISIBILITY_TIMEOUT": "60"}
QUERY = "apixaban in atrial fibrillation with chronic kidney disease"


def papers(n: int, tag: str = "p") -> list[dict[str, Any]]:
    """`n` distinct papers of about 400 tokens each: scoring 1,000 takes seconds on the tiny model."""
    return [
        {"id": f"{tag}{i}", "title": f"{tag}{i} {CORPUS[i % len(CORPUS)]}", "text": " ".join(CORPUS[i % 50 : i % 50 + 12]) + f" ({tag}{i})"}
        for i in range(n)
    ]


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid`, read from /proc (no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces or parentheses; the ppid follows the last ")".
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Send `sig` to `pid`, ignoring a process that is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a worker and its pool children at once (stopped first, so it forks no new child)."""
    kill(pid, signal.SIGSTOP)
    pool = children(pid)
    for child in pool:
        kill(child)
    kill(pid)
    return pool


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def started(client: RerankClient, task_id: str) -> dict[str, Any] | None:
    """Where `task_id` runs (`hostname`, and `pid` when the state tells it) while it runs, else None."""
    meta = client.app.backend.get_task_meta(task_id, cache=False)
    info = meta["result"] if isinstance(meta["result"], dict) else {}
    if meta["status"] == "STARTED":
        return {"hostname": info["hostname"], "pid": info["pid"]}
    if meta["status"] == "PROGRESS":  # batches done of total, written while the task runs
        return {"hostname": info["worker"], "pid": None}
    return None


def kill_running_child(client: RerankClient, worker_pid: int, task_id: str) -> tuple[int, float]:
    """Wait until `task_id` runs in the worker's only pool process, SIGKILL that process; return its pid and when."""
    meta = wait_for(lambda: started(client, task_id), 30, "the task to start")
    (child,) = children(worker_pid)
    assert meta["pid"] in (child, None), "the task runs in the worker's pool process"
    kill(child)
    return child, time.monotonic()


def deliveries(logs: list[str], task_id: str) -> int:
    """How many times workers logged receiving `task_id` (redeliveries included)."""
    return sum(len(re.findall(rf"Task rerank\.\w+\[{re.escape(task_id)}\] received", log)) for log in logs)


def assert_same_ranking(result: Any, expected: list[tuple[str, float]]) -> None:
    """`result` ranks the same ids in the same order as `expected`, with scores within 1e-5."""
    assert [item.id for item in result.items] == [i for i, _ in expected]
    assert [item.score for item in result.items] == pytest.approx([score for _, score in expected], abs=1e-5)


def report(test: str, **figures: Any) -> None:
    """Print what a fault test did and saw; pytest -s (or -rP) shows it."""
    print(f"\n[fault] {test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis with append-only persistence, as in docker-compose, restartable on its port."""
    server = RedisServer(tmp_path)
    server.start("--appendonly", "yes", "--appendfsync", "always")
    yield server
    server.stop()


@pytest.fixture
def fleet(tmp_path: Path, tiny_model: Path, fault_redis: RedisServer) -> Iterator[WorkerFleet]:
    """Real workers on the private Redis, with the short limits; all stopped (or killed) after the test."""
    workers = WorkerFleet(tmp_path, tiny_model, fault_redis.url)
    yield workers
    for worker in workers.started:
        kill_tree(worker.process.pid)
    workers.stop_all()


@pytest.fixture
def fault_settings(fault_redis: RedisServer, tiny_model: Path) -> Settings:
    """A producer on the private Redis with the same short limits as the workers."""
    return Settings(
        broker_url=fault_redis.url, model=str(tiny_model), task_time_limit=TIME_LIMIT, visibility_timeout=VISIBILITY_TIMEOUT
    )


@pytest.fixture
def reference(embedded_settings: Settings) -> Callable[..., Any]:
    """Score a request in this process: what a correct worker must return."""
    client = RerankClient(embedded_settings)

    def score(query: str, candidates: list[dict[str, Any]], top_k: int) -> list[tuple[str, float]]:
        result = client.rerank_documents(query, candidates, top_k=top_k)
        return [(item.id, item.score) for item in result.items]

    return score
