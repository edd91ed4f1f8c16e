"""Tracing: a job sent through the gateway is one trace, from the HTTP request to stage 2's stored result; a Python
caller's span is the parent of its jobs' spans; off, nothing of OpenTelemetry's trace SDK is imported."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.gateway_helpers import Gateway
from tests.helpers import QUERY, ROOT, candidates, free_port, wait_for

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra is not installed")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

QUEUE = "rerank.traced"


@dataclass(frozen=True)
class Span:
    """One span as an OTLP receiver got it."""

    trace: str
    id: str
    parent: str
    name: str
    service: str
    attributes: dict


class Receiver:
    """An OTLP/HTTP receiver (protobuf, as OpenTelemetry's exporter sends by default) that keeps every span it gets."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for span in scope.spans:
                    self.spans.append(Span(
                        span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name, attributes.get("service.name", ""),
                        {a.key: a.value.string_value or a.value.int_value for a in span.attributes},
                    ))

    def trace(self, trace_id: str) -> dict[str, Span]:
        """The spans of one trace, by span id."""
        return {span.id: span for span in list(self.spans) if span.trace == trace_id}

    def holding(self, trace_id: str, names: dict[str, int]) -> dict[str, Span] | None:
        """The spans of one trace once it holds at least `names[name]` spans of each name, else None."""
        spans = self.trace(trace_id)
        return spans if all(len(named(spans, name)) >= count for name, count in names.items()) else None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tracing_env(receiver: Receiver) -> dict[str, str]:
    """What turns tracing on: the standard variables, spans exported every 50 ms."""
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50", "RERANK_QUEUE": QUEUE}


def ancestors(spans: dict[str, Span], span: Span) -> list[str]:
    """The names of `span`'s ancestors within `spans`, nearest first."""
    names = []
    while span.parent in spans:
        span = spans[span.parent]
        names.append(span.name)
    return names


def named(spans: dict[str, Span], name: str) -> list[Span]:
    return [span for span in spans.values() if span.name == name]


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_model, redis_server) -> Iterator[tuple[Receiver, Gateway]]:
    """A receiver, and a worker (a device process fed by one host process, as on a GPU) and a gateway exporting to it, on their own queue."""
    from tests.helpers import WorkerFleet

    receiver = Receiver()
    env = tracing_env(receiver)
    fleet = WorkerFleet(tmp_path_factory.mktemp("traced"), tiny_model, redis_server.url)
    worker = fleet.start(env={**env, "RERANK_HOST_PROCESSES": "1"}, name="traced")
    gateway = Gateway(tmp_path_factory.mktemp("traced-gateway"), redis_server.url, tiny_model, env)
    try:
        worker.wait_until_loaded(processes=1)
        gateway.wait_until("/ready")
        yield receiver, gateway
    finally:
        gateway.stop()
        fleet.stop_all()
        receiver.close()


@pytest.mark.integration
def test_a_job_through_the_gateway_is_one_trace_from_the_request_to_stage_2(traced):
    receiver, gateway = traced
    # Given a caller's own trace context on the request (W3C traceparent)
    trace_id, caller = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    # When a two-stage job goes through the gateway
    body = {"query": QUERY, "candidates": candidates(8), "top_k_docs": 3}
    answer = gateway.http.post("/v1/evidence", json=body, headers={"traceparent": f"00-{trace_id}-{caller}-01"})
    assert answer.status_code == 200, answer.text
    # Then one trace holds spans from the gateway, the producer and both stages, down to each stored result
    wanted = {"POST /v1/evidence": 1, "rerank.send": 1, "rerank.documents": 1, "rerank.chunks": 1, "rerank.receive": 2, "rerank.tokenize": 2,
              "rerank.forward": 2, "rerank.store": 2}
    spans = wait_for(lambda: receiver.holding(trace_id, wanted), 30, "the job's spans to reach the receiver")
    (server,) = named(spans, "POST /v1/evidence")
    assert server.parent == caller and server.service == "rerank-gateway"
    (sent,) = named(spans, "rerank.send")
    assert sent.service == "rerank-gateway" and ancestors(spans, sent)[-1] == "POST /v1/evidence"
    (stage1,) = named(spans, "rerank.documents")
    (stage2,) = named(spans, "rerank.chunks")
    assert stage1.service == stage2.service == "rerank-worker" and stage1.attributes["messaging.destination.name"] == QUEUE
    # stage 2 was sent by stage 1, which the gateway's send started (inside FastAPI's span of our endpoint)
    assert ancestors(spans, stage1) == ["rerank.send", "fastapi.endpoint", "POST /v1/evidence"]
    assert ancestors(spans, stage2) == ["rerank.documents", "rerank.send", "fastapi.endpoint", "POST /v1/evidence"]
    # each stage waited in its queue, tokenized, waited for the device process and stored its result, inside its own span
    for stage in (stage1, stage2):
        inside = [span for span in spans.values() if span.parent == stage.id]
        assert {"rerank.tokenize", "rerank.forward", "rerank.store"} <= {span.name for span in inside}, stage.name
        assert [span.attributes["rerank.where"] for span in inside if span.name == "rerank.forward"] == ["device process"]
    assert sorted(ancestors(spans, span)[0] for span in named(spans, "rerank.receive")) == ["rerank.documents", "rerank.send"]
    assert all(span.trace == trace_id for span in spans.values()) and len({span.id for span in spans.values()}) == len(spans)


