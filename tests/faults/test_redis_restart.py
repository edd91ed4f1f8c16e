"""Redis restarts mid-run: workers and producers reconnect, every job completes, consuming goes on."""

from __future__ import annotations

import time

import pytest

from producer import RerankClient
from producer.jobs import stage1_id
from tests.helpers import (
    FAST,
    QUERY,
    assert_same_ranking,
    deliveries,
    long_papers,
    report,
    started,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_every_job_completes_across_a_redis_restart_and_the_worker_keeps_consuming(fleet, fault_redis, fault_settings, in_process_settings):
    # Given a worker, and 20 two-stage jobs in flight through a Redis with append-only persistence,
    # the first of them slow
    worker = fleet.start("-c", "1", env=FAST, name="restart")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(fault_settings)
    requests = {n: (f"{QUERY} #{n}", long_papers(20, tag=f"j{n}-")) for n in range(30)}
    requests[0] = (requests[0][0], long_papers(200, tag="j0-"))  # one slow job, to be running during the outage
    jobs = {n: client.submit(query, candidates, top_k_docs=3) for n, (query, candidates) in list(requests.items())[:20]}
    wait_for(lambda: started(client, stage1_id(jobs[0].id)), 60, "the slow job to start")

    # When Redis is stopped while it runs (its progress updates and its result must wait for
    # Redis), and started again 2 s later on the same port and data directory
    fault_redis.stop()
    time.sleep(2)
    fault_redis.start("--appendonly", "yes", "--appendfsync", "always")
    restarted_at = time.monotonic()

    # Then the same client sends 10 more jobs, and all 30 complete with the right results
    for n, (query, candidates) in list(requests.items())[20:]:
        jobs[n] = client.submit(query, candidates, top_k_docs=3)
    results = {}
    for n, job in jobs.items():
        results[n] = job.result(timeout=90)
    recovery = time.monotonic() - restarted_at
    reference = RerankClient(in_process_settings)
    for n in (0, 19, 29):
        expected = reference.two_stage(*requests[n], top_k_docs=3)
        assert_same_ranking(results[n].chunks, [(i.id, i.score) for i in expected.chunks.items])
    for n, result in results.items():
        assert result.documents.query == requests[n][0] and all(i.id.startswith(f"j{n}-") for i in result.documents.items)
    received = sum(deliveries([worker.output()], job.id) for job in jobs.values())
    report(
        "Redis restart", sent=len(jobs), completed=len(results), lost=len(jobs) - len(results),
        stage2_deliveries=received, duplicated=received - len(jobs), all_done_after_restart_s=round(recovery, 1),
        # redis-py retries a connect itself; what it gives up on, Celery retries (result_backend_always_retry)
        worker_result_store_retries=worker.output().count("Failed operation _store_result"),
    )
    assert len(results) == 30
    assert "Connection to broker lost" in worker.output()
