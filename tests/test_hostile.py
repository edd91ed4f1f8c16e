"""A hostile queue: whatever anyone with write access to Redis puts on it, the worker refuses it,
says why where it can, and keeps serving. Every case is sent as raw bytes, bypassing Celery."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from contract.names import TASK_CHUNKS, TASK_DOCUMENTS
from producer import InvalidRequest, RerankClient, RerankResult, Settings
from producer.jobs import Finish, Handle
from tests.helpers import (
    QUERY,
    RedisServer,
    WorkerFleet,
    WorkerProcess,
    children,
    long_papers,
    report,
    short_papers,
    started,
    wait_for,
)
from worker.report import rss_mb

pytestmark = pytest.mark.integration

QUEUE = "hostile"
VALID = {"query": QUERY, "candidates": short_papers(2)}
VALID_CHUNKS = {"query": QUERY, "chunks": [{"id": "c1", "doc_id": "d1", "title": "t", "text": "Apixaban reduced bleeding."}]}
BUILTINS = [
    "celery.chord_unlock", "celery.map", "celery.starmap", "celery.chunks", "celery.group",
    "celery.chain", "celery.accumulate", "celery.backend_cleanup", "celery.ping",
]


def headers(task: Any = TASK_DOCUMENTS, task_id: Any = None, **extra: Any) -> dict[str, Any]:
    """Protocol-2 headers as Celery's producer writes them, with `extra` over them."""
    return {
        "lang": "py", "task": task, "id": str(uuid.uuid4()) if task_id is None else task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": None,
        "parent_id": None, "argsrepr": "", "kwargsrepr": "", "origin": "hostile@test", "ignore_result": None, **extra,
    }


