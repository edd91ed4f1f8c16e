"""Fault-suite fixtures: a private Redis per test (append-only, restartable) and short limits.

Every fault test owns its Redis, so killing or restarting it cannot disturb other tests, and
nothing a killed worker left behind leaks into the next test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from producer import RerankClient, Settings
from tests.helpers import (
    TIME_LIMIT,
    VISIBILITY_TIMEOUT,
    RedisServer,
    WorkerFleet,
    kill_tree,
)


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
def slow_settings(fault_redis: RedisServer, slow_model: Path) -> Settings:
    """`fault_settings` for workers of the slow model (its own queue)."""
    return Settings(
        broker_url=fault_redis.url, model=str(slow_model), task_time_limit=TIME_LIMIT, visibility_timeout=VISIBILITY_TIMEOUT
    )


@pytest.fixture
def reference(in_process_settings: Settings) -> Callable[..., Any]:
    """Score a request in this process: what a correct worker must return."""
    client = RerankClient(in_process_settings)

    def score(query: str, candidates: list[dict[str, Any]], top_k: int) -> list[tuple[str, float]]:
        result = client.rerank_documents(query, candidates, top_k=top_k)
        return [(item.id, item.score) for item in result.items]

    return score
