"""Tenants through Envoy: a key acts for one tenant, and another tenant's users, devices,
templates, notifications and keys answer 404 exactly as if they did not exist."""

from __future__ import annotations

import uuid
from typing import Any

from scripts.api import DEMO_TEMPLATE
from scripts.system import poll
from tests.e2e_support import API_KEY, E2E


def _reason(body: Any) -> str:
    for detail in body.get("details", []) if isinstance(body, dict) else []:
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
            return str(detail["reason"])
    return ""


async def _tenant_admin(e2e: E2E, tenant: str) -> str:
    """An admin key of ``tenant``, made by the default tenant's admin (the bootstrap key)."""
    status, got = await e2e.api(
        "POST", "/v1/api-keys", {"name": "admin", "scopes": ["SCOPE_ADMIN"], "tenant": tenant}
    )
    assert status == 200 and got["apiKey"]["tenant"] == tenant, got
    secret: str = got["secret"]
    return secret


async def _template(e2e: E2E, key: str, subject: str, template_id: str = "welcome") -> None:
    """An e-mail-only template of the key's tenant with ``subject`` (a Jinja source)."""
    body = {
        "id": template_id,
        "contents": [{"language": "en", "email": {"subject": subject, "textBody": "Hi."}}],
    }
    status, got = await e2e.api("POST", "/v1/templates", body, api_key=key)
    assert status == 200, got


async def _user(e2e: E2E, key: str, email: str) -> str:
    status, got = await e2e.api("POST", "/v1/users", {"email": email}, api_key=key)
    assert status == 200, got
    user_id: str = got["user"]["id"]
    return user_id


async def test_a_key_sees_only_its_tenants_users_and_notifications(e2e: E2E) -> None:
    suffix = uuid.uuid4().hex[:8]
    acme, globex = f"acme-{suffix}", f"globex-{suffix}"
    acme_key, globex_key = await _tenant_admin(e2e, acme), await _tenant_admin(e2e, globex)
    email = f"same-{suffix}@example.com"
    ann = await _user(e2e, acme_key, email)
    bob = await _user(e2e, globex_key, email)  # one address, two tenants: two users
    await _template(e2e, acme_key, "Hello from Acme")
    status, got = await e2e.api("GET", f"/v1/users/{ann}", api_key=acme_key)
    assert status == 200 and got["user"]["tenant"] == acme, got
    status, sent = await e2e.api(
        "POST",
        "/v1/notifications",
        {"userId": ann, "templateId": "welcome", "channels": ["CHANNEL_EMAIL"]},
        api_key=acme_key,
    )
    assert status == 200, sent
    nid = sent["notification"]["id"]

    for method, path, body, reason in (
        ("GET", f"/v1/users/{ann}", None, "USER_NOT_FOUND"),
        ("GET", f"/v1/notifications/{nid}", None, "NOTIFICATION_NOT_FOUND"),
        ("GET", f"/v1/users/{ann}/notifications", None, "USER_NOT_FOUND"),
        (
            "POST",
            "/v1/notifications",
            {"userId": ann, "templateId": "welcome", "channels": ["CHANNEL_EMAIL"]},
            "USER_NOT_FOUND",
        ),
        ("PUT", f"/v1/users/{ann}/preferences", {"emailOptOut": True}, "USER_NOT_FOUND"),
        (
            "POST",
            f"/v1/users/{ann}/devices",
            {"platform": "DEVICE_PLATFORM_ANDROID", "token": f"t-{suffix}"},
            "USER_NOT_FOUND",
        ),
    ):
        for key in (globex_key, None):  # another tenant, and the default one
            kw = {"api_key": key} if key else {}
            status, got = await e2e.api(method, path, body, **kw)
            assert status == 404 and _reason(got) == reason, (method, path, key, got)
    # Ann is untouched, and Bob's tenant still works on Bob.
    status, got = await e2e.api("GET", f"/v1/users/{ann}", api_key=acme_key)
    assert status == 200 and got["user"]["devices"] == [], got
    assert got["user"]["preferences"].get("emailOptOut", False) is False
    status, got = await e2e.api("GET", f"/v1/users/{bob}", api_key=globex_key)
    assert status == 200, got


async def test_keys_belong_to_their_tenant(e2e: E2E) -> None:
    suffix = uuid.uuid4().hex[:8]
    acme, globex = f"acme-{suffix}", f"globex-{suffix}"
    acme_key, globex_key = await _tenant_admin(e2e, acme), await _tenant_admin(e2e, globex)
    status, made = await e2e.api(
        "POST", "/v1/api-keys", {"name": "app", "scopes": ["SCOPE_NOTIFICATIONS_SEND"]},
        api_key=acme_key,
    )  # fmt: skip
    assert status == 200 and made["apiKey"]["tenant"] == acme, made
    key_id = made["apiKey"]["id"]
    status, page = await e2e.api("GET", "/v1/api-keys?pageSize=500", api_key=acme_key)
    assert status == 200 and {k["tenant"] for k in page["apiKeys"]} == {acme}, page
    for method, path in (
        ("GET", f"/v1/api-keys/{key_id}"),
        ("POST", f"/v1/api-keys/{key_id}:rotate"),
        ("POST", f"/v1/api-keys/{key_id}:revoke"),
    ):
        status, got = await e2e.api(method, path, {} if method == "POST" else None,
                                    api_key=globex_key)  # fmt: skip
        assert status == 404 and _reason(got) == "API_KEY_NOT_FOUND", (path, got)
    # A tenant's admin makes keys for its own tenant only; dead letters are the operators'.
    status, got = await e2e.api(
        "POST", "/v1/api-keys",
        {"name": "x", "scopes": ["SCOPE_ADMIN"], "tenant": globex}, api_key=acme_key,
    )  # fmt: skip
    assert status == 403 and _reason(got) == "TENANT_NOT_YOURS", got
    status, got = await e2e.api("GET", "/v1/dead-letters", api_key=acme_key)
    assert status == 403 and _reason(got) == "OPERATORS_ONLY", got
    status, got = await e2e.api(
        "POST", "/v1/api-keys", {"name": "x", "scopes": ["SCOPE_ADMIN"], "tenant": "Not Valid"}
    )
    assert status == 400, got


