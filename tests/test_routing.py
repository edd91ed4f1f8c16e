"""Model-aware routing: a job goes to its model's queues, both stages run on that model, results say
which model and revision scored them, and a fleet moves from one model to another worker by worker."""

from __future__ import annotations

import collections
import re
import shutil
import time
from pathlib import Path

import pytest
import redis

from contract.names import MAX_SLUG, model_queue, model_slug, queue_name, worker_queues
from contract.schemas import RerankResult, ScoringInfo, TwoStageResult
from producer import RerankClient, Settings, WorkerError
from producer.client import ScoredBy
from tests.helpers import CORPUS, QUERY, candidates, short_papers

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# Names -----------------------------------------------------------------------------------------


def test_model_slugs_are_queue_safe_stable_and_distinct():
    assert model_slug("BAAI/bge-reranker-v2-m3") == "baai-bge-reranker-v2-m3"
    assert model_slug("BAAI/bge-reranker-base") == model_slug("baai/BGE-reranker-base") == "baai-bge-reranker-base"
    assert model_slug("cross-encoder/ms-marco-MiniLM-L6-v2") == "cross-encoder-ms-marco-minilm-l6-v2"
    # A local directory keeps its name and gets a hash of its path: two "model" folders differ
    first, second = model_slug("/models/a/model"), model_slug("/models/b/model")
    assert re.fullmatch(r"model-[0-9a-f]{8}", first) and first != second
    assert model_slug("/models/a/model/") == model_slug("/models/a//model") == first
    # Long names are cut, with a hash that keeps them apart
    long_a, long_b = model_slug("org/" + "x" * 80 + "a"), model_slug("org/" + "x" * 80 + "b")
    assert len(long_a) <= MAX_SLUG and long_a != long_b
    for slug in (first, long_a, model_slug("org/Model_v1.5+fp16")):
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug), slug


def test_producers_send_both_stages_to_their_models_queue_unless_rerank_queue_is_set(monkeypatch):
    monkeypatch.delenv("RERANK_QUEUE", raising=False)
    monkeypatch.setenv("RERANK_MODEL", "org/small")
    assert Settings().queue == "rerank.org-small" == model_queue("org/small")
    assert Settings().queue in worker_queues("cpu", Settings().queue, "org/small")
    # Given a client of that model, when it prepares a two-stage job, then both stages go to its queue
    client = RerankClient(Settings())
    _, chain, _ = client._prepare({"query": QUERY, "candidates": candidates(3)}, None, False, False)
    assert [task.options["queue"] for task in chain.tasks] == ["rerank.org-small", "rerank.org-small"]
    # An explicit RERANK_QUEUE still wins, also the old shared name
    monkeypatch.setenv("RERANK_QUEUE", "rerank")
    assert Settings().queue == "rerank"
    monkeypatch.setenv("RERANK_QUEUE", queue_name("gpu", "bulk", model="org/small"))
    assert Settings().queue == "rerank.org-small.gpu.bulk"


def _result(model: str, stage: str = "documents") -> dict:
    info = ScoringInfo(
        model=model, revision=None, device="cpu", dtype="float32", max_length=512, pairs=1, tokens=9, padded_tokens=9,
        batches=1, tokenize_ms=0.1, forward_ms=0.2, pid=1, model_loads=1,
    )
    return RerankResult(stage=stage, query=QUERY, items=[], scored=1, info=info).model_dump(mode="json")


def test_a_result_scored_by_another_model_raises_worker_error():
    # Given what a client asking for org/a does to results
    finish = ScoredBy(TwoStageResult, expected_model="org/a")
    # Then results of org/a (however its name is cased) pass, and one stage of org/b does not
    assert finish({"documents": _result("org/a"), "chunks": _result("ORG/a", "chunks")}).chunks.info.model == "ORG/a"
    with pytest.raises(WorkerError, match="the chunks stage was scored by 'org/b'.*not by 'org/a' as asked"):
        finish({"documents": _result("org/a"), "chunks": _result("org/b", "chunks")})
    with pytest.raises(WorkerError, match="leave RERANK_QUEUE unset"):
        ScoredBy(RerankResult, expected_model="org/a")(_result("org/b"))


