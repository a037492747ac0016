"""End to end: JSON through Envoy, gateway, RabbitMQ, workers, real SMTP and FCM peers."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.store import KeyStore
from notify_kit import db
from scripts.api import DEMO_TEMPLATE, call_raw
from tests.e2e_support import API_KEY, E2E

pytestmark = pytest.mark.timeout(300)


async def test_email_and_push_are_delivered(e2e: E2E) -> None:
    user_id = await e2e.new_user()
    status, sent = await e2e.api(
        "POST",
        "/v1/notifications",
        {"userId": user_id, "templateId": "welcome", "variables": {"name": "Grace <3"}},
    )
    assert status == 200, sent
    note = sent["notification"]
    assert {d["status"] for d in note["deliveries"]} == {"NOTIFICATION_STATUS_QUEUED"}
    final = await e2e.settle(note["id"])
    statuses = {d["channel"]: d["status"] for d in final["notification"]["deliveries"]}
    assert statuses == {
        "CHANNEL_EMAIL": "NOTIFICATION_STATUS_DELIVERED",
        "CHANNEL_PUSH": "NOTIFICATION_STATUS_DELIVERED",
    }
    assert final["notification"]["status"] == "NOTIFICATION_STATUS_DELIVERED"
    mails = [m for m in e2e.mail.messages if m["X-Notify-Notification-Id"] == note["id"]]
    assert len(mails) == 1
    assert mails[0]["Subject"] == "Welcome, Grace <3!"
    html = mails[0].get_body(("html",))
    assert html is not None and "Grace &lt;3" in html.get_content()
    pushes = [m for m in e2e.fcm.messages if m["data"]["notification_id"] == note["id"]]
    assert len(pushes) == 1
    assert pushes[0]["notification"]["title"] == "Welcome, Grace <3!"


async def test_language_fallback_and_channel_choice(e2e: E2E) -> None:
    user_id = await e2e.new_user(devices=0, locale="fr-CA")
    status, sent = await e2e.api(
        "POST",
        "/v1/notifications",
        {
            "userId": user_id,
            "templateId": "welcome",
            "channels": ["CHANNEL_EMAIL"],
            "variables": {"name": "Zoé"},
        },
    )
    assert status == 200, sent
    final = await e2e.settle(sent["notification"]["id"])
    assert [d["status"] for d in final["notification"]["deliveries"]] == [
        "NOTIFICATION_STATUS_DELIVERED"
    ]
    mail = next(
        m for m in e2e.mail.messages if m["X-Notify-Notification-Id"] == sent["notification"]["id"]
    )
    assert mail["Subject"] == "Bienvenue, Zoé !"


async def test_push_suppressed_without_devices(e2e: E2E) -> None:
    user_id = await e2e.new_user(devices=0)
    status, sent = await e2e.api(
        "POST",
        "/v1/notifications",
        {"userId": user_id, "templateId": "welcome", "variables": {"name": "x"}},
    )
    assert status == 200, sent
    by_channel = {d["channel"]: d for d in sent["notification"]["deliveries"]}
    assert by_channel["CHANNEL_PUSH"]["status"] == "NOTIFICATION_STATUS_SUPPRESSED"
    assert by_channel["CHANNEL_EMAIL"]["status"] == "NOTIFICATION_STATUS_QUEUED"


def _error_info(body: Any) -> dict[str, Any]:
    for detail in body.get("details", []):
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
            return dict(detail)
    return {}


def _reason(body: Any) -> str:
    return str(_error_info(body).get("reason", ""))


def _metadata(body: Any) -> dict[str, str]:
    return dict(_error_info(body).get("metadata", {}))


@pytest.mark.parametrize(
    ("body", "http", "code", "reason"),
    [
        ('{"userId": ', 400, 3, ""),  # malformed JSON
        ('{"userId": 5, "channels": "x"}', 400, 3, ""),  # wrong field types
        ('{"templateId": "welcome"}', 400, 3, "INVALID_REQUEST"),  # missing user
        ('{"userId": "%s"}', 400, 3, "INVALID_REQUEST"),  # missing template
        ('{"userId": "{%s}", "templateId": "welcome"}', 400, 3, "INVALID_REQUEST"),
        ('{"userId": "%s", "templateId": "welcome\\n"}', 400, 3, "INVALID_REQUEST"),
        (
            '{"userId": "%s", "templateId": "welcome", "channels": ["CHANNEL_UNSPECIFIED"]}',
            400,
            3,
            "INVALID_REQUEST",
        ),
        (
            '{"userId": "00000000-0000-4000-8000-000000000000", "templateId": "welcome"}',
            404,
            5,
            "USER_NOT_FOUND",
        ),
        ('{"userId": "%s", "templateId": "no-such-template"}', 404, 5, "TEMPLATE_NOT_FOUND"),
    ],
)
async def test_bad_input_is_rejected_and_nothing_queued(
    e2e: E2E, body: str, http: int, code: int, reason: str
) -> None:
    user_id = await e2e.new_user(devices=0)
    raw = body.replace("%s", user_id)
    status, got = await asyncio.to_thread(_post_raw, f"{e2e.base}/v1/notifications", raw)
    assert status == http, got
    assert isinstance(got, dict) and got["code"] == code, got
    if reason:
        assert _reason(got) == reason, got
    status, listed = await e2e.api("GET", f"/v1/users/{user_id}/notifications")
    assert status == 200 and listed["notifications"] == [], listed


def _post_raw(url: str, raw: str) -> tuple[int, Any]:
    return call_raw("POST", url, raw.encode(), api_key=API_KEY)


async def test_missing_or_unknown_api_key_is_401(e2e: E2E) -> None:
    status, got = await e2e.api("GET", f"/v1/notifications/{uuid.uuid4()}", api_key="")
    assert status == 401 and _reason(got) == "API_KEY_MISSING"
    status, got = await e2e.api("GET", f"/v1/notifications/{uuid.uuid4()}", api_key="nope")
    assert status == 401 and _reason(got) == "API_KEY_INVALID"


async def test_unknown_paths_and_query_parameters_are_rejected(e2e: E2E) -> None:
    status, got = await e2e.api("GET", "/v1/nothing-here")
    assert status == 404 and got["code"] == 5
    status, got = await e2e.api("GET", f"/v1/notifications/{uuid.uuid4()}?admin=true")
    assert status == 400 and got["code"] == 3


async def test_oversized_body_is_413(e2e: E2E) -> None:
    raw = '{"userId": "' + "a" * (2 * 1024 * 1024) + '"}'
    status, got = await asyncio.to_thread(_post_raw, f"{e2e.base}/v1/notifications", raw)
    assert status == 413, got


async def test_idempotent_send(e2e: E2E) -> None:
    user_id = await e2e.new_user(devices=0)
    key = uuid.uuid4().hex
    body = {
        "userId": user_id,
        "templateId": "welcome",
        "channels": ["CHANNEL_EMAIL"],
        "variables": {"name": "Idem"},
        "idempotencyKey": key,
    }
    first = await e2e.api("POST", "/v1/notifications", body)
    again = await e2e.api("POST", "/v1/notifications", body)
    assert first[0] == again[0] == 200
    assert first[1]["notification"]["id"] == again[1]["notification"]["id"]
    assert first[1]["idempotentReplayed"] is False and again[1]["idempotentReplayed"] is True
    # The key in the header means what it means in the body.
    in_header = {k: v for k, v in body.items() if k != "idempotencyKey"}
    header = await e2e.api("POST", "/v1/notifications", in_header, headers={"Idempotency-Key": key})
    assert header[0] == 200 and header[1]["idempotentReplayed"] is True, header
    assert header[1]["notification"]["id"] == first[1]["notification"]["id"]
    both = await e2e.api(
        "POST", "/v1/notifications", body, headers={"Idempotency-Key": key + "-other"}
    )
    assert both[0] == 400 and _reason(both[1]) == "IDEMPOTENCY_KEY_CONFLICT", both
    # Another body with the same key is a client bug, told apart from "wait and retry".
    other = await e2e.api("POST", "/v1/notifications", {**body, "variables": {"name": "Other"}})
    assert other[0] == 400 and _reason(other[1]) == "IDEMPOTENCY_KEY_REUSED", other
    await e2e.settle(first[1]["notification"]["id"])
    status, listed = await e2e.api("GET", f"/v1/users/{user_id}/notifications")
    assert status == 200 and len(listed["notifications"]) == 1
    # Once the idempotency record is gone (TTL, Redis loss), the same key with another
    # body is a new notification, never the old answer.
    redis = aioredis.from_url(e2e.cfg.redis_url)
    try:
        async for name in redis.scan_iter(match=f"notify:idem:*:{key}"):
            await redis.delete(name)
    finally:
        await redis.aclose()
    later = await e2e.api("POST", "/v1/notifications", {**body, "variables": {"name": "Later"}})
    assert later[0] == 200, later
    assert later[1]["notification"]["id"] != first[1]["notification"]["id"]
    mails = [
        m
        for m in e2e.mail.messages
        if m["X-Notify-Notification-Id"] == first[1]["notification"]["id"]
    ]
    assert len(mails) == 1


async def test_50_concurrent_sends_with_one_key_make_one_notification(e2e: E2E) -> None:
    user_id = await e2e.new_user(devices=0)
    body = {
        "userId": user_id,
        "templateId": "welcome",
        "channels": ["CHANNEL_EMAIL"],
        "idempotencyKey": uuid.uuid4().hex,
    }
    answers = await asyncio.gather(
        *(asyncio.to_thread(_post_with_headers, e2e.base, body) for _ in range(50))
    )
    ids = set()
    for status, got, headers in answers:
        if status == 200:
            ids.add(got["notification"]["id"])
            assert (headers.get("idempotent-replayed") == "true") == bool(
                got.get("idempotentReplayed")
            ), (got, headers)
        else:  # still being processed: a status of its own, with when to come back
            assert status == 409 and _reason(got) == "REQUEST_IN_PROGRESS", got
            assert int(headers["retry-after"]) >= 1, headers
    assert len(ids) == 1, ids
    fresh = [a for a in answers if a[0] == 200 and not a[1].get("idempotentReplayed")]
    assert len(fresh) <= 1  # at most one answer is the one that created it
    await e2e.settle(ids.pop())
    status, listed = await e2e.api("GET", f"/v1/users/{user_id}/notifications")
    assert status == 200 and len(listed["notifications"]) == 1, listed


def _post_with_headers(base: str, body: Any) -> tuple[int, Any, dict[str, str]]:
    request = urllib.request.Request(
        f"{base}/v1/notifications", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("x-api-key", API_KEY)
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            status, raw, headers = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        status, raw, headers = err.code, err.read(), err.headers
    return status, json.loads(raw), {k.lower(): v for k, v in headers.items()}


async def test_user_and_template_routes(e2e: E2E) -> None:
    user_id = await e2e.new_user(devices=1)
    status, got = await e2e.api("GET", f"/v1/users/{user_id}")
    assert status == 200 and got["user"]["id"] == user_id and len(got["user"]["devices"]) == 1
    status, got = await e2e.api("GET", "/v1/templates/welcome")
    assert status == 200 and got["template"]["variables"] == ["name"]
    status, got = await e2e.api("POST", "/v1/users", {"email": "bad\r\nBcc: x@y"})
    assert status == 400 and got["code"] == 3


async def test_one_correlation_id_follows_the_notification_through_every_log(e2e: E2E) -> None:
    user_id = await e2e.new_user(devices=0)
    # A template nobody has fetched yet: the gateway (GetTemplate) and the worker
    # (GetTemplateVersion, which it then keeps) both reach template_svc for this send.
    template = {**DEMO_TEMPLATE, "id": f"trace-{uuid.uuid4().hex[:8]}"}
    status, created = await e2e.api("POST", "/v1/templates", template)
    assert status == 200, created
    corr = f"corr-{uuid.uuid4().hex[:12]}"
    status, sent = await e2e.api(
        "POST",
        "/v1/notifications",
        {"userId": user_id, "templateId": template["id"], "variables": {"name": "Trace"}},
        headers={"x-correlation-id": corr},
    )
    assert status == 200, sent
    assert sent["notification"]["correlationId"] == corr
    await e2e.settle(sent["notification"]["id"])
    seen = set()
    for service in ("gateway", "user_svc", "template_svc", "email_worker"):
        for line in e2e.system.log_path(service).read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("correlation_id") == corr:
                seen.add(service)
    assert seen == {"gateway", "user_svc", "template_svc", "email_worker"}


async def test_api_key_scopes_are_enforced(e2e: E2E) -> None:
    store_pool = await db.create_pool(
        f"{e2e.cfg.pg_base}/{e2e.cfg.db_prefix}gateway", application="test"
    )
    try:
        keys = KeyStore(store_pool)
        await keys.ensure("read-only-key", "reader", frozenset({"users:read"}))
        await keys.ensure("send-only-key", "sender", frozenset({"notifications:send"}))
    finally:
        await db.close_pool(store_pool)
    user_id = await e2e.new_user(devices=0)
    send = {"userId": user_id, "templateId": "welcome"}
    status, got = await e2e.api("POST", "/v1/notifications", send, api_key="read-only-key")
    assert status == 403 and _reason(got) == "SCOPE_MISSING", got
    assert _metadata(got)["required_scope"] == "notifications:send"
    status, got = await e2e.api("GET", f"/v1/users/{user_id}", api_key="read-only-key")
    assert status == 200, got
    # A key that may send may not read what it sent, nor anything else.
    status, got = await e2e.api("POST", "/v1/notifications", send, api_key="send-only-key")
    assert status == 200, got
    sent = got["notification"]["id"]
    for path in (f"/v1/notifications/{sent}", f"/v1/users/{user_id}", "/v1/templates/welcome"):
        status, got = await e2e.api("GET", path, api_key="send-only-key")
        assert status == 403 and _reason(got) == "SCOPE_MISSING", (path, got)


async def test_the_gateway_reads_profiles_from_cache_and_sees_every_change(e2e: E2E) -> None:
    """A send reads user_svc's cached profile (no GetDeliveryProfile call on a hit), and a
    change to preferences or devices is visible to the very next send."""

    async def send(corr: str) -> dict[str, Any]:
        status, got = await e2e.api(
            "POST",
            "/v1/notifications",
            {"userId": user_id, "templateId": "welcome", "variables": {"name": "C"}},
            headers={"x-correlation-id": corr},
        )
        assert status == 200, got
        return {d["channel"]: d["status"] for d in got["notification"]["deliveries"]}

    def profile_calls(corr: str) -> int:
        lines = e2e.system.log_path("user_svc").read_text().splitlines()
        return sum(
            1
            for line in lines
            if line.startswith("{")
            and (entry := json.loads(line)).get("correlation_id") == corr
            and entry.get("method", "").endswith("/GetDeliveryProfile")
        )

    user_id = await e2e.new_user(devices=0)
    first, second = (f"corr-{uuid.uuid4().hex[:12]}" for _ in range(2))
    no_devices = {
        "CHANNEL_EMAIL": "NOTIFICATION_STATUS_QUEUED",
        "CHANNEL_PUSH": "NOTIFICATION_STATUS_SUPPRESSED",
    }
    assert await send(first) == no_devices
    assert await send(second) == no_devices
    assert profile_calls(first) == 1  # a miss: user_svc read it and filled the cache
    assert profile_calls(second) == 0  # a hit: one Redis GET at the gateway

    status, got = await e2e.api("PUT", f"/v1/users/{user_id}/preferences", {"emailOptOut": True})
    assert status == 200, got
    assert await send(f"corr-{uuid.uuid4().hex[:12]}") == {
        "CHANNEL_EMAIL": "NOTIFICATION_STATUS_SUPPRESSED",
        "CHANNEL_PUSH": "NOTIFICATION_STATUS_SUPPRESSED",
    }
    status, got = await e2e.api(
        "POST",
        f"/v1/users/{user_id}/devices",
        {"platform": "DEVICE_PLATFORM_ANDROID", "token": f"tok-{uuid.uuid4().hex}"},
    )
    assert status == 200, got
    assert await send(f"corr-{uuid.uuid4().hex[:12]}") == {
        "CHANNEL_EMAIL": "NOTIFICATION_STATUS_SUPPRESSED",
        "CHANNEL_PUSH": "NOTIFICATION_STATUS_QUEUED",
    }


async def test_a_template_bomb_costs_the_worker_one_render_process_not_its_queue(
    e2e: E2E,
) -> None:
    """The sandbox's limits hold in the workers too: a bomb hidden from the save-time
    test render fails its own delivery (once, no retry), and the next send goes out."""
    bomb = "{% if name == 'boom' %}{{ ([[1]] * 200000)|sum(start=[])|length }}{% endif %}ok"
    template_id = f"bomb-{uuid.uuid4().hex[:8]}"
    body = {
        "id": template_id,
        "contents": [{"language": "en", "email": {"subject": "Hi", "textBody": bomb}}],
    }
    status, got = await e2e.api("POST", "/v1/templates", body)
    assert status == 200, got
    user_id = await e2e.new_user(devices=0)

    async def send(name: str) -> dict[str, Any]:
        status, got = await e2e.api(
            "POST",
            "/v1/notifications",
            {"userId": user_id, "templateId": template_id, "variables": {"name": name}},
        )
        assert status == 200, got
        settled = await e2e.settle(got["notification"]["id"])
        delivery: dict[str, Any] = settled["notification"]["deliveries"][0]
        return delivery

    failed = await send("boom")
    assert failed["status"] == "NOTIFICATION_STATUS_FAILED", failed
    assert "RENDER_TIMEOUT" in failed["detail"] and failed["attempts"] == 1, failed
    delivered = await send("Ada")
    assert delivered["status"] == "NOTIFICATION_STATUS_DELIVERED", delivered