CALLER = """
import json, os, sys
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from producer import RerankClient
from tests.helpers import QUERY, candidates

provider = TracerProvider(resource=Resource({"service.name": "caller"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)
with trace.get_tracer("caller").start_as_current_span("caller.work") as work:
    result = RerankClient().two_stage(QUERY, candidates(6), top_k_docs=2, timeout=60)
print(json.dumps({"trace": format(work.get_span_context().trace_id, "032x"), "kept": len(result.documents.items)}))
"""


@pytest.mark.integration
def test_a_python_callers_current_span_is_the_parent_of_its_jobs_spans(traced, redis_server, tiny_model):
    receiver, _ = traced
    # Given a Python program that set up OpenTelemetry itself and runs a job inside its own span
    env = {**os.environ, **tracing_env(receiver), "RERANK_BROKER_URL": redis_server.url, "RERANK_MODEL": str(tiny_model)}
    # When it runs
    ran = subprocess.run([sys.executable, "-c", CALLER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["kept"] == 2
    # Then its provider got the send span, as a child of its own span, and the worker's spans continue that trace
    spans = wait_for(lambda: receiver.holding(out["trace"], {"caller.work": 1, "rerank.chunks": 1}), 30, "the caller's trace to reach the receiver")
    (sent,) = named(spans, "rerank.send")
    assert sent.service == "caller" and ancestors(spans, sent) == ["caller.work"]
    assert ancestors(spans, named(spans, "rerank.chunks")[0]) == ["rerank.documents", "rerank.send", "caller.work"]


OFF = """
import json, sys, time
import producer, producer.cli, producer.client, gateway.app, scoring.engine, scoring.device, worker.tasks
from contract import tracing
from producer import RerankClient
start = time.perf_counter()
for _ in range(100_000):
    with tracing.span("rerank.tokenize", pairs=1):
        pass
ns = (time.perf_counter() - start) * 1e4
# redis-py imports the SDK's metrics part wherever the SDK is installed; the trace SDK and the exporter are ours alone to load
print(json.dumps({"on": tracing.ON, "sdk": sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter"))),
                  "same": tracing.span("a") is tracing.span("b", root=True), "ns_per_span": ns}))
"""


def test_tracing_is_off_by_default_and_then_imports_no_sdk():
    # Given an environment with no OTEL_* variable
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    # When the producer, the gateway, the scoring core and the worker's tasks are imported and a span is asked for
    ran = subprocess.run([sys.executable, "-c", OFF], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    # Then tracing is off, nothing of OpenTelemetry's trace SDK or exporter was loaded, and a span is one shared no-op
    assert out["on"] is False and out["sdk"] == [] and out["same"] is True
    print(f"\n[tracing off] {out['ns_per_span']:.0f} ns per span asked for")


def test_a_protocol_we_do_not_ship_stops_the_worker_and_the_gateway_with_exit_2():
    # Given tracing asked for over OTLP/gRPC, which the tracing extra does not ship
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "RERANK_BROKER_URL": "redis://127.0.0.1:1/0", "RERANK_GATEWAY_API_KEYS": "k" * 32}
    for command in (["-m", "worker.cli"], ["-m", "gateway.cli", "--port", str(free_port())]):
        # When a worker or the gateway starts
        ran = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        # Then it stops before serving, exit code 2, naming the variable and what to set instead
        assert ran.returncode == 2, (command, ran.stderr[-2000:])
        assert "OTEL_EXPORTER_OTLP_PROTOCOL=grpc" in ran.stderr and "http/protobuf" in ran.stderr, ran.stderr[-2000:]
