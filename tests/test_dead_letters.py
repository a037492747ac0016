"""Dead letters through Envoy: filed from failed.queue, read with their history, replayed.

Runs against the shared end-to-end system (real services, Envoy, RabbitMQ, PostgreSQL,
a real SMTP server that the test tells to refuse one address).
"""

from __future__ import annotations

import uuid
from typing import Any

from scripts.system import poll
from tests.e2e_support import E2E

EMAIL_ONLY = ["CHANNEL_EMAIL"]


async def send_email(e2e: E2E, user_id: str, correlation_id: str = "") -> str:
    status, body = await e2e.api(
        "POST",
        "/v1/notifications",
        {
            "userId": user_id,
            "templateId": "welcome",
            "channels": EMAIL_ONLY,
            "variables": {"name": "Ada"},
            "idempotencyKey": uuid.uuid4().hex,
        },
        headers={"x-correlation-id": correlation_id} if correlation_id else None,
    )
    assert status == 200, body
    nid: str = body["notification"]["id"]
    return nid


async def dead_letter_of(e2e: E2E, nid: str) -> dict[str, Any]:
    """Wait until the gateway filed the notification's dead letter; return it."""

    async def listed() -> list[dict[str, Any]]:
        status, body = await e2e.api("GET", f"/v1/dead-letters?filter.notificationId={nid}")
        assert status == 200, body
        letters: list[dict[str, Any]] = body.get("deadLetters", [])
        assert all(d["notificationId"] == nid for d in letters), letters
        return letters

    found = await poll(listed, bool, timeout=20, what=f"dead letter of {nid}")
    return found[0]


def mails_to(e2e: E2E, address: str) -> int:
    return sum(address in str(m["To"]) for m in e2e.mail.messages)


async def test_a_dead_letter_is_listed_read_and_replayed_exactly_once(e2e: E2E) -> None:
    address = f"dl{uuid.uuid4().hex[:10]}@example.com"
    user_id = await e2e.new_user(devices=0, email=address)
    e2e.mail.refuse(address, "550 5.1.1 mailbox unavailable")
    nid = await send_email(e2e, user_id)
    settled = await e2e.settle(nid)
    assert settled["notification"]["deliveries"][0]["status"] == "NOTIFICATION_STATUS_FAILED"

    letter = await dead_letter_of(e2e, nid)
    assert letter["channel"] == "CHANNEL_EMAIL" and letter["state"] == "DEAD_LETTER_STATE_PARKED"
    assert "550" in letter["reason"]
    status, got = await e2e.api("GET", f"/v1/dead-letters/{letter['id']}")
    assert status == 200, got
    history = got["deadLetter"]["history"]
    assert [h["status"] for h in history] == ["NOTIFICATION_STATUS_FAILED"]
    assert "mailbox unavailable" in history[0]["detail"]

    # The mailbox is fixed; an operator replays the dead letter.
    e2e.mail.accept(address)
    status, replayed = await e2e.api("POST", "/v1/dead-letters:replay", {"id": letter["id"]})
    assert (status, replayed["replayed"], replayed["skipped"]) == (200, 1, 0), replayed
    status, now = await e2e.api("GET", f"/v1/notifications/{nid}")
    assert now["notification"]["deliveries"][0]["status"] != "NOTIFICATION_STATUS_FAILED"
    settled = await e2e.settle(nid)
    delivery = settled["notification"]["deliveries"][0]
    assert delivery["status"] == "NOTIFICATION_STATUS_DELIVERED", delivery
    assert mails_to(e2e, address) == 1
    status, again = await e2e.api("GET", f"/v1/dead-letters/{letter['id']}")
    assert again["deadLetter"]["state"] == "DEAD_LETTER_STATE_REPLAYED"
    assert again["deadLetter"]["replayCount"] == 1

    # Replaying it again sends nothing: the worker's ledger knows it was delivered.
    status, replayed = await e2e.api("POST", "/v1/dead-letters:replay", {"id": letter["id"]})
    assert (status, replayed["replayed"]) == (200, 1)
    barrier_user = await e2e.new_user(devices=0)  # a later job on the same queue
    await e2e.settle(await send_email(e2e, barrier_user))
    assert mails_to(e2e, address) == 1
    status, final = await e2e.api("GET", f"/v1/notifications/{nid}")
    assert final["notification"]["deliveries"][0]["status"] == "NOTIFICATION_STATUS_DELIVERED"