def body(args: Any = (VALID,), kwargs: Any = None, embed: Any = None) -> Any:
    """A protocol-2 body: [args, kwargs, embed]."""
    return [list(args), kwargs or {}, embed or {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


@dataclass(frozen=True)
class Hostile:
    """One message as raw Redis bytes, and whether its task must fail with InvalidRequest (its id is usable)."""

    name: str
    headers: Any = field(default_factory=headers)
    body: Any = field(default_factory=body)
    envelope: bytes | None = None  # raw bytes pushed instead of a kombu envelope

    @property
    def task_id(self) -> str | None:
        value = self.headers.get("id") if isinstance(self.headers, dict) and self.envelope is None else None
        return value if isinstance(value, str) and 0 < len(value) <= 255 else None

    def raw(self) -> bytes:
        if self.envelope is not None:
            return self.envelope
        encoded = base64.b64encode(json.dumps(self.body).encode()).decode()
        return json.dumps({
            "body": encoded, "content-encoding": "utf-8", "content-type": "application/json", "headers": self.headers,
            "properties": {
                "correlation_id": self.task_id or "x", "reply_to": "x", "delivery_mode": 2, "priority": 0,
                "delivery_info": {"exchange": "", "routing_key": QUEUE}, "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }).encode()


def chain_of(*tasks: str) -> dict[str, Any]:
    steps = [{"task": t, "args": [], "kwargs": {"request": VALID_CHUNKS}, "options": {"task_id": str(uuid.uuid4())}, "subtask_type": None, "immutable": False} for t in tasks]
    return {"callbacks": None, "errbacks": None, "chain": steps, "chord": None}


def with_raw_body(raw_body: bytes, task_headers: dict[str, Any] | None = None) -> bytes:
    """An envelope as Celery writes it, around body bytes that json.dumps could not produce."""
    return json.dumps({
        "body": base64.b64encode(raw_body).decode(), "content-encoding": "utf-8", "content-type": "application/json",
        "headers": task_headers or headers(), "properties": {
            "delivery_mode": 2, "priority": 0, "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }).encode()


DEEP = b"[" * 100_000 + b"]" * 100_000

CASES = [
    # Protocol headers a consumer parses before any task code runs
    Hostile("task header but no id", {k: v for k, v in headers().items() if k != "id"}),
    Hostile("id is a list", headers(task_id=["a", "b"])),
    Hostile("id is a dict", headers(task_id={"a": 1})),
    Hostile("id is a number", headers(task_id=12345)),
    Hostile("id is empty", headers(task_id="")),
    Hostile("id is 10 kB long", headers(task_id="x" * 10_000)),
    Hostile("task is a list", headers(task=[TASK_DOCUMENTS])),
    Hostile("task is a dict", headers(task={"name": TASK_DOCUMENTS})),
    Hostile("task is null", headers(task=None)),
    Hostile("timelimit is a string", headers(timelimit="soon")),
    Hostile("timelimit holds strings", headers(timelimit=["1", "2"])),
    Hostile("timelimit is a dict", headers(timelimit={"soft": 1})),
    Hostile("timelimit is negative", headers(timelimit=[-5, -1])),
    Hostile("eta is not a date", headers(eta="tomorrow-ish")),
    Hostile("eta is a number", headers(eta=12)),
    Hostile("expires is a list", headers(expires=[1])),
    Hostile("retries is a string", headers(retries="many")),
    Hostile("shadow is a dict", headers(shadow={"a": 1})),
    Hostile("root_id is a list", headers(root_id=[1])),
    Hostile("headers are a list", ["task", TASK_DOCUMENTS]),
    Hostile("no task header (protocol 1 style)", {"id": str(uuid.uuid4())}, {"task": TASK_DOCUMENTS, "id": "x", "args": [VALID], "kwargs": {}}),
    # Celery's own tasks, which every worker registers
    *[Hostile(f"builtin {name}", headers(task=name), body(args=())) for name in BUILTINS],
    Hostile("an unknown task", headers(task="rerank.everything")),
    # Delays: a message held until its eta stays unacknowledged and comes back every visibility timeout
    Hostile("eta 100 s ahead", headers(eta="2099-01-01T00:00:00+00:00")),
    # Bodies that are not [args, kwargs, embed]
    Hostile("body is an object", body={"args": [VALID]}),
    Hostile("body is a string", body="score this"),
    Hostile("body has two parts", body=[[VALID], {}]),
    Hostile("args are an object", body=[{"request": VALID}, {}, {}]),
    Hostile("kwargs are a list", body=[[VALID], [1], {}]),
    Hostile("embed is a list", body=[[VALID], {}, [1]]),
    # Follow-up work smuggled in the embed: only stage 1 may name stage 2, once
    Hostile("a chain of three stage-2 tasks", body=body(embed=chain_of(TASK_CHUNKS, TASK_CHUNKS, TASK_CHUNKS))),
    Hostile("a chain naming a builtin", body=body(embed=chain_of("celery.chord_unlock"))),
    Hostile("a chain on stage 2", headers(task=TASK_CHUNKS), body(args=(), kwargs={"request": VALID_CHUNKS}, embed=chain_of(TASK_CHUNKS))),
    Hostile("callbacks", body=body(embed={"callbacks": [{"task": "celery.ping"}], "errbacks": None, "chain": None, "chord": None})),
    Hostile("errbacks", body=body(embed={"callbacks": None, "errbacks": [{"task": "celery.ping"}], "chain": None, "chord": None})),
    Hostile("a chord", body=body(embed={"callbacks": None, "errbacks": None, "chain": None, "chord": {"task": "celery.ping"}})),
    # Envelopes kombu itself must read
    Hostile("envelope is not JSON", envelope=b"\x00\xffnot json at all"),
    Hostile("envelope is a JSON list", envelope=b"[1, 2, 3]"),
    Hostile("envelope without properties", envelope=json.dumps({"body": "", "headers": headers()}).encode()),
    Hostile("envelope headers are a list", envelope=json.dumps({"body": "", "headers": [1], "properties": {"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": QUEUE}}}).encode()),
    Hostile("envelope is not UTF-8", envelope=b'{"body": "\xff\xfe"}'),
    Hostile("a compressed body (a decompression bomb)", headers(compression="application/x-gzip")),
    # What kombu's JSON decoder turns into something other than plain data, and nesting past any decoder
    Hostile("envelope is kombu's decimal hook", envelope=b'{"__type__": "decimal", "__value__": "not a number"}'),
    Hostile("envelope properties are kombu's bytes hook", envelope=json.dumps({"body": "", "headers": headers(), "properties": {"__type__": "bytes", "__value__": "eA=="}}).encode()),
    Hostile("envelope nested 100,000 deep", envelope=DEEP),
    Hostile("envelope headers nested 40 deep", envelope=json.dumps({"body": "", "headers": json.loads("[" * 40 + "]" * 40), "properties": {}}).encode()),
    Hostile("envelope priority is a string", envelope=json.dumps({"body": "", "headers": headers(), "properties": {"priority": "high", "delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": QUEUE}}}).encode()),
    Hostile("body nested 100,000 deep", envelope=with_raw_body(DEEP)),
    Hostile("body is kombu's decimal hook", envelope=with_raw_body(b'[[{"__type__": "decimal", "__value__": "x"}], {}, {}]')),
    Hostile("body query is kombu's bytes hook", body=body(args=({"query": {"__type__": "bytes", "__value__": "eA=="}, "candidates": short_papers(2)},))),
    Hostile("body candidates hold kombu's datetime hook", body=body(args=({"query": QUERY, "candidates": [{"__type__": "datetime", "__value__": "2020-01-01T00:00:00"}]},))),
    Hostile("body nested 40 deep in kwargs", body=[[VALID], {"x": json.loads("[" * 40 + "]" * 40)}, {}]),
    Hostile("envelope body is not base64", envelope=json.dumps({"body": "%%%", "content-type": "application/json", "content-encoding": "utf-8", "headers": headers(), "properties": {"body_encoding": "base64", "delivery_tag": "t1", "delivery_info": {"exchange": "", "routing_key": QUEUE}}}).encode()),
]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[tuple[WorkerProcess, RerankClient, Redis]]:
    """One worker on a Redis of its own, consuming the hostile queue."""
    redis_server = RedisServer(tmp_path_factory.mktemp("hostile-redis"))
    redis_server.start("--appendonly", "no")
    fleet = WorkerFleet(tmp_path_factory.mktemp("hostile"), tiny_model, redis_server.url)
    worker = fleet.start("-Q", QUEUE, name="hostile")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=redis_server.url, queue=QUEUE, model=str(tiny_model)))
    try:
        yield worker, client, Redis(port=redis_server.port)
    finally:
        fleet.stop_all()
        redis_server.stop()


def test_the_corpus_covers_every_class_with_variants():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hostile_message_is_dropped_and_the_worker_serves_the_next_job_within_5_s(hostile, case: Hostile):
    worker, client, redis = hostile
    received_before = worker.output().count("] received")
    # When the message is pushed onto the queue as raw bytes
    redis.lpush(QUEUE, case.raw())
    # Then a valid job sent after it is served within 5 s
    result = client.rerank_documents(QUERY, short_papers(3, seed=7), top_k=2, timeout=5)
    assert len(result.items) == 2 and result.info.worker.startswith("hostile")
    # And the hostile message is gone for good: nothing queued, nothing waiting to be restored
    wait_for(lambda: redis.llen(QUEUE) == 0 and redis.hlen("unacked") == 0, 5, "the queue and the unacked set to empty")
    # And it ran no task: the only task received since is the valid job
    assert worker.output().count("] received") - received_before == 1, worker.output()[-3000:]
    # And where it carried a usable id, whoever waits on that id learns why at once
    if case.task_id is not None:
        with pytest.raises(InvalidRequest, match="dropped"):
            Handle(client.backend, case.task_id, Finish(RerankResult)).result(timeout=5)
    assert worker.process.poll() is None, "the worker is still running"



def rejected_messages_leave_memory_flat(start_worker, redis_server, tiny_model, count: int) -> None:
    """Send `count` 60 MB messages the worker must reject; its pool process must not grow past the first few."""
    worker = start_worker("-Q", "hostile-big", name="big")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=redis_server.url, queue="hostile-big", model=str(tiny_model)))
    (child,) = children(worker.process.pid)
    oversized = {"query": QUERY, "candidates": [{"id": "x", "title": "t", "text": "a" * 60_000_000}]}
    sizes = []
    for _ in range(count):
        task = client.app.send_task(TASK_DOCUMENTS, args=(oversized,), queue="hostile-big")
        with pytest.raises(InvalidRequest, match="RERANK_MAX_TEXT_CHARS"):
            Handle(client.backend, task.id, Finish(RerankResult)).result(timeout=60)
        sizes.append(rss_mb(child))
    report("rejected 60 MB messages", count=count, rss_mb_first=sizes[0], rss_mb_last=sizes[-1], rss_mb_max=max(sizes))
    # The last rejected request is still in memory (the next task collects it), and the allocator
    # keeps the room of one more; from the second message on, memory stays flat
    assert max(sizes[1:]) - sizes[1] <= 50, sizes
    assert worker.process.poll() is None and len(client.rerank_documents(QUERY, short_papers(2), top_k=1, timeout=10).items) == 1


def test_rejected_60_mb_messages_leave_memory_flat(start_worker, redis_server, tiny_model):
    rejected_messages_leave_memory_flat(start_worker, redis_server, tiny_model, count=4)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_hundred_rejected_60_mb_messages_leave_memory_flat(start_worker, redis_server, tiny_model):
    rejected_messages_leave_memory_flat(start_worker, redis_server, tiny_model, count=100)


def test_no_remote_control_command_stops_throttles_or_reshapes_the_worker(hostile):
    worker, client, redis = hostile
    name = client.rerank_documents(QUERY, short_papers(2), top_k=1, timeout=5).info.worker
    # Given a slow job running on the worker
    running = client.submit_documents(QUERY, long_papers(600), top_k=2)
    wait_for(lambda: started(client, running.id), 30, "the slow job to start")
    control = client.app.control
    # When every command that could stop, throttle or reshape it is broadcast
    control.revoke(running.id, terminate=True, signal="SIGKILL")
    control.shutdown(destination=[name])
    control.broadcast("terminate", arguments={"signal": "SIGKILL", "task_id": running.id}, destination=[name])
    control.cancel_consumer(QUEUE, destination=[name])
    control.rate_limit(TASK_DOCUMENTS, "1/h", destination=[name])
    control.time_limit(TASK_DOCUMENTS, soft=1, hard=1, destination=[name])
    control.pool_grow(8, destination=[name])
    control.pool_shrink(1, destination=[name])
    control.autoscale(8, 1, destination=[name])
    # Then the running job was not killed, the worker still serves at its speed, with one pool process
    assert worker.process.poll() is None
    assert len(client.rerank_documents(QUERY, short_papers(3, seed=9), top_k=2, timeout=5).items) == 2
    assert len(children(worker.process.pid)) == 1
    assert "refused to terminate" in worker.output()
    assert worker.output().count("model loaded:") == 1
    assert len(running.result(timeout=60).items) == 2
