"""A local stand-in for Firebase Cloud Messaging that speaks the FCM HTTP v1 wire format.

firebase-admin has no emulator setting, so the push worker's real client is pointed at
this server: ``write_service_account`` writes a service-account JSON with a fresh RSA
key whose ``token_uri`` is this server, and the worker's ``NOTIFY_FCM_URL`` is ``url``.
Both halves are checked the way Google does:

* ``POST /token``: the OAuth2 JWT-bearer grant. The assertion must be an RS256 JWT
  signed by the key of an account this fake wrote, for Google's (or this) token
  audience, not expired; the answer is a bearer token valid for an hour (else 400
  ``invalid_grant``).
* ``POST /v1/projects/{project}/messages:send``: needs one of those bearer tokens, for
  that project (401/403 otherwise), and a ``message`` with exactly one of ``token``,
  ``fid``, ``topic``, ``condition`` (400 ``INVALID_ARGUMENT`` otherwise); an ``fid`` must
  look like a Firebase installation ID and a ``token`` must not, so a device sent in the
  wrong field is caught.

Device tokens starting with ``unregistered`` get 404 ``UNREGISTERED`` and those starting
with ``unavailable`` get 503, like a dead device and an FCM outage. ``fail_next`` makes
the next sends fail with 503, 500 or 429 whatever the token.

CLI: ``python -m scripts.fcm_fake --port 8089 --credentials-out var/fcm/service-account.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from notify_kit.server import wait_for_shutdown_signal
from scripts.http_peer import serve, shut

log = logging.getLogger(__name__)

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth addresses every service-account assertion to Google's endpoint, whatever
# the token_uri it posts to; Google accepts that audience, and so do we.
GOOGLE_JWT_AUDIENCE = "https://oauth2.googleapis.com/token"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
TOKEN_LIFETIME = 3600
CLOCK_SKEW = 60
TARGET_FIELDS = ("token", "fid", "topic", "condition")
# The format of a Firebase installation ID: 22 characters of base64url, first c, d, e or f.
FID = re.compile(r"[cdef][A-Za-z0-9_-]{21}")
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_FCM_CODES = {429: "QUOTA_EXCEEDED", 500: "INTERNAL", 503: "UNAVAILABLE"}


@dataclass(frozen=True, slots=True)
class _Account:
    project_id: str
    public_key: rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class _Grant:
    project_id: str
    expires_at: float


class _InvalidGrant(Exception):
    """The assertion is not a valid JWT of a known account for this server."""


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def google_error(
    status: int, message: str, details: list[dict[str, Any]] | None = None
) -> web.Response:
    """The JSON error body Google APIs answer with (``google.rpc.Status`` as JSON)."""
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": _STATUS_NAMES[status],
    }
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status)


def _fcm_error(status: int, code: str, message: str) -> web.Response:
    return google_error(status, message, [{"@type": FCM_ERROR, "errorCode": code}])


class FcmFake:
    """The fake FCM server: OAuth2 token endpoint plus ``messages:send``."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._accounts: dict[str, _Account] = {}
        self._grants: dict[str, _Grant] = {}
        self._failures: list[int] = []
        self._received = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The ``FCM_URL`` template (``{0}`` is the project id) for firebase-admin."""
        return f"http://{self.host}:{self.port}/v1/projects/{{0}}/messages:send"

    @property
    def token_url(self) -> str:
        """The OAuth2 token endpoint written into service accounts as ``token_uri``."""
        return f"http://{self.host}:{self.port}/token"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port); return the bound port."""
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/v1/projects/{project}/messages:send", self._send)
        app.router.add_get("/messages", self._list)
        self._runner, self.port = await serve(app, host, port, "FCM fake")
        self.host = host
        return self.port

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        await shut(self._runner)
        self._runner = None

    def write_service_account(self, path: Path, project_id: str) -> Path:
        """Write a service-account JSON (fresh RSA key, ``token_uri`` = this server).

        Call after ``start()``: the token URI names the bound port.
        """
        if not self.port:
            raise RuntimeError("start() the fake before writing a service account")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = f"fcm-fake-{secrets.token_hex(4)}@{project_id}.iam.gserviceaccount.com"
        self._accounts[email] = _Account(project_id, key.public_key())
        info = {
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": secrets.token_hex(20),
            "private_key": key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode("ascii"),
            "client_email": email,
            "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": f"http://{self.host}:{self.port}/auth",
            "token_uri": self.token_url,
            "universe_domain": "googleapis.com",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2))
        path.chmod(0o600)
        return path

    def fail_next(self, count: int = 1, status: int = 503) -> None:
        """Answer the next ``count`` sends with ``status`` (503, 500 or 429)."""
        if status not in _FCM_CODES:
            raise ValueError(f"unsupported failure status {status}")
        self._failures.extend([status] * count)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` messages were accepted; return them all."""
        async with asyncio.timeout(timeout), self._received:
            await self._received.wait_for(lambda: len(self.messages) >= count)
            return list(self.messages)

    # --- OAuth2 --------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.Response:
        """What arrived so far, newest last: how a developer sees the pushes of ``make run``."""
        return web.json_response(self.messages)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != JWT_BEARER:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        assertion = form.get("assertion")
        try:
            if not isinstance(assertion, str):
                raise _InvalidGrant("no assertion")
            project_id = self._verify(assertion)
        except _InvalidGrant as exc:
            log.info("token refused: %s", exc)
            return web.json_response(
                {"error": "invalid_grant", "error_description": str(exc)}, status=400
            )
        access_token = f"ya29.fake-{secrets.token_urlsafe(32)}"
        self._grants[access_token] = _Grant(project_id, time.time() + TOKEN_LIFETIME)
        return web.json_response(
            {"access_token": access_token, "expires_in": TOKEN_LIFETIME, "token_type": "Bearer"}
        )

    def _verify(self, assertion: str) -> str:
        """Check an RS256 JWT of a known account; return the account's project id."""
        try:
            head, body, signature = assertion.split(".")
            header = json.loads(_b64url(head))
            claims = json.loads(_b64url(body))
            raw_signature = _b64url(signature)
        except (ValueError, binascii.Error) as exc:
            raise _InvalidGrant("malformed JWT") from exc
        if not isinstance(header, dict) or header.get("alg") != "RS256":
            raise _InvalidGrant("JWT must be signed with RS256")
        if not isinstance(claims, dict):
            raise _InvalidGrant("JWT claims must be an object")
        account = self._accounts.get(str(claims.get("iss")))
        if account is None:
            raise _InvalidGrant("unknown issuer")
        try:
            account.public_key.verify(
                raw_signature, f"{head}.{body}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature as exc:
            raise _InvalidGrant("bad signature") from exc
        now = time.time()
        if claims.get("aud") not in (GOOGLE_JWT_AUDIENCE, self.token_url):
            raise _InvalidGrant("wrong audience")
        if not isinstance(claims.get("exp"), int | float) or claims["exp"] < now - CLOCK_SKEW:
            raise _InvalidGrant("expired")
        if not isinstance(claims.get("iat"), int | float) or claims["iat"] > now + CLOCK_SKEW:
            raise _InvalidGrant("issued in the future")
        if not claims.get("scope"):
            raise _InvalidGrant("no scope")
        return account.project_id

    # --- messages:send -------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.Response:
        project = request.match_info["project"]
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        grant = self._grants.get(token) if scheme.lower() == "bearer" else None
        if grant is None or grant.expires_at < time.time():
            return google_error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
            )
        if grant.project_id != project:
            return google_error(403, f"Permission denied on project {project}.")
        try:
            payload = await request.json()
        except ValueError:
            return google_error(400, "Invalid JSON payload received.")
        message = payload.get("message") if isinstance(payload, dict) else None
        problem = _validate(message)
        if problem is not None:
            field, description = problem
            return google_error(
                400,
                description,
                [
                    {"@type": FCM_ERROR, "errorCode": "INVALID_ARGUMENT"},
                    {
                        "@type": BAD_REQUEST,
                        "fieldViolations": [{"field": field, "description": description}],
                    },
                ],
            )
        assert isinstance(message, dict)
        if self._failures:
            status = self._failures.pop(0)
            return _fcm_error(status, _FCM_CODES[status], "Injected failure.")
        device = str(message.get("token") or message.get("fid") or "")
        if device.startswith("unregistered"):
            return _fcm_error(404, "UNREGISTERED", "Requested entity was not found.")
        if device.startswith("unavailable"):
            return _fcm_error(503, "UNAVAILABLE", "The service is currently unavailable.")
        if payload.get("validate_only"):
            return web.json_response({"name": f"projects/{project}/messages/fake_message_id"})
        async with self._received:
            self.messages.append(message)
            number = len(self.messages)
            self._received.notify_all()
        log.info("push %s to %s", number, device or message.get("topic") or "condition")
        return web.json_response({"name": f"projects/{project}/messages/{number}"})


def _validate(message: object) -> tuple[str, str] | None:
    """The first thing FCM would reject in ``message``, as (field, description)."""
    if not isinstance(message, dict):
        return "message", "message is required"
    targets = [f for f in TARGET_FIELDS if message.get(f)]
    if len(targets) != 1:
        return "message", "exactly one of token, fid, topic or condition is required"
    if not isinstance(message[targets[0]], str):
        return f"message.{targets[0]}", "must be a string"
    # A Firebase installation ID has a fixed shape; a registration token never has it.
    # Sending one in the other's field is a client bug real FCM refuses too.
    if targets[0] == "fid" and not FID.fullmatch(message["fid"]):
        return "message.fid", "not a Firebase installation ID (is it a registration token?)"
    if targets[0] == "token" and FID.fullmatch(message["token"]):
        return "message.token", "an installation ID belongs in message.fid"
    data = message.get("data", {})
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        return "message.data", "data must map strings to strings"
    notification = message.get("notification", {})
    if not isinstance(notification, dict) or not all(
        isinstance(notification.get(k, ""), str) for k in ("title", "body")
    ):
        return "message.notification", "title and body must be strings"
    return None


async def _serve(host: str, port: int, credentials_out: Path | None, project: str) -> None:
    fake = FcmFake()
    await fake.start(host, port)
    if credentials_out is not None:
        fake.write_service_account(credentials_out, project)
        log.info("service account for %s written to %s", project, credentials_out)
    log.info("NOTIFY_FCM_URL=%s", fake.url)
    try:
        await wait_for_shutdown_signal()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the fake until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--credentials-out", type=Path, default=None)
    parser.add_argument("--project", default="notify-dev")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args.host, args.port, args.credentials_out, args.project))


if __name__ == "__main__":
    main()
