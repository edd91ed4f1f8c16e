"""Malformed and hostile requests: each gets a typed error with a clear message, nothing breaks.

The producer refuses what it can before anything is queued. Messages that bypass the producer
(sent straight to the queue) meet the same validation in the worker and fail without retry; what
cannot even be decoded is logged and dropped. Afterwards the worker still serves correct results.
"""

from __future__ import annotations

import json
import pickle
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from contract.names import TASK_CHUNKS, TASK_DOCUMENTS
from producer import InvalidRequest, RerankClient, RerankResult, Settings
from producer.jobs import Finish, Handle
from tests.helpers import CORPUS, QUERY, wait_for

OK = {"id": "ok", "title": "Apixaban in CKD", "text": "Apixaban reduced major bleeding in dialysis patients."}
OK_CHUNK = {"id": "c1", "doc_id": "ok", "title": "Apixaban in CKD", "text": "Apixaban reduced bleeding."}
TEN_MB = "a" * 10_000_000


def paper(i: int, **fields: Any) -> dict[str, Any]:
    return {"id": f"p{i}", "title": CORPUS[i % len(CORPUS)], "text": CORPUS[(i + 1) % len(CORPUS)], **fields}


def nested(depth: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(depth):
        node["k"] = {}
        node = node["k"]
    return root


@dataclass(frozen=True)
class Bad:
    """A hostile call on the client and the message its InvalidRequest must carry."""

    name: str
    call: Callable[[RerankClient], Any]
    message: str


def docs(query: Any = QUERY, candidates: Any = None, **options: Any) -> Callable[[RerankClient], Any]:
    return lambda client: client.submit(query, [OK] if candidates is None else candidates, **options)


def with_field(**fields: Any) -> Callable[[RerankClient], Any]:
    return docs(candidates=[{**OK, **fields}])


PRODUCER_CORPUS = [
    Bad("empty query", docs(""), r"query: String should have at least 1 character"),
    Bad("whitespace query", docs(" \t\n "), r"query: String should have at least 1 character"),
    Bad("query is None", docs(None), r"query: Input should be a valid string"),
    Bad("query is a number", docs(42), r"query: Input should be a valid string"),
    Bad("query is a list", docs(["apixaban"]), r"query: Input should be a valid string"),
    Bad("query over the limit", docs("q" * 2001), r"query has 2001 characters, over the limit of 2000 \(RERANK_MAX_QUERY_CHARS\)"),
    Bad("10 MB query", docs(TEN_MB), r"query has 10000000 characters, over the limit"),
    Bad("no candidates", docs(candidates=[]), r"candidates: List should have at least 1 item"),
    Bad("candidates is None", lambda c: c.submit(QUERY, None), r"candidates: Input should be a valid list"),
    Bad("candidates is a string", docs(candidates="abc"), r"candidates: Input should be a valid list"),
    Bad("100,000 candidates", docs(candidates=[paper(i) for i in range(100_000)]), r"100000 candidates, over the limit of 1000 \(RERANK_MAX_CANDIDATES\)"),
    Bad("10 MB text", with_field(text=TEN_MB), r"'ok' has a field of 10000000 characters, over the limit of 100000 \(RERANK_MAX_TEXT_CHARS\)"),
    Bad("10 MB title", with_field(title=TEN_MB), r"over the limit of 100000 \(RERANK_MAX_TEXT_CHARS\)"),
    Bad("missing id", docs(candidates=[{"title": "t", "text": "x"}]), r"candidates.0.id: Field required"),
    Bad("empty id", with_field(id="  "), r"candidates.0.id: String should have at least 1 character"),
    Bad("id over 512 characters", with_field(id="i" * 513), r"candidates.0.id: String should have at most 512 characters"),
    Bad("id is a number", with_field(id=7), r"candidates.0.id: Input should be a valid string"),
    Bad("no title and no text", with_field(title=" ", text=""), r"candidate 'ok' has neither a title nor a text"),
    Bad("extra field", with_field(score=0.9), r"candidates.0.score: Extra inputs are not permitted"),
    Bad("title is a dict", with_field(title={"en": "x"}), r"candidates.0.title: Input should be a valid string"),
    Bad("candidate is a list", docs(candidates=[["ok", "title", "text"]]), r"candidates.0: Input should be a valid dictionary"),
    Bad("duplicate ids", docs(candidates=[OK, OK]), r"id 'ok' appears more than once; ids must be unique"),
    Bad("chunk without text", with_field(chunks=[{"section": "Results"}]), r"chunks.0.text: Field required"),
    Bad("chunk with extra field", with_field(chunks=[{"text": "x", "page": 3}]), r"chunks.0.page: Extra inputs are not permitted"),
    Bad("chunks is a string", with_field(chunks="x"), r"chunks: Input should be a valid list"),
    Bad("metadata is a list", with_field(metadata=[1, 2]), r"metadata: Input should be a valid dictionary"),
    Bad("deeply nested metadata", with_field(metadata=nested(100_000)), r"metadata of 'ok' nests deeper than 32 levels"),
    Bad("infinite metadata", with_field(metadata={"score": [1.0, float("inf")]}), r"metadata of 'ok' holds inf, which JSON has no number for"),
    Bad("NaN metadata", with_field(metadata={"a": {"b": float("nan")}}), r"metadata of 'ok' holds nan, which JSON has no number for"),
    Bad("top_k_docs zero", docs(top_k_docs=0), r"top_k_docs: Input should be greater than or equal to 1"),
    Bad("top_k_docs negative", docs(top_k_docs=-5), r"top_k_docs: Input should be greater than or equal to 1"),
    Bad("top_k_docs NaN", docs(top_k_docs=float("nan")), r"top_k_docs: Input should be a valid integer"),
    Bad("top_k_docs infinite", docs(top_k_docs=float("inf")), r"top_k_docs: Input should be a valid integer"),
    Bad("top_k_docs huge", docs(top_k_docs=10**30), r"top_k=10{30} is over 1,000,000, more items than any request may hold"),
    Bad("top_k_docs fractional", docs(top_k_docs=2.5), r"top_k_docs: Input should be a valid integer"),
    Bad("top_k_docs a word", docs(top_k_docs="ten"), r"top_k_docs: Input should be a valid integer"),
    Bad("top_k_docs a bool", docs(top_k_docs=True), r"top_k_docs: Input should be a valid integer"),
    Bad("top_k_chunks negative", docs(top_k_chunks=-1), r"top_k_chunks: Input should be greater than or equal to 1"),
    Bad("min_score above 1", docs(min_score=1.5), r"min_score: Input should be less than or equal to 1"),
    Bad("min_score NaN", docs(min_score=float("nan")), r"min_score: Input should be a finite number|min_score"),
    Bad("windows out of range", docs(windows=33), r"windows: Input should be less than or equal to 32"),
    Bad("NUL in the query", docs("apixaban\x00; DROP TABLE"), r"query contains a control character U\+0000 at position 8"),
    Bad("escape sequence in a title", with_field(title="\x1b[31mred\x1b[0m"), r"title of 'ok' contains a control character U\+001B at position 0"),
    Bad("form feed in a text", with_field(text="page one\x0cpage two"), r"text of 'ok' contains a control character U\+000C"),
    Bad("control character in an id", with_field(id="ok\x07"), r"id of 'ok\\x07' contains a control character U\+0007"),
    Bad("lone surrogate in a text", with_field(text="broken \ud800 text"), r"text of 'ok' contains a lone surrogate U\+D800"),
    Bad("invalid UTF-8 bytes as text", with_field(text=b"caf\xc3\x28 \xff"), r"candidates.0.text: Input should be a valid string, unable to parse raw data as a unicode string"),
    Bad("invalid UTF-8 bytes as query", docs(b"\xff\xfe"), r"query: Input should be a valid string, unable to parse raw data"),
    Bad("chunks: missing doc_id", lambda c: c.submit_chunks(QUERY, [{"id": "c", "text": "x"}]), r"chunks.0.doc_id: Field required"),
    Bad("chunks: duplicate ids", lambda c: c.submit_chunks(QUERY, [OK_CHUNK, OK_CHUNK]), r"id 'c1' appears more than once"),
    Bad("chunks: none", lambda c: c.submit_chunks(QUERY, []), r"chunks: List should have at least 1 item"),
    Bad("chunks: huge top_k", lambda c: c.submit_chunks(QUERY, [OK_CHUNK], top_k=10**9), r"top_k=1000000000 is over 1,000,000"),
    Bad("batch: empty", lambda c: c.submit_many([]), r"submit_many needs at least one request"),
    Bad("batch: unknown field", lambda c: c.submit_many([{"query": QUERY, "candidates": [OK], "temperature": 0.2}]), r"request 0: .*temperature.*Extra inputs are not permitted"),
    Bad("batch: one bad request of two", lambda c: c.submit_many([{"query": QUERY, "candidates": [OK]}, {"query": "", "candidates": [OK]}]), r"request 1: "),
]


@pytest.fixture
def producer(redis_server, tiny_model) -> RerankClient:
    """A client on a queue no worker consumes: anything that got queued would stay there."""
    return RerankClient(Settings(broker_url=redis_server.url, queue="never-consumed", model=str(tiny_model)))


def queued(client: RerankClient) -> int:
    with client.app.connection_for_write() as connection:
        return connection.default_channel.client.llen(client.settings.queue)


def test_the_corpus_is_big_enough():
    assert len(PRODUCER_CORPUS) + len(WORKER_CORPUS) >= 40
    names = [getattr(bad, "values", (bad,))[0].name for bad in PRODUCER_CORPUS]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("bad", PRODUCER_CORPUS, ids=lambda bad: bad.name)
def test_the_producer_refuses_bad_input_before_queueing(bad: Bad, producer: RerankClient):
    # Given a hostile request, When the client is asked to send it
    with pytest.raises(InvalidRequest) as caught:
        bad.call(producer)
    # Then the error is typed, names the problem, is short enough to read, and nothing was queued
    # (pydantic's multi-line report, which the client passes on for two-stage requests, is read as one line)
    message = re.sub(r"\n\s*", ": ", str(caught.value))
    assert re.search(bad.message, message), message[:500]
    assert len(message) < 1000, "a 10 MB input must not be echoed back"
    assert queued(producer) == 0


# Messages that bypass the producer. `args`/`kwargs` are sent as the task's arguments with JSON.
@dataclass(frozen=True)
class Raw:
    """A message sent straight to the queue and the InvalidRequest the worker must answer with."""

    name: str
    task: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    message: str


VALID = {"query": QUERY, "candidates": [OK]}
VALID_CHUNKS = {"query": QUERY, "chunks": [OK_CHUNK]}
CHAINED = {**VALID_CHUNKS, "candidate_ids": ["ok", "other"]}
INFO = {"model": "m", "device": "cpu", "dtype": "float32", "max_length": 512, "pairs": 2, "tokens": 9, "padded_tokens": 9,
        "batches": 1, "tokenize_ms": 1.0, "forward_ms": 1.0, "pid": 1, "model_loads": 1}


def stage1(*items: tuple[int, str], scored: int = 2, query: str = QUERY) -> dict[str, Any]:
    """A stage-1 result as a forger would write it: (index, id) items."""
    return {"stage": "documents", "query": query, "items": [{"index": i, "id": d, "score": 0.5} for i, d in items], "scored": scored, "info": INFO}


FORGED_STAGE1 = r"stage 2 received a stage-1 result that does not belong to its request"
WORKER_CORPUS = [
    Raw("no arguments", TASK_DOCUMENTS, (), {}, r"rerank.documents takes \(request\), but the message had 0 positional and \[\] keyword arguments: missing a required argument: 'request'"),
    Raw("an extra positional argument", TASK_DOCUMENTS, (VALID, "extra"), {}, r"too many positional arguments"),
    Raw("an unknown keyword argument", TASK_DOCUMENTS, (), {"request": VALID, "temperature": 0.2}, r"unexpected keyword argument 'temperature'"),
    Raw("stage 2 without its request", TASK_CHUNKS, (None,), {}, r"missing a required argument: 'request'"),
    Raw("request is a string", TASK_DOCUMENTS, ("score these please",), {}, r"expected a JSON object, got str"),
    Raw("request is null", TASK_DOCUMENTS, (None,), {}, r"expected a JSON object, got NoneType"),
    Raw("request is a list", TASK_DOCUMENTS, ([QUERY, [OK]],), {}, r"expected a JSON object, got list"),
    Raw("missing query", TASK_DOCUMENTS, ({"candidates": [OK]},), {}, r"query: Field required"),
    Raw("unknown request field", TASK_DOCUMENTS, ({**VALID, "priority": 9},), {}, r"priority: Extra inputs are not permitted"),
    Raw("over the worker's candidate limit", TASK_DOCUMENTS, ({"query": QUERY, "candidates": [paper(i) for i in range(1001)]},), {}, r"1001 candidates, over the limit of 1000"),
    Raw("NaN top_k", TASK_DOCUMENTS, ({**VALID, "top_k": float("nan")},), {}, r"its body is not JSON"),
    Raw("control character", TASK_DOCUMENTS, ({**VALID, "query": "q\x00"},), {}, r"query contains a control character U\+0000"),
    Raw("lone surrogate", TASK_CHUNKS, (), {"request": {"query": QUERY, "chunks": [{**OK_CHUNK, "text": "\udfff"}]}}, r"lone surrogate U\+DFFF|lone \w+ surrogate|unable to parse raw data as a unicode string"),
    Raw("stage 1 result forged", TASK_CHUNKS, ({"stage": "documents", "items": "all"},), {"request": VALID_CHUNKS}, r"stage 2 received something other than a stage-1 result"),
    Raw("stage 1 result without candidate ids", TASK_CHUNKS, (stage1((0, "ok")),), {"request": VALID_CHUNKS}, r"must list the candidate_ids"),
    Raw("stage 1 result with an id never sent", TASK_CHUNKS, (stage1((0, "stranger")),), {"request": CHAINED}, FORGED_STAGE1 + r": item 'stranger' at index 0"),
    Raw("stage 1 result with index 999", TASK_CHUNKS, (stage1((999, "ok")),), {"request": CHAINED}, FORGED_STAGE1 + r": item 'ok' at index 999"),
    Raw("stage 1 result with index -1", TASK_CHUNKS, (stage1((-1, "other")),), {"request": CHAINED}, FORGED_STAGE1 + r": item 'other' at index -1"),
    Raw("stage 1 result with a swapped index", TASK_CHUNKS, (stage1((1, "ok")),), {"request": CHAINED}, FORGED_STAGE1 + r": item 'ok' at index 1"),
    Raw("stage 1 result listing a paper twice", TASK_CHUNKS, (stage1((0, "ok"), (0, "ok")),), {"request": CHAINED}, FORGED_STAGE1 + r": it lists a candidate more than once"),
    Raw("stage 1 result of another query", TASK_CHUNKS, (stage1((0, "ok"), query="warfarin"),), {"request": CHAINED}, FORGED_STAGE1 + r": it is not a stage-1 ranking of this request's query"),
    Raw("stage 1 result of another request's size", TASK_CHUNKS, (stage1((0, "ok"), scored=50),), {"request": CHAINED}, FORGED_STAGE1 + r": it scored 50 candidates"),
    Raw("a chunk of a paper that is no candidate", TASK_CHUNKS, (stage1((0, "ok")),), {"request": {**CHAINED, "candidate_ids": ["ok", "z"], "chunks": [{**OK_CHUNK, "doc_id": "elsewhere"}]}}, FORGED_STAGE1 + r": some chunks belong to no candidate"),
]


def publish_raw(client: RerankClient, body: bytes, content_type: str, headers: dict[str, Any]) -> None:
    """Put a message on the queue the way a hostile or broken producer would, bypassing Celery."""
    with client.app.connection_for_write() as connection:
        connection.Producer().publish(
            body, routing_key=client.settings.queue, exchange="", content_type=content_type, content_encoding="utf-8",
            headers=headers, serializer=None,
        )


class Marker:
    """Unpickling this creates a file: proof that a worker deserialized pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: D105
        return (Path.touch, (self.path,))


@pytest.mark.integration
def test_the_worker_refuses_messages_that_bypass_the_producer_and_serves_on(start_worker, redis_server, tiny_model, tmp_path, in_process_settings):
    # Given a worker on its own queue
    worker = start_worker("-Q", "hostile", name="hostile")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=redis_server.url, queue="hostile", model=str(tiny_model)))

    # When each malformed message of the corpus is sent straight to the queue
    ids = {}
    for raw in WORKER_CORPUS:
        ids[raw.name] = client.app.send_task(raw.task, args=raw.args, kwargs=raw.kwargs, queue="hostile").id
    # and messages no task can even read: pickle, broken JSON, invalid UTF-8, no task header, an unknown task
    marker = tmp_path / "unpickled"
    undecodable = {
        "pickle": (pickle.dumps(((Marker(marker),), {}, {})), "application/x-python-serialize"),
        "broken JSON": (b'[["q"], {}, {', "application/json"),
        "invalid UTF-8": (b'[["caf\xc3\x28 \xff"], {}, {}]', "application/json"),
    }
    for name, (body, content_type) in undecodable.items():
        ids[name] = str(uuid.uuid4())
        publish_raw(client, body, content_type, {"task": TASK_DOCUMENTS, "id": ids[name], "lang": "py"})
    publish_raw(client, json.dumps([[VALID], {}, {}]).encode(), "application/json", {"id": "no-task-header"})
    unknown = client.app.send_task("rerank.everything", args=(VALID,), queue="hostile").id

    # Then every malformed request fails in the worker with InvalidRequest and its reason, once
    for raw in WORKER_CORPUS:
        with pytest.raises(InvalidRequest, match=raw.message):
            Handle(client.backend, ids[raw.name], Finish(RerankResult)).result(timeout=30)
    # an unknown task is refused, and fails with a typed error naming it
    with pytest.raises(InvalidRequest, match=r"task 'rerank.everything' is not served here"):
        Handle(client.backend, unknown, Finish(RerankResult)).result(timeout=30)
    # and what cannot be decoded is logged and dropped, never executed (pickle least of all),
    # but its task fails, so nobody waits on it until a timeout
    reasons = {"pickle": "only UTF-8 JSON is accepted", "broken JSON": "its body is not JSON", "invalid UTF-8": "its body is not JSON"}
    for name, reason in reasons.items():
        with pytest.raises(InvalidRequest, match=rf"message {ids[name]} was refused and dropped: .*{reason}"):
            Handle(client.backend, ids[name], Finish(RerankResult)).result(timeout=30)
    log = worker.output()
    assert f"Refused message {ids['pickle']!r}: its content is 'application/x-python-serialize'" in log
    assert not marker.exists(), "the worker unpickled a message"
    for name in ("broken JSON", "invalid UTF-8"):
        assert log.count(f"Refused message {ids[name]!r}: its body is not JSON") == 1, name
    assert "Traceback" not in log, "invalid input is logged without tracebacks"
    assert "Refused message 'no-task-header': it has no `task` header" in log
    for name in [raw.name for raw in WORKER_CORPUS]:  # each taken once: received by its task, or refused at the gate
        taken = len(re.findall(rf"\[{ids[name]}\] received", log)) + log.count(f"Refused message {ids[name]!r}")
        assert taken == 1, f"{name}: taken {taken} times"
    with client.app.connection_for_write() as connection:
        redis = connection.default_channel.client
        ours = [*ids.values(), unknown, "no-task-header"]

        def all_acknowledged() -> bool:
            # The session's Redis is shared: other tests' workers may hold messages of their own. An
            # acknowledgement follows its task's result, so it may land a moment after the result.
            held = b"".join(redis.hvals("unacked"))
            return redis.llen("hostile") == 0 and not any(task_id.encode() in held for task_id in ours)

        wait_for(all_acknowledged, 10, "every bad message acknowledged, none requeued")

    # And the worker still serves correct results
    papers = [paper(i) for i in range(8)]
    served = client.two_stage(QUERY, papers, top_k_docs=3, timeout=30)
    expected = RerankClient(in_process_settings).two_stage(QUERY, papers, top_k_docs=3)
    assert [i.id for i in served.chunks.items] == [i.id for i in expected.chunks.items]
    assert [i.score for i in served.chunks.items] == pytest.approx([i.score for i in expected.chunks.items], abs=1e-5)
    assert served.documents.info.worker.startswith("hostile")
