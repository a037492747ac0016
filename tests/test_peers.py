"""The dev peers speak their protocols for real: SMTP (MailCatcher) and FCM HTTP v1 (FcmFake)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import firebase_admin
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from firebase_admin import credentials, messaging

from scripts.fcm_fake import FCM_ERROR, JWT_BEARER, FcmFake
from scripts.mailcatcher import MailCatcher

WAIT = 10.0


# --- MailCatcher ----------------------------------------------------------------------


async def test_mail_catcher_receives_parses_and_stores(tmp_path: Path) -> None:
    catcher = MailCatcher(tmp_path / "mail")
    port = await catcher.start("127.0.0.1", 0)
    raw = (
        b"From: a@example.com\r\nTo: b@example.com\r\n"
        b"Subject: =?utf-8?b?SMOpbGxv?=\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: text/plain; charset="utf-8"\r\n\r\nbody\r\n'
    )
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5, local_hostname="test")
    try:
        await smtp.connect()
        await smtp.sendmail("a@example.com", ["b@example.com"], raw)
        await smtp.sendmail("a@example.com", ["c@example.com", "reject@example.com"], raw)
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await smtp.sendmail("a@example.com", ["reject@example.com"], raw)
        assert refused.value.recipients[0].code == 550
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as deferred:
            await smtp.sendmail("a@example.com", ["defer@example.com"], raw)
        assert deferred.value.recipients[0].code == 451
        await smtp.quit()

        messages = await catcher.wait_for(2, WAIT)
        assert len(messages) == 2
        assert messages[0]["Subject"] == "Héllo"
        assert messages[0].get_content() == "body\n"
        assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == ["0001.eml", "0002.eml"]
        assert (tmp_path / "mail" / "0001.eml").read_bytes().startswith(b"From: a@example.com")
    finally:
        await catcher.stop()


async def test_mail_catcher_numbers_files_after_existing_ones(tmp_path: Path) -> None:
    (tmp_path / "0007.eml").write_bytes(b"Subject: from an earlier run\r\n\r\nx\r\n")
    catcher = MailCatcher(tmp_path)
    port = await catcher.start("127.0.0.1", 0)
    try:
        await aiosmtplib.send(
            b"Subject: new\r\n\r\nbody\r\n",
            sender="a@example.com",
            recipients=["b@example.com"],
            hostname="127.0.0.1",
            port=port,
            timeout=5,
        )
        await catcher.wait_for(1, WAIT)
        assert (tmp_path / "0008.eml").read_bytes().startswith(b"Subject: new")
    finally:
        await catcher.stop()


async def test_mail_catcher_wait_for_times_out() -> None:
    catcher = MailCatcher()
    await catcher.start("127.0.0.1", 0)
    try:
        with pytest.raises(TimeoutError):
            await catcher.wait_for(1, 0.05)
    finally:
        await catcher.stop()


# --- FcmFake --------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FcmFake]:
    server = FcmFake()
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_jwt(key: rsa.RSAPrivateKey, claims: dict[str, Any]) -> str:
    """An RS256 JWT, built the way google-auth builds a service account's assertion."""
    head = _b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{_b64(signature)}"


