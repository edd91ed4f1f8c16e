"""Hostile reads on the producer's side: whatever anyone with write access to Redis stores as a result,
publishes on a result channel, forges into a stage-2 request or leaves at a queue's tail, the producer
raises a typed error or ignores it, and never hangs, crashes untyped or hands back a wrong ranking."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from contract.formats import chunk_digest
from contract.plain import MAX_DEPTH, plain_json
from contract.schemas import Chunk
from producer import (
    AsyncRerankClient,
    InvalidRequest,
    RerankClient,
    RerankError,
    Settings,
    WorkerError,
)
from producer.jobs import RerankJob
from producer.metrics import default_queues
from tests.helpers import QUERY, candidates, free_port, short_papers, wait_for

pytestmark = pytest.mark.integration

HELD = "held-results"  # a queue no worker consumes: jobs wait there until a test moves them on


@pytest.fixture
def redis(redis_server) -> Redis:
    return Redis(port=redis_server.port)


@pytest.fixture
def held(redis_server, tiny_model) -> RerankClient:
    """A client whose jobs stay on a queue nobody consumes."""
    return RerankClient(Settings(broker_url=redis_server.url, queue=HELD, model=str(tiny_model)))


def meta_key(task_id: str) -> str:
    return f"celery-task-meta-{task_id}"


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def failure(exc_type: Any, exc_message: Any = "boom", exc_module: Any = "builtins") -> bytes:
    return json.dumps({"status": "FAILURE", "result": {"exc_type": exc_type, "exc_message": exc_message, "exc_module": exc_module}}).encode()


def success(result: Any) -> bytes:
    return json.dumps({"status": "SUCCESS", "result": result, "traceback": None, "children": [], "task_id": "x"}).encode()


# C. Stored result values ------------------------------------------------------------------------

PWNED = Path(f"/tmp/rerank-hostile-{os.getpid()}")

STORED = {
    "not JSON": b"\x00\xffnot json",
    "not UTF-8": b'{"status": "\xff\xfe"}',
    "a JSON list": b"[1, 2, 3]",
    "a JSON string": b'"SUCCESS"',
    "a JSON number": b"12",
    "null": b"null",
    "an empty object": b"{}",
    "status is a number": b'{"status": 5, "result": null}',
    "status is a list": b'{"status": ["SUCCESS"], "result": null}',
    "an unknown status": b'{"status": "DONE-ISH", "result": null}',
    "nested past the interpreter": deep(100_000).encode(),
    "a result nested past the bound": success(json.loads(deep(MAX_DEPTH + 5))),
    "kombu's bytes hook in the result": success({"__type__": "bytes", "__value__": "aGVsbG8="}),
    "kombu's datetime hook as the result": success({"__type__": "datetime", "__value__": "2020-01-01T00:00:00"}),
    "kombu's uuid hook as the whole meta": b'{"__type__": "uuid", "__value__": "6f1e2c3a-0000-4000-8000-000000000000"}',
    "a success whose result is a string": success("all good"),
    "a success whose result is a foreign ranking": success({"stage": "chunks", "query": "q", "items": [], "scored": 0}),
    "a success with a NaN score": b'{"status": "SUCCESS", "result": {"documents": NaN}}',
    "an integer of 5000 digits": b'{"status": "SUCCESS", "result": ' + b"9" * 5000 + b"}",
    "a compressed payload (a decompression bomb)": b"\x00celery-compressed\x00application/x-gzip\x00" + b"\x1f\x8b" + b"\x00" * 64,
    "a failure without an error": b'{"status": "FAILURE", "result": "it broke"}',
    "a failure naming a function to run": failure("system", [f"touch {PWNED}"], "os"),
    "a failure naming eval": failure("eval", ["__import__('os').system('touch " + str(PWNED) + "')"], "builtins"),
    "a failure whose type is a list": failure(["InvalidRequest"]),
    "a failure whose message is an object": failure("InvalidRequest", {"a": {"b": 1}}, "contract.errors"),
    "a failure whose module is a number": failure("ValueError", "x", 7),
    "a retry without an error": b'{"status": "RETRY", "result": [1]}',
}


@pytest.mark.parametrize("raw", STORED.values(), ids=STORED.keys())
def test_a_hostile_stored_result_raises_a_typed_error_at_once(held, redis, raw: bytes):
    # Given a two-stage job whose result key someone overwrote with hostile bytes
    job = held.submit(QUERY, short_papers(3), top_k_docs=2)
    redis.set(meta_key(job.id), raw)
    # When the producer waits for it, follows its progress, or asks whether it is ready
    started = time.monotonic()
    with pytest.raises(RerankError) as caught:
        held.job(job.id).result(timeout=10)
    # Then it raises one of our errors at once, never an untyped one, never hanging until the timeout
    assert time.monotonic() - started < 5
    assert isinstance(caught.value, (WorkerError, InvalidRequest)), repr(caught.value)
    assert len(str(caught.value)) < 2000
    for follow in (lambda: held.job(job.id).progress(), lambda: held.job(job.id).ready()):
        try:
            follow()
        except RerankError:
            pass
    # And no stored value ever ran code here
    assert not PWNED.exists()
    redis.delete(HELD)


def test_a_stored_failure_of_ours_keeps_its_class_and_a_foreign_one_becomes_a_worker_error(held, redis):
    # Given two finished jobs: one a worker refused, one failing with a class from elsewhere
    refused, foreign = held.submit(QUERY, short_papers(2)), held.submit(QUERY, short_papers(2))
    redis.set(meta_key(refused.id), failure("InvalidRequest", ["query is empty; send one"], "contract.errors"))
    redis.set(meta_key(foreign.id), failure("SystemExit", [3], "builtins"))
    # Then ours comes back as InvalidRequest with its message, the foreign one as a WorkerError naming it
    with pytest.raises(InvalidRequest, match="query is empty; send one"):
        held.job(refused.id).result(timeout=5)
    with pytest.raises(WorkerError, match="SystemExit: 3"):
        held.job(foreign.id).result(timeout=5)
    redis.delete(HELD)


BATCHES = {
    "not JSON": b"\x00\xff",
    "nested past the interpreter": deep(100_000).encode(),
    "kombu's hooks as the members": json.dumps({"result": [["g", None], {"__type__": "bytes", "__value__": "aGk="}]}).encode(),
    "no result": b'{"jobs": []}',
    "members of the wrong shape": b'{"result": [["g", null], [1, 2]]}',
    "an empty batch": b'{"result": [["g", null], []]}',
    "a member id that is a list": b'{"result": [["g", null], [[[["x"], null], null]]]}',
    "a member id of 10 kB": json.dumps({"result": [["g", None], [[["x" * 10_000, None], None]]]}).encode(),
}


@pytest.mark.parametrize("raw", BATCHES.values(), ids=BATCHES.keys())
def test_a_hostile_stored_batch_raises_a_typed_error(held, redis, raw: bytes):
    # Given a batch id whose stored group someone overwrote
    batch = held.submit_many([{"query": QUERY, "candidates": short_papers(2)}] * 2)
    redis.set(f"celery-taskset-meta-{batch.id}", raw)
    # When another process follows the batch by its id, Then it gets WorkerError, nothing untyped
    with pytest.raises(WorkerError, match="stored batch"):
        held.batch(batch.id)
    redis.delete(HELD)


def test_a_stored_batch_reads_back_its_jobs(held, redis):
    batch = held.submit_many([{"query": QUERY, "candidates": short_papers(2)}] * 3)
    assert [job.id for job in held.batch(batch.id)] == [job.id for job in batch]
    redis.delete(HELD)


# B and C. Announcements ----------------------------------------------------------------------------


class Waiting:
    """`result()` of a handle, run in a thread: what it returned or raised."""

    def __init__(self, wait: Callable[[], Any]) -> None:
        self.outcome: Any = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(wait,), daemon=True)
        self._thread.start()

    def _run(self, wait: Callable[[], Any]) -> None:
        try:
            self.outcome = wait()
        except BaseException as e:  # noqa: BLE001 - the test inspects whatever it was
            self.outcome = e
        self.done.set()


@pytest.fixture
def low_pubsub_limit(redis) -> Iterator[int]:
    """Redis drops a subscriber once 64 kB wait in its output buffer (32 MB by default): large results are cheap to test."""
    before = redis.config_get("client-output-buffer-limit")["client-output-buffer-limit"]
    redis.config_set("client-output-buffer-limit", "pubsub 65536 65536 0")
    yield 65536
    redis.config_set("client-output-buffer-limit", before)


ANNOUNCEMENTS = {
    "not JSON": b"\x00\xffnot json",
    "nested past the interpreter": deep(200_000).encode(),
    "kombu's hooks": json.dumps({"status": "SUCCESS", "result": {"__type__": "bytes", "__value__": "aGk="}}).encode(),
    "a final state's head on garbage": b'{"status": "SUCCESS", ' + b"\xff" * 100,
    "a failure for the job": failure("InvalidRequest", ["forged"], "contract.errors"),
    "larger than the pub/sub buffer": b"x" * 300_000,
    "larger than the buffer, shaped as a result": success({"pad": "y" * 300_000}),
}


def test_only_an_announced_final_state_ends_a_pause_early(redis_settings, redis):
    from producer.backends import Announcements

    # Given a producer listening on a task's channel
    client = RerankClient(redis_settings)
    task_id = str(uuid.uuid4())
    watch = Announcements(client.app.backend, [task_id], redis_settings.broker_url)
    try:
        wait_for(lambda: redis.pubsub_numsub(meta_key(task_id))[0][1] >= 1, 10, "the subscription")
        # When progress, garbage and a forged head are announced, Then the pause runs its course
        for raw in (json.dumps({"status": "PROGRESS", "result": {"done": 1}}).encode(), b"\x00", b'{"result": 1, "status": "SUCCESS"}'):
            redis.publish(meta_key(task_id), raw)
        started = time.monotonic()
        watch.wait(0.5)
        assert time.monotonic() - started >= 0.45
        # When a final state is announced as Celery writes it, Then the pause ends at once
        threading.Timer(0.2, redis.publish, (meta_key(task_id), success({"x": 1}))).start()
        started = time.monotonic()
        watch.wait(10)
        assert time.monotonic() - started < 2
    finally:
        watch.close()


def test_hostile_announcements_are_ignored_and_the_stored_result_is_still_delivered(shared_worker, held, redis, low_pubsub_limit):
    # Given a job waiting on a queue nobody consumes, and a producer waiting for it in a thread
    handle = held.submit_documents(QUERY, short_papers(4, seed=3), top_k=2)
    waiting = Waiting(lambda: handle.result(timeout=60))
    wait_for(lambda: redis.pubsub_numsub(meta_key(handle.id))[0][1] >= 1, 10, "the producer to subscribe")
    # When a third party publishes each hostile message on the job's result channel, twice
    for raw in [*ANNOUNCEMENTS.values(), *ANNOUNCEMENTS.values()]:
        redis.publish(meta_key(handle.id), raw)
    # Then the producer keeps waiting: no error, no result made up from an announcement
    assert not waiting.done.wait(1.0), waiting.outcome
    # And once a worker runs the job, the producer gets the real result
    redis.rpoplpush(HELD, Settings(model=held.settings.model).queue)
    assert waiting.done.wait(30), "the result arrived"
    assert not isinstance(waiting.outcome, BaseException), repr(waiting.outcome)
    assert len(waiting.outcome.items) == 2 and waiting.outcome.info.worker.startswith("shared")


def test_results_within_the_default_limits_can_be_larger_than_pubsub_carries():
    from kombu.utils.json import dumps

    from contract.schemas import RankedItem

    # Given the largest items the default limits allow: 512-character ids of 4-byte characters, with logits
    settings = Settings()
    longest = "\U0001F600" * 512
    chunk = RankedItem(index=settings.max_chunks - 1, id=longest, doc_id=longest, score=0.123456789, logit=-12.3456789)
    paper = RankedItem(index=settings.max_candidates - 1, id=longest, score=0.123456789, logit=-12.3456789)
    # When a two-stage result keeps them all, encoded as the worker stores and announces it
    size = settings.max_chunks * len(dumps(chunk.model_dump(mode="json"))) + settings.max_candidates * len(dumps(paper.model_dump(mode="json")))
    # Then it passes Redis's 32 MB pub/sub limit (so the producer must read it stored), within the 512 MB a value may be
    assert 32 * 2**20 < size < 512 * 2**20, size


def test_after_a_dropped_subscription_the_producer_listens_again(shared_worker, held, redis, low_pubsub_limit):
    # Given a producer waiting for a held job, whose subscription one oversized message drops
    handle = held.submit_documents(QUERY, short_papers(3, seed=5), top_k=1)
    waiting = Waiting(lambda: handle.result(timeout=60))
    channel = meta_key(handle.id)
    wait_for(lambda: redis.pubsub_numsub(channel)[0][1] >= 1, 10, "the producer to subscribe")
    before = {c["id"] for c in redis.client_list(_type="pubsub")}
    redis.publish(channel, b"z" * (2 * low_pubsub_limit))
    # Then it subscribes again, on a new connection, without failing
    wait_for(lambda: {c["id"] for c in redis.client_list(_type="pubsub")} - before, 10, "a new subscriber connection")
    assert redis.pubsub_numsub(channel)[0][1] >= 1 and not waiting.done.is_set(), waiting.outcome
    # And it gets the result once a worker runs the job
    redis.rpoplpush(HELD, Settings(model=held.settings.model).queue)
    assert waiting.done.wait(30) and not isinstance(waiting.outcome, BaseException), repr(waiting.outcome)
    assert len(waiting.outcome.items) == 1


def test_a_result_larger_than_pubsub_carries_is_still_delivered(shared_worker, redis_settings, redis, low_pubsub_limit):
    # Given chunks whose ranking, with long ids, is far larger than the 64 kB pub/sub buffer
    client = RerankClient(redis_settings)
    chunks = [{"id": f"{'c' * 300}-{n}", "doc_id": f"{'d' * 300}-{n % 7}", "text": f"Apixaban dose {n} in kidney disease."} for n in range(400)]
    # When the producer waits for it (listening on the result's channel)
    started = time.monotonic()
    result = client.rerank_chunks(QUERY, chunks, timeout=60)
    # Then it gets the whole ranking instead of BrokerUnavailable, shortly after the worker stored it
    assert sorted(item.index for item in result.items) == list(range(400))
    assert all(item.id == chunks[item.index]["id"] for item in result.items)
    assert time.monotonic() - started < 30
    sizes = [redis.strlen(key) for key in redis.scan_iter("celery-task-meta-*", count=1000)]
    assert max(sizes) > 2 * low_pubsub_limit, "a stored result was larger than what pub/sub carries"


# A. Stage-2 integrity ----------------------------------------------------------------------------


def papers() -> list[dict[str, Any]]:
    return candidates(8)


def held_stage1(client: RerankClient, redis: Redis, **options: Any) -> tuple[RerankJob, dict[str, Any], list[Any]]:
    """Submit a two-stage job to the held queue; return its handle, its stage-1 envelope and decoded body."""
    job = client.submit(QUERY, papers(), top_k_docs=3, **options)
    envelope = json.loads(redis.rpop(HELD))
    return job, envelope, json.loads(base64.b64decode(envelope["body"]))


def send_to_worker(redis: Redis, envelope: dict[str, Any], body: list[Any], queue: str) -> None:
    """Push a (changed) stage-1 message onto the worker's queue, with stage 2 routed there too."""
    body[2]["chain"][-1]["options"]["queue"] = queue
    envelope = {**envelope, "body": base64.b64encode(json.dumps(body).encode()).decode()}
    envelope["properties"]["delivery_info"]["routing_key"] = queue
    redis.lpush(queue, json.dumps(envelope))


