"""A batching worker holds several tasks at once: when it dies, stops or meets a slow task, none is lost or run wrong."""

from __future__ import annotations

import os
import signal
import time

import pytest

from producer import RerankClient, TaskTimedOut
from tests.helpers import (
    FAST,
    QUERY,
    ROOT,
    TIME_LIMIT,
    VISIBILITY_TIMEOUT,
    assert_same_ranking,
    deliveries,
    kill_tree,
    long_papers,
    report,
    started,
    wait_for,
)

pytestmark = pytest.mark.integration

BATCHING = {"RERANK_BATCH_TASKS": "4"}

# Loaded into the worker process by Python's site module (PYTHONPATH): once the flag file exists,
# the device thread meets an exception no per-round handler catches. Test code only: the worker
# has no fault switch of its own.
HALTING_SITECUSTOMIZE = """
import os

flag = os.environ.get("TEST_HALT_DEVICE_THREAD_FLAG")
if flag:
    from scoring.scheduler import UniquePairs

    class DeviceHalt(BaseException):
        pass

    collect = UniquePairs.collect

    def halting_collect(self, indexes, logits):
        if os.path.exists(flag):
            raise DeviceHalt("halted by the test")
        return collect(self, indexes, logits)

    UniquePairs.collect = halting_collect
"""


def test_a_killed_batching_worker_s_tasks_all_complete_once_on_another_worker(fleet, fault_settings, reference):
    # Given two batching workers holding four tasks each, and eight slow jobs between them
    workers = [fleet.start(env={**FAST, **BATCHING}, name=name) for name in ("batch-a", "batch-b")]
    for worker in workers:
        worker.wait_until_loaded(processes=1)
    client = RerankClient(fault_settings)
    requests = {n: (f"{QUERY} #{n}", long_papers(400, tag=f"k{n}-")) for n in range(8)}
    jobs = {n: client.submit_documents(query, docs, top_k=5) for n, (query, docs) in requests.items()}

    def running_on() -> dict[str, list[int]]:
        hosts: dict[str, list[int]] = {}
        for n, job in jobs.items():
            meta = started(client, job.id)
            if meta:
                hosts.setdefault(meta["hostname"].split("@")[0], []).append(n)
        return hosts

    # Killed once it runs all four it may hold, so it is not taking a message at that moment (a
    # kill between kombu's BRPOP and its unacked record loses the message: README, Reliability).
    busy = wait_for(lambda: next((h for h, held in running_on().items() if len(held) == 4), None), 30, "a worker to run four tasks at once")
    victim, survivor = (workers[0], workers[1]) if busy.startswith("batch-a") else (workers[1], workers[0])
    held = running_on()[busy]

    # When that worker is SIGKILLed with the tasks in hand
    killed_at = time.monotonic()
    kill_tree(victim.process.pid)

    # Then every job completes with the right ranking; those it held, on the other worker after the visibility timeout
    results = {n: job.result(timeout=VISIBILITY_TIMEOUT + 60) for n, job in jobs.items()}
    recovery = time.monotonic() - killed_at
    received = {n: deliveries([w.output() for w in workers], job.id) for n, job in jobs.items()}
    report("batching worker SIGKILL", sent=len(jobs), completed=len(results), lost=len(jobs) - len(results),
           held_by_the_killed=len(held), most_deliveries=max(received.values()), recovery_s=round(recovery, 1))
    for n, result in results.items():
        assert_same_ranking(result, reference(*requests[n], 5))
    assert all(results[n].info.worker.startswith(survivor.log.stem) for n in held)
    assert all(received[n] == 2 for n in held) and all(1 <= count <= 2 for count in received.values()), received


