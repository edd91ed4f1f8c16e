"""Killed processes lose nothing: a pool child, a whole worker, a warm shutdown mid-task."""

from __future__ import annotations

import signal
import time

import pytest

from producer import RerankClient, Settings
from tests.helpers import (
    FAST,
    QUERY,
    RELAXED,
    VISIBILITY_TIMEOUT,
    assert_same_ranking,
    deliveries,
    kill_running_child,
    kill_tree,
    long_papers,
    report,
    started,
    wait_for,
)

pytestmark = pytest.mark.integration

# About 1 s of scoring on the tiny model with one idle thread, a few seconds on a busy machine:
# long enough to be caught mid-task, short enough for the 5 s time limit of FAST workers.
SLOW = 150


def relaxed(settings: Settings) -> Settings:
    return settings.model_copy(update={"task_time_limit": 30, "visibility_timeout": 60})


def test_a_killed_pool_child_requeues_its_task_and_the_result_is_right(fleet, fault_settings, reference):
    # Given a worker with one pool process, busy with a slow request
    worker = fleet.start("-c", "1", env=RELAXED, name="child")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(relaxed(fault_settings))
    candidates = long_papers(2 * SLOW)
    handle = client.submit_documents(QUERY, candidates, top_k=10)

    # When its pool process is SIGKILLed mid-task
    child, killed_at = kill_running_child(client, worker.process.pid, handle.id)

    # Then the task is requeued at once, run again by a fresh pool process, and its result is right
    result = handle.result(timeout=90)
    recovery = time.monotonic() - killed_at
    received = deliveries([worker.output()], handle.id)
    report("pool child SIGKILL", sent=1, completed=1, lost=0, deliveries=received, duplicated=received - 2, recovery_s=round(recovery, 1))
    assert result.info.pid != child and result.info.model_loads == 1
    assert_same_ranking(result, reference(QUERY, candidates, 10))
    assert "WorkerLostError" in worker.output()
    assert received == 2, "delivered once, requeued once after the kill, no more"


LEASE = 2


def test_a_killed_worker_s_task_goes_to_the_other_worker_once_its_lease_lapses(fleet, fault_settings, reference):
    # Given two workers holding their messages under a 2 s lease (the visibility timeout is 10 s),
    # one of them busy with a slow request
    env = {**FAST, "RERANK_WORKER_LEASE": str(LEASE)}
    first = fleet.start("-c", "1", env=env, name="a")
    second = fleet.start("-c", "1", env=env, name="b")
    first.wait_until_loaded(processes=1)
    second.wait_until_loaded(processes=1)
    client = RerankClient(fault_settings)
    candidates = long_papers(SLOW)
    handle = client.submit_documents(QUERY, candidates, top_k=10)
    meta = wait_for(lambda: started(client, handle.id), 30, "the task to start")
    busy, idle = (first, second) if meta["hostname"].startswith(first.log.stem + "@") else (second, first)

    # When the busy worker, parent and pool process, is SIGKILLed mid-task
    killed_at = time.monotonic()
    kill_tree(busy.process.pid)

    # Then its lease lapses and the other worker's next renewal (every 0.4 s) puts the message
    # back, before the visibility timeout could have; that worker completes it
    wait_for(lambda: "whose lease lapsed" in idle.output(), VISIBILITY_TIMEOUT - 2, "the lapsed lease's message to be put back")
    put_back = time.monotonic() - killed_at
    result = handle.result(timeout=60)
    recovery = time.monotonic() - killed_at
    received = deliveries([first.output(), second.output()], handle.id)
    report(
        "whole worker SIGKILL", sent=1, completed=1, lost=0, deliveries=received, duplicated=received - 2,
        put_back_s=round(put_back, 1), recovery_s=round(recovery, 1), lease_s=LEASE, visibility_timeout_s=VISIBILITY_TIMEOUT,
    )
    assert result.info.worker.startswith(idle.log.stem + "@")
    assert_same_ranking(result, reference(QUERY, candidates, 10))
    assert received == 2


def test_a_warm_shutdown_mid_task_finishes_the_task_first(fleet, fault_settings, reference):
    # Given a worker busy with a slow request
    worker = fleet.start("-c", "1", env=RELAXED, name="warm")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(relaxed(fault_settings))
    candidates = long_papers(2 * SLOW)
    handle = client.submit_documents(QUERY, candidates, top_k=10)
    wait_for(lambda: started(client, handle.id), 30, "the task to start")

    # When it gets SIGTERM (warm shutdown) mid-task
    stopped_at = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)

    # Then it finishes the task, acknowledges it and exits cleanly; the result is right
    assert worker.process.wait(timeout=60) == 0
    shutdown = time.monotonic() - stopped_at
    result = handle.result(timeout=5)
    report(
        "SIGTERM mid-task", sent=1, completed=1, lost=0, deliveries=deliveries([worker.output()], handle.id),
        duplicated=0, shutdown_s=round(shutdown, 1),
    )
    assert_same_ranking(result, reference(QUERY, candidates, 10))
    assert client.app.connection().default_channel.client.hlen("unacked") == 0, "nothing left unacknowledged"