# Two models, side by side ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, Path]:
    """Model A: the tiny model as the hub cache lays out a download (so it has a commit); model B: other weights."""
    from worker.synthetic import build_cross_encoder

    root = tmp_path_factory.mktemp("hub")
    a = root / "models--org--rerank-a" / "snapshots" / COMMIT
    shutil.copytree(tiny_model, a)
    b = build_cross_encoder(root / "rerank-b", CORPUS, vocab_size=600, seed=1)
    return a, b


@pytest.mark.integration
def test_two_models_side_by_side_and_moving_from_one_to_the_other_worker_by_worker(start_worker, redis_server, two_models):
    a, b = two_models
    # Given one worker serving model A and one serving model B, each on its model's default queues
    worker_a = start_worker(env={"RERANK_MODEL": str(a)}, name="a")
    worker_b = start_worker(env={"RERANK_MODEL": str(b)}, name="b")
    worker_a.wait_until_loaded(processes=1)
    worker_b.wait_until_loaded(processes=1)
    client_a = RerankClient(Settings(broker_url=redis_server.url, model=str(a)))
    client_b = RerankClient(Settings(broker_url=redis_server.url, model=str(b)))

    # When both models' producers send the same jobs at once
    jobs = [(client, client.submit(QUERY, candidates(6), top_k_docs=2)) for _ in range(3) for client in (client_a, client_b)]
    results = [(client, job.result(timeout=120)) for client, job in jobs]
    # Then every stage of every job ran on the model it asked for, on that model's worker
    for client, result in results:
        model, worker = (a, "a0@") if client is client_a else (b, "b1@")
        for stage in (result.documents, result.chunks):
            assert stage.info.model == str(model) and stage.info.worker.startswith(worker)
        # And says which revision: A's files come from a hub snapshot, B's from a plain folder
        assert result.documents.info.revision == (COMMIT if client is client_a else None)
    # And the two models score the same job differently
    scores = {client: [item.score for item in result.documents.items] for client, result in results}
    assert scores[client_a] != scores[client_b]

    # When a producer asks for model B but forces the queue that model A's worker consumes
    stray = RerankClient(Settings(broker_url=redis_server.url, model=str(b), queue=model_queue(str(a))))
    # Then the result is refused, naming both models
    with pytest.raises(WorkerError, match=re.escape(f"scored by {str(a)!r}")):
        stray.rerank_documents(QUERY, short_papers(4), timeout=60)

    # When the fleet moves to model B worker by worker: A's worker stops, a B worker takes its place
    worker_a.stop()
    late_a = client_a.submit(QUERY, candidates(4), top_k_docs=2)
    replacement = start_worker(env={"RERANK_MODEL": str(b)}, name="b")
    replacement.wait_until_loaded(processes=1)
    served = collections.Counter()
    deadline = time.monotonic() + 120
    while served["b2"] < 2:
        assert time.monotonic() < deadline, f"the replacement took no jobs: {served}"
        batch = [client_b.submit(QUERY, candidates(6), top_k_docs=2) for _ in range(4)]
        for job in batch:
            result = job.result(timeout=120)
            assert result.documents.info.model == result.chunks.info.model == str(b)
            served[result.chunks.info.worker.split("@")[0]] += 1
    # Then B's jobs are served by the B workers only, the replacement among them, and A's late job
    # waits in A's queue: no B worker took it
    assert set(served) <= {"b1", "b2"}
    broker = redis.Redis.from_url(redis_server.url)
    assert late_a.status() == "PENDING" and broker.llen(model_queue(str(a))) == 1
    broker.delete(model_queue(str(a)))
