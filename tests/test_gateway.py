"""The HTTP gateway against real Redis, real workers and a real gateway process, driven by clients no one here wrote:
the cohere SDK, LangChain's CohereRerank, and TEI- and Jina-shaped requests as those clients send them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from contract.names import TASK_PASSAGES
from producer import InvalidRequest, RerankClient, Settings
from tests.gateway_helpers import FILE_KEY, KEY, Gateway
from tests.helpers import (
    CORPUS,
    QUERY,
    WorkerFleet,
    candidates,
    children,
    kill,
    reference_logits,
    sigmoid,
    wait_for,
)

pytestmark = pytest.mark.integration

DOCUMENTS = [CORPUS[n] for n in range(0, 40, 2)]  # 20 plain passages
ALIAS = "BAAI/bge-reranker-v2-m3"
"""The README's model name: the test gateways map it onto the tiny model (RERANK_GATEWAY_MODEL_ALIASES)."""

@pytest.fixture(scope="module")
def gateway(tmp_path_factory, shared_worker, redis_server, tiny_model) -> Iterator[Gateway]:
    """A gateway in front of the shared worker: 50 documents, 64 KiB a request and 30,000 characters a document at most."""
    env = {
        "RERANK_MAX_TEXT_CHARS": "30000",
        "RERANK_GATEWAY_MAX_DOCUMENTS": "50",
        "RERANK_GATEWAY_MAX_BODY_BYTES": str(64 * 1024),
        "RERANK_GATEWAY_MODEL_ALIASES": json.dumps({ALIAS: str(tiny_model)}),
    }
    gw = Gateway(tmp_path_factory.mktemp("gateway"), redis_server.url, tiny_model, env)
    gw.wait_until("/ready")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def reference(shared_worker, redis_server, tiny_model) -> RerankClient:
    """The Python client on the shared worker: what the gateway's scores must equal."""
    return RerankClient(Settings(broker_url=redis_server.url, model=str(tiny_model)))


def by_index(result) -> dict[int, tuple[float, float | None]]:
    return {item.index: (item.score, item.logit) for item in result.items}


# The contract's plain form ------------------------------------------------------------------------


def test_plain_passages_are_scored_exactly_as_sent(reference, tiny_model):
    # Given 20 passages sent through the Python client to a real worker
    result = reference.rerank_passages(QUERY, DOCUMENTS, top_k=5, return_logits=True, timeout=60)
    # Then each is the model's plain (query, passage) score, no Title:/Section: template, best first
    expected = reference_logits(tiny_model, QUERY, DOCUMENTS)
    best = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])[:5]
    assert [item.index for item in result.items] == best
    # Logits to 1e-5 relative: fp32 batches of another composition moved a logit of 5.6 by 1.05e-5 in CI
    assert [item.logit for item in result.items] == pytest.approx([expected[i] for i in best], rel=1e-5, abs=1e-5)
    assert [item.score for item in result.items] == pytest.approx(sigmoid([expected[i] for i in best]), abs=1e-6)
    assert result.stage == "passages" and result.scored == 20


def test_bad_passages_are_refused_before_the_queue_and_again_by_the_worker(reference):
    # Given a passage holding a NUL, sent through the client: refused before anything is queued
    with pytest.raises(InvalidRequest, match=r"passages\.1.*control character"):
        reference.submit_passages(QUERY, ["fine", "bad\x00"])
    # When the same request is written straight onto the queue, past the client
    sent = reference.app.send_task(TASK_PASSAGES, kwargs={"request": {"query": QUERY, "passages": ["fine", "bad\x00"]}}, queue=reference.settings.queue)
    # Then the worker refuses it too, as invalid input, without retrying
    with pytest.raises(Exception, match="control character") as refused:
        sent.get(timeout=60)
    assert type(refused.value).__name__ == "InvalidRequest"


# Clients no one here wrote -----------------------------------------------------------------------


