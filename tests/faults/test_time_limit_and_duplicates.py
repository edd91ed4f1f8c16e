"""A task past its time limit fails as a typed error and the worker serves on; duplicates do no harm."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import chain

from contract.errors import RerankTimeout, TaskTimedOut
from contract.names import TASK_CHUNKS, TASK_DOCUMENTS
from producer import RerankClient, Settings
from tests.helpers import (
    FAST,
    QUERY,
    TIME_LIMIT,
    VISIBILITY_TIMEOUT,
    RedisServer,
    WorkerFleet,
    WorkerProcess,
    assert_same_ranking,
    long_papers,
    report,
    wait_for,
)

pytestmark = pytest.mark.integration

# About 100 s of work for the slow model on one thread: twenty times the 5 s limit.
OVERSIZED = 1000


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, slow_model: Path) -> Iterator[tuple[WorkerProcess, Settings]]:
    """One worker with a 5 s time limit serving the slow model."""
    server = RedisServer(tmp_path_factory.mktemp("limited-redis"))
    server.start("--appendonly", "no")
    fleet = WorkerFleet(tmp_path_factory.mktemp("limited"), slow_model, server.url)
    worker = fleet.start("-c", "1", env=FAST, name="limited")
    worker.wait_until_loaded(processes=1)
    settings = Settings(
        broker_url=server.url, model=str(slow_model), task_time_limit=TIME_LIMIT, visibility_timeout=VISIBILITY_TIMEOUT
    )
    yield worker, settings
    fleet.stop_all()
    server.stop()


def test_a_task_past_its_time_limit_fails_as_a_typed_timeout_and_the_worker_serves_on(limited):
    worker, settings = limited
    client = RerankClient(settings)
    small = long_papers(5, tag="s")
    before = client.rerank_documents(QUERY, small, top_k=3, timeout=30)
    # Given a request that takes far longer than the 5 s time limit
    started = time.monotonic()
    handle = client.submit_documents(QUERY, long_papers(OVERSIZED), top_k=5)

    # When the worker runs it, Then it is stopped at the soft limit and reported as TaskTimedOut
    with pytest.raises(TaskTimedOut, match=r"ran past its time limit \(RERANK_TASK_TIME_LIMIT=5s\)") as caught:
        handle.result(timeout=60)
    stopped_after = time.monotonic() - started
    assert isinstance(caught.value, RerankTimeout), "callers catching RerankTimeout see it too"
    assert "Soft time limit (4s) exceeded" in worker.output()
    assert stopped_after < TIME_LIMIT + 5

    # And the same pool process serves the next request as it did before, without reloading the model
    result = client.rerank_documents(QUERY, small, top_k=3, timeout=30)
    assert_same_ranking(result, [(item.id, item.score) for item in before.items])
    assert result.info.model_loads == 1 and worker.output().count("model loaded:") == 1
    received = len(re.findall(rf"\[{handle.id}\] received", worker.output()))
    report("time limit", sent=3, completed=2, timed_out=1, lost=0, deliveries_of_timed_out=received, stopped_after_s=round(stopped_after, 1))
    assert received == 1, "a timed-out task is not retried"


def test_a_duplicate_delivery_of_a_two_stage_job_gives_the_same_result(fleet, fault_settings, in_process_settings):
    worker = fleet.start("-c", "1", env=FAST, name="duplicates")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(fault_settings)
    # Given a two-stage job whose messages are sent twice with the same task ids, as a
    # redelivery after a visibility timeout or a producer retry would do
    candidates = long_papers(12, tag="d")
    job_id = "duplicate-job"
    documents, chunks = client._two_stage_requests(QUERY, candidates, 4, None, False, None, {})
    job = chain(
        client.app.signature(TASK_DOCUMENTS, args=(documents.model_dump(mode="json"),), immutable=True, task_id=f"{job_id}:documents"),
        client.app.signature(TASK_CHUNKS, kwargs={"request": chunks.model_dump(mode="json")}, task_id=job_id),
    )
    job.apply_async()
    first = client.job(job_id).result(timeout=30)
    job.apply_async()

    # When both deliveries have run
    wait_for(lambda: worker.output().count(f"Task rerank.chunks[{job_id}] succeeded") == 2, 30, "the duplicate to finish")

    # Then the stored result is the one the first delivery gave, and both match the in-process result
    second = client.job(job_id).result(timeout=5)
    expected = RerankClient(in_process_settings).two_stage(QUERY, candidates, top_k_docs=4)
    for stage in ("documents", "chunks"):
        ranking = [(i.id, i.score) for i in getattr(expected, stage).items]
        assert_same_ranking(getattr(first, stage), ranking)
        assert_same_ranking(getattr(second, stage), ranking)
    report("duplicate delivery", sent=2, completed=2, lost=0, duplicated_executions=1, results_differ=0)