def as_sent_by_an_older_producer(client: RerankClient, request: dict[str, Any]) -> None:
    """Turn a stage-2 request naming its stored pool into the form producers before stored pools sent: every chunk, with digests."""
    pool = client.chunk_pool(client.validate({"query": QUERY, "candidates": papers()}).candidates)
    del request["pool"]
    request["chunks"] = [c.model_dump(mode="json") for c in pool]
    request["digests"] = [chunk_digest(c, n) for n, c in enumerate(pool)]


def _forge(name: str) -> Callable[[dict[str, Any]], None]:
    """Change a stage-2 request (the whole pool, with digests) the way a forger would, trimmed as older workers' stage 1 did."""

    def kept(request: dict[str, Any], docs: set[str]) -> list[int]:
        return [n for n, c in enumerate(request["chunks"]) if c["doc_id"] in docs]

    def trim(request: dict[str, Any], positions: list[int], chunks: list[int] | None = None) -> None:
        # Stage 1's trimming with a forger's positions: each chunk goes with the digest the producer gave it
        taken = positions if chunks is None else chunks
        request["chunks"] = [copy.deepcopy(request["chunks"][n]) for n in taken]
        request["digests"] = [request["digests"][n] for n in taken]
        request["positions"] = positions

    def apply(request: dict[str, Any]) -> None:
        pool = copy.deepcopy(request["chunks"])
        places = kept(request, {"p1", "p2"})
        other = kept(request, {"p5"})
        if name == "positions shifted by one":
            trim(request, [n + 1 for n in places], places)
        elif name == "chunks reordered":
            trim(request, places, list(reversed(places)))
        elif name == "a position out of range":
            trim(request, [*places[:-1], len(request["chunks"]) + 3], places)
        elif name == "a digest missing":
            trim(request, places, places)
            request["digests"] = request["digests"][:-1]
        elif name == "a position pointing at another paper's chunk":
            positions = sorted([*places[1:], other[0]])
            trim(request, positions, [places[0] if n == other[0] else n for n in positions])
        elif name == "a chunk's text swapped":
            trim(request, places)
            request["chunks"][0]["text"] = request["chunks"][1]["text"]
        elif name == "a chunk moved to another paper":
            trim(request, places)
            request["chunks"][0]["doc_id"] = "p2" if request["chunks"][0]["doc_id"] == "p1" else "p1"
        elif name == "positions without digests":
            trim(request, places)
            del request["digests"]
        elif name == "digests of another pool":
            trim(request, places)
            request["digests"] = [chunk_digest(Chunk.model_validate({**pool[n], "text": pool[n]["text"] + "!"}), n) for n in places]
        elif name == "a chunk sent twice at one position":
            trim(request, [places[0], places[0], *places[1:]], [places[0], places[0], *places[1:]])
        elif name == "two chunks at one position":
            trim(request, [places[0], places[0], *places[2:]], places)
        elif name == "a whole pool reordered, without positions":
            request["chunks"] = list(reversed(request["chunks"]))
        else:
            raise AssertionError(name)

    return apply


