"""SendGridProvider against the SendGrid stand-in over real HTTP, and the stand-in's rules."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from email_worker.outgoing import OutgoingEmail
from email_worker.sendgrid import SendGridProvider
from notify_kit.jobs.errors import OutcomeUnknown, PermanentError, TransientError
from notify_kit.jobs.providers import retry_after_seconds
from scripts.sendgrid_fake import INVALID_KEY, NO_KEY, SendGridFake

API_KEY = "SG.test-key.secret"
WAIT = 10.0
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def fake() -> AsyncIterator[SendGridFake]:
    server = SendGridFake(API_KEY)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


@pytest.fixture
async def provider(fake: SendGridFake) -> AsyncIterator[SendGridProvider]:
    client = SendGridProvider(api_key=API_KEY, base_url=fake.url, timeout=WAIT)
    yield client
    await client.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


def outgoing(**changes: Any) -> OutgoingEmail:
    message = OutgoingEmail(
        notification_id=str(uuid.uuid4()),
        from_name="Notify",
        from_address="noreply@notify.example.com",
        to_name="Ada Lovelace",
        to_address="ada@example.com",
        subject="Your order shipped",
        text_body="Order 42 is on its way.",
        html_body="<p>Order 42 is on its way.</p>",
    )
    return dataclasses.replace(message, **changes)


def valid_body(**changes: Any) -> dict[str, Any]:
    """A well-formed Mail Send body; a change to None removes that field."""
    body: dict[str, Any] = {
        "personalizations": [
            {"to": [{"email": "ada@example.com"}], "custom_args": {"notification_id": "n-1"}}
        ],
        "from": {"email": "noreply@example.com", "name": "Notify"},
        "subject": "Hello",
        "content": [
            {"type": "text/plain", "value": "hi"},
            {"type": "text/html", "value": "<p>hi</p>"},
        ],
        "headers": {"X-Notify-Notification-Id": "n-1"},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def to(*addresses: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"to": [{"email": a} for a in addresses], **extra}]


async def post(
    http: aiohttp.ClientSession,
    fake: SendGridFake,
    body: object,
    authorization: str | None = f"Bearer {API_KEY}",
) -> tuple[int, Any, dict[str, str]]:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with http.post(f"{fake.url}/v3/mail/send", json=body, headers=headers) as resp:
        raw = await resp.read()
        answer = await resp.json() if raw else None
        return resp.status, answer, dict(resp.headers)


# --- what the provider sends ----------------------------------------------------------


async def test_a_send_carries_every_field(fake: SendGridFake, provider: SendGridProvider) -> None:
    message = outgoing()

    detail = await provider.send(message)

    [received] = await fake.wait_for(1)
    assert detail == f"sendgrid 202 {received['message_id']}"
    assert received["request"] == {
        "personalizations": [
            {
                "to": [{"email": "ada@example.com", "name": "Ada Lovelace"}],
                "custom_args": {"notification_id": message.notification_id},
            }
        ],
        "from": {"email": "noreply@notify.example.com", "name": "Notify"},
        "subject": "Your order shipped",
        "content": [
            {"type": "text/plain", "value": "Order 42 is on its way."},
            {"type": "text/html", "value": "<p>Order 42 is on its way.</p>"},
        ],
        "headers": {"X-Notify-Notification-Id": message.notification_id},
    }
    assert fake.attempts == 1


async def test_text_only_and_nameless_parts_are_left_out(
    fake: SendGridFake, provider: SendGridProvider
) -> None:
    await provider.send(outgoing(to_name="", from_name="", html_body=""))

    [received] = await fake.wait_for(1)
    request = received["request"]
    assert request["personalizations"][0]["to"] == [{"email": "ada@example.com"}]
    assert request["from"] == {"email": "noreply@notify.example.com"}
    assert request["content"] == [{"type": "text/plain", "value": "Order 42 is on its way."}]


async def test_concurrent_sends_share_the_session(
    fake: SendGridFake, provider: SendGridProvider
) -> None:
    messages = [outgoing(to_address=f"user{i}@example.com") for i in range(5)]
    details = await asyncio.gather(*(provider.send(m) for m in messages))

    received = await fake.wait_for(5)
    assert len(set(details)) == 5
    assert {
        r["request"]["personalizations"][0]["custom_args"]["notification_id"] for r in received
    } == {m.notification_id for m in messages}


async def test_close_without_send_and_send_after_close(
    fake: SendGridFake, provider: SendGridProvider
) -> None:
    idle = SendGridProvider(api_key=API_KEY, base_url=fake.url)
    await idle.close()

    await provider.send(outgoing())
    await provider.close()
    await provider.send(outgoing())
    assert len(await fake.wait_for(2)) == 2


# --- how the provider classifies answers ------------------------------------------------


async def test_a_wrong_key_is_a_transient_provider_failure(fake: SendGridFake) -> None:
    wrong = SendGridProvider(api_key="SG.revoked", base_url=fake.url, timeout=WAIT)
    try:
        with pytest.raises(TransientError) as caught:
            await wrong.send(outgoing())
    finally:
        await wrong.close()
    assert type(caught.value) is TransientError
    assert "401" in str(caught.value)
    assert INVALID_KEY in str(caught.value)
    assert fake.received == []


async def test_forbidden_is_transient(fake: SendGridFake, provider: SendGridProvider) -> None:
    fake.fail_next(status=403)
    with pytest.raises(TransientError) as caught:
        await provider.send(outgoing())
    assert type(caught.value) is TransientError
    assert "403" in str(caught.value)


async def test_a_bounce_recipient_is_permanent(
    fake: SendGridFake, provider: SendGridProvider
) -> None:
    with pytest.raises(PermanentError) as caught:
        await provider.send(outgoing(to_address="bounce-me@example.com"))
    assert "400" in str(caught.value)
    assert "personalizations.0.to.0.email" in str(caught.value)
    assert "bounce-me@example.com" in str(caught.value)
    assert fake.received == []


async def test_an_address_sendgrid_refuses_is_permanent(
    fake: SendGridFake, provider: SendGridProvider
) -> None:
    with pytest.raises(PermanentError, match="Does not contain a valid address"):
        await provider.send(outgoing(to_address="ada@localhost"))


async def test_a_too_large_message_is_permanent() -> None:
    small = SendGridFake(API_KEY, max_bytes=2048)
    await small.start()
    client = SendGridProvider(api_key=API_KEY, base_url=small.url, timeout=WAIT)
    try:
        with pytest.raises(PermanentError, match=r"413.*too large"):
            await client.send(outgoing(text_body="x" * 4096))
    finally:
        await client.close()
        await small.stop()


async def test_503_is_transient_and_the_next_send_succeeds(
    fake: SendGridFake, provider: SendGridProvider
) -> None:
    fake.fail_next(status=503)
    with pytest.raises(TransientError) as caught:
        await provider.send(outgoing())
    assert type(caught.value) is TransientError
    assert caught.value.retry_after is None
    assert "503" in str(caught.value)

    assert (await provider.send(outgoing())).startswith("sendgrid 202 ")
    assert fake.attempts == 2


async def test_429_carries_retry_after(fake: SendGridFake, provider: SendGridProvider) -> None:
    fake.fail_next(status=429, retry_after=7)
    with pytest.raises(TransientError) as caught:
        await provider.send(outgoing())
    assert type(caught.value) is TransientError
    assert caught.value.retry_after == 7
    assert "too many requests" in str(caught.value)


async def test_429_without_retry_after_has_no_hint(
    fake: SendGridFake, provider: SendGridProvider
) -> None:
    fake.fail_next(status=429)
    with pytest.raises(TransientError) as caught:
        await provider.send(outgoing())
    assert caught.value.retry_after is None


async def test_5xx_retry_after_is_honoured(fake: SendGridFake, provider: SendGridProvider) -> None:
    fake.fail_next(status=500, retry_after=2.5)
    with pytest.raises(TransientError) as caught:
        await provider.send(outgoing())
    assert caught.value.retry_after == 2.5


@pytest.mark.parametrize("status", [404, 408])
async def test_configuration_and_timeout_4xx_are_transient(
    fake: SendGridFake, provider: SendGridProvider, status: int
) -> None:
    fake.fail_next(status=status)
    with pytest.raises(TransientError) as caught:
        await provider.send(outgoing())
    assert type(caught.value) is TransientError


async def test_an_outage_fails_every_send_until_it_ends(
    fake: SendGridFake, provider: SendGridProvider
) -> None:
    fake.set_down(503)
    for _ in range(3):
        with pytest.raises(TransientError):
            await provider.send(outgoing())
    assert fake.attempts == 3
    fake.set_down(None)
    await provider.send(outgoing())
    assert len(await fake.wait_for(1)) == 1
    assert fake.attempts == 4


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A server that accepts connections, reads, and never answers."""
    release = asyncio.Event()
    got_request = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got_request.set()
        await release.wait()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    assert got_request.is_set(), "the request never reached the silent server"
    release.set()
    server.close()
    await server.wait_closed()


