"""Batching across tasks: many requests, one device thread, each request's own scores, errors and deadline."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from producer import InvalidRequest, RerankClient, Settings, TaskTimedOut
from producer.jobs import stage1_id
from producer.names import TASK_DOCUMENTS
from tests.helpers import CORPUS, QUERY, Flower, candidates, wait_for
from worker.batching import BatchingScorer
from worker.engine import CrossEncoderEngine

QUERIES = [f"{CORPUS[i]} and anticoagulation" for i in range(8)]


def passages(seed: int, n: int) -> list[str]:
    return [" ".join(CORPUS[(seed + k) % len(CORPUS) : (seed + k) % len(CORPUS) + 1 + k % 4]) for k in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_model) -> CrossEncoderEngine:
    # A small budget, so requests share batches and some requests span several. Packed attention,
    # as batching GPU workers run it: a pair's scores do not depend on its batch-mates beyond
    # fp32 GEMM rounding (2e-7 here; padded attention pads to other widths: 2e-6).
    return CrossEncoderEngine.load(str(tiny_model), max_batch_tokens=1024, attention="packed")


def test_requests_scored_together_get_the_scores_they_get_alone(engine):
    # Given eight requests with different queries, each scored alone
    alone = [engine.score(QUERIES[n], passages(n, 5 + 3 * n)).probabilities for n in range(8)]
    scorer = BatchingScorer(engine, time_limit=60)
    batches = []
    original = engine.run_batch

    def counting(pairs):
        batches.append([tuple(p.input_ids[:12]) for p in pairs])  # the query leads every pair
        return original(pairs)

    engine.run_batch = counting
    try:
        # When they are sent from eight threads at once
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda n: scorer.score(QUERIES[n], passages(n, 5 + 3 * n)), range(8)))
    finally:
        del engine.run_batch
    # Then each gets its own scores, as alone to the 1e-5 we promise (other batch compositions
    # round fp32 differently: probabilities moved by up to 1.1e-6 on CI's CPU), in its own order
    for n in range(8):
        assert together[n].probabilities == pytest.approx(alone[n], abs=1e-5)
    # And pairs of different requests shared forward passes
    assert sum(len(b) for b in batches) == sum(5 + 3 * n for n in range(8))
    assert max(len(set(b)) for b in batches) >= 3, "pairs of three or more requests in one batch"


def test_a_failing_request_fails_alone_and_its_batch_mates_are_scored(engine):
    scorer = BatchingScorer(engine, time_limit=60)
    poison = CORPUS[0] + " (a passage that breaks the device)"
    original = engine.run_batch

    def failing(pairs):
        if any(engine.tokenize("q", [poison])[0].input_ids[-6:] == p.input_ids[-6:] for p in pairs):
            raise RuntimeError("device error on this pair")
        return original(pairs)

    engine.run_batch = failing
    try:
        with ThreadPoolExecutor(4) as pool:
            good = [pool.submit(scorer.score, QUERIES[n], passages(n, 6)) for n in range(3)]
            bad = pool.submit(scorer.score, QUERIES[3], passages(3, 4) + [poison])
            results = [f.result() for f in good]
            with pytest.raises(RuntimeError, match="device error on this pair"):
                bad.result()
    finally:
        del engine.run_batch
    for n, result in enumerate(results):
        assert result.probabilities == pytest.approx(engine.score(QUERIES[n], passages(n, 6)).probabilities, abs=1e-5)


def test_a_request_past_its_time_limit_times_out_while_small_ones_beside_it_finish(engine):
    # Given a request that takes the device a while, and a time limit of a third of that
    huge = [" ".join(CORPUS[k % 50 : k % 50 + 12]) + f" ({k})" for k in range(2000)]
    started = time.perf_counter()
    engine.score(QUERIES[0], huge)
    alone = time.perf_counter() - started
    scorer = BatchingScorer(engine, time_limit=max(0.3, alone / 3))
    with ThreadPoolExecutor(4) as pool:
        late = pool.submit(scorer.score, QUERIES[0], huge)
        time.sleep(0.2)
        # When small requests arrive while it runs
        small = [pool.submit(scorer.score, QUERIES[n], passages(n, 10)) for n in (1, 2, 3)]
        # Then they are scored in the batches that follow (in turn with the huge one), within the limit
        assert all(len(f.result(timeout=5).logits) == 10 for f in small)
        # And the huge one fails with TaskTimedOut at its limit
        with pytest.raises(TaskTimedOut, match="RERANK_TASK_TIME_LIMIT"):
            late.result(timeout=10)


def test_progress_is_reported_from_the_requests_own_thread_in_pairs(engine):
    scorer = BatchingScorer(engine, time_limit=60)
    seen: list[tuple[int, int, int]] = []
    result = scorer.score(QUERIES[0], passages(0, 60), on_batch=lambda done, total: seen.append((done, total, threading.get_ident())))
    assert len(result.logits) == 60 and result.batches >= 2
    assert seen and all(total == 60 and 0 < done < 60 for done, total, _ in seen)
    assert {ident for *_, ident in seen} == {threading.get_ident()}
    assert [done for done, *_ in seen] == sorted(done for done, *_ in seen)


def test_identical_pairs_are_scored_once_and_empty_requests_return_at_once(engine):
    scorer = BatchingScorer(engine, time_limit=60)
    twice = scorer.score(QUERIES[0], [CORPUS[2], CORPUS[3], CORPUS[2]])
    assert twice.logits[0] == twice.logits[2]
    assert scorer.score(QUERIES[0], []).logits == []


# Through Redis, on a real batching worker ------------------------------------------------------


@pytest.mark.integration
def test_a_batching_worker_scores_concurrent_jobs_as_alone_fails_a_bad_one_alone_and_flower_sees_each(
    start_worker, redis_server, tiny_model, in_process_settings, tmp_path
):
    # Given a worker holding four tasks at once, and Flower watching it
    worker = start_worker("-Q", "batching", env={"RERANK_BATCH_TASKS": "4", "RERANK_ATTENTION": "packed"}, name="batch")
    worker.wait_until_loaded(processes=1)
    assert "(thread)" in worker.output() and worker.output().count("model loaded:") == 1
    flower = Flower(redis_server.url, tmp_path / "flower.log")
    try:
        flower.wait_until_up()
        client = RerankClient(Settings(broker_url=redis_server.url, queue="batching", model=str(tiny_model)))
        # When eight two-stage jobs with different queries arrive together, with a malformed message among them
        queries = [f"{QUERY} ({CORPUS[n][:40]})" for n in range(8)]
        jobs = [client.submit(q, candidates(6 + n), top_k_docs=3) for n, q in enumerate(queries)]
        bad = client.app.send_task(TASK_DOCUMENTS, args=({"query": QUERY, "candidates": candidates(2), "colour": "red"},), queue="batching")
        results = [job.result(timeout=120) for job in jobs]
        # Then each job gets the scores it gets alone, and the bad one fails alone with its reason
        reference = RerankClient(in_process_settings)
        for n, result in enumerate(results):
            alone = reference.two_stage(queries[n], candidates(6 + n), top_k_docs=3)
            assert [i.id for i in result.chunks.items] == [i.id for i in alone.chunks.items]
            assert [i.score for i in result.chunks.items] == pytest.approx([i.score for i in alone.chunks.items], abs=1e-5)
        with pytest.raises(InvalidRequest, match="colour: Extra inputs are not permitted"):
            client.job(bad.id).result(timeout=30)
        # And Flower lists every task with its own state
        ids = {job.id: "SUCCESS" for job in jobs} | {stage1_id(job.id): "SUCCESS" for job in jobs} | {bad.id: "FAILURE"}
        tasks = wait_for(lambda: (t := flower.json("/api/tasks")) and all(t.get(i, {}).get("state") == s for i, s in ids.items()) and t,
                         30, "Flower to list every task with its state", interval=0.2)
        assert {tasks[i]["worker"] for i in ids} == {results[0].documents.info.worker}
    finally:
        flower.stop()