async def test_dead_letter_requests_are_checked(e2e: E2E) -> None:
    status, body = await e2e.api("POST", "/v1/dead-letters:replay", {})
    assert status == 400 and body["details"][0]["reason"] == "INVALID_REQUEST"
    status, body = await e2e.api("GET", "/v1/dead-letters/not-a-uuid")
    assert status == 400 and body["details"][0]["reason"] == "INVALID_REQUEST"
    status, body = await e2e.api("GET", f"/v1/dead-letters/{uuid.uuid4()}")
    assert status == 404 and body["details"][0]["reason"] == "DEAD_LETTER_NOT_FOUND"
    status, body = await e2e.api("GET", "/v1/dead-letters?pageSize=501")
    assert status == 400 and body["details"][0]["reason"] == "INVALID_REQUEST"
    status, body = await e2e.api("GET", "/v1/dead-letters", api_key="wrong")
    assert status == 401


async def test_purge_removes_what_the_filter_names(e2e: E2E) -> None:
    address = f"dp{uuid.uuid4().hex[:10]}@example.com"
    user_id = await e2e.new_user(devices=0, email=address)
    e2e.mail.refuse(address, "550 5.1.1 gone")
    nid = await send_email(e2e, user_id)
    await e2e.settle(nid)
    letter = await dead_letter_of(e2e, nid)
    status, purged = await e2e.api("POST", "/v1/dead-letters:purge", {"id": letter["id"]})
    assert (status, purged["purged"]) == (200, 1)
    status, _ = await e2e.api("GET", f"/v1/dead-letters/{letter['id']}")
    assert status == 404


async def test_a_notification_or_a_correlation_id_finds_its_dead_letters(e2e: E2E) -> None:
    """What an operator holding a support ticket has: the id a send answered with, or
    the correlation id the client sent."""
    address = f"df{uuid.uuid4().hex[:10]}@example.com"
    e2e.mail.refuse(address, "550 5.1.1 no such user")
    user_id = await e2e.new_user(devices=0, email=address)
    first = await send_email(e2e, user_id)
    correlation_id = f"ticket-{uuid.uuid4().hex[:12]}"
    second = await send_email(e2e, user_id, correlation_id)
    await e2e.settle(first)
    await e2e.settle(second)
    assert (await dead_letter_of(e2e, first))["notificationId"] == first
    await dead_letter_of(e2e, second)

    status, body = await e2e.api("GET", f"/v1/dead-letters?filter.correlationId={correlation_id}")
    assert status == 200, body
    assert [d["notificationId"] for d in body["deadLetters"]] == [second]
    assert body["deadLetters"][0]["correlationId"] == correlation_id
    both = f"filter.notificationId={first}&filter.correlationId={correlation_id}"
    status, body = await e2e.api("GET", f"/v1/dead-letters?{both}")
    assert (status, body.get("deadLetters", [])) == (200, [])

    status, body = await e2e.api("GET", f"/v1/dead-letters?filter.notificationId={first.upper()}")
    assert [d["notificationId"] for d in body["deadLetters"]] == [first], "any case finds it"

    status, body = await e2e.api("GET", "/v1/dead-letters?filter.notificationId=nope")
    assert status == 400 and body["details"][0]["reason"] == "INVALID_REQUEST", body

    # Replaying by the ticket's id replays that one, not every parked dead letter.
    status, replayed = await e2e.api(
        "POST", "/v1/dead-letters:replay", {"filter": {"notificationId": first}}
    )
    assert (status, replayed["replayed"], replayed["skipped"]) == (200, 1, 0), replayed
    status, body = await e2e.api("GET", f"/v1/dead-letters?filter.correlationId={correlation_id}")
    assert body["deadLetters"][0]["state"] == "DEAD_LETTER_STATE_PARKED"