async def test_no_answer_after_the_request_left_is_outcome_unknown(silent_server: str) -> None:
    client = SendGridProvider(api_key=API_KEY, base_url=silent_server, timeout=0.3)
    try:
        async with asyncio.timeout(3):
            with pytest.raises(OutcomeUnknown, match=r"did not answer within 0\.3s"):
                await client.send(outgoing())
    finally:
        await client.close()


async def test_a_connection_dropped_after_the_request_left_is_outcome_unknown() -> None:
    got_request = asyncio.Event()

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got_request.set()
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = SendGridProvider(api_key=API_KEY, base_url=f"http://127.0.0.1:{port}", timeout=WAIT)
    try:
        with pytest.raises(OutcomeUnknown, match="connection lost"):
            await client.send(outgoing())
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    assert got_request.is_set()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening (held for the test): connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_nothing_listening_is_transient_not_unknown(closed_port: int) -> None:
    client = SendGridProvider(
        api_key=API_KEY, base_url=f"http://127.0.0.1:{closed_port}", timeout=WAIT
    )
    try:
        with pytest.raises(TransientError) as caught:
            await client.send(outgoing())
    finally:
        await client.close()
    assert not isinstance(caught.value, OutcomeUnknown)
    assert "unreachable" in str(caught.value)


