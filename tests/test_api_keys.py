"""AdminService through Envoy: API keys created, listed, rotated, expired and revoked
against the running system, and each change seen by the gateway within its key cache's
lifetime (2 s), which the tests hold to 5 s."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from scripts.system import poll
from tests.e2e_support import E2E

SEND = "SCOPE_NOTIFICATIONS_SEND"
REFUSED_WITHIN = 5.0


def _reason(body: Any) -> str:
    for detail in body.get("details", []) if isinstance(body, dict) else []:
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
            return str(detail["reason"])
    return ""


async def _create(e2e: E2E, **fields: Any) -> dict[str, Any]:
    body = {"name": f"key-{uuid.uuid4().hex[:8]}", "scopes": [SEND], **fields}
    status, got = await e2e.api("POST", "/v1/api-keys", body)
    assert status == 200, got
    created: dict[str, Any] = got
    return created


async def _send(e2e: E2E, user_id: str, secret: str) -> int:
    status, _ = await e2e.api(
        "POST", "/v1/notifications", {"userId": user_id, "templateId": "welcome"}, api_key=secret
    )
    return status


async def _refused_within(e2e: E2E, user_id: str, secret: str) -> float:
    """Seconds until a send with ``secret`` is refused (401), polled; fails past 5 s."""
    start = time.monotonic()
    await poll(
        lambda: _send(e2e, user_id, secret),
        lambda status: status == 401,
        timeout=REFUSED_WITHIN,
        what="the key to be refused",
    )
    return time.monotonic() - start


async def test_a_key_is_shown_once_listed_without_its_secret_and_works(e2e: E2E) -> None:
    created = await _create(e2e)
    key, secret = created["apiKey"], created["secret"]
    assert secret.startswith("nfy_") and len(secret) > 40
    assert key["scopes"] == [SEND] and "revokeTime" not in key and "createTime" in key

    user_id = await e2e.new_user(devices=0)
    assert await _send(e2e, user_id, secret) == 200
    status, got = await e2e.api("GET", f"/v1/api-keys/{key['id']}")
    assert status == 200 and got["apiKey"]["id"] == key["id"], got
    assert "secret" not in got and secret not in str(got)
    listed: list[dict[str, Any]] = []
    token = ""
    while True:  # page through everything: ours is among the newest
        status, page = await e2e.api("GET", f"/v1/api-keys?pageSize=2&pageToken={token}")
        assert status == 200, page
        listed += page["apiKeys"]
        token = page.get("nextPageToken", "")
        if not token or any(k["id"] == key["id"] for k in listed):
            break
    assert any(k["id"] == key["id"] for k in listed)
    assert secret not in str(listed)
    # The last use is recorded (off the call, at most once a minute).
    await poll(
        lambda: e2e.api("GET", f"/v1/api-keys/{key['id']}"),
        lambda r: "lastUsedTime" in r[1]["apiKey"],
        timeout=5.0,
        what="the key's last use",
    )


async def test_a_revoked_key_is_refused_within_seconds(e2e: E2E) -> None:
    created = await _create(e2e)
    key, secret = created["apiKey"], created["secret"]
    user_id = await e2e.new_user(devices=0)
    assert await _send(e2e, user_id, secret) == 200  # cached as valid now

    status, got = await e2e.api("POST", f"/v1/api-keys/{key['id']}:revoke", {})
    assert status == 200 and "revokeTime" in got["apiKey"], got
    assert await _refused_within(e2e, user_id, secret) < REFUSED_WITHIN
    status, again = await e2e.api("POST", f"/v1/api-keys/{key['id']}:revoke", {})
    assert status == 200 and again["apiKey"]["revokeTime"] == got["apiKey"]["revokeTime"]
    status, got = await e2e.api("POST", f"/v1/api-keys/{key['id']}:rotate", {})
    assert status == 400 and _reason(got) == "API_KEY_REVOKED", got
    # Revoked keys are listed only when asked.
    status, page = await e2e.api("GET", "/v1/api-keys?pageSize=500")
    assert status == 200 and all(k["id"] != key["id"] for k in page.get("apiKeys", []))


async def test_rotation_keeps_the_old_secret_for_its_grace_period_only(e2e: E2E) -> None:
    created = await _create(e2e)
    key, first = created["apiKey"], created["secret"]
    user_id = await e2e.new_user(devices=0)

    status, rotated = await e2e.api(
        "POST", f"/v1/api-keys/{key['id']}:rotate", {"gracePeriod": "3600s"}
    )
    assert status == 200, rotated
    second = rotated["secret"]
    assert second != first and "previousSecretExpireTime" in rotated["apiKey"]
    assert await _send(e2e, user_id, first) == 200  # within its grace
    assert await _send(e2e, user_id, second) == 200

    status, rotated = await e2e.api(
        "POST", f"/v1/api-keys/{key['id']}:rotate", {"gracePeriod": "0s"}
    )
    assert status == 200, rotated
    third = rotated["secret"]
    # The second rotation ended the first secret at once and the second with no grace.
    assert await _refused_within(e2e, user_id, first) < REFUSED_WITHIN
    assert await _refused_within(e2e, user_id, second) < REFUSED_WITHIN
    assert await _send(e2e, user_id, third) == 200


async def test_an_expired_key_is_refused(e2e: E2E) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=5)
    created = await _create(e2e, expireTime=expires.isoformat().replace("+00:00", "Z"))
    secret = created["secret"]
    user_id = await e2e.new_user(devices=0)
    assert await _send(e2e, user_id, secret) == 200
    await poll(
        lambda: _send(e2e, user_id, secret),
        lambda status: status == 401,
        timeout=5 + REFUSED_WITHIN,
        what="the key to expire",
    )
    assert datetime.now(UTC) >= expires  # refused at its expiry, not before


async def test_bad_key_requests_name_the_field(e2e: E2E) -> None:
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    for body, field in (
        ({"name": "", "scopes": [SEND]}, "name"),
        ({"name": "x", "scopes": []}, "scopes"),
        ({"name": "x", "scopes": ["SCOPE_UNSPECIFIED"]}, "scopes[0]"),
        ({"name": "x", "scopes": [SEND, SEND]}, "scopes"),
        ({"name": "x", "scopes": [SEND], "expireTime": past}, "expire_time"),
        ({"name": "a\nb", "scopes": [SEND]}, "name"),
    ):
        status, got = await e2e.api("POST", "/v1/api-keys", body)
        assert status == 400, (body, got)
        fields = {
            v["field"]
            for d in got["details"]
            if d["@type"].endswith("BadRequest")
            for v in d["fieldViolations"]
        }
        assert field in fields, (body, got)
    status, got = await e2e.api("POST", "/v1/api-keys", {"name": "x", "scopes": ["SCOPE_ROOT"]})
    assert status == 400, got  # not an enum value: the transcoder refuses it
    status, got = await e2e.api("GET", f"/v1/api-keys/{uuid.uuid4()}")
    assert status == 404 and _reason(got) == "API_KEY_NOT_FOUND", got


async def test_only_admin_keys_manage_keys(e2e: E2E) -> None:
    created = await _create(
        e2e, scopes=[SEND, "SCOPE_NOTIFICATIONS_READ", "SCOPE_USERS_WRITE", "SCOPE_TEMPLATES_WRITE"]
    )
    secret = created["secret"]
    for method, path, body in (
        ("POST", "/v1/api-keys", {"name": "mine", "scopes": ["SCOPE_ADMIN"]}),
        ("GET", "/v1/api-keys", None),
        ("POST", f"/v1/api-keys/{created['apiKey']['id']}:rotate", {}),
    ):
        status, got = await e2e.api(method, path, body, api_key=secret)
        assert status == 403 and _reason(got) == "SCOPE_MISSING", (path, got)
