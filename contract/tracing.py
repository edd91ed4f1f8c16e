"""Traces across the gateway, producers and workers (OpenTelemetry), off unless the standard OTEL_* variables ask for them.

On when OTEL_TRACES_EXPORTER names an exporter (`otlp`, `console`) or an OTLP endpoint is set
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), unless OTEL_SDK_DISABLED=true or
OTEL_TRACES_EXPORTER=none. Off, nothing of OpenTelemetry is imported and each call here returns at
once. On, OpenTelemetry's SDK (the `tracing` extra) reads the rest of OTEL_* itself: service name and
resource attributes, sampler, batching, endpoint, headers, timeout. A process that installed its own
tracer provider keeps it: the spans here go to it.

A trace crosses processes as W3C `traceparent`/`tracestate`: an HTTP header into the gateway, and a
task message header from producers to workers and from stage 1 to stage 2. Only this module imports
OpenTelemetry; it imports nothing heavy itself, so the scoring core may use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from contextlib import nullcontext
from typing import Any

log = logging.getLogger(__name__)

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_NOTHING = nullcontext()


def exporters_asked(environ: Mapping[str, str]) -> list[str]:
    """The span exporters `environ` asks for, lower case; empty when tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if not named and any(environ.get(variable) for variable in _ENDPOINTS):
        named = ["otlp"]
    return [name for name in named if name != "none"]


EXPORTERS = exporters_asked(os.environ)
ON = bool(EXPORTERS)
"""Whether this process traces; read once, at import."""

_service = "rerank-producer"
_ready = False


def configure(service: str) -> None:
    """Install the SDK's tracer provider from OTEL_*, naming this process `service` unless OTEL_SERVICE_NAME names it.

    Does nothing when tracing is off, when it ran already, or when the process installed a tracer
    provider of its own. Raises `ValueError` naming the variable to fix (an exporter or protocol we
    do not ship, or the `tracing` extra missing).
    """
    global _service, _ready
    _service = service
    if not ON or _ready:
        return
    _ready = True
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as e:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP_ENDPOINT turns tracing on, but OpenTelemetry's SDK is missing ({e}): "
            "pip install 'bge-rerank-celery[tracing]', or unset them"
        ) from e
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # the application set up OpenTelemetry itself
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)  # the sampler follows OTEL_TRACES_SAMPLER
    for name in EXPORTERS:
        if name == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={name} is not shipped here: use otlp (OTLP over HTTP, protobuf) or console")
    trace.set_tracer_provider(provider)


def _otlp_exporter() -> Any:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol != "http/protobuf":
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not shipped here: set it to http/protobuf "
            "(a collector's OTLP/HTTP port, 4318 by default)"
        )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise ValueError(f"OTLP export needs the `tracing` extra: pip install 'bge-rerank-celery[tracing]' ({e})") from e
    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: OTEL_EXPORTER_OTLP_*


def _tracer() -> Any:
    """The tracer of this project's spans; a library caller that never configured gets the SDK set up on first use."""
    from opentelemetry import trace

    if not _ready:
        try:
            configure(_service)
        except ValueError as e:
            log.warning("tracing stays off: %s", e)
    return trace.get_tracer("bge-rerank-celery")


def _kind(name: str) -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind[name.upper()]


def span(name: str, *, kind: str = "internal", root: bool = False, **attributes: Any) -> Any:
    """A context manager timing `name` as a span of the current trace; `root` lets it start a trace.

    Off, or (without `root`) outside any trace, it is a no-op: warm-up passes and other work no
    request asked for leave no spans. `attributes` become `rerank.<key>` unless the key has a dot.
    """
    if not ON:
        return _NOTHING
    from opentelemetry import trace

    if not root and not trace.get_current_span().get_span_context().is_valid:
        return _NOTHING
    return _tracer().start_as_current_span(name, kind=_kind(kind), attributes=_named(attributes))


def _named(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {(key if "." in key else f"rerank.{key}"): value for key, value in attributes.items() if value is not None}


def inject(carrier: MutableMapping[str, Any]) -> None:
    """Write the current span's W3C context (`traceparent`, `tracestate`) into `carrier`, e.g. a task's headers."""
    if ON:
        from opentelemetry import propagate

        propagate.inject(carrier)


def begin(name: str, carrier: Mapping[str, Any], *, queued_since: float | None = None, **attributes: Any) -> Any:
    """Start a consumer span `name` in the trace `carrier`'s W3C headers continue (else a new trace), current until `end`.

    With `queued_since` (a Unix time), a `rerank.receive` span first covers the time from then to
    now: the message waiting in its queue, then taken. Returns what `end` needs; None when off.
    """
    if not ON:
        return None
    import time

    from opentelemetry import context, propagate, trace

    # No traceparent: the current context (a task applied in the caller's process runs under the caller's span).
    parent = propagate.extract({key: value for key, value in carrier.items() if isinstance(value, str)}, context=context.get_current())
    tracer, named = _tracer(), _named(attributes)
    if queued_since is not None:
        now = time.time_ns()
        waited = tracer.start_span("rerank.receive", context=parent, kind=_kind("consumer"), start_time=min(int(queued_since * 1e9), now),
                                   attributes=named)
        waited.end(end_time=now)
    current = tracer.start_span(name, context=parent, kind=_kind("consumer"), attributes=named)
    return current, context.attach(trace.set_span_in_context(current, parent))


def end(begun: Any, error: str | None = None) -> None:
    """End a span `begin` started, marked as failed with `error` when given."""
    if begun is None:
        return
    from opentelemetry import context
    from opentelemetry.trace import Status, StatusCode

    current, token = begun
    if error is not None:
        current.set_status(Status(StatusCode.ERROR, error))
    context.detach(token)
    current.end()


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans this process still holds (before it exits without running atexit handlers, as pool processes do)."""
    if ON and _ready:
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        if hasattr(provider, "force_flush"):
            provider.force_flush(timeout_ms)