def test_retry_after_accepts_seconds_and_dates() -> None:
    assert retry_after_seconds("7") == 7
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


# --- the fake's strictness --------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "message"),
    [(None, NO_KEY), ("Bearer SG.wrong", INVALID_KEY), (f"Basic {API_KEY}", INVALID_KEY)],
    ids=["missing", "wrong", "not-bearer"],
)
async def test_the_fake_refuses_a_wrong_key(
    fake: SendGridFake, http: aiohttp.ClientSession, authorization: str | None, message: str
) -> None:
    status, answer, _ = await post(http, fake, valid_body(), authorization)
    assert status == 401
    assert answer == {"errors": [{"message": message, "field": None, "help": None}]}
    assert fake.received == []
    assert fake.attempts == 1


@pytest.mark.parametrize(
    ("changes", "field", "error"),
    [
        ({"from": None}, "from.email", "The from object must be provided"),
        ({"from": {"name": "No address"}}, "from.email", "The from object must be provided"),
        ({"from": {"email": "not-an-address"}}, "from.email", "valid address"),
        ({"subjet": "typo"}, "subjet", "Additional property subjet is not allowed"),
        (
            {"personalizations": to("a@example.com", sujbect="x")},
            "personalizations.0.sujbect",
            "not allowed",
        ),
        (
            {"personalizations": to("a@example.com", custom_args={"notification_id": 42})},
            "personalizations.0.custom_args.notification_id",
            "Expected: string, given: integer",
        ),
        ({"custom_args": {"n": True}}, "custom_args.n", "Expected: string, given: boolean"),
        ({"custom_args": "n-1"}, "custom_args", "Expected: object, given: string"),
        (
            {"personalizations": to("ada@@example.com")},
            "personalizations.0.to.0.email",
            "valid address",
        ),
        (
            {"personalizations": to("ada example@x.com")},
            "personalizations.0.to.0.email",
            "valid address",
        ),
        (
            {"personalizations": to("a@example.com", "A@example.com")},
            "personalizations.0",
            "unique",
        ),
        ({"personalizations": []}, "personalizations", "at least one personalization"),
        ({"personalizations": None}, "personalizations", "at least one personalization"),
        ({"personalizations": [{"to": []}]}, "personalizations.0.to", "The to array is required"),
        (
            {"personalizations": to(*(f"u{i}@example.com" for i in range(1001)))},
            "personalizations",
            "1000 total recipients",
        ),
        (
            {"personalizations": [to("a@example.com")[0]] * 1001},
            "personalizations",
            "limited to 1000",
        ),
        ({"subject": None}, "subject", "The subject is required"),
        ({"subject": ""}, "subject", "at least one character"),
        ({"content": None}, "content", "the content parameter is required"),
        (
            {
                "content": [
                    {"type": "text/html", "value": "<p>x</p>"},
                    {"type": "text/plain", "value": "x"},
                ]
            },
            "content",
            "text/plain must be first",
        ),
        (
            {"content": [{"type": "text/plain", "value": ""}]},
            "content.0.value",
            "at least one character",
        ),
        (
            {
                "content": [
                    {"type": "text/plain", "value": "a"},
                    {"type": "text/plain", "value": "b"},
                ]
            },
            "content",
            "only be provided once",
        ),
        (
            {"content": [{"type": "text/plain; charset=utf-8", "value": "a"}]},
            "content.0.type",
            "cannot contain ';'",
        ),
        ({"headers": {"Subject": "override"}}, "headers.Subject", "reserved"),
        ({"headers": {"X-Count": 1}}, "headers.X-Count", "Expected: string, given: integer"),
        ({"categories": ["a"] * 11}, "categories", "more than 10 categories"),
        ({"custom_args": {"big": "x" * 10_001}}, "personalizations.0.custom_args", "10000 bytes"),
    ],
    ids=lambda value: value if isinstance(value, str) and " " not in value else None,
)
async def test_the_fake_refuses_malformed_requests(
    fake: SendGridFake,
    http: aiohttp.ClientSession,
    changes: dict[str, Any],
    field: str,
    error: str,
) -> None:
    status, answer, _ = await post(http, fake, valid_body(**changes))
    assert status == 400
    [only] = answer["errors"]
    assert set(only) == {"message", "field", "help"}
    assert only["field"] == field
    assert error in only["message"]
    assert only["help"].startswith("http://sendgrid.com/docs/")
    assert fake.received == []


