"""A Redis that is full, or that evicts: nothing stops a worker, nothing vanishes silently."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis import Redis

from producer import BrokerUnavailable, RerankClient, Settings
from tests.helpers import (
    FAST,
    QUERY,
    RedisServer,
    WorkerFleet,
    long_papers,
    short_papers,
    started,
    wait_for,
)

pytestmark = pytest.mark.integration


@contextmanager
def full(redis: Redis) -> Iterator[None]:
    """Make Redis refuse every write for want of memory, then free it.

    A maxmemory of one byte is always exceeded: Redis's used memory breathes by megabytes as
    connection buffers are freed, so filling it to the brink would not hold it full.
    """
    original = redis.config_get("maxmemory")["maxmemory"]
    redis.config_set("maxmemory", 1)
    try:
        yield
    finally:
        redis.config_set("maxmemory", original)


@pytest.fixture
def small_redis(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start("--maxmemory", "100mb", "--maxmemory-policy", "noeviction")
    yield server
    server.stop()


def test_a_full_redis_keeps_the_worker_up_and_the_job_completes_once_memory_is_free(small_redis, tmp_path, tiny_model):
    redis = Redis(port=small_redis.port)
    fleet = WorkerFleet(tmp_path, tiny_model, small_redis.url)
    try:
        worker = fleet.start("-Q", "full", env=FAST, name="full")
        worker.wait_until_loaded(processes=1)
        client = RerankClient(Settings(broker_url=small_redis.url, queue="full", model=str(tiny_model), task_time_limit=5, visibility_timeout=10))
        # Given a job running long enough (a few seconds) to be caught by the filling
        job = client.submit_documents(QUERY, long_papers(1000), top_k=2)
        wait_for(lambda: started(client, job.id), 30, "the job to start")
        # When Redis is full: it refuses every write
        with full(redis):
            # Then a producer is told Redis is out of memory, not that it cannot be reached
            with pytest.raises(BrokerUnavailable, match="is out of memory") as refusal:
                client.submit_documents(QUERY, short_papers(2), top_k=1)
            assert "cannot reach" not in str(refusal.value)
            # And the worker stays up, retries storing the result saying why, and when it gives up
            # (after about 10-18 s) keeps the message unacknowledged instead of stopping
            wait_for(lambda: "Redis is out of memory" in worker.output(), 30, "the worker to log that Redis is full")
            wait_for(lambda: "stays unacknowledged" in worker.output(), 60, "the worker to give up acknowledging")
            assert worker.process.poll() is None, worker.output()[-3000:]
        # When memory is freed, Then the message comes back after the visibility timeout and the job completes
        result = job.result(timeout=60)
        assert len(result.items) == 2
        assert worker.output().count(f"Task rerank.documents[{job.id}] received") == 2, "delivered again, once"
        # And the worker serves new jobs
        assert len(client.rerank_documents(QUERY, short_papers(3), top_k=2, timeout=30).items) == 2
        assert worker.process.poll() is None and "Unrecoverable error" not in worker.output()
    finally:
        fleet.stop_all()


def test_every_eviction_policy_gets_its_verdict():
    from worker.redis_check import eviction_verdict

    # Any policy that may delete a queue is refused, one that may delete results is warned about, none passes
    for policy in ("allkeys-lru", "allkeys-lfu", "allkeys-random"):
        assert eviction_verdict(policy)[0] == "refuse"
    for policy in ("volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl"):
        assert eviction_verdict(policy)[0] == "warn"
    assert eviction_verdict("noeviction") is None and eviction_verdict(None) is None


@pytest.mark.parametrize(("policy", "refused"), [("allkeys-lru", True), ("volatile-lru", False)])
def test_a_worker_refuses_a_redis_that_evicts_queued_jobs_and_warns_on_one_that_evicts_results(policy, refused, tmp_path, tiny_model):
    server = RedisServer(tmp_path)
    server.start("--maxmemory", "100mb", "--maxmemory-policy", policy)
    fleet = WorkerFleet(tmp_path, tiny_model, server.url)
    try:
        worker = fleet.start(name="evict")
        if refused:
            assert worker.process.wait(timeout=60) == 2  # a setting to fix: restarting will not help
            assert f"maxmemory-policy is {policy}: when Redis fills up it deletes queued jobs" in worker.output()
        else:
            worker.wait_until_loaded(processes=1)
            assert f"maxmemory-policy is {policy}: when Redis fills up it deletes results" in worker.output()
    finally:
        fleet.stop_all()
        server.stop()
