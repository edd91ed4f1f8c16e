"""Prometheus metrics of one gateway: requests, latency, errors by kind, requests in flight, cancellations."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """The gateway's metrics, in a registry of their own (the page serves nothing else)."""

    def __init__(self) -> None:
        """Create the metrics in a fresh registry."""
        self.registry = CollectorRegistry()
        self.requests = Counter("rerank_gateway_requests", "HTTP requests answered, by route and status.", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "rerank_gateway_request_seconds", "Seconds from a request's arrival to its answer, by route.", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.errors = Counter("rerank_gateway_errors", "Requests refused or failed, by kind (the body's `error_type`).", ["kind"], registry=self.registry)
        self.in_flight = Gauge("rerank_gateway_in_flight", "Requests being handled now.", registry=self.registry)
        self.revoked = Counter("rerank_gateway_revoked", "Jobs revoked because their client disconnected before the answer.", registry=self.registry)


class Measure:
    """ASGI middleware counting every HTTP request by route template (never the raw path: ids would explode the labels)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        """Measure `app` into `metrics`."""
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the request, time it, and record its status and error kind."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 499  # nginx's "client closed request": no response was sent
        scope.setdefault("state", {})

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            kind = scope["state"].get("error_kind")
            if kind is None and status >= 400:
                kind = "client_gone" if status == 499 else "http"
            if kind is not None:
                self.metrics.errors.labels(kind).inc()
