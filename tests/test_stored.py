"""A job's requests are kept in Redis beside its messages: written once, read by the stage that needs them, never trusted."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import zstandard
from redis import Redis

from contract.errors import InvalidRequest, JobCancelled
from contract.formats import stage1_message
from contract.names import TASK_DOCUMENTS
from contract.settings import Settings
from producer import RerankClient
from producer.payloads import digest, key_of, pack, unpack
from tests.helpers import QUERY, candidates, wait_for

pytestmark = pytest.mark.integration


def hand_over(redis: Redis, client: RerankClient, job_id: str, timeout: float = 60) -> None:
    """Move the job's messages from the parked queue to the worker's until the job ends: stage 2 is sent where stage 1 came from."""
    def ended() -> bool:
        redis.lmove("stored-parked", "stored-served", "RIGHT", "LEFT")
        return client.backend.meta(job_id)["status"] in ("SUCCESS", "FAILURE")

    wait_for(ended, timeout, f"job {job_id} to end", interval=0.1)


def queued(redis: Redis, queue: str) -> tuple[bytes, list]:
    """The raw item at the head of `queue` (left there) and its decoded [args, kwargs, embed]."""
    item = redis.lindex(queue, -1)
    return item, json.loads(base64.b64decode(json.loads(item)["body"]))


def test_a_two_stage_job_keeps_its_requests_once_beside_small_messages(redis_server, tiny_model):
    # Given a two-stage job sent to a queue nobody consumes
    settings = Settings(broker_url=redis_server.url, queue="stored-shape", model=str(tiny_model))
    client, redis = RerankClient(settings), Redis.from_url(redis_server.url)
    papers = candidates(30)
    job = client.submit(QUERY, papers, top_k_docs=3)
    try:
        # When its stage-1 message is read off the queue as a worker would read it
        item, (args, kwargs, embed) = queued(redis, "stored-shape")
        # Then the message is small: stage 1's request and the chunk pool are named, not carried
        key = key_of(job.id)
        assert args == [{"stored": {"key": key, "field": "documents", "digest": args[0]["stored"]["digest"]}}] and not kwargs
        stage2 = embed["chain"][0]["kwargs"]["request"]
        assert "chunks" not in stage2 and stage2["pool"]["key"] == key and stage2["candidate_ids"] == [p["id"] for p in papers]
        job_json = len(json.dumps({"query": QUERY, "candidates": papers}))
        assert len(item) < 8_000 < job_json, (len(item), job_json)
        # And the hash holds stage 1's request and each candidate's chunks, compressed, under the digests the messages name
        stored = redis.hgetall(key)
        assert set(stored) == {b"documents", *(str(n).encode() for n in range(len(papers)))}
        request = client._documents_request(QUERY, papers, 3, False)
        assert unpack(stored[b"documents"], args[0]["stored"]["digest"], "documents", 2**24) == stage1_message(request)
        pool = client.chunk_pool(request.candidates)
        for n, paper in enumerate(papers):
            chunks = unpack(stored[str(n).encode()], stage2["pool"]["digests"][n], "chunks", 2**24)
            assert chunks == [c.model_dump(mode="json") for c in pool if c.doc_id == paper["id"]]
            assert stage2["pool"]["counts"][n] == len(chunks)
        assert sum(len(v) for v in stored.values()) < job_json * 0.6  # compressed (the shipped 100-paper job: about 9x)
        # And cancelling the job drops them
        job.cancel()
        assert not redis.exists(key)
    finally:
        redis.delete("stored-shape", key_of(job.id))


@pytest.fixture(scope="module")
def stored_worker(tmp_path_factory, tiny_model, redis_server):
    """A worker on its own queue, for jobs tampered with before it takes them."""
    from tests.helpers import WorkerFleet

    fleet = WorkerFleet(tmp_path_factory.mktemp("stored"), tiny_model, redis_server.url)
    worker = fleet.start("-Q", "stored-served", "-c", "1", name="stored")
    worker.wait_until_loaded(processes=1)
    yield worker
    fleet.stop_all()


TAMPERINGS = {
    "every paper's chunks replaced": lambda redis, key, n: redis.hset(key, mapping={str(i): pack(b"[]") for i in range(n)}),
    "stage 1's request deleted": lambda redis, key, n: redis.hdel(key, "documents"),
    "the hash replaced by a string": lambda redis, key, n: redis.delete(key) and redis.set(key, "not a hash"),
    "the hash gone": lambda redis, key, n: redis.delete(key),
    "stage 1's request cut short": lambda redis, key, n: redis.hset(key, "documents", redis.hget(key, "documents")[:-9]),
}


@pytest.mark.parametrize("tamper", TAMPERINGS)
def test_a_stored_request_changed_in_redis_fails_its_job_and_the_worker_serves_on(stored_worker, redis_server, tiny_model, tamper):
    # Given a two-stage job queued where no worker takes it yet
    settings = Settings(broker_url=redis_server.url, queue="stored-parked", model=str(tiny_model))
    client, redis = RerankClient(settings), Redis.from_url(redis_server.url)
    papers = candidates(6)
    job = client.submit(QUERY, papers, top_k_docs=6)
    # When what it keeps in Redis is changed, and then a worker takes it
    TAMPERINGS[tamper](redis, key_of(job.id), len(papers))
    hand_over(redis, client, job.id)
    # Then the job fails as invalid, naming what was wrong, and is not retried
    with pytest.raises(InvalidRequest, match="not in Redis|not what the producer stored|not the .* chunks"):
        client.job(job.id).result(timeout=60)
    # And the worker serves the next job
    served = RerankClient(Settings(broker_url=redis_server.url, queue="stored-served", model=str(tiny_model)))
    assert len(served.two_stage(QUERY, papers, top_k_docs=2, timeout=60).documents.items) == 2
    assert stored_worker.process.poll() is None
    redis.delete(key_of(job.id))


def test_a_finished_job_leaves_nothing_stored_and_a_late_duplicate_changes_nothing(stored_worker, redis_server, tiny_model):
    settings = Settings(broker_url=redis_server.url, queue="stored-parked", model=str(tiny_model))
    client, redis = RerankClient(settings), Redis.from_url(redis_server.url)
    # Given a two-stage job whose stage-1 message is copied before a worker takes it
    job = client.submit(QUERY, candidates(12), top_k_docs=2)
    copy, _ = queued(redis, "stored-parked")
    hand_over(redis, client, job.id)
    result = client.job(job.id).result(timeout=5)
    # Then once it finished, nothing it stored is left in Redis
    wait_for(lambda: not redis.exists(key_of(job.id)), 10, "the job's stored requests to be dropped")
    # When the copy of stage 1 arrives after the job ended (as a message delivered again would)
    redis.lpush("stored-served", copy)
    wait_for(lambda: f"{job.id}:documents] ignored" in stored_worker.output() or redis.llen("stored-parked"), 30, "the copy to be taken")
    hand_over(redis, client, job.id)
    wait_for(lambda: f"{job.id}:documents] ignored" in stored_worker.output(), 30, "the late duplicate to be ignored")
    # Then it changes nothing: the job's result is the one it had, and no stage ran again
    assert client.job(job.id).result(timeout=5) == result
    assert stored_worker.output().count(f"rerank.chunks[{job.id}] received") == 1


def test_a_stage_that_starts_after_its_job_was_cancelled_ends_quietly_as_cancelled(stored_worker, redis_server, tiny_model):
    settings = Settings(broker_url=redis_server.url, queue="stored-parked", model=str(tiny_model))
    client, redis = RerankClient(settings), Redis.from_url(redis_server.url)
    # Given a job cancelled while its stage was on its way to a worker: the producer marked it cancelled and dropped
    # what it stored, and the revoke broadcast lost the race (here it is never sent)
    job = client.submit(QUERY, candidates(6), top_k_docs=2)
    client.backend._mark_revoked(list(job.task_ids.values()))
    assert not redis.exists(key_of(job.id))
    # When the worker takes the stage and finds its request gone
    redis.lmove("stored-parked", "stored-served", "RIGHT", "LEFT")
    wait_for(lambda: f"{job.id}:documents] ignored" in stored_worker.output(), 30, "the stage to be ignored")
    # Then the job stays cancelled (not failed as if its request had expired), and the worker serves on
    with pytest.raises(JobCancelled):
        client.job(job.id).result(timeout=5)
    assert client.backend.meta(job.task_ids["documents"])["status"] == "REVOKED"
    assert stored_worker.process.poll() is None


HOSTILE_PARTS = {
    "a frame that inflates past any request": (lambda: _zstd(b"[]" + b" " * 100_000_000), "inflates past"),
    "a frame of bytes that are not JSON": (lambda: _zstd(b"\xff\xfe not JSON"), "not JSON"),
    "bytes that are no zstd frame": (lambda: b"not a zstd frame at all", "not a zstd frame"),
    "a frame of kombu-typed JSON": (lambda: _zstd(b'{"query": "q", "candidates": {"__type__": "bytes", "__value__": "eA=="}}'), "kombu-typed"),
    "a request with a control character": (lambda: _zstd(json.dumps({"query": QUERY, "candidates": [{"id": "a", "text": "x\u0000"}]}).encode()), "control character"),
}


def _zstd(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(raw)


@pytest.mark.parametrize("part", HOSTILE_PARTS)
def test_a_forged_message_naming_a_hostile_stored_part_fails_as_invalid(stored_worker, redis_server, tiny_model, part):
    # Given a part written into Redis with its true digest, and a message naming it (anyone who writes to Redis can do both)
    blob, refusal = HOSTILE_PARTS[part][0](), HOSTILE_PARTS[part][1]
    redis = Redis.from_url(redis_server.url)
    # A key of its own: the worker drops a failed job's stored key after storing its result, which may come after the next case's write
    key = f"rerank.job.forged-{uuid.uuid4().hex}"
    redis.hset(key, "request", blob)
    client = RerankClient(Settings(broker_url=redis_server.url, queue="stored-served", model=str(tiny_model)))
    task = client.app.send_task(TASK_DOCUMENTS, args=({"stored": {"key": key, "field": "request", "digest": digest(blob)}},), queue="stored-served")
    # When the worker takes it, Then the task fails as invalid with the reason, without reading more than the limit
    from contract.schemas import RerankResult
    from producer.jobs import Finish, Handle

    with pytest.raises(InvalidRequest, match=refusal):
        Handle(client.backend, task.id, Finish(RerankResult)).result(timeout=60)
    assert stored_worker.process.poll() is None
    redis.delete(key)


def test_a_request_over_the_byte_limit_is_refused_before_anything_is_queued(redis_server, tiny_model):
    settings = Settings(broker_url=redis_server.url, queue="stored-limit", model=str(tiny_model), max_request_bytes=2**20)
    client, redis = RerankClient(settings), Redis.from_url(redis_server.url)
    papers = [{"id": f"p{n}", "title": "t", "text": "word " * 19_000} for n in range(12)]  # about 1.1 MB of JSON
    before = set(redis.scan_iter("rerank.job.*"))
    with pytest.raises(InvalidRequest, match="RERANK_MAX_REQUEST_BYTES"):
        client.submit(QUERY, papers)
    with pytest.raises(InvalidRequest, match="RERANK_MAX_REQUEST_BYTES"):
        client.submit_passages(QUERY, [p["text"] for p in papers])
    assert set(redis.scan_iter("rerank.job.*")) == before
    assert redis.llen("stored-limit") == 0
