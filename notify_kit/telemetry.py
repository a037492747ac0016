"""OpenTelemetry: tracer provider, instrumentation, context across the queue.

Tracing is set up once per process from its settings, and only when spans have somewhere
to go: ``NOTIFY_OTLP_ENDPOINT`` (an OTLP/gRPC collector, e.g. ``http://collector:4317``)
or ``NOTIFY_TRACING=console``. Without either nothing is instrumented at all: spans that
are made and dropped are not free (the grpc.aio interceptors alone took 11-27% of the
Python samples on the send path, py-spy, bench.e2e, 2026-12-02).

When tracing is on: asyncpg and Redis are instrumented (the kept OpenTelemetry
instrumentations, gated to run inside recorded traces only), and our shared gRPC
interceptors call the grpc.aio instrumentation's server and client interceptors for the
calls that are recorded (``traced_service``, ``traced_call``); the trace context
crosses RabbitMQ in the job (``inject_trace_context`` at publish,
``extract_trace_context`` at consume, the W3C headers in ``JobMeta.trace_context``);
renders and each provider call get spans of their own (``span``). Sampling is
parent-based: a trace Envoy started (or a caller continued) keeps its decision across
every hop; a root made here (a job without context) is kept at
``NOTIFY_TRACE_SAMPLE_RATIO``. Every span carries the correlation id of the work it
belongs to (``correlation_id``), so a trace and the logs find each other.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from notify_kit.acl import HEALTH_METHODS
from notify_kit.context import get_correlation_id

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import Span, TracerProvider

CORRELATION_ATTRIBUTE = "correlation_id"


def setup_tracing(
    service: str, mode: str, *, endpoint: str = "", sample_ratio: float = 1.0
) -> TracerProvider | None:
    """Install a tracer provider exporting to ``mode`` and instrument, unless off."""
    if mode == "off":
        return None
    # Imported here: a service that does not trace does not load the SDK either.
    from opentelemetry.instrumentation.grpc import (  # noqa: PLC0415
        aio_client_interceptors,
        aio_server_interceptor,
    )
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )
    from opentelemetry.sdk.trace.sampling import (  # noqa: PLC0415
        ParentBased,
        TraceIdRatioBased,
    )

    class CorrelationProcessor(SpanProcessor):
        """Puts the correlation id of the work in progress on every span."""

        def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
            correlation_id = get_correlation_id()
            if correlation_id:
                span.set_attribute(CORRELATION_ATTRIBUTE, correlation_id)

    exporter: SpanExporter
    if mode == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter(
            endpoint=endpoint, insecure=endpoint.startswith("http://"), timeout=5
        )
    else:
        exporter = ConsoleSpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    provider.add_span_processor(CorrelationProcessor())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    # The gRPC instrumentation's interceptors, which our own interceptors call for the
    # requests that are recorded only (``traced_service``, ``traced_call``).
    global _server_spans, _client_spans  # noqa: PLW0603 (set once, by the process's setup)
    _server_spans = aio_server_interceptor()  # type: ignore[no-untyped-call]
    _client_spans = aio_client_interceptors()[0]  # type: ignore[no-untyped-call]
    global _tracing_on  # noqa: PLW0603 (set once, by the process's setup)
    _tracing_on = True
    _instrument_clients()
    return provider


def _instrument_clients() -> None:
    """SQL and Redis spans, for the clients this process has loaded (its modules are all
    imported before its ``__main__`` sets tracing up).

    A client the service does not use is not instrumented: instrumenting Redis imports
    it, 8-11 MB in a worker that never talks to Redis.
    """
    if "asyncpg" in sys.modules:
        import asyncpg  # noqa: PLC0415
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor  # noqa: PLC0415

        AsyncPGInstrumentor().instrument()  # type: ignore[no-untyped-call]
        for owner in (
            asyncpg.connection.Connection,
            asyncpg.prepared_stmt.PreparedStatement,
            asyncpg.cursor.Cursor,
            asyncpg.cursor.CursorIterator,
        ):
            _in_recorded_traces_only(owner)
    if "redis" in sys.modules:
        import redis.asyncio  # noqa: PLC0415
        from opentelemetry.instrumentation.redis import RedisInstrumentor  # noqa: PLC0415

        RedisInstrumentor().instrument()
        for owner in (redis.asyncio.Redis, redis.asyncio.client.Pipeline):
            _in_recorded_traces_only(owner)


TRACEPARENT = "traceparent"  # W3C Trace Context: version-trace_id-parent_id-flags
_tracing_on = False  # whether setup_tracing turned tracing on in this process
_server_spans: grpc.aio.ServerInterceptor | None = None  # the instrumentation's, once on
_client_spans: grpc.aio.UnaryUnaryClientInterceptor | None = None


def traced_service(details: grpc.HandlerCallDetails) -> grpc.aio.ServerInterceptor | None:
    """The gRPC instrumentation's server interceptor when this call is to be recorded
    (tracing on, its caller sampled it or it starts a trace, not a health check); None
    otherwise.

    The shared server interceptor calls it for the recorded calls only, instead of the
    instrumentor putting it in front of every call: the unrecorded 90% then cost a
    header read, not an interceptor layer and a filter chain each (2% of the gateway's
    samples, py-spy at saturation, 2026-12-04). The caller's decision still travels
    (``continue_unsampled``)."""
    if _server_spans is None or details.method.startswith(HEALTH_METHODS):
        return None
    if not sampled_or_new(_traceparent(details.invocation_metadata)):
        return None
    return _server_spans


def traced_call() -> grpc.aio.UnaryUnaryClientInterceptor | None:
    """The gRPC instrumentation's client interceptor when the call is made inside a
    recorded span (it then gets a span of its own, which its server continues); None
    otherwise (``pass_on_unsampled`` carries the decision instead)."""
    if _client_spans is None or not trace.get_current_span().is_recording():
        return None
    return _client_spans


def _traceparent(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == TRACEPARENT and isinstance(value, str):
            return value
    return None


_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def sampled_or_new(traceparent: str | None) -> bool:
    """Whether a request carrying ``traceparent`` is traced here: its caller sampled it,
    or it has no valid trace context (none, or malformed: the W3C format, version 00,
    ids not all zero) and starts a trace, sampled at the ratio. Only a well-formed
    "not sampled" is followed without a span of ours."""
    if traceparent is None or not _TRACEPARENT.fullmatch(traceparent):
        return True
    return bool(int(traceparent[-2:], 16) & 1)  # the flags' "sampled" bit


def continue_unsampled(metadata: Iterable[tuple[str, str | bytes]] | None) -> object | None:
    """Make a request's unsampled trace context current, without a span; returns the
    token for ``detach`` (None when there is nothing to do).

    The gRPC instrumentation's interceptors run only for recorded calls
    (``traced_service``), so that the 90% not recorded cost a header read instead of two
    interceptor layers, a span and a servicer-context wrapper each (0.5 ms CPU per
    notification, bench.e2e, 2026-12-03).
    The decision must still travel: with this context current, the calls and jobs the
    request makes say "not sampled" too (``pass_on_unsampled``, ``inject_trace_context``),
    and no service downstream starts a trace of its own for it.
    """
    if not _tracing_on:
        return None
    traceparent = _traceparent(metadata)
    if traceparent is None or sampled_or_new(traceparent):
        return None
    return otel_context.attach(propagate.extract({TRACEPARENT: traceparent}))


def detach(token: object | None) -> None:
    """Undo ``continue_unsampled``."""
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]


def pass_on_unsampled(metadata: grpc.aio.Metadata) -> None:
    """Add the current trace context to an outgoing call's ``metadata`` when it is one
    not being recorded (a recorded one the client instrumentation propagates itself,
    with its own span as the parent)."""
    if not _tracing_on or TRACEPARENT in metadata:
        return
    current = trace.get_current_span()
    if current.is_recording() or not current.get_span_context().is_valid:
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    for key, value in carrier.items():
        metadata.add(key, value)


def _in_recorded_traces_only(owner: type) -> None:
    """Let the SQL and Redis instrumentations run only inside a trace being recorded.

    Those instrumentations build a span's name and attributes (a regex over the SQL, the
    command's arguments) before the sampler is even asked, so on the 90% of requests
    that are not sampled they cost as much as on the rest: py-spy put them at a third of
    the OpenTelemetry samples of the e-mail worker (bench.e2e, 2026-12-03). A query
    outside any recorded trace (not sampled, or a background loop such as a health
    probe) calls the uninstrumented method directly; inside one it gets its span as
    before. Every method the instrumentations wrapped on ``owner`` (``wrapt`` function
    wrappers) is replaced by a gate choosing between the two.
    """
    import wrapt  # noqa: PLC0415

    for name, attribute in list(vars(owner).items()):
        if isinstance(attribute, wrapt.FunctionWrapper):
            setattr(owner, name, _gate(owner, attribute))


def _gate(owner: type, instrumented: Any) -> Any:
    """``instrumented``'s original method unless the current span is recording."""
    original = instrumented.__wrapped__
    get_current_span = trace.get_current_span

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        if get_current_span().is_recording():
            return instrumented.__get__(self, owner)(*args, **kwargs)
        return original(self, *args, **kwargs)

    return method