async def test_the_fake_accepts_per_personalization_subjects_and_documented_options(
    fake: SendGridFake, http: aiohttp.ClientSession
) -> None:
    body = valid_body(
        subject=None,
        personalizations=[
            {"to": [{"email": "a@example.com", "name": "A"}], "subject": "For A"},
            {
                "to": [{"email": "b@example.com"}],
                "cc": [{"email": "c@example.com"}],
                "subject": "For B",
            },
        ],
        reply_to={"email": "support@example.com"},
        categories=["transactional"],
        tracking_settings={"click_tracking": {"enable": False}},
    )
    status, answer, headers = await post(http, fake, body)
    assert status == 202
    assert answer is None
    [received] = await fake.wait_for(1)
    assert headers["X-Message-Id"] == received["message_id"]
    assert received["request"] == body


async def test_the_fake_refuses_bad_json_and_content_type(
    fake: SendGridFake, http: aiohttp.ClientSession
) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{fake.url}/v3/mail/send"
    async with http.post(
        url, data=b"{not json", headers={**auth, "Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["errors"][0]["message"] == "Bad Request"
    async with http.post(url, data=b"x=1", headers={**auth, "Content-Type": "text/plain"}) as resp:
        assert resp.status == 415
    status, _, _ = await post(http, fake, ["not", "an", "object"])
    assert status == 400
    assert fake.attempts == 3


async def test_the_fake_lists_messages_and_scripts_failures(
    fake: SendGridFake, http: aiohttp.ClientSession
) -> None:
    fake.fail_next(2, status=429, retry_after=7)
    for _ in range(2):
        status, answer, headers = await post(http, fake, valid_body())
        assert status == 429
        assert headers["Retry-After"] == "7"
        assert answer == {"errors": [{"message": "too many requests", "field": None, "help": None}]}
    assert (await post(http, fake, valid_body()))[0] == 202
    async with http.get(f"{fake.url}/messages") as resp:
        listed = await resp.json()
    assert listed == fake.received
    assert listed[0]["request"] == valid_body()
    with pytest.raises(ValueError, match="unsupported"):
        fake.fail_next(1, status=302)
    with pytest.raises(TimeoutError):
        await fake.wait_for(2, 0.05)


# --- the CLI ---------------------------------------------------------------------------


async def test_the_cli_serves_until_sigterm(http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scripts.sendgrid_fake",
        *("--port", "0", "--api-key", API_KEY),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        found = None
        async with asyncio.timeout(WAIT):
            while found is None:
                line = await proc.stderr.readline()
                assert line, "sendgrid_fake exited before listening"
                found = re.search(rb"listening on 127\.0\.0\.1:(\d+)", line)
        async with http.post(
            f"http://127.0.0.1:{int(found.group(1))}/v3/mail/send",
            json=valid_body(),
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as resp:
            assert resp.status == 202
            assert resp.headers["X-Message-Id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            code = await proc.wait()
    assert code == 0