def account(path: Path) -> tuple[dict[str, Any], rsa.RSAPrivateKey]:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key  # noqa: PLC0415

    info = json.loads(path.read_text())
    key = load_pem_private_key(info["private_key"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return info, key


def claims_for(info: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": info["client_email"],
        "aud": info["token_uri"],
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
        "iat": now,
        "exp": now + 3600,
        **overrides,
    }


async def grant(
    http: aiohttp.ClientSession, fake: FcmFake, assertion: str
) -> aiohttp.ClientResponse:
    return await http.post(fake.token_url, data={"grant_type": JWT_BEARER, "assertion": assertion})


async def test_fcm_token_endpoint_issues_tokens_for_valid_assertions_only(
    fake: FcmFake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    info, key = account(fake.write_service_account(tmp_path / "sa.json", "proj-a"))
    assert info["token_uri"] == fake.token_url

    ok = await grant(http, fake, signed_jwt(key, claims_for(info)))
    assert ok.status == 200
    body = await ok.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600 and body["access_token"]

    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad_assertions = [
        signed_jwt(stranger, claims_for(info)),  # not the account's key
        signed_jwt(key, claims_for(info, exp=int(time.time()) - 3600)),  # expired
        signed_jwt(key, claims_for(info, iss="someone@else.iam.gserviceaccount.com")),
        signed_jwt(key, claims_for(info, aud="https://elsewhere.example/token")),
        "not.a.jwt",
        "garbage",
    ]
    for assertion in bad_assertions:
        refused = await grant(http, fake, assertion)
        assert refused.status == 400, assertion
        assert (await refused.json())["error"] == "invalid_grant"

    wrong_grant = await http.post(fake.token_url, data={"grant_type": "password"})
    assert wrong_grant.status == 400


async def bearer(http: aiohttp.ClientSession, fake: FcmFake, path: Path, project: str) -> str:
    info, key = account(fake.write_service_account(path, project))
    response = await grant(http, fake, signed_jwt(key, claims_for(info)))
    token: str = (await response.json())["access_token"]
    return token


async def test_fcm_send_requires_a_bearer_token_for_the_project(
    fake: FcmFake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    url = fake.url.format("proj-a")
    message = {"message": {"fid": "device-1", "notification": {"title": "t", "body": "b"}}}

    missing = await http.post(url, json=message)
    assert missing.status == 401
    assert (await missing.json())["error"]["status"] == "UNAUTHENTICATED"

    made_up = await http.post(url, json=message, headers={"Authorization": "Bearer made-up"})
    assert made_up.status == 401

    token = await bearer(http, fake, tmp_path / "sa.json", "proj-b")
    other_project = await http.post(url, json=message, headers={"Authorization": f"Bearer {token}"})
    assert other_project.status == 403
    assert (await other_project.json())["error"]["status"] == "PERMISSION_DENIED"
    assert fake.messages == []


async def test_fcm_send_validates_and_answers_like_fcm(
    fake: FcmFake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token = await bearer(http, fake, tmp_path / "sa.json", "proj-a")
    url = fake.url.format("proj-a")
    auth = {"Authorization": f"Bearer {token}"}

    async def send(message: object) -> tuple[int, dict[str, Any]]:
        response = await http.post(url, json={"message": message}, headers=auth)
        return response.status, await response.json()

    for malformed in (
        {"notification": {"title": "t"}},  # no target
        {"token": "a", "fid": "b"},  # two targets
        {"token": "a", "data": {"n": 1}},  # data values must be strings
        {"fid": "tok-1"},  # a registration token in the installation-ID field
        {"token": "cAbCdEfGhIjKlMnOpQrStU"},  # an installation ID in the token field
        "not an object",
    ):
        status, body = await send(malformed)
        assert status == 400, malformed
        assert body["error"]["status"] == "INVALID_ARGUMENT"

    status, body = await send({"token": "unregistered-1"})
    assert status == 404
    assert body["error"]["status"] == "NOT_FOUND"
    assert body["error"]["details"] == [{"@type": FCM_ERROR, "errorCode": "UNREGISTERED"}]

    status, body = await send({"token": "unavailable-1"})
    assert (status, body["error"]["status"]) == (503, "UNAVAILABLE")

    fake.fail_next(1, 429)
    status, body = await send({"token": "device-1"})
    assert (status, body["error"]["status"]) == (429, "RESOURCE_EXHAUSTED")

    status, body = await send({"token": "device-1", "data": {"k": "v"}})
    assert (status, body) == (200, {"name": "projects/proj-a/messages/1"})
    status, body = await send({"topic": "news"})
    assert (status, body) == (200, {"name": "projects/proj-a/messages/2"})
    messages = await fake.wait_for(2, WAIT)
    assert messages[0] == {"token": "device-1", "data": {"k": "v"}}


async def test_real_firebase_admin_sends_through_the_fake(
    fake: FcmFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fake.write_service_account(tmp_path / "sa.json", "proj-fb")
    monkeypatch.setattr(messaging._MessagingService, "FCM_URL", fake.url)
    app = firebase_admin.initialize_app(
        credentials.Certificate(str(path)),
        name=f"peers-{uuid.uuid4().hex}",
        options={"httpTimeout": 5},
    )
    try:
        # The synchronous client blocks, and the fake runs on this loop: use a thread.
        message = messaging.Message(
            fid="dDevice42abcdefghijklm",
            notification=messaging.Notification(title="Hello", body="World"),
            data={"notification_id": "n-1"},
        )
        name = await asyncio.to_thread(messaging.send, message, app=app)
        assert name == "projects/proj-fb/messages/1"
        with warnings.catch_warnings():  # ``token`` is right for a registration token
            warnings.simplefilter("ignore", DeprecationWarning)
            dead = messaging.Message(token="unregistered-x")
        with pytest.raises(messaging.UnregisteredError):
            await asyncio.to_thread(messaging.send, dead, app=app)
        with pytest.raises(messaging.exceptions.InvalidArgumentError):  # not an installation ID
            await asyncio.to_thread(messaging.send, messaging.Message(fid="tok-1"), app=app)
        received = await fake.wait_for(1, WAIT)
        assert received[0]["fid"] == "dDevice42abcdefghijklm"
        assert received[0]["notification"] == {"title": "Hello", "body": "World"}
        assert received[0]["data"] == {"notification_id": "n-1"}
    finally:
        # delete_app closes the async client with asyncio.run(), impossible on a running loop.
        await asyncio.to_thread(firebase_admin.delete_app, app)


async def test_fcm_fake_lists_what_it_received(
    fake: FcmFake, http: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = len(fake.messages)
    await test_real_firebase_admin_sends_through_the_fake(fake, tmp_path, monkeypatch)
    async with http.get(f"http://127.0.0.1:{fake.port}/messages") as resp:
        assert resp.status == 200
        listed = await resp.json()
    assert len(listed) == before + 1 and listed[-1]["fid"] == "dDevice42abcdefghijklm"
