"""E-mail through SendGrid's v3 Mail Send API (``POST /v3/mail/send``), the second provider.

One ``OutgoingEmail`` is one request with one personalization: ``to`` the recipient,
``custom_args.notification_id`` (SendGrid carries it into its event webhook and Email
Activity, which is how an operator finds out whether a dead-lettered attempt was in fact
sent), top-level ``from``, ``subject``, ``content`` (``text/plain`` first, then
``text/html`` when there is one, the order SendGrid requires) and the header
``X-Notify-Notification-Id``, which the SMTP provider's messages carry too.

Idempotency: SendGrid has none on our id. A request that left and got no answer may have
been queued, so a timeout (or a lost connection) after the request started going out is
``OutcomeUnknown``: the runner neither retries it nor fails it over, and no one gets the
e-mail twice. Whether it started going out is known exactly (aiohttp's "request headers
sent" trace), so a failure to connect at all, however slow, is an ordinary transient
failure that may go to the next provider.

Classification, one table, here at the boundary (``SendGridProvider.send``):

=============================================  ============================================
SendGrid's answer                              outcome
=============================================  ============================================
202                                            delivered: ``sendgrid 202 <X-Message-Id>``
429                                            ``TransientError``, ``retry_after`` from
                                               ``Retry-After`` when sent (not promised)
401, 403                                       ``TransientError``: our API key, its scopes
                                               or our sender identity are refused. That is
                                               this provider failing for every message (the
                                               breaker opens, the attempt may fail over to
                                               SMTP), not this message's fault, so it must
                                               not dead-letter the message
404, 408                                       ``TransientError``: the endpoint is fixed, so
                                               404 is our base URL (configuration); 408
                                               asks for a retry
other 4xx (400 invalid request, 413 too big)   ``PermanentError`` with SendGrid's errors
5xx                                            ``TransientError`` (``Retry-After`` if sent)
other (200 sandbox "not queued", 3xx)          ``TransientError``: nothing was queued
refused, DNS, TLS, reset before the request    ``TransientError``: nothing reached SendGrid
timeout or lost connection after it left       ``OutcomeUnknown``
=============================================  ============================================
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp

from email_worker.outgoing import OutgoingEmail
from notify_kit.jobs.errors import OutcomeUnknown, PermanentError, TransientError
from notify_kit.jobs.providers import retry_after_seconds

log = logging.getLogger(__name__)

NOTIFICATION_HEADER = "X-Notify-Notification-Id"
ERROR_TEXT_LIMIT = 500  # characters of SendGrid's error messages kept in a failure
_CREDENTIAL_STATUSES = frozenset({401, 403})
_TRANSIENT_STATUSES = frozenset({404, 408, 429})


@dataclass(slots=True)
class _Progress:
    """How far one request got; set by the trace callback, read when it failed."""

    sent: bool = False


async def _on_headers_sent(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceRequestHeadersSentParams,
) -> None:
    """Mark the request as leaving: aiohttp calls this just before writing the headers."""
    progress = context.trace_request_ctx
    if isinstance(progress, _Progress):
        progress.sent = True


class SendGridProvider:
    """SendGrid's Mail Send API over one lazily created ``aiohttp`` session.

    The session (and its connection pool, so TLS handshakes are shared) is created on the
    first ``send``, inside the running loop, and closed by ``close``; a later ``send``
    opens a new one. Every request is bounded by ``timeout`` seconds in all (connect,
    send, answer). See the module docstring for what each outcome raises.
    """

    name = "sendgrid"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = "https://api.sendgrid.com",
        timeout: float = 10.0,
    ) -> None:
        self._api_key = api_key
        self._url = f"{base_url.rstrip('/')}/v3/mail/send"
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def send(self, email: OutgoingEmail) -> str:
        """Hand ``email`` to SendGrid; return ``sendgrid 202 <X-Message-Id>``.

        Raises ``PermanentError``, ``TransientError`` or ``OutcomeUnknown`` as the module
        docstring's table says; never returns unless SendGrid answered 202.
        """
        progress = _Progress()
        try:
            async with self._client().post(
                self._url,
                json=request_body(email),
                allow_redirects=False,
                trace_request_ctx=progress,
            ) as resp:
                status = resp.status
                message_id = resp.headers.get("X-Message-Id", "")
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                text = "" if status == 202 else await _read_text(resp)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._lost(email, exc, progress) from exc
        return _classify(email, status, message_id, text, retry_after)

    async def close(self) -> None:
        """Close the HTTP session (a later ``send`` opens a new one)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            trace = aiohttp.TraceConfig()
            trace.on_request_headers_sent.append(_on_headers_sent)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={
                    "Authorization": f"Bearer {self._api_key}",
                    "Accept": "application/json",
                },
                trace_configs=[trace],
            )
        return self._session

    def _lost(
        self, email: OutgoingEmail, exc: BaseException, progress: _Progress
    ) -> TransientError:
        """No answer: transient if nothing left, unknown if the request may have arrived."""
        if not progress.sent:
            log.warning("SendGrid unreachable for %s: %r", email.notification_id, exc)
            return TransientError(f"SendGrid unreachable: {exc!r}")
        if isinstance(exc, TimeoutError):
            detail = f"SendGrid did not answer within {self._timeout}s"
        else:
            detail = f"SendGrid connection lost before an answer: {exc!r}"
        log.error(
            "%s for %s; it may have queued the message (custom_args.notification_id)",
            detail,
            email.notification_id,
        )
        return OutcomeUnknown(f"{detail}; it may have queued the message")


