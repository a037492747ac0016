"""A local stand-in for SendGrid that speaks the v3 Mail Send wire format (``POST /v3/mail/send``).

The e-mail worker's ``SendGridProvider`` is pointed at this server (``url`` is its
``base_url``). It answers the way api.sendgrid.com does, and is deliberately at least as
strict as SendGrid about what it accepts, so that a wrong field fails here instead of in
production:

* Auth: ``Authorization: Bearer <API key>``; a missing or wrong key gets 401 with
  SendGrid's body ``{"errors": [{"message": ..., "field": null, "help": null}]}``.
* Body: ``Content-Type: application/json``, at most ``max_bytes`` (SendGrid's 30 MB by
  default; 413 beyond), a JSON object with only the documented top-level fields
  (``FIELDS``; anything else is a 400 naming the field). ``personalizations`` (1 to 1000,
  at most 1000 recipients in all), each with a non-empty ``to`` of ``{"email", "name"?}``
  objects and no address twice; ``from`` (required); ``subject`` (required unless every
  personalization has one, or a ``template_id`` is given); ``content`` (required unless a
  ``template_id`` is given) of ``{"type", "value"}`` with non-empty values, ``text/plain``
  first and ``text/html`` next when present, each at most once; ``custom_args`` and
  ``headers`` (top level or per personalization) map strings to strings, 10,000 bytes of
  custom args at most, and no reserved header (``RESERVED_HEADERS``). Addresses must be
  plain ``local@domain.tld``. The first problem found is answered as 400 ``{"errors":
  [{"message", "field", "help"}]}``, the shape of SendGrid's validation errors.
* Success: 202 with an empty body and ``X-Message-Id``; the request is kept in
  ``received`` as ``{"message_id": ..., "request": <the JSON body>}`` (and listed by
  ``GET /messages``).

Unlike SendGrid (which accepts the request and bounces later), a recipient whose address
starts with ``bounce`` is refused at once with 400, to stand for a permanently invalid
recipient. ``fail_next`` answers the next well-formed sends with any 4xx/5xx (a 429 or 5xx
with ``Retry-After`` when asked; SendGrid does not promise that header); ``set_down``
answers every send with a status, before reading it, until ``set_down(None)``.
``attempts`` counts every send request, whatever its answer, so tests can count probes.

CLI: ``python -m scripts.sendgrid_fake --port 8090 --api-key KEY``.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from aiohttp import web

from notify_kit.server import wait_for_shutdown_signal
from scripts.http_peer import Received, serve, shut

log = logging.getLogger(__name__)

MAX_BYTES = 30 * 1024 * 1024  # SendGrid's limit on a whole request, attachments included
MAX_PERSONALIZATIONS = 1000
MAX_RECIPIENTS = 1000  # to + cc + bcc over all personalizations
MAX_CUSTOM_ARGS_BYTES = 10_000
MAX_CATEGORIES = 10
HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
FIELDS = frozenset(
    {
        "personalizations",
        "from",
        "reply_to",
        "reply_to_list",
        "subject",
        "content",
        "attachments",
        "template_id",
        "sections",
        "headers",
        "categories",
        "custom_args",
        "send_at",
        "batch_id",
        "asm",
        "ip_pool_name",
        "mail_settings",
        "tracking_settings",
    }
)
PERSONALIZATION_FIELDS = frozenset(
    {
        "to",
        "cc",
        "bcc",
        "from",
        "subject",
        "headers",
        "substitutions",
        "dynamic_template_data",
        "custom_args",
        "send_at",
    }
)
# Headers SendGrid writes itself and refuses in ``headers`` (compared case-insensitively).
RESERVED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)
INVALID_KEY = "The provided authorization grant is invalid, expired, or revoked"
NO_KEY = "authorization required"
FROM_REQUIRED = (
    "The from object must be provided for every email send. It is an object that requires "
    'the email parameter, but may also contain a name parameter.  e.g. {"email" : '
    '"example@example.com"}  or {"email" : "example@example.com", "name" : "Example '
    'Recipient"}.'
)
TO_REQUIRED = (
    "The to array is required for all personalization objects, and must have at least one "
    "email object with a valid email address."
)
RECIPIENT_REQUIRED = (
    "Each {kind} object must at least have an email address and may also contain a name. "
    'e.g. {{"email": "example@example.com"}} or {{"email": "example@example.com", "name": '
    '"Example Recipient"}}'
)
SUBJECT_REQUIRED = (
    "The subject is required. You can get around this requirement if you use a template "
    "with a subject defined or if every personalization has a subject defined."
)
CONTENT_REQUIRED = (
    "Unless a valid template_id is provided, the content parameter is required. There must "
    "be at least one defined content block. We typically suggest both text/plain and "
    "text/html blocks are included, but only one block is required."
)
CONTENT_ORDER = (
    "If present, text/plain must be first, followed by text/html, followed by any other content."
)
_FAILURE_TEXT = {
    401: INVALID_KEY,
    403: "You are temporarily blocked from sending emails due to repeated bad requests.",
    413: "The JSON payload you have included in your request is too large.",
    429: "too many requests",
    500: "internal error",
    503: "service unavailable",
}
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDRESS = re.compile(
    rf"{_ATEXT}(?:\.{_ATEXT})*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,63}"
)
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII without ':' or space (RFC 5322)
_INDEX = re.compile(r"\.\d+")


@dataclass(frozen=True, slots=True)
class _Failure:
    status: int
    retry_after: float | None


class Invalid(Exception):
    """What SendGrid would refuse in a body: ``field`` (None: the body) and its message."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def errors(
    status: int,
    message: str,
    field: str | None = None,
    *,
    retry_after: float | None = None,
) -> web.Response:
    """SendGrid's error body with one error, and ``Retry-After`` when given.

    ``help`` links the errors page for field errors and is null otherwise, as SendGrid's
    are.
    """
    link = None if field is None else f"{HELP}#message.{_INDEX.sub('', field)}"
    headers = {} if retry_after is None else {"Retry-After": _seconds(retry_after)}
    return web.json_response(
        {"errors": [{"message": message, "field": field, "help": link}]},
        status=status,
        headers=headers,
    )


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _failure_text(status: int) -> str:
    if status in _FAILURE_TEXT:
        return _FAILURE_TEXT[status]
    try:
        return http.HTTPStatus(status).phrase.lower()
    except ValueError:
        return f"error {status}"


