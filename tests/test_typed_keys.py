"""Every key a worker writes may hold another type (anyone can write any key): it is moved aside, and the worker serves on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import uuid
from redis import Redis

from contract.errors import BrokerUnavailable
from contract.names import TASK_DOCUMENTS
from contract.schemas import RerankResult
from contract.settings import Settings
from producer import RerankClient
from producer.jobs import Finish, Handle
from tests.helpers import (
    QUERY,
    WorkerFleet,
    long_papers,
    short_papers,
    started,
    wait_for,
)
from worker.taking import HELD_PREFIX, LEASES, QUARANTINE

pytestmark = pytest.mark.integration

QUEUE = "typed"


@pytest.fixture(scope="module")
def typed(tmp_path_factory, tiny_model, redis_server):
    """One worker on its own queue with a short lease (renewed and swept every 0.4 s), a client, and raw Redis."""
    fleet = WorkerFleet(tmp_path_factory.mktemp("typed"), tiny_model, redis_server.url)
    worker = fleet.start("-Q", QUEUE, "-c", "1", env={"RERANK_WORKER_LEASE": "2"}, name="typed")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=redis_server.url, queue=QUEUE, model=str(tiny_model)))
    yield worker, client, Redis.from_url(redis_server.url)
    fleet.stop_all()


def plant(redis: Redis, key: str, kind: str) -> None:
    """Replace `key` with a value of `kind` (a Redis type) that no worker writes there."""
    redis.delete(key)
    {"string": lambda: redis.set(key, "planted"), "hash": lambda: redis.hset(key, "planted", "x"), "list": lambda: redis.rpush(key, "planted"),
     "set": lambda: redis.sadd(key, "planted"), "zset": lambda: redis.zadd(key, {"planted": 1.0})}[kind]()


def held_set(redis: Redis) -> str:
    """The held set of the worker's lease (it exists while the worker holds a message)."""
    return wait_for(lambda: next((k.decode() for k in redis.keys(HELD_PREFIX + "*") if b"misplaced" not in k), None), 30, "a held set")


# (key to plant, its wrong type, whether to plant it while a task runs): each key the worker writes to.
WHILE_RUNNING: dict[str, tuple[Callable[[Redis], str], str]] = {
    "unacked as a string": (lambda r: "unacked", "string"),
    "unacked as a list": (lambda r: "unacked", "list"),
    "unacked_index as a hash": (lambda r: "unacked_index", "hash"),
    "the held set as a string": (held_set, "string"),
    "the held set as a zset": (held_set, "zset"),
    "the leases as a string": (lambda r: LEASES, "string"),
    "the leases as a set": (lambda r: LEASES, "set"),
}


@pytest.mark.parametrize("case", WHILE_RUNNING)
def test_bookkeeping_of_another_type_planted_while_a_task_runs_is_moved_aside_and_the_job_completes(typed, case):
    worker, client, redis = typed
    # Given a job the worker is running
    job = client.submit_documents(QUERY, long_papers(250), top_k=2)
    wait_for(lambda: started(client, job.id), 30, "the job to start")
    # When a key the worker writes to when the task ends (acknowledging it, renewing its lease) is given another type
    locate, kind = WHILE_RUNNING[case]
    key = locate(redis)
    plant(redis, key, kind)
    # Then the job completes, the key was moved aside (kept for inspection), and the worker serves the next job at once
    assert len(job.result(timeout=60).items) == 2
    wait_for(lambda: redis.keys(f"{key}.misplaced.*"), 10, f"{key} moved aside")
    assert len(client.rerank_documents(QUERY, short_papers(3), top_k=2, timeout=5).items) == 2
    assert worker.process.poll() is None and "Unrecoverable error" not in worker.output()
    for aside in redis.keys(f"{key}.misplaced.*"):
        redis.delete(aside)


BEFORE_A_JOB: dict[str, tuple[Callable[[Any], str], str]] = {
    "the queue as a string": (lambda job_id: QUEUE, "string"),
    "the queue as a hash": (lambda job_id: QUEUE, "hash"),
    "the result key as a hash": (lambda job_id: f"celery-task-meta-{job_id}", "hash"),
    "the result key as a list": (lambda job_id: f"celery-task-meta-{job_id}", "list"),
    "the quarantine as a string": (lambda job_id: QUARANTINE, "string"),
}


@pytest.mark.parametrize("case", BEFORE_A_JOB)
def test_a_key_of_another_type_where_a_job_will_be_written_is_moved_aside_and_the_job_completes(typed, case):
    worker, shared, redis = typed
    client = RerankClient(shared.settings)  # a producer that starts now
    # Given a key a job's path writes to (its queue, its result, the quarantine, the queue's routing table), of another type
    job_id = uuid()
    locate, kind = BEFORE_A_JOB[case]
    key = locate(job_id)
    plant(redis, key, kind)
    if key == QUARANTINE:
        redis.lpush(QUEUE, b"not a message")  # a hostile item goes to the quarantine
    # When a job is sent there (while the key is in the way, a producer is refused and sends again)
    handle = wait_for(lambda: _sent(client, job_id), 10, "a producer to send the job")
    # Then the job completes, and the key is kept aside for inspection
    assert len(handle.result(timeout=30).items) == 2
    assert redis.keys(f"{key}.misplaced.*"), f"{key} was not kept aside"
    assert worker.process.poll() is None and "Unrecoverable error" not in worker.output()
    for aside in redis.keys(f"{key}.misplaced.*"):
        redis.delete(aside)


def _sent(client: RerankClient, job_id: str) -> Any:
    """Submit 3 papers under `job_id` as a producer does; None while the broker refuses it (a key of another type in the way)."""
    try:
        client.backend.send(job_id, client.app.signature(
            TASK_DOCUMENTS, args=({"query": QUERY, "candidates": short_papers(3), "top_k": 2},), queue=QUEUE, task_id=job_id
        ))
    except BrokerUnavailable:  # told so, as every producer is; it sends again
        return None
    return Handle(client.backend, job_id, Finish(RerankResult))