FORGERIES = [
    "positions shifted by one", "chunks reordered", "a position out of range", "a digest missing",
    "a position pointing at another paper's chunk", "a chunk's text swapped", "a chunk moved to another paper",
    "positions without digests", "digests of another pool", "a chunk sent twice at one position", "two chunks at one position", "a whole pool reordered, without positions",
]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_stage2_request_is_refused_and_the_worker_serves_on(shared_worker, held, redis, forgery: str):
    # Given a two-stage job's stage-1 message, whose stage-2 request a forger changed
    job, envelope, body = held_stage1(held, redis)
    request = body[2]["chain"][-1]["kwargs"]["request"]
    as_sent_by_an_older_producer(held, request)
    _forge(forgery)(request)
    # When it reaches a worker
    queue = Settings(model=held.settings.model).queue
    send_to_worker(redis, envelope, body, queue)
    # Then the job fails with InvalidRequest (no ranking of other chunks than the ones scored)
    with pytest.raises(InvalidRequest, match="digest|positions|pool|increasing|more than once"):
        held.job(job.id, papers()).result(timeout=30)
    # And the worker serves the next job at once
    assert RerankClient(Settings(broker_url=held.settings.broker_url, model=held.settings.model)).rerank_documents(
        QUERY, short_papers(2), top_k=1, timeout=10
    ).items


