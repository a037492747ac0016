"""Metrics on a scrape of the running system: every process serves its own, the ones the
dashboards and alerts use exist, and they move when their event happens (a delivery, a
429, an idempotent replay). Retries, dead letters, replays and breakers are in
tests/test_delivery_engine.py, whose system has short breaker and retry settings."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable

from scripts import metrics_doc
from scripts.system import SERVICES, poll
from tests.e2e_support import E2E, Samples

SEND = "/notify.v1.NotificationService/SendNotification"


async def test_every_process_serves_its_metrics(e2e: E2E) -> None:
    for service in SERVICES:
        scrape = await e2e.metrics(service)
        names = scrape.names()
        assert "process_resident_memory_bytes" in names, service
        assert "notify_db_pool_connections" in names, service
        assert scrape.value("notify_db_pool_max") >= 1, service
        assert "notify_rpc_server_duration_seconds_count" in names or service.endswith("worker"), (
            service
        )


async def test_a_delivery_moves_its_metrics(e2e: E2E) -> None:
    user_id = await e2e.new_user(devices=1)
    before = {s: await e2e.metrics(s) for s in ("gateway", "email_worker", "push_worker")}
    status, sent = await e2e.api(
        "POST",
        "/v1/notifications",
        {"userId": user_id, "templateId": "welcome", "variables": {"name": "Ada"}},
    )
    assert status == 200, sent
    await e2e.settle(sent["notification"]["id"])

    def delta(service: str, after: Samples, name: str, **labels: str) -> float:
        return after.value(name, **labels) - before[service].value(name, **labels)

    gateway = await e2e.metrics("gateway")
    assert delta("gateway", gateway, "notify_rpc_server_duration_seconds_count",
                 method=SEND, code="OK") == 1  # fmt: skip
    assert delta("gateway", gateway, "notify_notifications_accepted_total",
                 channel="email", status="queued") == 1  # fmt: skip
    assert delta("gateway", gateway, "notify_queue_published_total", queue="email.queue") == 1
    assert delta("gateway", gateway, "notify_queue_published_total", queue="push.queue") == 1
    assert delta("gateway", gateway, "notify_queue_publish_duration_seconds_count",
                 queue="email.queue", outcome="confirmed") == 1  # fmt: skip
    assert delta("gateway", gateway, "notify_rpc_client_duration_seconds_count",
                 method="/notify.v1.DeliveryService/CreateNotificationRecords") >= 1  # fmt: skip
    for service, channel, provider in (
        ("email_worker", "email", "smtp"),
        ("push_worker", "push", "fcm"),
    ):
        # The worker counts after it recorded the outcome, which is before the status
        # the test waited for: the scrape sees it.
        after = await e2e.metrics(service)
        assert delta(service, after, "notify_deliveries_total", channel=channel,
                     provider=provider, outcome="delivered") == 1, service  # fmt: skip
        assert delta(service, after, "notify_provider_call_duration_seconds_count",
                     channel=channel, provider=provider, outcome="ok") == 1  # fmt: skip
        assert delta(service, after, "notify_render_duration_seconds_count",
                     channel=channel, outcome="ok") == 1  # fmt: skip
        queue = f"{channel}.queue"
        assert delta(service, after, "notify_queue_consumed_total", queue=queue) == 1
        assert delta(service, after, "notify_queue_settled_total", queue=queue,
                     outcome="acked") == 1  # fmt: skip
        assert after.value("notify_breaker_state", channel=channel, provider=provider) == 0
        assert delta(service, after, "notify_rpc_client_duration_seconds_count",
                     method="/notify.v1.DeliveryService/UpdateDeliveryStatuses",
                     code="OK") >= 1  # fmt: skip


def _consumed(queue: str, scrape: Samples) -> bool:
    return scrape.value("notify_queue_consumers", queue=queue) >= 1


async def test_queue_depth_is_read_by_the_consumers(e2e: E2E) -> None:
    for service, queue in (
        ("email_worker", "email.queue"),
        ("push_worker", "push.queue"),
        ("gateway", "failed.queue"),
    ):
        consumed: Callable[[Samples], bool] = functools.partial(_consumed, queue)
        scrape = await poll(
            functools.partial(e2e.metrics, service),
            consumed,
            timeout=15,
            what=f"{service}'s depth of {queue}",
        )
        assert ("notify_queue_messages", queue) in {
            (n, labels.get("queue")) for n, labels, _ in scrape.samples
        }


async def test_a_429_and_an_idempotent_replay_are_counted(e2e: E2E) -> None:
    suffix = uuid.uuid4().hex[:8]
    tenant = f"limits-{suffix}"
    status, made = await e2e.api(
        "POST", "/v1/api-keys", {"name": "admin", "scopes": ["SCOPE_ADMIN"], "tenant": tenant}
    )
    assert status == 200, made
    key = made["secret"]
    limit = {"channel": "CHANNEL_EMAIL", "maxNotifications": 1, "window": "3600s"}
    status, got = await e2e.api(  # by the operators: the tenant's key is not cached yet
        "PUT", f"/v1/tenants/{tenant}/settings", {"recipientLimits": [limit]}
    )
    assert status == 200, got
    template = {"id": "welcome", "contents": [{"language": "en",
                "email": {"subject": "Hi", "textBody": "Hi."}}]}  # fmt: skip
    status, got = await e2e.api("POST", "/v1/templates", template, api_key=key)
    assert status == 200, got
    status, got = await e2e.api(
        "POST", "/v1/users", {"email": f"m-{suffix}@example.com"}, api_key=key
    )
    assert status == 200, got
    send = {"userId": got["user"]["id"], "templateId": "welcome", "idempotencyKey": suffix}
    before = await e2e.metrics("gateway")
    for _ in range(2):  # the second is a replay, not a send
        status, got = await e2e.api("POST", "/v1/notifications", send, api_key=key)
        assert status == 200, got
    status, got = await e2e.api(
        "POST", "/v1/notifications", {**send, "idempotencyKey": f"{suffix}-2"}, api_key=key
    )
    assert status == 429, got
    after = await e2e.metrics("gateway")
    assert (
        after.value("notify_idempotent_replays_total")
        - before.value("notify_idempotent_replays_total")
        == 1
    )
    assert (
        after.value("notify_rate_limited_total", limit="recipient")
        - before.value("notify_rate_limited_total", limit="recipient")
        == 1
    )


def test_the_runbook_lists_exactly_the_declared_metrics() -> None:
    text = metrics_doc.DOCUMENT.read_text()
    assert metrics_doc.document_with_table(text) == text, (
        "run python -m scripts.metrics_doc --write"
    )
