"""An OTLP/gRPC trace receiver: what the services and Envoy export, kept in memory.

It speaks the collector's real protocol (``opentelemetry.proto.collector.trace.v1``), so
the exporters and Envoy's tracer are the production ones: tests read the spans back,
and the benchmark runs it as a process (``python -m scripts.otlp_sink --port N``) to
measure what tracing costs the system with a collector that costs little itself.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ExportedSpan:
    """One span as exported, with the service that exported it."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, str]
    links: tuple[str, ...]  # the span ids it links to
    linked_traces: tuple[str, ...] = ()  # and the trace ids of those spans
    start_ns: int = 0  # Unix epoch nanoseconds, as exported
    end_ns: int = 0


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every exported span; ``wait_for`` waits until a condition holds."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self._changed = asyncio.Condition()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> int:
        """Listen on a local port (0: a free one; plaintext, as a local collector would)."""
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        await self._server.start()
        return self.port

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            await self._server.stop(None)

    async def Export(  # noqa: N802 (the collector's method name)
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = resource.get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    found.append(
                        ExportedSpan(
                            service=service,
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes={
                                a.key: a.value.string_value or str(a.value.int_value)
                                for a in s.attributes
                            },
                            links=tuple(link.span_id.hex() for link in s.links),
                            linked_traces=tuple(link.trace_id.hex() for link in s.links),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                        )
                    )
        async with self._changed:
            self.spans.extend(found)
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, done: object, timeout: float = 20.0) -> list[ExportedSpan]:
        """Wait until ``done(spans)`` is true; return the spans."""
        assert callable(done)

        async def until() -> list[ExportedSpan]:
            async with self._changed:
                await self._changed.wait_for(lambda: done(self.spans))
                return list(self.spans)

        return await asyncio.wait_for(until(), timeout)


async def _serve(port: int) -> None:
    sink = OtlpSink()
    await sink.start(port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await sink.stop()
    print(f"spans received: {len(sink.spans)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Receive spans until SIGINT/SIGTERM, then say how many came."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, default=4317)
    asyncio.run(_serve(parser.parse_args(argv).port))


if __name__ == "__main__":
    main()
