"""OneSignalProvider against the OneSignal stand-in over real HTTP, and the stand-in's rules."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from push_worker.onesignal import OneSignalProvider
from push_worker.outgoing import Outcome, OutgoingPush, Target, TargetKind
from scripts.onesignal_fake import IDEMPOTENCY_WINDOW, NOT_SUBSCRIBED, OneSignalFake

APP_ID = "202d4f61-1ca9-42df-9d36-bb17d8123abc"
API_KEY = "os_v2_app_test-key"
WAIT = 10.0
ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A settable clock for the fake's 30-day idempotency window."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def fake(clock: Clock) -> AsyncIterator[OneSignalFake]:
    server = OneSignalFake(APP_ID, API_KEY, clock=clock)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


@pytest.fixture
async def provider(fake: OneSignalFake) -> AsyncIterator[OneSignalProvider]:
    client = OneSignalProvider(app_id=APP_ID, api_key=API_KEY, base_url=fake.url, timeout=WAIT)
    yield client
    await client.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


def subscription() -> str:
    return str(uuid.uuid4())


def push(*targets: Target, user_id: str = "user-1", title: str = "Hi") -> OutgoingPush:
    return OutgoingPush(
        notification_id=str(uuid.uuid4()),
        user_id=user_id,
        targets=targets,
        title=title,
        body="Your order shipped",
        data={"order": "42"},
    )


def onesignal(address: str) -> Target:
    return Target(address, TargetKind.ONESIGNAL)


def valid_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "app_id": APP_ID,
        "include_subscription_ids": ["s-1"],
        "contents": {"en": "body"},
        "headings": {"en": "title"},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


async def create(
    http: aiohttp.ClientSession,
    fake: OneSignalFake,
    body: dict[str, Any],
    authorization: str = f"Key {API_KEY}",
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{fake.url}/notifications",
        params={"c": "push"},
        json=body,
        headers={"Authorization": authorization},
    ) as resp:
        return resp.status, await resp.json()


# --- what the provider sends ----------------------------------------------------------


async def test_sends_subscription_ids_with_the_documented_fields(
    fake: OneSignalFake, provider: OneSignalProvider
) -> None:
    first, second = subscription(), subscription()
    fake.subscribe(first)
    fake.subscribe(second)
    message = push(onesignal(first), Target("fcm-token"), onesignal(second))

    result = await provider.send(message)

    [notification] = await fake.wait_for(1, WAIT)
    assert [(r.address, r.outcome) for r in result.results] == [
        (first, Outcome.DELIVERED),
        (second, Outcome.DELIVERED),
    ]
    assert {r.detail for r in result.results} == {f"onesignal {notification['id']}"}
    assert notification["request"] == {
        "app_id": APP_ID,
        "idempotency_key": message.notification_id,
        "include_subscription_ids": [first, second],
        "headings": {"en": "Hi"},
        "contents": {"en": "Your order shipped"},
        "data": {"order": "42", "notification_id": message.notification_id},
    }
    assert notification["recipients"] == [first, second]


async def test_without_subscription_targets_the_user_goes_by_external_id(
    fake: OneSignalFake, provider: OneSignalProvider
) -> None:
    fake.subscribe_alias("user-7")
    message = push(Target("fcm-token"), Target("fid", TargetKind.FCM_FID), user_id="user-7")

    result = await provider.send(message)

    [notification] = await fake.wait_for(1, WAIT)
    [only] = result.results
    assert (only.address, only.outcome) == ("external_id:user-7", Outcome.DELIVERED)
    assert only.detail == f"onesignal {notification['id']}"
    request = notification["request"]
    assert request["include_aliases"] == {"external_id": ["user-7"]}
    assert request["target_channel"] == "push"
    assert "include_subscription_ids" not in request
    assert request["idempotency_key"] == message.notification_id


async def test_sent_pushes_are_listed_at_messages(
    fake: OneSignalFake, provider: OneSignalProvider, http: aiohttp.ClientSession
) -> None:
    device = subscription()
    fake.subscribe(device)
    await provider.send(push(onesignal(device)))
    async with http.get(f"{fake.url}/messages") as resp:
        listed = await resp.json()
    assert listed == fake.received
    assert listed[0]["recipients"] == [device]


# --- idempotency ------------------------------------------------------------------------


async def test_a_repeat_with_the_same_key_returns_the_same_id_and_sends_nothing(
    fake: OneSignalFake, provider: OneSignalProvider
) -> None:
    device = subscription()
    fake.subscribe(device)
    message = push(onesignal(device))

    first = await provider.send(message)
    again = await provider.send(message)

    assert first == again
    assert first.results[0].outcome is Outcome.DELIVERED
    assert len(fake.received) == 1
    assert fake.attempts == 2


async def test_a_failed_attempt_does_not_use_up_the_key(
    fake: OneSignalFake, provider: OneSignalProvider
) -> None:
    device = subscription()
    fake.subscribe(device)
    message = push(onesignal(device))
    fake.fail_next(1, status=503)

    assert (await provider.send(message)).results[0].outcome is Outcome.TRANSIENT
    assert (await provider.send(message)).results[0].outcome is Outcome.DELIVERED
    assert len(fake.received) == 1


async def test_the_key_is_idempotent_for_thirty_days_only(
    fake: OneSignalFake, http: aiohttp.ClientSession, clock: Clock
) -> None:
    fake.subscribe("s-1")
    body = valid_body(idempotency_key=str(uuid.uuid4()))
    _, first = await create(http, fake, body)
    clock.now += IDEMPOTENCY_WINDOW - 60
    _, repeat = await create(http, fake, body)
    clock.now += 120
    _, later = await create(http, fake, body)

    assert repeat == first
    assert later["id"] not in ("", first["id"])
    assert [n["id"] for n in fake.received] == [first["id"], later["id"]]


# --- per-target outcomes ---------------------------------------------------------------


async def test_unknown_subscription_is_unregistered_next_to_a_delivered_one(
    fake: OneSignalFake, provider: OneSignalProvider
) -> None:
    known, unknown = subscription(), subscription()
    fake.subscribe(known)

    result = await provider.send(push(onesignal(unknown), onesignal(known)))

    assert [(r.address, r.outcome) for r in result.results] == [
        (unknown, Outcome.UNREGISTERED),
        (known, Outcome.DELIVERED),
    ]
    [notification] = fake.received
    assert notification["recipients"] == [known]


async def test_nobody_subscribed_unregisters_every_subscription(
    fake: OneSignalFake, provider: OneSignalProvider, http: aiohttp.ClientSession
) -> None:
    status, answer = await create(http, fake, valid_body())
    assert (status, answer) == (200, {"id": "", "external_id": None, "errors": [NOT_SUBSCRIBED]})

    dead = subscription()
    result = await provider.send(push(onesignal(dead)))
    assert [(r.address, r.outcome) for r in result.results] == [(dead, Outcome.UNREGISTERED)]
    assert fake.received == []


async def test_an_alias_without_a_subscription_is_invalid(
    fake: OneSignalFake, provider: OneSignalProvider
) -> None:
    result = await provider.send(push(Target("fcm-token"), user_id="nobody"))

    [only] = result.results
    assert (only.address, only.outcome) == ("external_id:nobody", Outcome.INVALID)
    assert NOT_SUBSCRIBED in only.detail
    assert fake.received == []


async def test_a_malformed_request_is_invalid_for_every_target(
    fake: OneSignalFake, provider: OneSignalProvider
) -> None:
    device = subscription()
    fake.subscribe(device)
    empty = OutgoingPush(str(uuid.uuid4()), "user-1", (onesignal(device),), "Hi", "")

    [only] = (await provider.send(empty)).results

    assert only.outcome is Outcome.INVALID
    assert "English language content" in only.detail


# --- provider-level failures ------------------------------------------------------------


async def test_an_outage_is_transient(fake: OneSignalFake, provider: OneSignalProvider) -> None:
    device = subscription()
    fake.subscribe(device)
    fake.fail_next(1, status=503)
    [only] = (await provider.send(push(onesignal(device)))).results
    assert only.outcome is Outcome.TRANSIENT
    assert "503" in only.detail

    fake.set_down(500)
    assert (await provider.send(push(onesignal(device)))).of(Outcome.TRANSIENT)
    fake.set_down(None)
    assert (await provider.send(push(onesignal(device)))).of(Outcome.DELIVERED)
    assert len(fake.received) == 1


async def test_rate_limit_carries_retry_after(
    fake: OneSignalFake, provider: OneSignalProvider
) -> None:
    devices = [subscription(), subscription()]
    fake.fail_next(1, status=429, retry_after=5)

    result = await provider.send(push(*map(onesignal, devices)))

    assert [(r.outcome, r.retry_after) for r in result.results] == [(Outcome.TRANSIENT, 5.0)] * 2


async def test_a_refused_api_key_is_a_provider_failure(fake: OneSignalFake) -> None:
    wrong = OneSignalProvider(app_id=APP_ID, api_key="stale", base_url=fake.url, timeout=WAIT)
    try:
        [only] = (await wrong.send(push(onesignal(subscription())))).results
    finally:
        await wrong.close()
    assert only.outcome is Outcome.TRANSIENT
    assert "403" in only.detail


async def test_no_server_is_transient(fake: OneSignalFake) -> None:
    url = fake.url
    await fake.stop()
    client = OneSignalProvider(app_id=APP_ID, api_key=API_KEY, base_url=url, timeout=WAIT)
    try:
        [only] = (await client.send(push(onesignal(subscription())))).results
    finally:
        await client.close()
    assert only.outcome is Outcome.TRANSIENT


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A server that accepts connections, reads, and never answers."""
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    release.set()
    server.close()
    await server.wait_closed()


