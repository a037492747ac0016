"""OpenTelemetry: tracer provider, grpc.aio instrumentation, context across the queue.

Spans are exported to the console only when asked (``NOTIFY_TRACE_CONSOLE=1``); trace
context is always propagated, through gRPC metadata by the instrumentation and through
queue jobs by ``inject_trace_context``/``extract_trace_context``.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter


def setup_tracing(service: str, *, console: bool = False) -> TracerProvider:
    """Install a tracer provider and instrument grpc.aio servers and clients."""
    from opentelemetry.instrumentation.grpc import (  # noqa: PLC0415 (patches grpc on import use)
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
    )

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if console:
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