def test_the_cohere_sdk_reranks_through_the_gateway(gateway, reference, tiny_model):
    import cohere

    # Given the cohere SDK pointed at the gateway, with one of its keys
    co = cohere.ClientV2(base_url=gateway.url, api_key=KEY)
    # When it reranks 20 documents, as any Cohere user would
    response = co.rerank(model=str(tiny_model), query=QUERY, documents=DOCUMENTS, top_n=5)
    # Then the best five come back best first, with the Python client's probabilities (1e-6)
    expected = reference.rerank_passages(QUERY, DOCUMENTS, timeout=60)
    assert [r.index for r in response.results] == [item.index for item in expected.items[:5]]
    assert [r.relevance_score for r in response.results] == pytest.approx([item.score for item in expected.items[:5]], abs=1e-6)
    assert response.id and response.meta.api_version.version == "2"


def test_the_cohere_sdk_without_a_valid_key_gets_401(gateway, tiny_model):
    import cohere

    # Given the SDK with a key the gateway was never given
    co = cohere.ClientV2(base_url=gateway.url, api_key="not-a-key")
    # When it reranks, Then the SDK raises its own 401 error
    with pytest.raises(cohere.errors.UnauthorizedError) as refused:
        co.rerank(model=str(tiny_model), query=QUERY, documents=DOCUMENTS[:2])
    assert "not-a-key" not in str(refused.value.body)


def test_langchain_cohere_rerank_compresses_documents(gateway, reference, tiny_model):
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    # Given LangChain's CohereRerank against the gateway (the key from the gateway's key file), keeping 3
    compressor = CohereRerank(base_url=gateway.url, cohere_api_key=FILE_KEY, model=str(tiny_model), top_n=3)
    documents = [Document(page_content=text, metadata={"n": n}) for n, text in enumerate(DOCUMENTS)]
    # When it compresses 20 documents for a query
    kept = compressor.compress_documents(documents, QUERY)
    # Then it keeps the Python client's best three, in order, with their scores
    expected = reference.rerank_passages(QUERY, DOCUMENTS, top_k=3, timeout=60)
    assert [doc.metadata["n"] for doc in kept] == [item.index for item in expected.items]
    assert [doc.metadata["relevance_score"] for doc in kept] == pytest.approx([item.score for item in expected.items], abs=1e-6)


def test_a_jina_shaped_request_gets_documents_model_and_usage(gateway, reference, tiny_model):
    # Given a request as Jina's clients send it: {text} objects, return_documents
    body = {"model": str(tiny_model), "query": QUERY, "documents": [{"text": t} for t in DOCUMENTS], "top_n": 4, "return_documents": True}
    # When it is posted to /v1/rerank
    response = gateway.http.post("/v1/rerank", json=body)
    # Then results carry each document's text, best first, plus Jina's model and usage
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = reference.rerank_passages(QUERY, DOCUMENTS, top_k=4, timeout=60)
    assert [r["index"] for r in answer["results"]] == [item.index for item in expected.items]
    assert [r["document"]["text"] for r in answer["results"]] == [DOCUMENTS[item.index] for item in expected.items]
    assert [r["relevance_score"] for r in answer["results"]] == pytest.approx([item.score for item in expected.items], abs=1e-6)
    assert answer["model"] == str(tiny_model) and answer["usage"]["total_tokens"] > 20


def test_a_tei_shaped_request_gets_a_bare_list_with_logits_or_probabilities(gateway, reference):
    # Given TEI's request shape (no model: the gateway's RERANK_MODEL), first with raw_scores
    expected = reference.rerank_passages(QUERY, DOCUMENTS, return_logits=True, timeout=60)
    raw = gateway.http.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": True, "return_text": True})
    plain = gateway.http.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS})
    # Then both are bare lists, best first: logits when asked, probabilities otherwise
    assert raw.status_code == plain.status_code == 200, (raw.text, plain.text)
    assert [r["index"] for r in raw.json()] == [r["index"] for r in plain.json()] == [item.index for item in expected.items]
    assert [r["score"] for r in raw.json()] == pytest.approx([item.logit for item in expected.items], abs=1e-6)
    assert [r["score"] for r in plain.json()] == pytest.approx([item.score for item in expected.items], abs=1e-6)
    assert [r["text"] for r in raw.json()] == [DOCUMENTS[item.index] for item in expected.items]
    assert "text" not in plain.json()[0]


