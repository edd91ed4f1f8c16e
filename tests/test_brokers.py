"""RabbitMQ as the broker (amqp://) with Redis as the result backend: the same jobs, errors and recovery."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Queue

from producer import InvalidRequest, RerankClient, Settings
from tests.helpers import (
    QUERY,
    WorkerFleet,
    WorkerProcess,
    candidates,
    check_two_stage,
    kill_running_child,
    report,
    skip_or_fail,
)

pytestmark = pytest.mark.integration

RABBITMQ_URL = os.environ.get("RERANK_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def need_rabbitmq(url: str) -> None:
    """Skip without a RabbitMQ on a laptop; fail under CI, which must run every test."""
    host, port = "127.0.0.1", 5672
    with Connection(url) as connection:
        host, port = connection.hostname, connection.port or 5672
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        skip_or_fail(f"no RabbitMQ at {host}:{port} (set RERANK_TEST_AMQP_URL)")


@pytest.fixture(scope="module")
def amqp(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_server) -> Iterator[tuple[WorkerProcess, Settings]]:
    """A worker on a queue of its own in RabbitMQ, storing results in the test Redis; the queue is deleted after."""
    need_rabbitmq(RABBITMQ_URL)
    # The queue and the worker's name are this run's own: two runs sharing one RabbitMQ must not
    # meet in a queue or in the workers' remote-control (pidbox) queue.
    tag = uuid.uuid4().hex[:8]
    queue = f"rerank-test-{tag}"
    fleet = WorkerFleet(tmp_path_factory.mktemp("amqp"), tiny_model, RABBITMQ_URL)
    worker = fleet.start("-c", "1", "-Q", queue, env={"RERANK_RESULT_BACKEND": redis_server.url, "RERANK_QUEUE": queue}, name=f"rabbit{tag}-")
    try:
        worker.wait_until_loaded(processes=1)
        yield worker, Settings(broker_url=RABBITMQ_URL, result_backend=redis_server.url, queue=queue, model=str(tiny_model))
    finally:
        fleet.stop_all()
        with Connection(RABBITMQ_URL) as connection:
            Queue(queue, channel=connection.default_channel).delete()


def test_two_stage_jobs_through_rabbitmq_match_the_reference(amqp, tiny_model):
    worker, settings = amqp
    # Given a worker consuming from RabbitMQ, When a two-stage job is sent, Then its rankings match the reference
    result = check_two_stage(RerankClient(settings), tiny_model)
    assert result.documents.info.worker.startswith("rabbit") and result.documents.info.worker.split("@")[0] in worker.output()
    assert "transport:   amqp://guest:**@127.0.0.1:5672//" in worker.output()


def test_a_batch_and_a_worker_side_error_through_rabbitmq(amqp):
    _, settings = amqp
    client = RerankClient(settings)
    # Given a batch of three jobs, one of which the worker refuses (a raw stage-1 message with an unknown field)
    results = client.two_stage_many([{"query": QUERY, "candidates": candidates(4), "top_k_docs": 2} for _ in range(3)], timeout=60)
    assert [len(r.documents.items) for r in results] == [2, 2, 2]
    bad = client.app.send_task("rerank.documents", args=({"query": QUERY, "candidates": candidates(2), "priority": 9},), queue=settings.queue)
    # Then the valid jobs complete and the invalid one fails with the worker's typed error, once
    with pytest.raises(InvalidRequest, match="priority: Extra inputs are not permitted"):
        client.job(bad.id).result(timeout=30)


def test_a_killed_pool_child_requeues_its_task_through_rabbitmq(amqp):
    worker, settings = amqp
    client = RerankClient(settings)
    # Given the worker busy with a slow request
    papers = [{"id": f"s{i}", "title": f"paper {i}", "text": " ".join(candidates(40)[i % 40]["text"] for _ in range(2)) + f" {i}"} for i in range(300)]
    handle = client.submit_documents(QUERY, papers, top_k=5)
    # When its pool process is SIGKILLed mid-task
    child, killed_at = kill_running_child(client, worker.process.pid, handle.id)
    # Then RabbitMQ redelivers the rejected message at once and a fresh pool process completes it
    result = handle.result(timeout=90)
    report("pool child SIGKILL (RabbitMQ)", sent=1, completed=1, lost=0, recovery_s=round(time.monotonic() - killed_at, 1))
    assert result.info.pid != child and len(result.items) == 5
    # And the worker serves on
    assert len(client.rerank_documents(QUERY, candidates(3), top_k=2, timeout=30).items) == 2
