"""One notification is one trace: Envoy starts it, the gateway continues it, the job
carries it through RabbitMQ, the worker continues it to the provider call and the status
report; every span has its parent in the trace and carries the correlation id.

The system of this module exports to an OTLP/gRPC receiver in the test process
(``tests/otlp_sink.py``, the collector's real protocol) with every trace sampled.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scripts.otlp_sink import ExportedSpan, OtlpSink
from tests.conftest import RUN_ID
from tests.e2e_support import E2E, e2e_system

pytestmark = pytest.mark.timeout(180)

SERVER = 2  # OTLP span kind


@pytest.fixture(scope="module")
async def sink() -> AsyncIterator[OtlpSink]:
    receiver = OtlpSink()
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.fixture(scope="module")
async def traced(
    tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, sink: OtlpSink
) -> AsyncIterator[E2E]:
    env = {
        "NOTIFY_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
        "NOTIFY_TRACE_SAMPLE_RATIO": "1",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s instead of 5 s
        "NOTIFY_RECONCILE_INTERVAL": "1",  # its passes run while the tests do
    }
    async with e2e_system(
        tmp_path_factory.mktemp("traced"), certs_dir, f"t{RUN_ID}tr", extra_env=env
    ) as handle:
        yield handle


def _trace_of(spans: list[ExportedSpan], correlation_id: str) -> list[ExportedSpan]:
    ids = {s.trace_id for s in spans if s.attributes.get("correlation_id") == correlation_id}
    return [s for s in spans if s.trace_id in ids]


async def _send(traced: E2E, correlation_id: str, headers: dict[str, str] | None = None) -> None:
    """One e-mail notification through Envoy, settled (its terminal status recorded)."""
    user_id = await traced.new_user(devices=0)
    status, sent = await traced.api(
        "POST",
        "/v1/notifications",
        {"userId": user_id, "templateId": "welcome", "variables": {"name": "Tia"}},
        headers={"x-correlation-id": correlation_id, **(headers or {})},
    )
    assert status == 200, sent
    await traced.settle(sent["notification"]["id"])


async def _traced_send(traced: E2E, sink: OtlpSink, correlation_id: str) -> list[ExportedSpan]:
    """Send one notification and wait until its whole trace has been exported."""
    await _send(traced, correlation_id)

    def complete(spans: list[ExportedSpan]) -> bool:
        trace = _trace_of(spans, correlation_id)
        names = {(s.service, s.name) for s in trace}
        reports = {s.span_id for s in trace if s.name == "status report"}
        # Each service exports on its own schedule: wait for every one the tests read,
        # user_svc's side of the batch calls included (it may come after the caller's).
        upstream = {
            s.name.rsplit("/", 1)[-1] for s in trace if s.service == "user_svc" and s.kind == SERVER
        }
        return (
            ("email_worker", "email smtp") in names
            and any(s.service == "envoy" for s in trace)
            and {"UpdateDeliveryStatuses", "CreateNotificationRecords"} <= upstream
            and any(
                s.name == "status report batch"
                and (s.parent_id in reports or set(s.links) & reports)
                for s in spans
            )
        )

    return _trace_of(await sink.wait_for(complete), correlation_id)


async def test_one_notification_is_one_trace_from_envoy_to_the_provider(
    traced: E2E, sink: OtlpSink
) -> None:
    correlation_id = f"trace-{uuid.uuid4().hex[:12]}"
    trace = await _traced_send(traced, sink, correlation_id)
    assert len({s.trace_id for s in trace}) == 1, "one notification, one trace"
    by_id = {s.span_id: s for s in trace}
    roots = [s for s in trace if not s.parent_id]
    assert [r.service for r in roots] == ["envoy"], roots
    for s in trace:
        assert not s.parent_id or s.parent_id in by_id, f"{s.service} {s.name}: parent missing"

    def ancestors(span: ExportedSpan) -> list[str]:
        chain = []
        while span.parent_id:
            span = by_id[span.parent_id]
            chain.append(span.service)
        return chain

    send = next(
        s for s in trace
        if s.service == "gateway" and s.kind == SERVER and s.name.endswith("SendNotification")
    )  # fmt: skip
    assert ancestors(send) == ["envoy"] * len(ancestors(send)) and ancestors(send)
    provider = next(s for s in trace if s.name == "email smtp")
    chain = ancestors(provider)
    assert "gateway" in chain and chain[-1] == "envoy", chain  # across the queue
    assert any(s.name == "render" and s.service == "email_worker" for s in trace)
    # The status update and the record are in the trace (each caller's wait for its
    # batch; the batch call links back to them), and so are SQL and Redis.
    assert any(s.name == "status report" and s.service == "email_worker" for s in trace)
    assert any(s.name == "notification record" and s.service == "gateway" for s in trace)
    # The batch calls carrying them are in the trace too, down to user_svc's side (a
    # batch call belongs to its first recorded caller's trace, whatever the ratio).
    for method in ("UpdateDeliveryStatuses", "CreateNotificationRecords"):
        assert any(
            s.service == "user_svc" and s.kind == SERVER and s.name.endswith(method) for s in trace
        ), method
    assert any(s.attributes.get("db.system") == "postgresql" for s in trace)
    assert any(s.attributes.get("db.system") == "redis" for s in trace)
    ours = [s for s in trace if s.service != "envoy"]
    assert all(s.attributes.get("correlation_id") == correlation_id for s in ours), [
        (s.service, s.name) for s in ours if s.attributes.get("correlation_id") != correlation_id
    ]


async def test_a_caller_that_does_not_sample_gets_no_span_anywhere(
    traced: E2E, sink: OtlpSink
) -> None:
    """The caller's "not sampled" (W3C flags 00) holds on every hop: no service starts a
    trace of its own for that request, on either side of the queue."""
    trace_id = uuid.uuid4().hex
    correlation_id = f"unsampled-{uuid.uuid4().hex[:12]}"
    parent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-00"
    await _send(traced, correlation_id, headers={"traceparent": parent})
    spans = [
        *await _traced_send(traced, sink, f"after-{correlation_id}"),
        *sink.spans,
    ]  # a later trace, exported
    assert not [(s.service, s.name) for s in spans if s.trace_id == trace_id]
    assert not [
        (s.service, s.name) for s in spans if s.attributes.get("correlation_id") == correlation_id
    ]
    # Nor did a batch carrying only its items make a span (linking to the unrecorded
    # trace) or start a trace upstream: the record and the status report went in batch
    # calls, and no server span anywhere is a root (the reconciler's passes, the only
    # other calls without a request, are traces of their own).
    assert not [(s.service, s.name) for s in spans if trace_id in s.linked_traces]
    assert not [
        (s.service, s.name)
        for s in spans
        if s.kind == SERVER and not s.parent_id and s.service != "envoy"
    ]


async def test_sql_redis_and_health_checks_make_no_traces_of_their_own(
    traced: E2E, sink: OtlpSink
) -> None:
    """Only work done for a request (or a job, or a batch) is traced: the dependency
    probes' queries and Envoy's health checks, which run with no request around them,
    would otherwise each start a trace of one span."""
    await _traced_send(
        traced, sink, f"trace-{uuid.uuid4().hex[:12]}"
    )  # the probes at start-up are long exported by now
    spans = list(sink.spans)
    assert any(s.attributes.get("db.system") for s in spans)
    orphans = [
        (s.service, s.name) for s in spans if s.attributes.get("db.system") and not s.parent_id
    ]
    assert not orphans
    assert not [(s.service, s.name) for s in spans if "grpc.health.v1.Health" in s.name]