def request_body(email: OutgoingEmail) -> dict[str, Any]:
    """The Mail Send JSON for ``email``: one personalization, the fields the module names."""
    recipient = {"email": email.to_address}
    if email.to_name:
        recipient["name"] = email.to_name
    sender = {"email": email.from_address}
    if email.from_name:
        sender["name"] = email.from_name
    content = []
    if email.text_body:
        content.append({"type": "text/plain", "value": email.text_body})
    if email.html_body:
        content.append({"type": "text/html", "value": email.html_body})
    return {
        "personalizations": [
            {"to": [recipient], "custom_args": {"notification_id": email.notification_id}}
        ],
        "from": sender,
        "subject": email.subject,
        "content": content,
        "headers": {NOTIFICATION_HEADER: email.notification_id},
    }


def _classify(
    email: OutgoingEmail, status: int, message_id: str, text: str, retry_after: float | None
) -> str:
    """The module docstring's table for an answer SendGrid gave."""
    if status == 202:
        log.info("SendGrid queued %s as %s", email.notification_id, message_id or "-")
        return f"sendgrid 202 {message_id or '-'}"
    message = error_text(text)
    if status in _CREDENTIAL_STATUSES:
        log.error("SendGrid refused our API key or sender (%s): %s", status, message)
        raise TransientError(f"SendGrid {status} (our credentials): {message}")
    if status >= 500 or status in _TRANSIENT_STATUSES or not 400 <= status < 500:
        log.warning("SendGrid answered %s for %s: %s", status, email.notification_id, message)
        raise TransientError(f"SendGrid {status}: {message}", retry_after=retry_after)
    log.warning("SendGrid refused %s (%s): %s", email.notification_id, status, message)
    raise PermanentError(f"SendGrid {status}: {message}")


async def _read_text(resp: aiohttp.ClientResponse) -> str:
    """An error answer's body; empty when it cannot be read (the status decides alone)."""
    try:
        return (await resp.read()).decode("utf-8", "replace")
    except (TimeoutError, aiohttp.ClientError):
        return ""


def error_text(text: str) -> str:
    """SendGrid's ``{"errors": [{"message", "field"}]}`` as one line, at most 500 characters."""
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    errors = answer.get("errors") if isinstance(answer, dict) else None
    if isinstance(errors, list) and errors:
        parts = []
        for error in errors:
            if isinstance(error, dict):
                field, message = error.get("field"), error.get("message")
                parts.append(f"{field}: {message}" if field else str(message))
            else:
                parts.append(str(error))
        return "; ".join(parts)[:ERROR_TEXT_LIMIT]
    return text.strip()[:ERROR_TEXT_LIMIT] or "no details"
