"""The gateway and `rerank status` against attackers and buggy clients: other keys, half-open connections,
slow bodies, malformed bodies, and results planted in Redis. A real gateway process, a real worker, real Redis."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
import redis

from producer import RerankClient, Settings
from tests.gateway_helpers import FILE_KEY, KEY, Gateway, memory
from tests.helpers import QUERY, candidates, wait_for

pytestmark = pytest.mark.integration

MB = 2**20
JOB = {"query": QUERY, "candidates": candidates(3), "top_k_docs": 2}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, shared_worker, redis_server, tiny_model) -> Iterator[SimpleNamespace]:
    """A gateway held to 1,024 descriptors and 2 s for a request head, in front of the shared worker."""
    gateway = Gateway(
        tmp_path_factory.mktemp("hostile-gateway"), redis_server.url, tiny_model, {"RERANK_GATEWAY_HEAD_TIMEOUT": "2", "RERANK_GATEWAY_BODY_TIMEOUT": "2"},
        descriptors=1024,
    )
    gateway.wait_until("/ready")
    other = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {FILE_KEY}"}, timeout=30)
    yield SimpleNamespace(gateway=gateway, http=gateway.http, other=other, redis=redis.Redis.from_url(redis_server.url), url=redis_server.url)
    other.close()
    gateway.stop()


def finished_job(gw) -> str:
    """A two-stage job submitted with KEY and finished."""
    job_id = gw.http.post("/v1/jobs", json=JOB).json()["job_id"]
    wait_for(lambda: gw.http.get(f"/v1/jobs/{job_id}").json()["state"] == "SUCCESS", 60, "the job to finish")
    return job_id


# API keys are tenants -----------------------------------------------------------------------------


def test_a_job_is_visible_and_cancellable_only_with_the_key_that_created_it(gw):
    # Given a finished job submitted with one key
    job_id = finished_job(gw)
    unknown = "00000000-0000-0000-0000-000000000000"
    # When another key asks for it or deletes it, Then it gets the same 404 as for an id nobody submitted
    for response in (gw.other.get(f"/v1/jobs/{job_id}"), gw.other.delete(f"/v1/jobs/{job_id}"), gw.http.get(f"/v1/jobs/{unknown}")):
        assert response.status_code == 404, response.text
        assert response.json()["error_type"] == "not_found" and "for this API key" in response.json()["message"]
    # And its own key still reads its result, then deletes it, after which the id is unknown to it too
    assert gw.http.get(f"/v1/jobs/{job_id}").json()["result"]["documents"]["items"]
    assert gw.http.delete(f"/v1/jobs/{job_id}").json() == {"job_id": job_id, "cancelled": False}
    assert gw.http.get(f"/v1/jobs/{job_id}").status_code == 404


def test_ownership_is_kept_in_redis_as_a_digest_and_holds_across_gateway_processes(gw, tmp_path, redis_server, tiny_model):
    # Given a job submitted through one gateway
    job_id = finished_job(gw)
    # Then Redis holds a digest of the key as its owner, never the key, expiring like the results
    record = gw.redis.get(f"rerank.owner.{job_id}")
    assert record is not None and KEY.encode() not in record and len(record) == 64
    assert 0 < gw.redis.ttl(f"rerank.owner.{job_id}") <= Settings().result_expires
    # And a second gateway process (a replica, or this one restarted) serves it to the same key only
    replica = Gateway(tmp_path, redis_server.url, tiny_model)
    try:
        replica.wait_until("/health")
        assert replica.http.get(f"/v1/jobs/{job_id}").json()["state"] == "SUCCESS"
        assert httpx.get(f"{replica.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {FILE_KEY}"}).status_code == 404
    finally:
        replica.stop()


@pytest.mark.parametrize("job_id", ["00000000-0000-0000-0000-000000000000", "never-submitted", "a" * 255])
def test_asking_about_or_cancelling_an_unknown_id_writes_nothing_and_broadcasts_nothing(gw, job_id, reference_client):
    # Given an id nobody submitted, and the keys Redis holds before
    keys_before = set(gw.redis.keys("*"))
    # When it is asked about and deleted, with and without a key of the gateway
    answers = [gw.http.get(f"/v1/jobs/{job_id}"), gw.http.delete(f"/v1/jobs/{job_id}"), gw.other.delete(f"/v1/jobs/{job_id}")]
    # Then each is 404, no key about it was written, and no worker was told to revoke it
    assert [a.status_code for a in answers] == [404, 404, 404]
    written = {k for k in set(gw.redis.keys("*")) - keys_before if job_id.encode() in k}
    assert not written, written
    revoked = reference_client.app.control.inspect(timeout=1).revoked() or {}
    assert not any(job_id in ids for ids in revoked.values())


@pytest.fixture(scope="module")
def reference_client(redis_server, tiny_model) -> RerankClient:
    return RerankClient(Settings(broker_url=redis_server.url, model=str(tiny_model)))


# Bodies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/rerank", b'{"model": "\\ud800", "query": "q", "documents": ["a"]}', 422),  # a lone surrogate in the model name
        ("/v2/rerank", b'{"model": "a\\u0007b", "query": "q", "documents": ["a"]}', 422),
        ("/v2/rerank", b'{"model": "no-such-model", "query": "q", "documents": ["a"]}', 404),
        ("/v2/rerank", b'{"query": "\\udfff", "documents": ["a"]}', 422),
        ("/v2/rerank", b'{"query": "\xc3\x28"}', 400),  # not UTF-8
        ("/v2/rerank", b"\xff\xfe{}", 422),  # a UTF-16 byte-order mark
        ("/v2/rerank", b"{not json", 422),
        ("/v2/rerank", b"[1, 2]", 422),
        ("/v2/rerank", b'{"query": "q", "documents": ["a"], "top_n": 1e400}', 422),
        ("/v2/rerank", b'{"query": "q", "documents": ["a"], "top_n": 2.5}', 422),
        ("/v2/rerank", b"[" * 100_000, 400),  # nested past what the JSON decoder follows
        ("/rerank", b'{"query": "q", "texts": [' + b'"a",' * 100 + b'"a"], "raw_scores": "yes"}', 422),
        ("/v1/jobs", b'{"query": "q", "candidates": [{"id": "a", "title": " ", "text": "\\t"}]}', 422),
        ("/v1/evidence", b'{"query": "q", "candidates": []}', 422),
        ("/v1/jobs", b'{"query": "q", "candidates": [{"id": "a", "title": "t", "metadata": {"x": Infinity}}]}', 422),
        ("/v1/jobs", b'{"query": "q", "candidates": [{"id": "a", "title": "t", "metadata": {"x": [NaN]}}]}', 422),
    ],
)
def test_every_malformed_body_is_a_4xx_and_the_gateway_keeps_serving(gw, path, body, status):
    # Given a body a buggy or hostile client sends
    response = gw.http.post(path, content=body, headers={"Content-Type": "application/json"})
    # Then it is refused with a 4xx in the gateway's error shape, never a 500
    assert response.status_code == status, response.text
    assert response.json()["error_type"] and response.json()["message"]
    assert gw.http.get("/health").status_code == 200


def test_a_body_sent_too_slowly_is_refused_with_408(gw):
    # Given a client that declares a body and sends a byte of it, then nothing (RERANK_GATEWAY_BODY_TIMEOUT is 2 s)
    with socket.create_connection(("127.0.0.1", gw.gateway.port)) as sock:
        sock.sendall(f"POST /v2/rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{".encode())
        sock.settimeout(10)
        started = time.monotonic()
        answer = sock.recv(4096)
    # Then the gateway answers 408 once the body is late, not never
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 1.5 < time.monotonic() - started < 8


# Connections -------------------------------------------------------------------------------------


@pytest.mark.parametrize("opening", [b"", b"GET /health HTTP/1.1\r\nHo"], ids=["silent", "partial-head"])
def test_2000_half_open_connections_at_1024_descriptors_leave_normal_requests_served(gw, opening):
    gateway = gw.gateway
    log_before = gateway.log.stat().st_size
    # Given a request in flight: its body half sent
    busy = socket.create_connection(("127.0.0.1", gateway.port))
    body = json.dumps({"query": QUERY, "texts": ["a", "b"]}).encode()
    busy.sendall(f"POST /rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:5])
    # When 2,000 connections open and send nothing, or half a request head, against a limit of 1,024 descriptors
    idle = []
    for _ in range(2000):
        idle.append(socket.create_connection(("127.0.0.1", gateway.port)))
        if opening:
            idle[-1].sendall(opening)
    try:
        # Then a normal request answers within 2 s, authenticated work too
        started = time.monotonic()
        assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 2
        ranked = gw.http.post("/rerank", json={"query": QUERY, "texts": ["apixaban", "warfarin"]}, timeout=10)
        assert ranked.status_code == 200, ranked.text
        # And the request in flight before the flood is answered once its body is complete
        busy.sendall(body[5:])
        busy.settimeout(10)
        assert busy.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for sock in idle:
            sock.close()
        busy.close()
    # And the gateway is alive, and logged less than 1 MB for all of it
    assert gateway.process.poll() is None
    assert gateway.log.stat().st_size - log_before < MB, gateway.output()[-3000:]


def test_a_connection_that_sends_no_head_is_closed_at_the_head_timeout(gw):
    # Given a connection that opens and sends half a request head (RERANK_GATEWAY_HEAD_TIMEOUT is 2 s)
    with socket.create_connection(("127.0.0.1", gw.gateway.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        sock.settimeout(10)
        started = time.monotonic()
        # Then the gateway closes it after about 2 s
        assert sock.recv(4096) == b""
        assert 1.5 < time.monotonic() - started < 8


# Results planted in Redis ------------------------------------------------------------------------


def planted(shape: str, size: int = 60 * MB) -> bytes:
    """A value of about `size` bytes at a result key, shaped to cost the most to read."""
    head, tail = b'{"status": "SUCCESS", "result": ', b', "traceback": null, "children": []}'
    item = b'{"index": 1000, "id": "ab", "score": 0.5, "logit": null, "doc_id": null}, '
    astral = b"\\ud83d\\ude00"
    body = {
        # 28 bytes of Python for each of its 7 bytes, before this change
        "tiny-objects": lambda: b"[" + b'{"":0},' * (size // 7) + b'{"":0}]',
        "numbers": lambda: b"[" + b"0.5," * (size // 4) + b"0.5]",
        "items": lambda: b'{"stage": "chunks", "query": "q", "scored": 1, "items": [' + item * (size // len(item)) + b'{"index": 1, "id": "a", "score": 0.5}]}',
        "one-string": lambda: b'"' + b"a" * size + b'"',
        "widening-strings": lambda: b"[" + (b'"' + astral + b"a" * 6000 + b'", ') * (size // 6016) + b'"x"]',
        "commas-in-strings": lambda: b"[" + b'"' + b"," * 1000 + b'", ' * (size // 1004) + b'"x"]',
        "deep": lambda: b"[" * (size // 2) + b"]" * (size // 2),
        "over-the-largest-result": lambda: b'"' + b"a" * (100 * MB) + b'"',
    }[shape]()
    return head + body + tail


HOSTILE = [
    "tiny-objects", "numbers", "items", "one-string", "widening-strings", "deep", "over-the-largest-result",
    # Within every bound a result can reach: decoded whole, in one call that holds the interpreter for longer than 100 ms.
    pytest.param("commas-in-strings", marks=pytest.mark.xfail(strict=False, reason="a 60 MB value within the bounds is decoded in one call: /health waits 255 ms on a 2-core EPYC, under 100 ms on faster machines")),
]


def health_latencies(gateway, work) -> list[float]:
    """Seconds each /health took, polled one after another from a thread while `work()` runs (at least two)."""
    latencies, stop = [], threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=gateway.url) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get("/health")
                latencies.append(time.perf_counter() - started)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        wait_for(lambda: latencies, 10, "a first /health")
        work()
        settled = len(latencies)
        wait_for(lambda: len(latencies) > settled, 10, "a /health after the work")
    finally:
        stop.set()
        poller.join()
    return latencies


@pytest.mark.parametrize("shape", HOSTILE)
def test_a_planted_result_costs_the_gateway_under_3x_its_size_and_never_stalls_health(gw, shape):
    gateway = gw.gateway
    # Given a job of this key whose result someone overwrote in Redis with a large hostile value
    job_id = finished_job(gw)
    value = planted(shape)
    gw.redis.set(f"celery-task-meta-{job_id}", value)
    size = len(value)
    del value
    # When the key's owner reads the job while /health is polled (and, first, /health alone for a second: the other
    # test processes sharing these cores delay some answers whatever the gateway does)
    baseline = health_latencies(gateway, lambda: time.sleep(1.0))
    idle = memory(gateway.process.pid)
    gateway.peak_memory(reset=True)
    answers = []
    latencies = health_latencies(gateway, lambda: answers.append(gw.http.get(f"/v1/jobs/{job_id}", timeout=60)))
    answer = answers[0]
    growth = gateway.peak_memory() - idle
    # Then it is refused as a value no worker writes (502), or read without a ranking in it
    assert answer.status_code in (200, 502), answer.text
    assert "no worker writes" in answer.text or "not a ranking" in answer.text
    # And the gateway's peak memory grew by at most 3 times the value's size, and /health kept answering within 100 ms
    # of its slowest answer on the same machine without the read
    assert growth <= 3 * size, f"{growth / size:.2f}x"
    assert max(latencies) < 0.1 + max(baseline), f"/health took up to {max(latencies) * 1000:.0f} ms ({max(baseline) * 1000:.0f} ms without the read)"
    gw.redis.delete(f"celery-task-meta-{job_id}")


@pytest.mark.parametrize("shape", ["tiny-objects", "widening-strings", "one-string"])
def test_a_planted_result_costs_rerank_status_under_3x_its_size(gw, shape, tiny_model):
    env = {"RERANK_BROKER_URL": gw.url, "RERANK_MODEL": str(tiny_model)}
    measure = (
        "import resource, sys; from producer.cli import main; code = main(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr); sys.exit(code)"
    )

    def peak(job_id: str) -> tuple[int, subprocess.CompletedProcess[str]]:
        ran = subprocess.run([sys.executable, "-c", measure, "status", job_id], env={**_environment(), **env}, capture_output=True, text=True, timeout=120)
        return int(ran.stderr.strip().splitlines()[-1]), ran

    # Given rerank status's peak memory on a normal job, and a job whose result was overwritten with a large hostile value
    idle, _ = peak(finished_job(gw))
    job_id = finished_job(gw)
    value = planted(shape)
    gw.redis.set(f"celery-task-meta-{job_id}", value)
    size = len(value)
    del value
    # When rerank status reads it
    used, ran = peak(job_id)
    # Then it says the value is foreign (exit 1, a worker-side failure), and its peak grew by at most 3 times the value's size
    assert ran.returncode == 1 and "no worker writes" in ran.stderr, ran.stderr[-2000:]
    assert used - idle <= 3 * size, f"{(used - idle) / size:.2f}x"
    gw.redis.delete(f"celery-task-meta-{job_id}")


def _environment() -> dict[str, str]:
    import os

    return dict(os.environ)
