"""Load: 8 producer threads, 400 two-stage jobs, 2 workers; nothing lost, wrong or duplicated."""

from __future__ import annotations

import re
import statistics
import threading
import time
from pathlib import Path

import pytest

from producer import RerankClient, Settings
from tests.helpers import CORPUS, RedisServer, WorkerFleet

pytestmark = pytest.mark.integration

JOBS = 400
THREADS = 8
TEMPLATES = 10
RESULT_EXPIRES = 600


def template(t: int) -> tuple[str, list[dict]]:
    """A small request: a query and three short papers (two of them chunked by the producer)."""
    query = CORPUS[(7 * t) % len(CORPUS)]
    papers = [{"id": f"p{k}", "title": CORPUS[(t + k) % len(CORPUS)], "text": CORPUS[(t + k + 20) % len(CORPUS)]} for k in range(3)]
    return query, papers


def for_job(n: int) -> tuple[str, list[dict]]:
    """Job `n` asks template n % TEMPLATES's question, with ids that name the job."""
    query, papers = template(n % TEMPLATES)
    return query, [{**p, "id": f"j{n}-{p['id']}"} for p in papers]


def test_four_hundred_jobs_from_eight_threads_all_arrive_right_and_once(tmp_path: Path, tiny_model: Path, in_process_settings):
    # Given 2 workers on a private Redis, and the right answer for each request template
    server = RedisServer(tmp_path)
    server.start("--appendonly", "no")
    fleet = WorkerFleet(tmp_path, tiny_model, server.url)
    settings = Settings(broker_url=server.url, model=str(tiny_model), result_expires=RESULT_EXPIRES)
    try:
        # Results expire by the setting of the worker that stores them, not the producer's.
        env = {"RERANK_RESULT_EXPIRES": str(RESULT_EXPIRES)}
        workers = [fleet.start("-c", "1", env=env, name="load"), fleet.start("-c", "1", env=env, name="load")]
        reference = RerankClient(in_process_settings)
        expected = {}
        for t in range(TEMPLATES):
            result = reference.two_stage(*template(t), top_k_docs=2)
            expected[t] = [(item.id.split("#")[0], item.id.partition("#")[2], item.score) for item in result.chunks.items]
        for worker in workers:
            worker.wait_until_loaded(processes=1)
        redis = RerankClient(settings).app.backend.client
        memory_before = redis.info("memory")["used_memory"]

        # When 8 threads each submit their share of 400 jobs, one at a time, waiting for each
        results: dict[int, object] = {}
        latencies: list[float] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def produce(thread: int) -> None:
            client = RerankClient(settings)  # one client per thread, as separate app servers would have
            for n in range(thread, JOBS, THREADS):
                try:
                    sent = time.perf_counter()
                    result = client.submit(*for_job(n), top_k_docs=2).result(timeout=120)
                    took = time.perf_counter() - sent
                except BaseException as e:  # noqa: BLE001 - collected and reported below
                    with lock:
                        errors.append(e)
                    continue
                with lock:
                    if n in results:
                        errors.append(AssertionError(f"job {n} came back twice"))
                    results[n] = result
                    latencies.append(took)

        started = time.perf_counter()
        threads = [threading.Thread(target=produce, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        elapsed = time.perf_counter() - started

        # Then every job came back once, with its own ids and the right scores
        assert not errors, errors[:3]
        wrong = 0
        for n, result in results.items():
            got = [(item.id.split("#")[0], item.id.partition("#")[2], item.score) for item in result.chunks.items]
            want = expected[n % TEMPLATES]
            same = [(i.removeprefix(f"j{n}-"), c) for i, c, _ in got] == [(i, c) for i, c, _ in want]
            close = all(abs(a[2] - b[2]) <= 1e-5 for a, b in zip(got, want))
            wrong += not (same and close and result.documents.query == for_job(n)[0])
        executions = sum(len(re.findall(r"Task rerank\.chunks\[[^\]]+\] succeeded", w.output())) for w in workers)
        latencies.sort()
        p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
        memory_after = redis.info("memory")["used_memory"]
        served = {w.log.stem: sum(r.chunks.info.worker.startswith(w.log.stem + "@") for r in results.values()) for w in workers}
        print(
            f"\n[load] jobs={JOBS} threads={THREADS} workers=2 completed={len(results)} lost={JOBS - len(results)} "
            f"wrong={wrong} duplicated={executions - JOBS} elapsed_s={elapsed:.1f} throughput_jobs_s={JOBS / elapsed:.1f} "
            f"p50_ms={p50 * 1000:.0f} p99_ms={p99 * 1000:.0f} served={served} "
            f"redis_used_memory_kb={memory_before // 1024}->{memory_after // 1024}"
        )
        assert len(results) == JOBS and wrong == 0
        assert executions == JOBS, "no stage-2 task ran twice"
        assert all(served.values()), "both workers took work"

        # And nothing in Redis grows without bound: the queues are drained, nothing is left
        # unacknowledged, and every result expires within RERANK_RESULT_EXPIRES
        keys = [k.decode() for k in redis.scan_iter(count=1000)]
        results_kept = [k for k in keys if k.startswith("celery-task-meta-")]
        assert len(results_kept) == 2 * JOBS
        ttls = redis.pipeline()
        for key in results_kept:
            ttls.ttl(key)
        expiring = ttls.execute()
        assert all(0 < ttl <= RESULT_EXPIRES for ttl in expiring), sorted(set(expiring))[:5]
        permanent = [k for k in keys if not k.startswith("celery-task-meta-") and redis.ttl(k) == -1]
        assert [k for k in permanent if redis.type(k) == b"list" and redis.llen(k)] == [], "queues drained"
        assert redis.hlen("unacked") == 0
        assert len(permanent) < 20, f"only kombu's fixed bookkeeping keys live forever: {permanent}"
    finally:
        fleet.stop_all()
        server.stop()