def ranked(client: RerankClient, redis: Redis) -> tuple[RerankJob, dict[str, Any]]:
    """Run a two-stage job on the worker; return its handle and its stored meta."""
    job = client.submit(QUERY, papers(), top_k_docs=3)
    job.result(timeout=30)
    return job, json.loads(redis.get(meta_key(job.id)))


def _tamper(name: str, result: dict[str, Any], pool: list[Any]) -> None:
    chunks, documents = result["chunks"]["items"], result["documents"]["items"]
    kept = {d["id"] for d in documents}
    if name == "an index shifted by one":
        chunks[0]["index"] += 1
    elif name == "every index shifted":
        for item in chunks:
            item["index"] = (item["index"] + 1) % len(pool)
    elif name == "an index past the pool":
        chunks[0]["index"] = len(pool) + 10
    elif name == "a negative index":
        chunks[0]["index"] = -1
    elif name == "a duplicated index":
        chunks[1]["index"] = chunks[0]["index"]
    elif name == "indexes swapped between papers":
        other = next(i for i in chunks if i["doc_id"] != chunks[0]["doc_id"])
        chunks[0]["index"], other["index"] = other["index"], chunks[0]["index"]
    elif name == "an index of an unkept paper's chunk":
        chunks[0]["index"] = next(n for n, c in enumerate(pool) if c.doc_id not in kept)
    elif name == "a doc_id changed":
        chunks[0]["doc_id"] = next(d for d in kept if d != chunks[0]["doc_id"])
    elif name == "a chunk of an unkept paper":
        n = next(n for n, c in enumerate(pool) if c.doc_id not in kept)
        chunks[0].update(index=n, id=pool[n].id, doc_id=pool[n].doc_id)
    elif name == "a stage-1 index moved":
        documents[0]["index"] = (documents[0]["index"] + 1) % 8
    elif name == "more items than scored":
        result["chunks"]["scored"] = len(chunks) - 1
    else:
        raise AssertionError(name)


