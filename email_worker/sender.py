"""E-mail providers: SMTP (a small pool of reused connections; SendGrid is `email_worker.sendgrid`).

Every provider takes an ``OutgoingEmail``; which failures are worth a retry is decided
here, at the boundary, from the SMTP reply (one table, ``_classify``):

* 5xx to MAIL, RCPT or DATA: permanent for this message (a 550 for one address is the
  relay working: it does not count against the breaker);
* 4xx, refused sessions (greeting, EHLO, STARTTLS, AUTH), timeouts and lost connections
  before DATA: transient (the breaker counts them; another provider may take over);
* a timeout or lost connection while the message itself is on the wire (after DATA was
  accepted): ``OutcomeUnknown``. The relay may have queued it, and SMTP has no way to
  ask; resending could deliver twice, so it is not failed over or retried.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

import aiosmtplib

from email_worker.mime import build_message, format_address
from email_worker.outgoing import OutgoingEmail
from notify_kit.jobs.errors import OutcomeUnknown, PermanentError, TransientError

log = logging.getLogger(__name__)

_SESSION_ERRORS = (
    aiosmtplib.SMTPConnectResponseError,
    aiosmtplib.SMTPHeloError,
    aiosmtplib.SMTPAuthenticationError,
)


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """Where and how to hand mail to the relay."""

    host: str = "127.0.0.1"
    port: int = 1025
    username: str | None = None
    password: str | None = None
    starttls: bool = False
    timeout: float = 10.0
    pool_size: int = 4


class SmtpProvider:
    """SMTP with up to ``pool_size`` reused connections, one transaction on each at a time.

    A new connection (TCP, EHLO, maybe STARTTLS and AUTH) costs several round trips, so
    connections are kept and reused; a connection the relay closed while idle is
    noticed before the next transaction and replaced. After any error whose effect on
    the session is unknown the connection is dropped, never reused.
    """

    name = "smtp"

    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._closed = False

    async def send(self, email: OutgoingEmail) -> str:
        """Run one mail transaction on a pooled connection; return the relay's reply."""
        message = build_message(
            from_header=format_address(email.from_name, email.from_address),
            to_address=email.to_address,
            to_name=email.to_name,
            subject=email.subject,
            text_body=email.text_body,
            html_body=email.html_body,
            notification_id=email.notification_id,
        )
        timeout = self._settings.timeout
        async with self._slots:
            smtp: aiosmtplib.SMTP | None = None
            in_data = False
            try:
                smtp = await self._connection()
                await smtp.mail(email.from_address, timeout=timeout)
                await smtp.rcpt(email.to_address, timeout=timeout)
                in_data = True
                reply = await smtp.data(message, timeout=timeout)
            except aiosmtplib.SMTPResponseException as exc:
                if isinstance(exc, _SESSION_ERRORS):
                    _drop(smtp)  # greeting, EHLO or AUTH refused: not this message
                    smtp = None
                    raise TransientError(f"SMTP session: {exc.code} {exc.message}") from exc
                smtp = await _reset(smtp, timeout)
                if exc.code >= 500:
                    raise PermanentError(f"SMTP {exc.code} {exc.message}") from exc
                raise TransientError(f"SMTP {exc.code} {exc.message}") from exc
            except (aiosmtplib.SMTPNotSupported, ValueError) as exc:
                smtp = await _reset(smtp, timeout)
                raise PermanentError(f"cannot send: {exc}") from exc
            except (aiosmtplib.SMTPException, TimeoutError, OSError) as exc:
                _drop(smtp)
                smtp = None
                if in_data:
                    raise OutcomeUnknown(f"SMTP connection lost during DATA: {exc!r}") from exc
                raise TransientError(f"SMTP connection: {exc!r}") from exc
            finally:
                if smtp is not None and smtp.is_connected and not self._closed:
                    self._idle.append(smtp)
                elif smtp is not None:
                    smtp.close()
            return f"{reply.code} {reply.message}"

    async def close(self) -> None:
        """Say QUIT on every idle connection (bounded by the timeout)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for smtp in idle:
            try:
                await smtp.quit(timeout=self._settings.timeout)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()

    async def _connection(self) -> aiosmtplib.SMTP:
        while self._idle:
            smtp = self._idle.pop()
            if smtp.is_connected:
                return smtp
        s = self._settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout,
            start_tls=s.starttls,
            username=s.username,
            password=s.password,
            local_hostname=socket.gethostname(),
        )
        await smtp.connect()
        log.info("SMTP connected to %s:%s", s.host, s.port)
        return smtp


def _drop(smtp: aiosmtplib.SMTP | None) -> None:
    """Forget a connection whose state is unknown after an error."""
    if smtp is not None:
        smtp.close()


async def _reset(smtp: aiosmtplib.SMTP | None, timeout: float) -> aiosmtplib.SMTP | None:
    """RSET after a refused command so the connection can be reused; drop it if that fails."""
    if smtp is None:
        return None
    try:
        await smtp.rset(timeout=timeout)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        smtp.close()
        return None
    return smtp