class SendGridFake:
    """The fake SendGrid server: ``POST /v3/mail/send`` plus ``GET /messages``."""

    def __init__(self, api_key: str, *, max_bytes: int = MAX_BYTES) -> None:
        self.api_key = api_key
        self.max_bytes = max_bytes
        self.log = Received()
        self.attempts = 0
        self.host = "127.0.0.1"
        self.port = 0
        self._failures: list[_Failure] = []
        self._down: _Failure | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The API base URL (``https://api.sendgrid.com`` in production)."""
        return f"http://{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port); return the bound port."""
        app = web.Application(client_max_size=self.max_bytes)
        app.router.add_post("/v3/mail/send", self._send)
        app.router.add_get("/messages", self.log.listing)
        self._runner, self.port = await serve(app, host, port, "SendGrid fake")
        self.host = host
        return self.port

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        await shut(self._runner)
        self._runner = None

    # --- the script ------------------------------------------------------------------

    def fail_next(
        self, count: int = 1, status: int = 503, retry_after: float | None = None
    ) -> None:
        """Answer the next ``count`` well-formed, authorized sends with ``status`` (4xx/5xx).

        Nothing is recorded. ``retry_after`` (seconds) is sent as ``Retry-After``; SendGrid
        does not promise that header, so a 429 carries none unless asked.
        """
        self._failures.extend([_Failure(_failure_status(status), retry_after)] * count)

    def set_down(self, status: int | None, retry_after: float | None = None) -> None:
        """Answer every send with ``status`` before reading it (an outage); None ends it."""
        self._down = None if status is None else _Failure(_failure_status(status), retry_after)

    @property
    def received(self) -> list[dict[str, Any]]:
        """Everything accepted so far, in order."""
        return self.log.items

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` sends were accepted; return them all."""
        return await self.log.wait_for(count, timeout)

    # --- HTTP ------------------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self._down is not None:
            down = self._down
            return errors(down.status, _failure_text(down.status), retry_after=down.retry_after)
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if not scheme:
            return errors(401, NO_KEY)
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            key.strip().encode(), self.api_key.encode()
        ):
            return errors(401, INVALID_KEY)
        if request.content_type != "application/json":
            return errors(415, "Content-Type should be application/json.")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return errors(413, _FAILURE_TEXT[413])
        try:
            body = json.loads(raw)
        except ValueError:
            return errors(400, "Bad Request")
        try:
            validate(body)
        except Invalid as exc:
            log.info("mail send refused (%s): %s", exc.field, exc.message)
            return errors(400, exc.message, exc.field)
        if self._failures:
            failure = self._failures.pop(0)
            return errors(
                failure.status, _failure_text(failure.status), retry_after=failure.retry_after
            )
        bounced = _bounced(body)
        if bounced is not None:
            field, address = bounced
            return errors(400, f"The recipient {address} is permanently invalid.", field)
        message_id = secrets.token_urlsafe(16)
        await self.log.add({"message_id": message_id, "request": body})
        log.info("mail %s accepted for %s", message_id, ", ".join(_recipients(body)))
        return web.Response(status=202, headers={"X-Message-Id": message_id})


def _failure_status(status: int) -> int:
    if not 400 <= status <= 599:
        raise ValueError(f"unsupported failure status {status}")
    return status


def _recipients(body: Mapping[str, Any]) -> list[str]:
    return [
        str(r["email"])
        for p in body["personalizations"]
        for kind in ("to", "cc", "bcc")
        for r in p.get(kind, ())
    ]


def _bounced(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first recipient the fake treats as permanently invalid, as (field, address)."""
    for i, personalization in enumerate(body["personalizations"]):
        for kind in ("to", "cc", "bcc"):
            for j, recipient in enumerate(personalization.get(kind, ())):
                if str(recipient["email"]).lower().startswith("bounce"):
                    return f"personalizations.{i}.{kind}.{j}.email", recipient["email"]
    return None


# --- validation ------------------------------------------------------------------------


def validate(body: object) -> None:
    """Raise ``Invalid`` for the first thing SendGrid would refuse in a Mail Send body."""
    if not isinstance(body, dict):
        raise Invalid(None, f"Invalid type. Expected: object, given: {_type(body)}.")
    for name in body:
        if name not in FIELDS:
            raise Invalid(name, f"Additional property {name} is not allowed.")
    templated = "template_id" in body
    if templated and not _text(body["template_id"]):
        raise Invalid("template_id", "The template_id must be a non-empty string.")
    personalizations = _personalizations(body.get("personalizations"))
    if "from" not in body:
        raise Invalid("from.email", FROM_REQUIRED)
    _address(body["from"], "from", FROM_REQUIRED)
    _subject(body, "subject")
    every_subject = all("subject" in p for p in personalizations)
    if "subject" not in body and not every_subject and not templated:
        raise Invalid("subject", SUBJECT_REQUIRED)
    if "content" in body or not templated:
        _content(body.get("content"))
    _options(body)
    if "custom_args" in body:
        _string_map(body["custom_args"], "custom_args")
    if "headers" in body:
        _headers(body["headers"], "headers")
    _custom_args_size(body, personalizations)


def _personalizations(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise Invalid("personalizations", "You must have at least one personalization.")
    if len(value) > MAX_PERSONALIZATIONS:
        raise Invalid(
            "personalizations",
            f"The personalization block is limited to {MAX_PERSONALIZATIONS} personalizations "
            f"per API request. You have provided {len(value)} personalizations. Please "
            "consider splitting this into multiple requests and resending your request.",
        )
    recipients = 0
    for i, personalization in enumerate(value):
        recipients += _personalization(personalization, f"personalizations.{i}")
    if recipients > MAX_RECIPIENTS:
        raise Invalid(
            "personalizations",
            f"There is a limit of {MAX_RECIPIENTS} total recipients (to + cc + bcc) per request.",
        )
    return value


def _personalization(value: object, field: str) -> int:
    """Check one personalization; return its number of recipients."""
    if not isinstance(value, dict):
        raise Invalid(field, f"Invalid type. Expected: object, given: {_type(value)}.")
    for name in value:
        if name not in PERSONALIZATION_FIELDS:
            raise Invalid(f"{field}.{name}", f"Additional property {name} is not allowed.")
    count = _recipients_of(value, field)
    if "from" in value:
        _address(value["from"], f"{field}.from", FROM_REQUIRED)
    _subject(value, f"{field}.subject")
    for name in ("custom_args", "substitutions"):
        if name in value:
            _string_map(value[name], f"{field}.{name}")
    if "headers" in value:
        _headers(value["headers"], f"{field}.headers")
    if "dynamic_template_data" in value and not isinstance(value["dynamic_template_data"], dict):
        raise Invalid(f"{field}.dynamic_template_data", "dynamic_template_data must be an object.")
    if "send_at" in value:
        _integer(value["send_at"], f"{field}.send_at")
    return count


def _recipients_of(personalization: Mapping[str, Any], field: str) -> int:
    """Check ``to`` (required), ``cc`` and ``bcc``: addresses, each once; return how many."""
    if not isinstance(personalization.get("to"), list) or not personalization["to"]:
        raise Invalid(f"{field}.to", TO_REQUIRED)
    seen: set[str] = set()
    for kind in ("to", "cc", "bcc"):
        if kind not in personalization:
            continue
        recipients = personalization[kind]
        if not isinstance(recipients, list) or not recipients:
            raise Invalid(f"{field}.{kind}", f"The {kind} array must have at least one address.")
        for j, recipient in enumerate(recipients):
            address = _address(
                recipient, f"{field}.{kind}.{j}", RECIPIENT_REQUIRED.format(kind=kind)
            )
            if address.lower() in seen:
                raise Invalid(
                    field,
                    "Each email address in the personalization block should be unique between "
                    f"to, cc, and bcc. We found the first duplicate instance of [{address}] in "
                    f"the {field}.{kind} field.",
                )
            seen.add(address.lower())
    return len(seen)


def _address(value: object, field: str, required: str) -> str:
    """Check an ``{"email", "name"?}`` object; return the address."""
    if not isinstance(value, dict):
        raise Invalid(f"{field}.email", required)
    for name in value:
        if name not in ("email", "name"):
            raise Invalid(f"{field}.{name}", f"Additional property {name} is not allowed.")
    address = value.get("email")
    if not isinstance(address, str) or not address:
        raise Invalid(f"{field}.email", required)
    local, _, _ = address.rpartition("@")
    if len(address) > 254 or len(local) > 64 or not _ADDRESS.fullmatch(address):
        raise Invalid(f"{field}.email", "Does not contain a valid address.")
    if "name" in value:
        name = value["name"]
        if not isinstance(name, str):
            raise Invalid(f"{field}.name", f"Invalid type. Expected: string, given: {_type(name)}.")
        if "\r" in name or "\n" in name:
            raise Invalid(f"{field}.name", "The name cannot contain CRLF characters.")
    return address


def _subject(container: Mapping[str, Any], field: str) -> None:
    if "subject" not in container:
        return
    subject = container["subject"]
    if not _text(subject):
        raise Invalid(
            field, "The subject of your email must be a string at least one character in length."
        )
    if "\r" in subject or "\n" in subject:
        raise Invalid(field, "The subject cannot contain CRLF characters.")


def _content(value: object) -> None:
    if not isinstance(value, list) or not value:
        raise Invalid("content", CONTENT_REQUIRED)
    types: list[str] = []
    for i, block in enumerate(value):
        field = f"content.{i}"
        if not isinstance(block, dict):
            raise Invalid(field, f"Invalid type. Expected: object, given: {_type(block)}.")
        for name in block:
            if name not in ("type", "value"):
                raise Invalid(f"{field}.{name}", f"Additional property {name} is not allowed.")
        kind = block.get("type")
        if not _text(kind) or any(c in kind for c in ";\r\n"):
            raise Invalid(
                f"{field}.type",
                "The content type must be a string at least one character in length, and "
                "cannot contain ';', or CRLF characters.",
            )
        if not _text(block.get("value")):
            raise Invalid(
                f"{field}.value",
                "The content value must be a string at least one character in length.",
            )
        types.append(kind.lower())
    for kind in ("text/plain", "text/html"):
        if types.count(kind) > 1:
            raise Invalid(
                "content", "If present, text/plain and text/html may only be provided once."
            )
    plain = "text/plain" in types
    if (plain and types[0] != "text/plain") or (
        "text/html" in types and types.index("text/html") != (1 if plain else 0)
    ):
        raise Invalid("content", CONTENT_ORDER)


def _options(body: Mapping[str, Any]) -> None:
    """The optional top-level fields this fake does not act on, checked for their types."""
    _reply_to(body)
    if "categories" in body:
        categories = body["categories"]
        if not isinstance(categories, list) or not all(
            _text(c) and len(c) <= 255 for c in categories
        ):
            raise Invalid("categories", "The categories must be strings of 1 to 255 characters.")
        if len(categories) > MAX_CATEGORIES:
            raise Invalid("categories", f"You cannot have more than {MAX_CATEGORIES} categories.")
    if "attachments" in body:
        _attachments(body["attachments"])
    if "sections" in body:
        _string_map(body["sections"], "sections")
    if "send_at" in body:
        _integer(body["send_at"], "send_at")
    for name in ("batch_id", "ip_pool_name"):
        if name in body and not _text(body[name]):
            raise Invalid(name, f"Invalid type. Expected: string, given: {_type(body[name])}.")
    for name in ("asm", "mail_settings", "tracking_settings"):
        if name in body and not isinstance(body[name], dict):
            raise Invalid(name, f"Invalid type. Expected: object, given: {_type(body[name])}.")


def _reply_to(body: Mapping[str, Any]) -> None:
    if "reply_to" in body and "reply_to_list" in body:
        raise Invalid("reply_to", "reply_to and reply_to_list cannot both be used.")
    if "reply_to" in body:
        _address(body["reply_to"], "reply_to", "The reply_to email must be an email object.")
    if "reply_to_list" in body:
        replies = body["reply_to_list"]
        if not isinstance(replies, list) or not 1 <= len(replies) <= MAX_RECIPIENTS:
            raise Invalid("reply_to_list", "reply_to_list must be a list of 1 to 1000 addresses.")
        for i, reply in enumerate(replies):
            _address(reply, f"reply_to_list.{i}", "Each reply_to must be an email object.")


def _attachments(value: object) -> None:
    if not isinstance(value, list):
        raise Invalid("attachments", f"Invalid type. Expected: array, given: {_type(value)}.")
    allowed = ("content", "type", "filename", "disposition", "content_id")
    for i, attachment in enumerate(value):
        field = f"attachments.{i}"
        if not isinstance(attachment, dict):
            raise Invalid(field, f"Invalid type. Expected: object, given: {_type(attachment)}.")
        for name, item in attachment.items():
            if name not in allowed:
                raise Invalid(f"{field}.{name}", f"Additional property {name} is not allowed.")
            if not isinstance(item, str):
                raise Invalid(
                    f"{field}.{name}", f"Invalid type. Expected: string, given: {_type(item)}."
                )
        for name in ("content", "filename"):
            if not attachment.get(name):
                raise Invalid(f"{field}.{name}", f"The attachment {name} is required.")


def _string_map(value: object, field: str) -> None:
    if not isinstance(value, dict):
        raise Invalid(field, f"Invalid type. Expected: object, given: {_type(value)}.")
    for key, item in value.items():
        if not isinstance(item, str):
            raise Invalid(
                f"{field}.{key}", f"Invalid type. Expected: string, given: {_type(item)}."
            )


def _headers(value: object, field: str) -> None:
    _string_map(value, field)
    assert isinstance(value, dict)
    for name, item in value.items():
        if not _HEADER_NAME.fullmatch(name):
            raise Invalid(f"{field}.{name}", f"The header name {name!r} is not a valid header.")
        if name.lower() in RESERVED_HEADERS:
            raise Invalid(
                f"{field}.{name}",
                f"The header {name} is reserved and cannot be set; SendGrid writes it itself.",
            )
        if "\r" in item or "\n" in item:
            raise Invalid(f"{field}.{name}", "Header values cannot contain CRLF characters.")


def _custom_args_size(body: Mapping[str, Any], personalizations: list[dict[str, Any]]) -> None:
    """SendGrid's limit on custom args, per personalization merged with the top level ones."""
    top = body.get("custom_args", {})
    for i, personalization in enumerate(personalizations):
        merged = {**top, **personalization.get("custom_args", {})}
        size = len(json.dumps(merged, separators=(",", ":")).encode())
        if size > MAX_CUSTOM_ARGS_BYTES:
            raise Invalid(
                f"personalizations.{i}.custom_args",
                f"The custom_args of a message are limited to {MAX_CUSTOM_ARGS_BYTES} bytes; "
                f"these are {size}.",
            )


def _integer(value: object, field: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Invalid(field, f"Invalid type. Expected: integer, given: {_type(value)}.")


def _text(value: object) -> TypeGuard[str]:
    """A non-empty string."""
    return isinstance(value, str) and bool(value)


def _type(value: object) -> str:
    """The JSON schema type name of a decoded JSON value, as SendGrid's messages use them."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


async def _serve(host: str, port: int, api_key: str) -> None:
    fake = SendGridFake(api_key)
    await fake.start(host, port)
    log.info("NOTIFY_SENDGRID_URL=%s", fake.url)
    try:
        await wait_for_shutdown_signal()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the fake until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument(
        "--api-key", required=True, help="the accepted key (Authorization: Bearer …)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args.host, args.port, args.api_key))


if __name__ == "__main__":
    main()