TAMPERINGS = [
    "an index shifted by one", "every index shifted", "an index past the pool", "a negative index", "a duplicated index",
    "indexes swapped between papers", "an index of an unkept paper's chunk", "a doc_id changed", "a chunk of an unkept paper",
    "a stage-1 index moved", "more items than scored",
]


@pytest.fixture(scope="module")
def finished_job(shared_worker, redis_server, tiny_model) -> tuple[str, dict[str, Any]]:
    client = RerankClient(Settings(broker_url=redis_server.url, model=str(tiny_model)))
    job, meta = ranked(client, Redis(port=redis_server.port))
    return job.id, meta


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_a_ranking_whose_indexes_do_not_match_what_was_sent_raises_invalid_request(finished_job, redis_settings, redis, tampering: str):
    # Given a finished two-stage job whose stored ranking was altered (or came from a worker that checks nothing)
    job_id, meta = finished_job
    client = RerankClient(redis_settings)
    pool = client.chunk_pool(client.validate({"query": QUERY, "candidates": papers()}).candidates)
    altered = copy.deepcopy(meta)
    _tamper(tampering, altered["result"], pool)
    fake = str(uuid.uuid4())
    redis.set(meta_key(fake), json.dumps(altered))
    # When the producer that sent it reads it, with or without documents joined back
    # Then it raises InvalidRequest: never a ranking whose indexes name other inputs, never an IndexError
    with pytest.raises(InvalidRequest, match="does not match what was sent"):
        client.job(fake, papers()).result(timeout=5)
    original = client.submit(QUERY, papers(), top_k_docs=3, return_documents=True)
    with pytest.raises(InvalidRequest, match="does not match what was sent"):
        RerankJob(client.backend, fake, original.finish).result(timeout=5)
    with pytest.raises(InvalidRequest, match="does not match what was sent"):
        asyncio.run(AsyncRerankClient(redis_settings).job(fake, papers()).result(timeout=5))