async def test_templates_belong_to_their_tenant(e2e: E2E) -> None:
    """Each tenant has its own templates: another tenant's id answers 404, one id may name
    a template in each tenant, and a send renders its own tenant's (through the gateway's,
    the workers' and the render processes' caches, all keyed by tenant)."""
    suffix = uuid.uuid4().hex[:8]
    acme, globex = f"acme-{suffix}", f"globex-{suffix}"
    acme_key, globex_key = await _tenant_admin(e2e, acme), await _tenant_admin(e2e, globex)
    status, got = await e2e.api("POST", "/v1/templates", DEMO_TEMPLATE)  # the default tenant's
    assert status in (200, 409), got
    own = f"acme-only-{suffix}"
    await _template(e2e, acme_key, "Acme: {{ name }}")  # "welcome", like the default's
    await _template(e2e, acme_key, "Private", own)
    status, got = await e2e.api("GET", "/v1/templates/welcome", api_key=acme_key)
    assert status == 200 and got["template"]["tenant"] == acme, got
    assert got["template"]["contents"][0]["email"]["subject"] == "Acme: {{ name }}", got
    status, got = await e2e.api("POST", "/v1/templates", DEMO_TEMPLATE, api_key=acme_key)
    assert status == 409 and _reason(got) == "TEMPLATE_EXISTS", got

    globex_user = await _user(e2e, globex_key, f"g-{suffix}@example.com")
    version = {"contents": [{"language": "en", "email": {"subject": "Taken", "textBody": "x"}}]}
    for method, path, body in (
        ("GET", f"/v1/templates/{own}", None),
        ("GET", "/v1/templates/welcome", None),  # acme's and the default's: not globex's
        ("POST", f"/v1/templates/{own}/versions", version),
        ("POST", "/v1/notifications", {"userId": globex_user, "templateId": own}),
    ):
        status, got = await e2e.api(method, path, body, api_key=globex_key)
        assert status == 404 and _reason(got) == "TEMPLATE_NOT_FOUND", (method, path, got)
    status, got = await e2e.api("GET", f"/v1/templates/{own}")  # nor the default tenant's
    assert status == 404 and _reason(got) == "TEMPLATE_NOT_FOUND", got
    status, got = await e2e.api("GET", f"/v1/templates/{own}", api_key=acme_key)
    assert status == 200 and got["template"]["version"] == 1, got  # no version was added

    # One id, version 1 in both tenants: each send renders its own tenant's.
    ann = await _user(e2e, acme_key, f"a-{suffix}@example.com")
    ada = await e2e.new_user(devices=0)
    sent = {}
    for user, key in ((ada, API_KEY), (ann, acme_key)):
        status, got = await e2e.api(
            "POST", "/v1/notifications",
            {"userId": user, "templateId": "welcome", "channels": ["CHANNEL_EMAIL"],
             "variables": {"name": "Zed"}},
            api_key=key,
        )  # fmt: skip
        assert status == 200, got
        sent[user] = (got["notification"]["id"], key)
    subjects = {}
    for user, (nid, key) in sent.items():
        final = await e2e.settle(nid, api_key=key)
        assert final["notification"]["status"] == "NOTIFICATION_STATUS_DELIVERED", final
        (mail,) = (m for m in e2e.mail.messages if m["X-Notify-Notification-Id"] == nid)
        subjects[user] = mail["Subject"]
    assert subjects == {ada: "Welcome, Zed!", ann: "Acme: Zed"}


async def test_a_tenants_new_limits_apply_within_seconds(e2e: E2E) -> None:
    """Settings ride with the key lookup, so a change reaches a key already in use as soon
    as its cache entry ends (2 s by default), on every gateway."""
    suffix = uuid.uuid4().hex[:8]
    tenant = f"acme-{suffix}"
    key = await _tenant_admin(e2e, tenant)
    await _template(e2e, key, "Hi")
    user = await _user(e2e, key, f"a-{suffix}@example.com")
    send = {"userId": user, "templateId": "welcome", "channels": ["CHANNEL_EMAIL"]}
    status, got = await e2e.api("POST", "/v1/notifications", send, api_key=key)
    assert status == 200, got  # no limit yet, and the key is now cached
    limit = {"channel": "CHANNEL_EMAIL", "maxNotifications": 1, "window": "3600s"}
    status, got = await e2e.api(
        "PUT", f"/v1/tenants/{tenant}/settings", {"recipientLimits": [limit]}, api_key=key
    )
    assert status == 200, got
    status, got = await poll(
        lambda: e2e.api("POST", "/v1/notifications", send, api_key=key),
        lambda answer: answer[0] != 200,
        timeout=5,
        what="the new recipient limit",
    )
    assert status == 429 and _reason(got) == "RECIPIENT_RATE_LIMITED", got