@pytest.mark.slow  # the threads shape; GPU workers run host processes (tests/faults/test_device_process.py)
def test_a_batching_worker_stops_a_task_past_its_limit_and_finishes_the_others(fleet, slow_settings, slow_model):
    # Given a batching worker of the slow model with a 5 s time limit and small batches, a job
    # of about 100 s of work, and small ones beside it
    env = {**FAST, **BATCHING, "RERANK_MAX_BATCH_TOKENS": "512", "RERANK_MODEL": str(slow_model)}
    worker = fleet.start(env=env, name="batch-limit")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(slow_settings)
    chunks = [{"id": f"c{i}", "doc_id": f"d{i % 50}", "text": f"{text} ({i})"} for i, text in
              enumerate(p["text"] for p in long_papers(1000, tag="x"))]
    huge = client.submit_chunks(QUERY, chunks, top_k=3)
    wait_for(lambda: started(client, huge.id), 30, "the big job to start")
    small = [client.submit_documents(f"{QUERY} #{n}", long_papers(5, tag=f"s{n}-"), top_k=2) for n in range(3)]
    # Then the small ones finish, the big one fails at its limit with TaskTimedOut, and the worker serves on
    assert all(len(job.result(timeout=30).items) == 2 for job in small)
    with pytest.raises(TaskTimedOut, match="RERANK_TASK_TIME_LIMIT"):
        huge.result(timeout=60)
    assert len(client.rerank_documents(QUERY, long_papers(3), top_k=1, timeout=30).items) == 1
    assert worker.process.poll() is None


@pytest.mark.slow  # the threads shape; GPU workers run host processes (tests/faults/test_device_process.py)
def test_a_warm_shutdown_finishes_every_task_the_batching_worker_holds(fleet, slow_settings, slow_model):
    # Given a batching worker of the slow model running four jobs of a few seconds each at once
    worker = fleet.start(env={**BATCHING, "RERANK_MODEL": str(slow_model)}, name="batch-warm")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(slow_settings)
    jobs = [client.submit_documents(f"{QUERY} #{n}", long_papers(20, tag=f"w{n}-"), top_k=3) for n in range(4)]
    wait_for(lambda: all(started(client, job.id) for job in jobs), 30, "four tasks to run at once")
    # When it gets SIGTERM
    worker.process.send_signal(signal.SIGTERM)
    # Then it finishes every task it holds (one thread each) and exits 0, leaving nothing unacknowledged
    assert worker.process.wait(timeout=90) == 0
    assert all(len(job.result(timeout=5).items) == 3 for job in jobs)
    assert client.app.connection().default_channel.client.hlen("unacked") == 0


@pytest.mark.slow  # the threads shape; GPU workers run host processes (tests/faults/test_device_process.py)
def test_a_batching_worker_whose_device_thread_stops_exits_1_and_its_tasks_complete_on_another(fleet, fault_settings, reference, tmp_path):
    # Given a batching worker whose device thread stops for good once a flag file exists
    flag, site = tmp_path / "halt-device-thread", tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HALTING_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    victim = fleet.start(env={**FAST, **BATCHING, "PYTHONPATH": path, "TEST_HALT_DEVICE_THREAD_FLAG": str(flag)}, name="halt")
    victim.wait_until_loaded(processes=1)
    client = RerankClient(fault_settings)
    requests = {n: (f"{QUERY} #{n}", long_papers(400, tag=f"h{n}-")) for n in range(4)}
    jobs = {n: client.submit_documents(query, docs, top_k=5) for n, (query, docs) in requests.items()}
    wait_for(lambda: all(started(client, job.id) for job in jobs.values()), 30, "the worker to run all four jobs")
    # When its device thread stops
    halted_at = time.monotonic()
    flag.touch()
    # Then the worker exits with code 1 at once, not at the tasks' time limit, and says why
    assert victim.process.wait(timeout=TIME_LIMIT) == 1
    exited = time.monotonic() - halted_at
    assert "the device thread stopped" in victim.output() and "DeviceHalt: halted by the test" in victim.output()
    # And a healthy worker runs every job it held, after the visibility timeout, with the right ranking
    survivor = fleet.start(env={**FAST, **BATCHING}, name="healthy")
    results = {n: job.result(timeout=VISIBILITY_TIMEOUT + 60) for n, job in jobs.items()}
    recovery = time.monotonic() - halted_at
    redone = [n for n, r in results.items() if r.info.worker.startswith(survivor.log.stem)]
    report("batching device thread stopped", exit_s=round(exited, 2), redelivered=len(redone), recovery_s=round(recovery, 1))
    for n, result in results.items():
        assert_same_ranking(result, reference(*requests[n], 5))
    assert redone, "the stopped worker's tasks were delivered again"
    received = {n: deliveries([victim.output(), survivor.output()], job.id) for n, job in jobs.items()}
    assert all(received[n] == 2 for n in redone) and all(1 <= count <= 2 for count in received.values()), received
