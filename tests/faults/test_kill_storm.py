"""A kill storm: thousands of small jobs, workers SIGKILLed at random instants, Redis crashing once.

Nothing may be lost, nothing wrong, nothing run three times. The CI-length storm runs here; the
long one is marked slow (`python -m pytest -m slow tests/faults/test_kill_storm.py -s`), and its
figures are in docs/reliability.md.
"""

from __future__ import annotations

from collections import Counter

import pytest

from producer import RerankClient
from tests.faults.storm import VARIANTS, request, storm, wait_all
from tests.helpers import report

pytestmark = pytest.mark.integration

SHAPES = {
    # One task at a time per prefork process: what CPU workers run.
    "prefork": (["-c", "1"], {}),
    # Two host processes feeding a device process: what GPU workers run. Kills hit the whole
    # worker, its device process or one host process.
    "device": ([], {"RERANK_HOST_PROCESSES": "2"}),
    # Four tasks in hand, scored together on one device thread (RERANK_BATCH_TASKS).
    "batching": ([], {"RERANK_BATCH_TASKS": "4"}),
}
ENV = {"RERANK_TASK_TIME_LIMIT": "30", "RERANK_VISIBILITY_TIMEOUT": "600", "RERANK_WORKER_LEASE": "2"}


def run_storm(shape, fleet, fault_redis, tiny_model, in_process_settings, tmp_path, producers, jobs_each, slots, seconds, kills):
    args, extra = SHAPES[shape]
    # Given a fleet of workers and several producers submitting small jobs
    # When workers are SIGKILLed every 0.3-1 s (a new one started each time) and Redis crashes once
    seen = storm(fault_redis, fleet, args, {**ENV, **extra}, tiny_model, tmp_path, producers, jobs_each, slots, seconds, kills,
                 piecemeal=shape == "device")
    # Then, once the last workers drain the queues, every job the producers were told is queued finished
    results = wait_all(fault_redis.url, [job_id for job_id, _ in seen.sent], timeout=300)
    reference = RerankClient(in_process_settings)
    expected = {}
    for variant in range(VARIANTS):
        items = reference.rerank_documents(*request(variant), top_k=2).items
        expected[variant] = [(i.id, i.score) for i in items]
    wrong = []
    for job_id, variant in seen.sent:
        meta = results[job_id]
        got = [(i["id"], i["score"]) for i in meta["result"]["items"]] if meta["status"] == "SUCCESS" else meta["status"]
        ok = isinstance(got, list) and [i for i, _ in got] == [i for i, _ in expected[variant]] and all(
            abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(got, expected[variant])
        )
        if not ok:
            wrong.append((job_id, got))
    runs, skipped = seen.runs(), seen.runs("Task already completed successfully")
    ran = Counter(runs[job_id] for job_id, _ in seen.sent)
    # A worker killed after storing a result but before logging it leaves no "succeeded" line;
    # its message, delivered again, is then skipped as already done (and logged so).
    unlogged = [job_id for job_id, _ in seen.sent if runs[job_id] == 0 and skipped[job_id] == 0]
    report(
        f"kill storm ({shape})", jobs=len(seen.sent), producers=producers, kills=seen.kills, workers_started=seen.workers_started,
        redis_down_s=round(seen.redis_down_s, 2), refused_submits=seen.refused_submits, lost=len(seen.sent) - len(results),
        wrong=len(wrong), ran_once=ran[1], ran_twice=ran[2], ran_3_or_more=sum(v for k, v in ran.items() if k >= 3),
        skipped_as_done=sum(1 for job_id, _ in seen.sent if skipped[job_id]), success_unlogged=ran[0],
    )
    assert len(seen.sent) == producers * jobs_each
    assert not wrong, wrong[:3]
    assert not unlogged, f"{len(unlogged)} jobs finished with no worker saying so"
    assert max(ran) <= 2, f"{sum(v for k, v in ran.items() if k >= 3)} jobs ran three times or more"


@pytest.mark.parametrize("shape", ["prefork", "device"])
def test_a_kill_storm_loses_nothing(shape, fleet, fault_redis, tiny_model, in_process_settings, tmp_path):
    run_storm(shape, fleet, fault_redis, tiny_model, in_process_settings, tmp_path, producers=3, jobs_each=200, slots=2, seconds=8, kills=6)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_long_kill_storm_loses_nothing(shape, fleet, fault_redis, tiny_model, in_process_settings, tmp_path):
    run_storm(shape, fleet, fault_redis, tiny_model, in_process_settings, tmp_path, producers=4, jobs_each=2500, slots=4, seconds=300, kills=150)