def test_the_two_stage_job_waited_for_or_fetched_later(gateway, reference):
    # Given our evidence job in the producer's own schema
    job = {"query": QUERY, "candidates": candidates(6), "top_k_docs": 3}
    # When it is run and waited for, and submitted to fetch later
    waited = gateway.http.post("/v1/evidence", json=job)
    accepted = gateway.http.post("/v1/jobs", json=job)
    # Then both give the Python client's ranking
    assert waited.status_code == 200, waited.text
    assert accepted.status_code == 202, accepted.text
    url = accepted.json()["status_url"]
    fetched = wait_for(lambda: (r := gateway.http.get(url).json())["state"] == "SUCCESS" and r, 60, "the job to finish")
    expected = reference.two_stage(QUERY, candidates(6), top_k_docs=3, timeout=60)
    for answer in (waited.json(), fetched["result"]):
        assert [i["id"] for i in answer["documents"]["items"]] == [i.id for i in expected.documents.items]
        assert [i["score"] for i in answer["chunks"]["items"]] == pytest.approx([i.score for i in expected.chunks.items], abs=1e-6)


def test_a_waiting_request_wakes_on_the_result_backends_announcement(redis_server):
    import asyncio

    import redis

    from gateway.announcements import Announcements

    async def scenario() -> float:
        # Given the gateway's one subscriber on the test Redis, and a request watching its job's channel
        announcements = Announcements.for_url(redis_server.url)
        await announcements.start()
        for _ in range(500):
            if announcements.up:
                break
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        async with announcements.watching(b"celery-task-meta-announced") as nap:
            # When the result backend announces a state 50 ms into a 5 s nap
            loop.call_later(0.05, lambda: redis.Redis.from_url(redis_server.url).publish("celery-task-meta-announced", "{}"))
            started = loop.time()
            await nap(5.0)
            woke = loop.time() - started
        await announcements.close()
        return woke

    # Then the nap ends at the announcement, not at its end
    assert asyncio.run(scenario()) < 1.0


# Every refusal -------------------------------------------------------------------------------------


