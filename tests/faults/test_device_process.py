"""Host processes feeding one device process (RERANK_HOST_PROCESSES): right scores, and nothing lost when either dies."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from producer import RerankClient
from tests.helpers import (
    QUERY,
    RELAXED,
    assert_same_ranking,
    children,
    deliveries,
    is_device_process,
    kill,
    long_papers,
    report,
    short_papers,
    started,
    wait_for,
)

pytestmark = pytest.mark.integration

SLOW = 150  # papers: about a second of scoring on the tiny model, long enough to be caught mid-task


def device_process_of(worker_pid: int) -> int:
    """The pid of the worker's device process (its child running scoring.device)."""
    for pid in children(worker_pid):
        if is_device_process(pid):
            return pid
    raise AssertionError("the worker has no device process")


def host_processes_of(worker_pid: int) -> list[int]:
    """The worker's prefork pool processes (every child but the device process)."""
    device = device_process_of(worker_pid)
    return [pid for pid in children(worker_pid) if pid != device]


def relaxed(settings):
    return settings.model_copy(update={"task_time_limit": 30, "visibility_timeout": 60})


def test_host_processes_score_concurrent_jobs_as_alone_through_one_device_process(fleet, fault_settings, reference):
    # Given a worker with two host processes and one device process
    worker = fleet.start(env={**RELAXED, "RERANK_HOST_PROCESSES": "2"}, name="dev")
    worker.wait_until_loaded(processes=2)
    client = RerankClient(relaxed(fault_settings))
    jobs = [(f"{QUERY} ({n})", short_papers(4 + 3 * n, seed=n, tag=f"j{n}")) for n in range(8)]
    # When eight jobs arrive at once
    handles = [client.submit_documents(query, papers, top_k=3) for query, papers in jobs]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda h: h.result(timeout=60), handles))
    # Then each got the ranking it gets scored alone in this process, from both host processes, and the
    # model was loaded once, in the device process, not in the hosts
    for (query, papers), result in zip(jobs, results):
        assert_same_ranking(result, reference(query, papers, 3))
    hosts = set(host_processes_of(worker.process.pid))
    assert {r.info.pid for r in results} <= hosts and len(hosts) == 2
    assert worker.output().count("device process ready") == 1
    assert worker.output().count(f"held by pid {device_process_of(worker.process.pid)} ") == len(hosts)


def test_a_killed_device_process_stops_its_worker_and_every_held_task_is_delivered_again(fleet, fault_settings, reference):
    # Given a worker with two host processes, both busy with slow requests, and a second worker to take over
    env = {**RELAXED, "RERANK_HOST_PROCESSES": "2", "RERANK_WORKER_LEASE": "2"}
    first = fleet.start("-Q", "devkill", env=env, name="first")
    first.wait_until_loaded(processes=2)
    client = RerankClient(relaxed(fault_settings).model_copy(update={"queue": "devkill"}))
    papers = [long_papers(SLOW, tag=f"d{n}") for n in range(2)]
    handles = [client.submit_documents(QUERY, p, top_k=10) for p in papers]
    wait_for(lambda: all(started(client, h.id) for h in handles), 30, "both tasks to start")

    # When its device process is SIGKILLed with both tasks in hand
    killed_at = time.monotonic()
    kill(device_process_of(first.process.pid))

    # Then the worker exits non-zero at once, and a fresh worker scores both tasks right
    assert first.process.wait(timeout=30) != 0
    exited = time.monotonic() - killed_at
    second = fleet.start("-Q", "devkill", env=env, name="second")
    results = [h.result(timeout=90) for h in handles]
    recovery = time.monotonic() - killed_at
    for p, result in zip(papers, results):
        assert_same_ranking(result, reference(QUERY, p, 10))
        assert result.info.worker.startswith(second.log.stem + "@")
    received = [deliveries([first.output(), second.output()], h.id) for h in handles]
    report("device process SIGKILL", sent=2, completed=2, lost=0, deliveries=received, worker_exit_s=round(exited, 1),
           recovery_s=round(recovery, 1))
    assert "the device process exited" in first.output()
    assert received == [2, 2]


def test_a_killed_host_process_requeues_only_its_task_and_the_device_process_serves_on(fleet, fault_settings, reference):
    # Given a worker with two host processes, one busy with a slow request
    worker = fleet.start(env={**RELAXED, "RERANK_HOST_PROCESSES": "2"}, name="hostkill")
    worker.wait_until_loaded(processes=2)
    client = RerankClient(relaxed(fault_settings))
    device = device_process_of(worker.process.pid)
    slow = long_papers(2 * SLOW, tag="slow")
    handle = client.submit_documents(QUERY, slow, top_k=10)
    meta = wait_for(lambda: (m := started(client, handle.id)) and m.get("pid") and m, 30, "the slow task to start")

    # When that host process is SIGKILLed mid-task, and a small job is sent after it
    kill(meta["pid"])
    small = short_papers(6, tag="small")
    after = client.rerank_documents(f"{QUERY} (after)", small, top_k=3, timeout=60)

    # Then its task is requeued and scored right by a host process, the small job is right too,
    # and the device process is the same one: it dropped the dead host's request and served on
    result = handle.result(timeout=90)
    assert_same_ranking(result, reference(QUERY, slow, 10))
    assert_same_ranking(after, reference(f"{QUERY} (after)", small, 3))
    assert result.info.pid != meta["pid"]
    assert device_process_of(worker.process.pid) == device and worker.process.poll() is None
    assert deliveries([worker.output()], handle.id) == 2


def test_a_device_process_whose_worker_is_killed_exits_too(fleet):
    # Given a worker with a device process
    worker = fleet.start(env={**RELAXED, "RERANK_HOST_PROCESSES": "1"}, name="orphan")
    worker.wait_until_loaded(processes=1)
    device = device_process_of(worker.process.pid)
    # When only the worker's parent is SIGKILLed
    kill(worker.process.pid)
    worker.process.wait(timeout=10)
    # Then its device process does not live on holding the model (and, on a GPU, its memory)
    wait_for(lambda: not Path(f"/proc/{device}").exists() or b"Z" in Path(f"/proc/{device}/stat").read_bytes().split(b")")[1][:3],
             10, "the device process to exit")