@contextmanager
def span(
    name: str,
    *,
    parent: Mapping[str, str] | None = None,
    child_of: trace.SpanContext | None = None,
    links: Sequence[trace.Link] = (),
    **attributes: Any,
) -> Iterator[trace.SpanContext]:
    """A span of our own around a step (a render, a provider call, a job, a batch), made
    current; it yields the span's context (to link to). ``parent`` continues a trace a
    queue job carried (``inject_trace_context``); ``child_of`` makes it the child of a
    span of this process that is not current here (another task's). Exceptions are
    recorded on it and
    re-raised. Without tracing it is nothing at all, not even the API's no-op span, whose
    context attach and detach per step cost the untraced build 18% of its CPU per
    notification (bench.e2e, 2026-12-03)."""
    if not _tracing_on:
        yield trace.INVALID_SPAN_CONTEXT
        return
    if parent is not None:
        if not sampled_or_new(parent.get(TRACEPARENT)):
            # A job its sender did not sample: its decision made current, no span (the
            # sampler would drop every span under it anyway), for what the step calls.
            token = otel_context.attach(extract_trace_context(parent))
            try:
                yield trace.get_current_span().get_span_context()
            finally:
                otel_context.detach(token)
            return
        context: otel_context.Context | None = extract_trace_context(parent)
    elif child_of is not None:
        context = trace.set_span_in_context(trace.NonRecordingSpan(child_of))
    else:
        enclosing = trace.get_current_span().get_span_context()
        if enclosing.is_valid and not enclosing.trace_flags.sampled:
            # Inside an unsampled trace a child is never sampled (``ParentBased``): the
            # SDK's span, attach and detach would buy nothing (3% of the e-mail
            # worker's samples, py-spy at saturation, 2026-12-04).
            yield enclosing
            return
        context = None
    with _tracer().start_as_current_span(
        name, context=context, links=links, attributes=attributes
    ) as current:
        yield current.get_span_context()


@contextmanager
def within(context: trace.SpanContext) -> Iterator[None]:
    """Make the (unrecorded) span ``context`` current for a step of no span of its own,
    so the calls it makes carry that trace's decision; nothing when tracing is off."""
    if not _tracing_on or not context.is_valid:
        yield
        return
    with trace.use_span(trace.NonRecordingSpan(context)):
        yield


@functools.cache
def _tracer() -> trace.Tracer:
    """One tracer for ``span``: the SDK makes a new tracer and scope per ``get_tracer``
    (its hashing showed in py-spy). Taken before ``setup_tracing`` it is the API's proxy,
    which follows the provider set later."""
    return trace.get_tracer("notify")


def tag_current_span(correlation_id: str) -> None:
    """Put ``correlation_id`` on the current span (a no-op when not recording)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attribute(CORRELATION_ATTRIBUTE, correlation_id)


def inject_trace_context() -> dict[str, str]:
    """The current trace context as W3C headers, to put into a queue job."""
    carrier: dict[str, str] = {}
    if _tracing_on:
        propagate.inject(carrier)
    return carrier


def extract_trace_context(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context a queue job carried, to continue its trace in the worker."""
    return propagate.extract(dict(carrier))
