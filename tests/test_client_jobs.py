"""Job handles, batches, min_score, documents and stage-1 windows: in-process and through Redis."""

from __future__ import annotations

import subprocess
import sys

import pytest

from contract.formats import document_passage, text_windows
from contract.schemas import Candidate, Chunk
from producer import InvalidRequest, JobCancelled, RerankClient, Settings
from producer.jobs import stage1_id
from tests.helpers import CORPUS, QUERY, candidates, reference_logits, sigmoid


def test_min_score_and_documents_are_applied_client_side(in_process_settings):
    # Given a two-stage job whose chunk scores we know
    client = RerankClient(in_process_settings)
    plain = client.two_stage(QUERY, candidates(8), top_k_docs=3)
    cut = sorted(item.score for item in plain.chunks.items)[len(plain.chunks.items) // 2]
    # When asked for documents and a threshold
    result = client.two_stage(QUERY, candidates(8), top_k_docs=3, min_score=cut, return_documents=True)
    # Then exactly the chunks at or above it remain, in order, each with what we sent joined back
    assert [i.id for i in result.chunks.items] == [i.id for i in plain.chunks.items if i.score >= cut]
    pool = client.chunk_pool([Candidate.model_validate(c) for c in candidates(8)])
    assert all(isinstance(i.document, Chunk) and i.document == pool[i.index] for i in result.chunks.items)
    assert [i.document.id for i in result.documents.items] == [i.id for i in result.documents.items]
    # And the wire format did not change: an item without a document has no "document" key
    assert "document" not in plain.chunks.model_dump(mode="json")["items"][0]
    with pytest.raises(InvalidRequest, match="min_score"):
        client.rerank_documents(QUERY, candidates(2), min_score=1.5)


def test_stage1_windows_keep_each_papers_best_window(in_process_settings, tiny_model):
    # Given papers whose texts run far past the seed's 1,500-character abstract
    papers = [{"id": f"long{i}", "title": CORPUS[i], "text": " ".join((CORPUS * 3)[i * 10 : i * 10 + 40])} for i in range(3)]
    assert all(len(p["text"]) > 3000 for p in papers)
    client = RerankClient(in_process_settings)
    # When stage 1 scores up to 3 windows of each
    result = client.rerank_documents(QUERY, papers, top_k=3, windows=3)
    # Then each paper's score is the best of its windows' reference scores
    for item in result.items:
        paper = Candidate.model_validate(papers[item.index])
        windows = text_windows(paper.text, 3)
        assert len(windows) == 3 and windows[0] == paper.text[:1500]
        passages = [document_passage(paper.model_copy(update={"text": w})) for w in windows]
        assert item.score == pytest.approx(max(sigmoid(reference_logits(tiny_model, QUERY, passages))), abs=1e-5)
    assert result.info.pairs == 9
    # And one window is the seed's score
    seed = client.rerank_documents(QUERY, papers, top_k=3)
    first = {p["id"]: sigmoid(reference_logits(tiny_model, QUERY, [document_passage(Candidate.model_validate(p))]))[0] for p in papers}
    assert [i.score for i in seed.items] == pytest.approx([first[i.id] for i in seed.items], abs=1e-5)


def test_in_process_jobs_report_progress_and_can_be_cancelled_before_they_run(in_process_settings):
    # Given in-process jobs, which run when their result is first waited for
    client = RerankClient(in_process_settings)
    batch = client.submit_many([{"query": QUERY, "candidates": candidates(4), "top_k_docs": 2} for _ in range(3)])
    assert batch.progress().states == {"PENDING": 3}
    # When one is cancelled before it runs
    assert batch[1].cancel() is True
    # Then the others finish, in input order, and the cancelled one raises JobCancelled
    results = batch.results(return_exceptions=True)
    assert isinstance(results[1], JobCancelled)
    assert [len(r.documents.items) for r in (results[0], results[2])] == [2, 2]
    assert batch.progress().states == {"SUCCESS": 2, "REVOKED": 1}
    assert batch[0].progress().fraction == 1.0 and batch[0].cancel() is False


@pytest.mark.integration
def test_a_job_is_followed_and_collected_from_another_process(shared_worker, redis_settings):
    # Given a job submitted here
    client = RerankClient(redis_settings)
    job = client.submit(QUERY, candidates(10), top_k_docs=3, top_k_chunks=4)
    here = job.result(timeout=60)
    # When another process knows only its id
    code = (
        "import sys, json; from producer import RerankClient, Settings; "
        f"job = RerankClient(Settings(broker_url={redis_settings.broker_url!r}, model={redis_settings.model!r})).job(sys.argv[1]); "
        "p = job.progress(); r = job.result(timeout=30); "
        "print(json.dumps([p.state, [s.state for s in p.stages], [s.task_id for s in p.stages], [i.id for i in r.chunks.items]]))"
    )
    completed = subprocess.run([sys.executable, "-c", code, job.id], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    # Then it finds both stages and the same result
    state, stage_states, task_ids, chunk_ids = __import__("json").loads(completed.stdout)
    assert state == "SUCCESS" and stage_states == ["SUCCESS", "SUCCESS"]
    assert task_ids == [stage1_id(job.id), job.id]
    assert chunk_ids == [i.id for i in here.chunks.items]


@pytest.mark.integration
def test_a_batch_is_a_group_of_chains_collected_in_order_or_as_completed(shared_worker, redis_settings):
    # Given queries of different sizes, one of them invalid for the worker (duplicate-free but top_k beyond nothing is fine)
    client = RerankClient(redis_settings)
    sizes = [12, 3, 7, 5]
    requests = [{"query": QUERY, "candidates": candidates(n), "top_k_docs": 2, "top_k_chunks": 3} for n in sizes]
    batch = client.submit_many(requests)
    # When collected as they complete
    seen = [job.index for job in batch.as_completed(timeout=120)]
    # Then every job came once, and results() gives them in input order
    assert sorted(seen) == [0, 1, 2, 3]
    results = batch.results(timeout=60)
    assert [r.documents.scored for r in results] == sizes
    # And another client finds the batch by its id
    again = RerankClient(redis_settings).batch(batch.id)
    assert [j.id for j in again] == [j.id for j in batch]
    assert [r.documents.scored for r in again.results(timeout=10)] == sizes
    assert again.progress().states == {"SUCCESS": 4}


@pytest.mark.integration
def test_cancel_revokes_a_queued_job_and_other_processes_see_it(redis_server, redis_settings):
    # Given a job on a queue no worker consumes
    settings = Settings(broker_url=redis_server.url, queue="cancel-me", model=redis_settings.model)
    job = RerankClient(settings).submit(QUERY, candidates(3))
    assert job.status() == "PENDING"
    # When it is cancelled
    assert job.cancel() is True
    # Then its result raises JobCancelled at once, here and for a client that only has the id
    with pytest.raises(JobCancelled):
        job.result(timeout=5)
    resumed = RerankClient(settings).job(job.id)
    assert resumed.status() == "REVOKED"
    with pytest.raises(JobCancelled):
        resumed.result(timeout=5)