SINGLE_STAGE = {
    "an index past the chunks": lambda items: items[0].update(index=9),
    "a duplicated index": lambda items: items[1].update(index=items[0]["index"]),
    "two indexes swapped": lambda items: (items[0].update(index=items[1]["index"]), items[1].update(index=items[0]["index"])),
    "an id that is not the chunk's": lambda items: items[0].update(id="c9"),
    "a doc_id that is not the chunk's": lambda items: items[0].update(doc_id="d9"),
}


@pytest.mark.parametrize("tamper", SINGLE_STAGE.values(), ids=SINGLE_STAGE.keys())
def test_a_single_stage_ranking_whose_indexes_do_not_match_raises_invalid_request(held, redis, tamper):
    # Given a chunks job and a stored ranking of its three chunks, altered
    chunks = [{"id": f"c{n}", "doc_id": f"d{n}", "text": f"text {n}"} for n in range(3)]
    handle = held.submit_chunks(QUERY, chunks, return_documents=True)
    items = [{"index": n, "id": f"c{n}", "doc_id": f"d{n}", "score": 0.5 - n / 10} for n in range(3)]
    info = {"model": held.settings.model, "device": "cpu", "dtype": "float32", "max_length": 512, "pairs": 3, "tokens": 9,
            "padded_tokens": 9, "batches": 1, "tokenize_ms": 1.0, "forward_ms": 1.0, "pid": 1, "model_loads": 1}
    tamper(items)
    redis.set(meta_key(handle.id), success({"stage": "chunks", "query": QUERY, "items": items, "scored": 3, "info": info}))
    # When the producer that sent it reads it, Then it raises InvalidRequest, never joining another chunk's text
    with pytest.raises(InvalidRequest, match="does not match what was sent"):
        handle.result(timeout=5)
    redis.delete(HELD)