async def test_a_server_that_never_answers_is_transient_within_the_timeout(
    silent_server: str,
) -> None:
    client = OneSignalProvider(app_id=APP_ID, api_key=API_KEY, base_url=silent_server, timeout=0.3)
    try:
        async with asyncio.timeout(3):
            [only] = (await client.send(push(onesignal(subscription())))).results
    finally:
        await client.close()
    assert only.outcome is Outcome.TRANSIENT
    assert "timed out" in only.detail


# --- the fake's strictness --------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "changes"),
    [
        ("Key wrong", {}),
        (f"Basic {API_KEY}", {}),
        (f"Bearer {API_KEY}", {}),
        (f"Key {API_KEY}", {"app_id": "7e0a3c27-0000-4000-8000-000000000000"}),
    ],
    ids=["wrong-key", "legacy-basic", "bearer", "other-app"],
)
async def test_the_fake_denies_wrong_credentials(
    fake: OneSignalFake, http: aiohttp.ClientSession, authorization: str, changes: dict[str, Any]
) -> None:
    fake.subscribe("s-1")
    status, answer = await create(http, fake, valid_body(**changes), authorization)
    assert status == 403
    assert answer["errors"][0].startswith("Access denied")
    assert fake.received == []


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"app_id": None}, "app_id not found"),
        ({"included_segments": ["All"]}, "Only one targeting method"),
        ({"include_subscription_ids": None}, "You must include which players"),
        ({"include_subscription_ids": []}, "non-empty list"),
        ({"include_subscription_ids": [f"s-{i}" for i in range(20_001)]}, "limited to 20000"),
        ({"contents": {"fr": "bonjour"}}, "English language content"),
        ({"contents": None}, "English language content"),
        ({"headings": {"de": "Hallo"}}, "English language content"),
        ({"contents": {"en": 1}}, "must be a string"),
        ({"mesage": "typo"}, "Unknown field(s): mesage"),
        ({"include_player_ids": ["s-1"]}, "deprecated"),
        ({"data": ["not", "an", "object"]}, "data must be a JSON object"),
        ({"idempotency_key": "order-42"}, "must be a UUID"),
        ({"priority": "high"}, "priority"),
        ({"ttl": -1}, "ttl"),
        (
            {"include_subscription_ids": None, "include_aliases": {"external_id": ["u"]}},
            "target_channel is required",
        ),
        ({"target_channel": "email"}, "only sends push"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_the_fake_refuses_malformed_requests(
    fake: OneSignalFake, http: aiohttp.ClientSession, changes: dict[str, Any], error: str
) -> None:
    fake.subscribe("s-1")
    status, answer = await create(http, fake, valid_body(**changes))
    assert status == 400
    assert list(answer) == ["errors"]
    assert error in answer["errors"][0]
    assert fake.received == []


async def test_the_fake_answers_partial_aliases_and_counts_attempts(
    fake: OneSignalFake, http: aiohttp.ClientSession
) -> None:
    fake.subscribe_alias("u-1")
    body = valid_body(
        include_subscription_ids=None,
        include_aliases={"external_id": ["u-1", "u-2"]},
        target_channel="push",
    )
    status, answer = await create(http, fake, body)
    assert status == 200
    assert answer["errors"] == {"invalid_aliases": {"external_id": ["u-2"]}}
    assert answer["external_id"] is None
    assert uuid.UUID(answer["id"])
    assert fake.received[0]["recipients"] == ["external_id:u-1"]
    assert fake.attempts == 1


async def test_the_fake_accepts_everyone_when_told(http: aiohttp.ClientSession) -> None:
    server = OneSignalFake(APP_ID, API_KEY, accept_all=True)
    await server.start()
    try:
        status, answer = await create(http, server, valid_body(include_subscription_ids=["x"]))
        assert status == 200
        assert "errors" not in answer
        assert (await server.wait_for(1, WAIT))[0]["recipients"] == ["x"]
    finally:
        await server.stop()


async def test_the_fake_rate_limit_and_outage_answers(
    fake: OneSignalFake, http: aiohttp.ClientSession
) -> None:
    fake.subscribe("s-1")
    fake.fail_next(1, status=429)
    async with http.post(
        f"{fake.url}/notifications", json=valid_body(), headers={"Authorization": f"Key {API_KEY}"}
    ) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        assert await resp.json() == {"errors": ["API rate limit exceeded."]}
    fake.set_down(503)
    assert (await create(http, fake, valid_body()))[0] == 503
    with pytest.raises(ValueError, match="unsupported"):
        fake.fail_next(1, status=400)
    with pytest.raises(TimeoutError):
        await fake.wait_for(1, 0.05)


# --- the CLI ---------------------------------------------------------------------------


async def test_the_cli_serves_until_sigterm(http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scripts.onesignal_fake",
        *("--port", "0", "--app-id", APP_ID, "--api-key", API_KEY, "--accept-all"),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        found = None
        async with asyncio.timeout(WAIT):
            while found is None:
                line = await proc.stderr.readline()
                assert line, "onesignal_fake exited before listening"
                found = re.search(rb"listening on 127\.0\.0\.1:(\d+)", line)
        async with http.post(
            f"http://127.0.0.1:{int(found.group(1))}/notifications?c=push",
            json=valid_body(include_subscription_ids=["anyone"]),
            headers={"Authorization": f"Key {API_KEY}"},
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            code = await proc.wait()
    assert code == 0