def test_the_gateway_refuses_to_start_without_an_api_key(redis_server):
    # Given no key configured and anonymous access not allowed
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_GATEWAY_")} | {"RERANK_BROKER_URL": redis_server.url}
    # When the gateway starts, Then it stops at once, saying how to give it keys
    started = subprocess.run([sys.executable, "-m", "gateway.cli"], env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode == 2 and "RERANK_GATEWAY_API_KEYS" in started.stderr


def test_the_gateway_refuses_to_start_with_results_outside_redis(redis_server):
    # Given results kept over AMQP (a worker allows it; the gateway keeps jobs' owners beside the results, in Redis)
    env = os.environ | {"RERANK_BROKER_URL": redis_server.url, "RERANK_RESULT_BACKEND": "amqp://guest@127.0.0.1:5672//", "RERANK_GATEWAY_API_KEYS": KEY}
    # When the gateway starts, Then it stops at once with exit 2 and one line naming the setting, no traceback
    started = subprocess.run([sys.executable, "-m", "gateway.cli"], env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode == 2 and "RERANK_RESULT_BACKEND" in started.stderr and "Traceback" not in started.stderr


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer", f"Bearer {KEY}x"])
def test_401_without_a_valid_key(gateway, authorization):
    # Given a request with no key, a wrong one, or the right one in the wrong scheme
    headers = {} if authorization is None else {"Authorization": authorization}
    # When it is posted
    response = httpx.post(f"{gateway.url}/v2/rerank", json={"query": QUERY, "documents": ["a"]}, headers=headers)
    # Then 401, asking for a bearer key, echoing nothing that was sent
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "wrong-key" not in response.text and KEY not in response.text


def test_413_by_content_length_and_by_streamed_bytes_422_by_documents(gateway):
    # Given a body over the 64 KiB limit, declared by its Content-Length
    big = json.dumps({"query": QUERY, "documents": ["x" * 70_000]}).encode()
    declared = gateway.http.post("/v2/rerank", content=big, headers={"Content-Type": "application/json"})
    # And the same bytes streamed without a length (chunked)
    streamed = gateway.http.post("/v2/rerank", content=iter([big[i : i + 8192] for i in range(0, len(big), 8192)]), headers={"Content-Type": "application/json"})
    # And 51 documents, one over RERANK_GATEWAY_MAX_DOCUMENTS
    many = gateway.http.post("/v2/rerank", json={"query": QUERY, "documents": ["a"] * 51})
    # Then the bytes are 413 and the count 422 (a field over its schema's maxItems), each naming its limit
    assert declared.status_code == streamed.status_code == 413, (declared.text, streamed.text)
    assert many.status_code == 422 and many.json()["errors"][0]["field"] == "documents", many.text
    assert "RERANK_GATEWAY_MAX_BODY_BYTES" in declared.json()["message"] and "RERANK_GATEWAY_MAX_BODY_BYTES" in streamed.json()["message"]
    assert "RERANK_GATEWAY_MAX_DOCUMENTS" in many.json()["message"]


@pytest.mark.parametrize(
    ("path", "body", "field", "reason"),
    [
        ("/v2/rerank", {"query": QUERY, "documents": ["ok", 7]}, "documents.1", "valid string"),
        ("/v2/rerank", {"query": "  ", "documents": ["ok"]}, "query", "at least 1 character"),
        ("/v2/rerank", {"query": QUERY, "documents": ["ok"], "top_n": 0}, "top_n", "greater than or equal to 1"),
        ("/v1/rerank", {"query": QUERY, "documents": ["ok", "secret document\x00 body"]}, "documents.1", "control character"),
        ("/rerank", {"query": QUERY, "texts": ["ok"], "truncation_direction": "Up"}, "truncation_direction", "Right"),
        ("/rerank", {"query": QUERY, "texts": ["ok", "y" * 40_000]}, "texts.1", "RERANK_MAX_TEXT_CHARS"),
    ],
)
def test_422_names_the_field_and_the_reason_without_echoing_the_document(gateway, path, body, field, reason):
    # Given a request with one bad field (as the schema or the producer's limits see it)
    response = gateway.http.post(path, json=body)
    # Then 422 names the field and why, and echoes no document
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert any(e["field"] == field and reason in e["reason"] for e in errors), errors
    assert "secret document" not in response.text and "y" * 100 not in response.text


def test_404_for_a_model_no_worker_serves_names_the_models_served(gateway, tiny_model):
    # Given a model no worker serves, while another is served
    response = gateway.http.post("/v2/rerank", json={"model": "rerank-v3.5", "query": QUERY, "documents": ["a"]})
    # Then 404 at once (Cohere's answer to an unknown model), naming what is served
    assert response.status_code == 404
    assert "rerank-v3.5" in response.json()["message"] and str(tiny_model) in response.json()["message"]


def test_health_ready_metrics_and_openapi(gateway, tiny_model):
    # Given a gateway that has answered, and refused, some requests
    gateway.http.post("/rerank", json={"query": QUERY, "texts": ["a", "b"]})
    httpx.post(f"{gateway.url}/rerank", json={"query": QUERY, "texts": ["a"]})
    # Then /health and /ready say so without a key, and /ready names the model served
    assert httpx.get(f"{gateway.url}/health").status_code == 200
    ready = httpx.get(f"{gateway.url}/ready")
    assert ready.status_code == 200 and ready.json()["models_served"] == [str(tiny_model)]
    # And /metrics counts requests by route and status, errors by kind, latency and requests in flight
    page = httpx.get(f"{gateway.url}/metrics").text
    assert re.search(r'rerank_gateway_requests_total\{route="/rerank",status="200"\} [1-9]', page)
    assert re.search(r'rerank_gateway_errors_total\{kind="unauthorized"\} [1-9]', page)
    assert 'rerank_gateway_request_seconds_bucket{le="0.1",route="/rerank"}' in page
    assert "rerank_gateway_in_flight 1.0" in page  # this scrape itself
    # And the OpenAPI document is built from the producer's own schemas, with the limits of this gateway in them
    document = httpx.get(f"{gateway.url}/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert {"TwoStageRequest", "TwoStageResult", "RerankResult", "JobProgress", "CohereRequest", "TeiRequest"} <= set(schemas)
    assert schemas["CohereRequest"]["properties"]["documents"]["maxItems"] == 50
    assert schemas["TeiRequest"]["properties"]["texts"]["items"]["maxLength"] == 30000
    assert set(document["paths"]["/v2/rerank"]["post"]["responses"]) >= {"200", "400", "401", "404", "413", "422", "429", "503", "504"}
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    # And both job routes show a request example
    for path in ("/v1/evidence", "/v1/jobs"):
        assert document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"]


# A stalled fleet: 504, revoke on disconnect, 429 ---------------------------------------------------


STALLED_QUEUE = "rerank.gateway-stalled"


@pytest.fixture(scope="module")
def stalled(tmp_path_factory, redis_server, tiny_model) -> Iterator[SimpleNamespace]:
    """A gateway (1 s waits, 429 past one waiting job) on a queue only its own one-process worker consumes.

    Before that worker starts, /ready is recorded; tests then stop the worker's pool process
    (SIGSTOP) to stall the queue: the worker's main process still answers the broker.
    """
    workdir = tmp_path_factory.mktemp("stalled")
    env = {
        "RERANK_QUEUE": STALLED_QUEUE,
        "RERANK_GATEWAY_WAIT_TIMEOUT": "1",
        "RERANK_GATEWAY_MAX_QUEUE_DEPTH": "1",
        "RERANK_GATEWAY_RETRY_AFTER": "3",
    }
    gw = Gateway(workdir, redis_server.url, tiny_model, env)
    gw.wait_until("/health")
    before = wait_for(lambda: (r := httpx.get(f"{gw.url}/ready")).json()["workers_asked"] and r, 30, "the gateway to ask the workers")
    fleet = WorkerFleet(workdir, tiny_model, redis_server.url)
    worker = fleet.start("-c", "1", env={"RERANK_QUEUE": STALLED_QUEUE}, name="stalled")
    try:
        worker.wait_until_loaded(processes=1)
        gw.wait_until("/ready")
        (pool,) = children(worker.process.pid)
        client = RerankClient(Settings(broker_url=redis_server.url, model=str(tiny_model), queue=STALLED_QUEUE))
        yield SimpleNamespace(gateway=gw, worker=worker, pool=pool, client=client, ready_before=before)
    finally:
        fleet.stop_all()
        gw.stop()


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """Stop a process (it takes no work, keeps its state) and continue it afterwards, whatever happens."""
    kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        kill(pid, signal.SIGCONT)


def waiting_messages(client: RerankClient) -> int:
    with client.app.connection_for_read() as connection:
        return connection.default_channel.client.llen(STALLED_QUEUE)


def test_ready_is_503_until_a_worker_consumes_the_queue(stalled):
    # Given the gateway, once it asked the workers, before any worker consumed its queue: 503, nothing served
    assert stalled.ready_before.status_code == 503
    assert stalled.ready_before.json()["models_served"] == []
    # Then, with the worker up, 200
    assert httpx.get(f"{stalled.gateway.url}/ready").status_code == 200


def test_504_gives_the_job_id_and_the_job_completes_for_a_later_get(stalled, reference):
    gw = stalled.gateway
    # Given a worker whose pool process is stopped
    with paused(stalled.pool):
        # When a request waits longer than RERANK_GATEWAY_WAIT_TIMEOUT (1 s)
        response = gw.http.post("/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS})
        # Then 504 names the job and where to fetch it
        assert response.status_code == 504, response.text
        job_id, url = response.json()["job_id"], response.json()["status_url"]
        assert job_id in response.json()["message"] and url == f"/v1/jobs/{job_id}"
        assert gw.http.get(url).json()["state"] != "SUCCESS"
    # And once the worker runs again, the job completes and GET returns the Python client's ranking
    fetched = wait_for(lambda: (r := gw.http.get(url).json())["state"] == "SUCCESS" and r, 60, "the timed-out job to finish")
    expected = reference.rerank_passages(QUERY, DOCUMENTS, timeout=60)
    assert [i["index"] for i in fetched["result"]["items"]] == [item.index for item in expected.items]
    assert [i["score"] for i in fetched["result"]["items"]] == pytest.approx([item.score for item in expected.items], abs=1e-6)


def test_a_client_that_leaves_has_its_job_revoked_and_a_deep_queue_gets_429(stalled):
    gw, client = stalled.gateway, stalled.client
    # Given a stopped pool process busy with one job, so further jobs wait in the queue
    with paused(stalled.pool):
        filler = client.submit_passages(QUERY, DOCUMENTS[:3])
        wait_for(lambda: waiting_messages(client) == 0, 30, "the worker to take the first job")
        # When a client gives up on its request before the answer
        with pytest.raises(httpx.ReadTimeout):
            gw.http.post("/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS[:2]}, timeout=0.5)
        # Then the gateway revokes its job
        job_id = wait_for(lambda: re.search(r"revoked job (\S+): its client disconnected", gw.output()), 10, "the revocation").group(1)
        assert client.app.backend.get_task_meta(job_id, cache=False)["status"] == "REVOKED"
        # And when more jobs wait than RERANK_GATEWAY_MAX_QUEUE_DEPTH (1), requests get 429 with Retry-After
        later = [client.submit_passages(QUERY, DOCUMENTS[:2]) for _ in range(2)]
        refused = wait_for(
            lambda: (r := gw.http.post("/v2/rerank", json={"query": QUERY, "documents": ["a"]})).status_code == 429 and r, 20, "a 429"
        )
        assert refused.headers["retry-after"] == "3" and STALLED_QUEUE in refused.json()["message"]
    # And once the worker runs again, the queued jobs finish while the revoked one is discarded, never run
    for handle in [filler, *later]:
        handle.result(timeout=60)
    wait_for(lambda: f"Discarding revoked task: {TASK_PASSAGES}[{job_id}]" in stalled.worker.output(), 30, "the worker to discard it")
    assert client.app.backend.get_task_meta(job_id, cache=False)["status"] == "REVOKED"


# Deployment ---------------------------------------------------------------------------------------


def test_compose_and_kubernetes_run_the_gateway_behind_keys_with_its_real_settings():
    import tomllib
    import yaml

    from gateway.settings import GatewaySettings
    from tests.test_kubernetes import BASE, container, kinds

    root = Path(__file__).parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rerank-gateway"] == "gateway.cli:main"
    fields = {f"RERANK_GATEWAY_{name.upper()}" for name in GatewaySettings.model_fields}
    # Given the compose service: our entry point, real settings, a key required
    service = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]["gateway"]
    assert service["command"] == ["rerank-gateway"]
    assert {k for k in service["environment"] if k.startswith("RERANK_GATEWAY_")} <= fields
    assert "RERANK_GATEWAY_API_KEYS:?" in service["environment"]["RERANK_GATEWAY_API_KEYS"]
    # And the Kubernetes Deployment: restricted pod, probes on /health and /ready, keys from the Secret as a file
    deployment = kinds(BASE, "Deployment")["rerank-gateway"]
    pod = deployment["spec"]["template"]["spec"]
    gateway = container(deployment)
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert {k for k in env if k.startswith("RERANK_GATEWAY_")} <= fields
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert gateway["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health" and gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "api-keys")
    assert env["RERANK_GATEWAY_API_KEYS_FILE"].startswith(mount["mountPath"] + "/")
    assert next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]["secretName"] == "rerank-secrets"
    # And it scales on CPU
    hpa = kinds(BASE, "HorizontalPodAutoscaler")["rerank-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "rerank-gateway" and hpa["spec"]["minReplicas"] >= 2
