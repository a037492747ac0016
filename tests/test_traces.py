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
    }
    async with e2e_system(
        tmp_path_factory.mktemp("traced"), certs_dir, f"t{RUN_ID}tr", extra_env=env
    ) as handle:
        yield handle


def _trace_of(spans: list[ExportedSpan], correlation_id: str) -> list[ExportedSpan]:
    ids = {s.trace_id for s in spans if s.attributes.get("correlation_id") == correlation_id}
    return [s for s in spans if s.trace_id in ids]


async def test_one_notification_is_one_trace_from_envoy_to_the_provider(
    traced: E2E, sink: OtlpSink
) -> None:
    user_id = await traced.new_user(devices=0)
    correlation_id = f"trace-{uuid.uuid4().hex[:12]}"
    status, sent = await traced.api(
        "POST",
        "/v1/notifications",
        {"userId": user_id, "templateId": "welcome", "variables": {"name": "Tia"}},
        headers={"x-correlation-id": correlation_id},
    )
    assert status == 200, sent
    await traced.settle(sent["notification"]["id"])

    def complete(spans: list[ExportedSpan]) -> bool:
        trace = _trace_of(spans, correlation_id)
        names = {(s.service, s.name) for s in trace}
        reports = {s.span_id for s in trace if s.name == "status report"}
        return (
            ("email_worker", "email smtp") in names
            and any(s.service == "envoy" for s in trace)
            and any(s.name == "status report batch" and set(s.links) & reports for s in spans)
        )

    trace = _trace_of(await sink.wait_for(complete), correlation_id)
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
    assert any(s.attributes.get("db.system") == "postgresql" for s in trace)
    assert any(s.attributes.get("db.system") == "redis" for s in trace)
    ours = [s for s in trace if s.service != "envoy"]
    assert all(s.attributes.get("correlation_id") == correlation_id for s in ours), [
        (s.service, s.name) for s in ours if s.attributes.get("correlation_id") != correlation_id
    ]
