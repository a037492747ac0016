"""OpenTelemetry: tracer provider, grpc.aio instrumentation, context across the queue.

Tracing is set up only when spans have somewhere to go (``NOTIFY_TRACING``: ``off``, the
default, or ``console``). Spans that are made and dropped are not free: the grpc.aio
interceptors alone took 11-27% of the Python samples on the send path (py-spy, bench.e2e,
2026-12-02). When tracing is on, the context crosses gRPC through the instrumentation and
queue jobs through ``inject_trace_context``/``extract_trace_context``; when it is off
both are no-ops (no active span: nothing to inject, nothing to continue).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


def setup_tracing(service: str, mode: str) -> TracerProvider | None:
    """Install a tracer provider and instrument grpc.aio servers and clients, unless off."""
    if mode == "off":
        return None
    # Imported here: a service that does not trace does not load the SDK either.
    from opentelemetry.instrumentation.grpc import (  # noqa: PLC0415
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
    )
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        ConsoleSpanExporter,
    )

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if mode == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    GrpcAioInstrumentorServer().instrument()  # type: ignore[no-untyped-call]
    GrpcAioInstrumentorClient().instrument()  # type: ignore[no-untyped-call]
    return provider


def inject_trace_context() -> dict[str, str]:
    """The current trace context as W3C headers, to put into a queue job."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_trace_context(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context a queue job carried, to continue its trace in the worker."""
    return propagate.extract(dict(carrier))
