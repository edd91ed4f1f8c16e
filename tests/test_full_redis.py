"""A Redis that is full, or that evicts: nothing stops a worker, nothing vanishes silently."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis import Redis

from producer import BrokerUnavailable, RerankClient, Settings
from tests.helpers import FAST, QUERY, RedisServer, WorkerFleet, long_papers, short_papers, started, wait_for

pytestmark = pytest.mark.integration


def fill(redis: Redis) -> int:
    """Write filler keys until Redis refuses even a 100-byte one; return how many it took."""
    n = 0
    for size in (1_000_000, 10_000, 100):
        try:
            while True:
                redis.set(f"filler{n}", b"x" * size)
                n += 1
        except Exception:  # noqa: BLE001 - the OOM refusal is what we wait for
            pass
    return n


def free(redis: Redis) -> None:
    for key in list(redis.scan_iter("filler*")) + list(redis.scan_iter("pre*")):
        redis.delete(key)


@pytest.fixture
def small_redis(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start("--maxmemory", "30mb", "--maxmemory-policy", "noeviction")
    yield server
    server.stop()


def test_a_full_redis_keeps_the_worker_up_and_the_job_completes_once_memory_is_free(small_redis, tmp_path, tiny_model):
    redis = Redis(port=small_redis.port)
    fleet = WorkerFleet(tmp_path, tiny_model, small_redis.url)
    try:
        worker = fleet.start("-Q", "full", env=FAST, name="full")
        worker.wait_until_loaded(processes=1)
        client = RerankClient(Settings(broker_url=small_redis.url, queue="full", model=str(tiny_model), task_time_limit=5, visibility_timeout=10))
        # Given Redis nearly full, and a job running long enough to be caught by the rest of the filling
        for n in range(22):
            redis.set(f"pre{n}", b"x" * 1_000_000)
        job = client.submit_documents(QUERY, long_papers(1000), top_k=2)
        wait_for(lambda: started(client, job.id), 30, "the job to start")
        # When Redis is filled until it refuses every write (its used memory breathes, so fill again
        # until a submit meets it full)
        refusal = None
        for _ in range(10):
            fill(redis)
            try:
                client.submit_documents(QUERY, short_papers(2), top_k=1)
            except BrokerUnavailable as e:
                refusal = e
                break
        # Then a producer is told Redis is out of memory, not that it cannot be reached
        assert refusal is not None and "is out of memory" in str(refusal) and "cannot reach" not in str(refusal)
        # And the worker stays up, says why it cannot store the result, and keeps the message unacknowledged
        wait_for(lambda: "Redis is out of memory" in worker.output(), 30, "the worker to log that Redis is full")
        assert worker.process.poll() is None, worker.output()[-3000:]
        # When memory is freed, Then the job completes (on redelivery if its first result could not be stored)
        free(redis)
        result = job.result(timeout=60)
        assert len(result.items) == 2
        # And the worker serves new jobs
        assert len(client.rerank_documents(QUERY, short_papers(3), top_k=2, timeout=30).items) == 2
        assert worker.process.poll() is None and "Unrecoverable error" not in worker.output()
    finally:
        fleet.stop_all()


@pytest.mark.parametrize(("policy", "refused"), [("allkeys-lru", True), ("allkeys-random", True), ("volatile-lru", False)])
def test_a_worker_refuses_a_redis_that_evicts_queued_jobs_and_warns_on_one_that_evicts_results(policy, refused, tmp_path, tiny_model):
    server = RedisServer(tmp_path)
    server.start("--maxmemory", "100mb", "--maxmemory-policy", policy)
    fleet = WorkerFleet(tmp_path, tiny_model, server.url)
    try:
        worker = fleet.start(name="evict")
        if refused:
            assert worker.process.wait(timeout=60) == 1
            assert f"maxmemory-policy is {policy}: when Redis fills up it deletes queued jobs" in worker.output()
        else:
            worker.wait_until_loaded(processes=1)
            assert f"maxmemory-policy is {policy}: when Redis fills up it deletes results" in worker.output()
    finally:
        fleet.stop_all()
        server.stop()
