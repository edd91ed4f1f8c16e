"""The contract: torch-free import, schemas, limits and stable names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from contract.validation import parse_request
from producer import (
    TASK_CHUNKS,
    TASK_DOCUMENTS,
    ChunksRequest,
    DocumentsRequest,
    InvalidRequest,
    RerankClient,
    RerankError,
    Settings,
)


def test_importing_producer_loads_no_torch_transformers_or_worker():
    code = (
        "import sys, producer, producer.cli; "
        "bad = [m for m in ('torch', 'transformers', 'worker', 'tokenizers') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, f"producer imported {completed.stdout.strip()}"


def test_task_names_are_stable():
    assert (TASK_DOCUMENTS, TASK_CHUNKS) == ("rerank.documents", "rerank.chunks")


def paper(i: int, **extra) -> dict:
    return {"id": f"p{i}", "title": f"Paper {i}", "text": "Apixaban in kidney disease.", **extra}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"query": "  ", "candidates": [paper(1)]}, "query"),
        ({"query": "q", "candidates": []}, "candidates"),
        ({"query": "q", "candidates": [paper(1), paper(1)]}, "appears more than once"),
        ({"query": "q", "candidates": [paper(1)], "top_k": 0}, "top_k"),
        ({"query": "q", "candidates": [{"id": "x", "title": " ", "text": ""}]}, "neither a title nor a text"),
        ({"query": "q", "candidates": [paper(1, colour="red")]}, "Extra inputs are not permitted"),
        ({"query": "q", "candidates": [paper(1)], "top_k": "many"}, "top_k"),
        # Counts and flags are strict: a bool is not a count, and "5" or "yes" are not typed values.
        ({"query": "q", "candidates": [paper(1)], "top_k": True}, "top_k"),
        ({"query": "q", "candidates": [paper(1)], "top_k": "5"}, "top_k"),
        ({"query": "q", "candidates": [paper(1)], "windows": 2.5}, "windows"),
        ({"query": "q", "candidates": [paper(1)], "windows": "2"}, "windows"),
        ({"query": "q", "candidates": [paper(1)], "return_logits": "yes"}, "return_logits"),
    ],
)
def test_malformed_requests_are_rejected_with_the_reason(data, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_request(DocumentsRequest, data, Settings())


def test_a_whole_number_written_with_a_point_is_that_number():
    # Given counts written as JSON's 2.0 (which JSON Schema's "integer" admits, and OpenAPI clients may send)
    request = parse_request(DocumentsRequest, {"query": "q", "candidates": [paper(1)], "top_k": 3.0, "windows": 2.0}, Settings())
    # Then they are the whole numbers, as ints
    assert (request.top_k, request.windows) == (3, 2) and type(request.top_k) is int


def test_limits_come_from_settings_and_name_the_variable():
    settings = Settings(max_candidates=2, max_text_chars=100, max_query_chars=10)
    with pytest.raises(InvalidRequest, match="3 candidates, over the limit of 2 .RERANK_MAX_CANDIDATES."):
        parse_request(DocumentsRequest, {"query": "q", "candidates": [paper(1), paper(2), paper(3)]}, settings)
    with pytest.raises(InvalidRequest, match="RERANK_MAX_TEXT_CHARS"):
        parse_request(DocumentsRequest, {"query": "q", "candidates": [paper(1, text="x" * 101)]}, settings)
    with pytest.raises(InvalidRequest, match="RERANK_MAX_QUERY_CHARS"):
        parse_request(ChunksRequest, {"query": "q" * 11, "chunks": [{"id": "c", "doc_id": "d", "text": "t"}]}, settings)


def test_invalid_request_is_a_rerank_error_and_a_value_error():
    assert issubclass(InvalidRequest, RerankError) and issubclass(InvalidRequest, ValueError)


def test_settings_read_the_environment_with_one_prefix(monkeypatch):
    monkeypatch.setenv("RERANK_MAX_LENGTH", "1024")
    monkeypatch.setenv("RERANK_DEVICE", "cuda:3")
    settings = Settings()
    assert (settings.max_length, settings.device) == (1024, "cuda:3")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RERANK_DEVICE", "gpu"), ("RERANK_MAX_LENGTH", "8"), ("RERANK_DTYPE", "int8"), ("RERANK_VISIBILITY_TIMEOUT", "30")],
)
def test_out_of_range_settings_are_refused(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable.removeprefix("RERANK_").lower() + "|VISIBILITY"):
        Settings()


def test_the_producer_validates_before_queueing(redis_server):
    # Given a client pointed at a broker nobody consumes
    client = RerankClient(Settings(broker_url=redis_server.url, queue="never-consumed"))
    # When the request is invalid, Then it is refused at once and nothing reaches the queue
    with pytest.raises(InvalidRequest):
        client.two_stage("", [paper(1)])
    assert client.app.connection_for_write().default_channel.client.llen("never-consumed") == 0


def test_stage1_messages_carry_only_the_text_stage1_reads():
    from contract.formats import stage1_message

    # Given a paper with a long full text, chunks and metadata
    request = DocumentsRequest(
        query="q", candidates=[paper(1, text="x" * 20_000, chunks=[{"text": "c"}], metadata={"year": 2020})]
    )
    # When it is turned into a stage-1 message
    sent = stage1_message(request)["candidates"][0]
    # Then only the 1,500 characters stage 1 scores travel (more with windows), nothing else
    assert len(sent["text"]) == 1500 and "chunks" not in sent and "metadata" not in sent
    assert len(stage1_message(request.model_copy(update={"windows": 3}))["candidates"][0]["text"]) == 1500 + 2 * 1300


def chunk(i: int, doc: str) -> dict:
    return {"id": f"{doc}#{i}", "doc_id": doc, "text": f"chunk {i} of {doc}"}


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        ([0], "1 positions for 2 chunks"),
        ([3, 3], "strictly increasing"),
        ([5, 2], "strictly increasing"),
        ([-1, 2], "positions"),
        ([0, True], "positions"),
        ([0, 5000], r"position 5000 lies beyond a chunk pool of at most 5000 \(RERANK_MAX_CHUNKS\)"),
    ],
)
def test_chunk_positions_must_place_each_chunk_in_a_pool_once(positions, message):
    data = {"query": "q", "chunks": [chunk(0, "a"), chunk(1, "a")], "positions": positions}
    with pytest.raises(InvalidRequest, match=message):
        parse_request(ChunksRequest, data, Settings())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(digests=r["digests"][:-1]), "digests for"),
        (lambda r: r.update(digests=[*r["digests"], "0" * 16]), "digests for"),
        (lambda r: r.update(digests=list(reversed(r["digests"]))), "not the chunk the producer sent at position 0"),
        (lambda r: r["chunks"][1].update(text="another text"), "at position 1"),
        (lambda r: r["chunks"][0].update(id="a#9"), "at position 0"),
        (lambda r: r["chunks"][0].update(title="another title"), "at position 0"),
        (lambda r: r["chunks"][0].update(section="Methods"), "at position 0"),
        (lambda r: r.update(digests=["XYZ"] * 2), "digests"),
        (lambda r: r.update(digests="0" * 32), "digests"),
        (lambda r: r.update(positions=[0, 1]) or r.pop("digests"), "must carry a digest of each chunk"),
        (lambda r: r.update(positions=[0, 7]), "at position 7"),
        (lambda r: r.update(positions=[1, 2]), "at position 1"),
    ],
)
def test_stage2_refuses_chunks_that_are_not_the_ones_sent_at_their_places(change, message):
    from contract.formats import chunk_digest
    from contract.schemas import Chunk

    # Given a stage-2 request whose digests name its two chunks
    chunks = [chunk(0, "a"), chunk(1, "a")]
    request = {"query": "q", "chunks": chunks, "digests": [chunk_digest(Chunk.model_validate(c), n) for n, c in enumerate(chunks)]}
    parse_request(ChunksRequest, request, Settings())
    # When anything of it changes on the way, Then it is refused with the reason
    change(request)
    with pytest.raises(InvalidRequest, match=message):
        parse_request(ChunksRequest, request, Settings())
