"""Handing finished messages to a mail transport: the real SMTP client and an in-memory one.

The handler only sees ``EmailSender``; which failures are worth a retry is decided here,
at the boundary, from the SMTP reply: a 5xx answer to MAIL, RCPT or DATA is permanent;
4xx answers, timeouts, broken connections and a relay that refuses the session itself
(greeting, EHLO, AUTH) are transient.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Protocol

import aiosmtplib

from notify_kit.worker import PermanentError, TransientError

log = logging.getLogger(__name__)

_SESSION_ERRORS = (
    aiosmtplib.SMTPConnectResponseError,
    aiosmtplib.SMTPHeloError,
    aiosmtplib.SMTPAuthenticationError,
)


class EmailSender(Protocol):
    """Delivers one finished message to its recipients."""

    async def send(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Return the transport's acceptance detail (e.g. the relay's queue id).

        Raise ``PermanentError`` or ``TransientError`` when it was not accepted.
        """


class SmtpSender:
    """One SMTP connection reused for every message, reopened when it was lost.

    A new connection (TCP, EHLO, maybe STARTTLS and AUTH) costs several round trips, so
    messages share one; the lock keeps transactions on it one at a time. A connection
    the relay closed while idle is noticed before the next transaction and reopened; a
    connection lost in the middle of one is a ``TransientError`` (the relay may or may
    not have the message, so the retry queue decides, not a silent resend).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
    ) -> None:
        self._host = host
        self._port = port
        self._timeout = timeout
        self._username = username
        self._password = password
        self._starttls = starttls
        self._lock = asyncio.Lock()
        self._smtp: aiosmtplib.SMTP | None = None

    async def send(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Run one mail transaction, connecting first when needed."""
        async with self._lock:
            try:
                smtp = await self._connected()
                _, reply = await smtp.sendmail(sender, recipients, message, timeout=self._timeout)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                detail = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
                if all(refused.code >= 500 for refused in exc.recipients):
                    raise PermanentError(f"recipient refused: {detail}") from exc
                raise TransientError(f"recipient deferred: {detail}") from exc
            except _SESSION_ERRORS as exc:
                # Greeting, EHLO or AUTH refused: the relay's or our configuration's
                # fault, not this message's; retry rather than dead-letter it at once.
                await self._drop()
                raise TransientError(f"SMTP session: {exc.code} {exc.message}") from exc
            except aiosmtplib.SMTPResponseException as exc:
                # MAIL, RCPT or DATA refused; sendmail already reset the envelope.
                if exc.code >= 500:
                    raise PermanentError(f"SMTP {exc.code} {exc.message}") from exc
                raise TransientError(f"SMTP {exc.code} {exc.message}") from exc
            except (aiosmtplib.SMTPNotSupported, ValueError) as exc:
                raise PermanentError(f"cannot send: {exc}") from exc
            except (aiosmtplib.SMTPException, TimeoutError, OSError) as exc:
                # Timeouts and lost connections leave the session in an unknown state.
                await self._drop()
                raise TransientError(f"SMTP connection: {exc!r}") from exc
            return reply

    async def close(self) -> None:
        """Say QUIT politely (bounded by the timeout) and forget the connection."""
        async with self._lock:
            smtp, self._smtp = self._smtp, None
            if smtp is not None and smtp.is_connected:
                try:
                    await smtp.quit(timeout=self._timeout)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    smtp.close()

    async def _connected(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        smtp = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            timeout=self._timeout,
            start_tls=self._starttls,
            username=self._username,
            password=self._password,
            local_hostname=socket.gethostname(),
        )
        await smtp.connect()
        log.info("SMTP connected to %s:%s", self._host, self._port)
        self._smtp = smtp
        return smtp

    async def _drop(self) -> None:
        """Forget a connection whose state is unknown after an error."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()


@dataclass(frozen=True, slots=True)
class SentMessage:
    """What ``InMemorySender`` was given."""

    sender: str
    recipients: list[str]
    message: bytes


@dataclass
class InMemorySender:
    """Records messages instead of sending them; can be told to fail first.

    ``fail_next(n)`` makes the next ``n`` sends raise ``TransientError`` (or
    ``PermanentError`` with ``permanent=True``) before anything is recorded.
    """

    sent: list[SentMessage] = field(default_factory=list)
    _failures: int = field(default=0, init=False, repr=False)
    _permanent: bool = field(default=False, init=False, repr=False)

    def fail_next(self, count: int = 1, *, permanent: bool = False) -> None:
        """Make the next ``count`` sends fail."""
        self._failures = count
        self._permanent = permanent

    async def send(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Record the message, or fail as told."""
        if self._failures > 0:
            self._failures -= 1
            if self._permanent:
                raise PermanentError("in-memory sender told to fail permanently")
            raise TransientError("in-memory sender told to fail transiently")
        self.sent.append(SentMessage(sender, list(recipients), message))
        return f"in-memory-{len(self.sent)}"