def test_the_untouched_ranking_reads_back_with_the_right_documents(finished_job, redis_settings):
    # Given the same finished job, unaltered
    job_id, _ = finished_job
    client = RerankClient(redis_settings)
    # Then every item's document is the chunk at its index, of a paper stage 1 kept
    result = client.job(job_id, papers()).result(timeout=5)
    pool = client.chunk_pool(client.validate({"query": QUERY, "candidates": papers()}).candidates)
    kept = {d.id for d in result.documents.items}
    assert result.chunks.items and all(item.document == pool[item.index] and item.doc_id in kept for item in result.chunks.items)


# D. The queue exporter ------------------------------------------------------------------------------

HOSTILE_TAILS = {
    "nested past the interpreter": deep(200_000).encode(),
    "nested past the bound": json.dumps({"headers": json.loads(deep(MAX_DEPTH + 3))}).encode(),
    "kombu's datetime hook as the stamp": b'{"headers": {"rerank_sent_at": {"__type__": "datetime", "__value__": "2020-01-01T00:00:00"}}}',
    "not JSON": b"\x00\xff",
    "a JSON list": b"[1, 2]",
    "headers a string": b'{"headers": "x"}',
    "a stamp that is Infinity": b'{"headers": {"rerank_sent_at": Infinity}}',
    "a stamp that is NaN": b'{"headers": {"rerank_sent_at": NaN}}',
    "a stamp of 5000 digits": b'{"headers": {"rerank_sent_at": ' + b"9" * 5000 + b"}}",
}


def test_hostile_items_at_a_queues_tail_leave_every_scrape_answering(redis_server, redis):
    from tests.test_metrics import scrape, value

    # Given `rerank metrics` watching a model's queues, one of which holds a job, and a priority list that is a string
    model = "org/hostile-tails"
    queues = default_queues(Settings(broker_url=redis_server.url, model=model))
    redis.rpush(queues[0], json.dumps({"headers": {"rerank_sent_at": time.time() - 100}}))
    redis.set(f"{queues[1]}\x06\x163", b"a string where a priority list belongs")
    port = free_port()
    env = {**os.environ, "RERANK_BROKER_URL": redis_server.url, "RERANK_MODEL": model}
    exporter = subprocess.Popen([sys.executable, "-m", "producer.cli", "metrics", "--port", str(port)], env=env, stderr=subprocess.PIPE)
    try:
        first = wait_for(lambda: _try(lambda: scrape(port)), 30, "the exporter to serve")
        assert value(first, "rerank_queue_oldest_message_age_seconds", queue=queues[0]) >= 100
        for depth, tail in enumerate(HOSTILE_TAILS.values(), start=2):
            # When each hostile item in turn becomes the oldest of the queue, and the exporter is scraped
            # (the page is built at most once a second) until the depth shows it, and once more
            redis.rpush(queues[0], tail)
            fresh = wait_for(lambda: _showing(scrape(port), queues[0], depth), 10, "a page showing the new depth")
            for samples in (fresh, scrape(port)):
                # Then every scrape answers, with the broker up and the depth; the age is unknown, not made up
                assert value(samples, "rerank_broker_up") == 1
                assert value(samples, "rerank_queue_messages", queue=queues[0]) == depth
                assert ("rerank_queue_oldest_message_age_seconds", (("queue", queues[0]),)) not in samples
    finally:
        exporter.terminate()
        _, errors = exporter.communicate(timeout=30)
        redis.delete(*queues, f"{queues[1]}\x06\x163")
    # And each distinct reason a tail is unreadable was logged once, not once a scrape
    reasons = set()
    for tail in HOSTILE_TAILS.values():
        try:
            plain_json(tail, "x")
        except InvalidRequest as e:
            reasons.add(str(e))
    log = errors.decode(errors="replace")
    assert len(reasons) >= 4 and log.count(f"the oldest item of {queues[0]} ") == len(reasons), log[-3000:]


def _showing(samples: Any, queue: str, depth: int) -> Any:
    from tests.test_metrics import value

    return samples if value(samples, "rerank_queue_messages", queue=queue) == depth else None


def _try(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except OSError:
        return None
