"""OpenTelemetry set-up shared by every bitsmith process.

One trace per job: the coordinator opens the job's root span, and the gRPC interceptors of
`bitsmith.rpc` carry its context in call metadata to every service, wherever Ray placed it.

Exporters are chosen from the environment, so a deployment needs no code change:
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` set: spans go to that collector over OTLP/gRPC (batched).
- ``BITSMITH_TRACE_FILE`` set: every finished span is appended to that file as one JSON line —
  how tests and `bitsmith report` read a job's spans from several processes without a collector.

Tracing is an observer, never a requirement: on a host without the OpenTelemetry packages (a GPU
node that runs only the calibrator and solver, say) every function here degrades to a no-op, and the
services run untraced.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import threading
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

TRACE_FILE_ENV = "BITSMITH_TRACE_FILE"
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"


class _JsonLinesExporter:
    """Appends each span as one JSON object per line; safe across threads and processes (O_APPEND)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = None

    def export(self, spans: list[ReadableSpan]) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = "".join(json.dumps(_span_record(span)) + "\n" for span in spans)
        with self._lock:
            if self._file is None:
                self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _span_record(span: ReadableSpan) -> dict[str, object]:
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}" if ctx else "",
        "span_id": f"{ctx.span_id:016x}" if ctx else "",
        "parent_id": f"{parent.span_id:016x}" if parent else None,
        "service": span.resource.attributes.get("service.name", ""),
        "pid": span.resource.attributes.get("process.pid", 0),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": {k: v if isinstance(v, str | int | float | bool) else str(v)
                       for k, v in (span.attributes or {}).items()},
        "status": span.status.status_code.name,
    }


def tracing_available() -> bool:
    """Whether the OpenTelemetry SDK and its gRPC instrumentation can be imported here."""
    try:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("opentelemetry.sdk.trace", "opentelemetry.instrumentation.grpc"))
    except (ImportError, ValueError):  # a parent package is missing (or blocked)
        return False


class _UntracedTracer:
    """What `setup_tracing(...).get_tracer(...)` is without OpenTelemetry: spans that record nothing."""

    @contextlib.contextmanager
    def start_as_current_span(self, name: str, **_: Any) -> Iterator[None]:
        yield None


class UntracedProvider:
    """The tracer provider of a process without OpenTelemetry."""

    def get_tracer(self, name: str, *_: Any, **__: Any) -> _UntracedTracer:
        return _UntracedTracer()


@functools.cache
def setup_tracing(service_name: str) -> TracerProvider | UntracedProvider:
    """Install the process's tracer provider once, named after the service, with env-chosen exporters
    (an untraced one where OpenTelemetry is not installed)."""
    if not tracing_available():
        return UntracedProvider()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name, "process.pid": os.getpid()}))
    if os.environ.get(OTLP_ENDPOINT_ENV):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace_file = os.environ.get(TRACE_FILE_ENV)
    if trace_file:
        provider.add_span_processor(SimpleSpanProcessor(_JsonLinesExporter(trace_file)))  # type: ignore[arg-type]
    return provider


def server_interceptors(service_name: str) -> list[grpc.ServerInterceptor]:
    """The interceptors that continue a caller's trace in a server (none without OpenTelemetry)."""
    provider = setup_tracing(service_name)
    if isinstance(provider, UntracedProvider) or not tracing_available():
        return []
    from opentelemetry.instrumentation.grpc import server_interceptor

    return [server_interceptor(tracer_provider=provider)]


def traced_channel(channel: grpc.Channel, service_name: str) -> grpc.Channel:
    """`channel` with its calls traced and their context propagated (unchanged without OpenTelemetry)."""
    provider = setup_tracing(service_name)
    if isinstance(provider, UntracedProvider) or not tracing_available():
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    traced: grpc.Channel = intercept_channel(channel, client_interceptor(tracer_provider=provider))
    return traced


def current_trace_id() -> str:
    """Hex trace id of the active span, or "" outside any span (always "" without OpenTelemetry)."""
    if not tracing_available():
        return ""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def current_span_id() -> str:
    """Hex id of the active span, or "" outside any span (always "" without OpenTelemetry)."""
    if not tracing_available():
        return ""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.span_id:016x}" if ctx.is_valid else ""


def read_spans(path: str) -> list[dict[str, object]]:
    """The span records a `BITSMITH_TRACE_FILE` holds (for tests and reports)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
