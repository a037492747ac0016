"""A real SMTP server that keeps every message it receives: the dev and test mail peer.

``make run``, the end-to-end tests and the benchmarks point the e-mail worker at it
instead of a mail provider. It runs on the caller's event loop (aiosmtpd's protocol
served by ``loop.create_server``), so tests in the same process can ``await
wait_for(n)`` without threads or sleeps.

Recipients whose local part starts with ``reject`` are refused with ``550`` and those
starting with ``defer`` with ``451``, so the permanent and transient failure paths of
the real SMTP client can be exercised end to end. In-process, tests can also script it:
``refuse(address, reply)`` answers RCPT for one address with ``reply`` until
``accept(address)``; ``down = "451 ..."`` answers every MAIL FROM with it (a relay in
trouble) until set back to ``None``; ``transactions`` counts MAIL FROM commands, which
is how tests count what reached the relay.

CLI: ``python -m scripts.mailcatcher --host 127.0.0.1 --port 1025 --dir var/mail``.
"""

from __future__ import annotations

import argparse
import asyncio
import email.policy
import logging
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from notify_kit.server import wait_for_shutdown_signal

log = logging.getLogger(__name__)

REJECT_PREFIX = "reject"
DEFER_PREFIX = "defer"


class MailCatcher:
    """Accepts mail over SMTP, parses it, keeps it in ``messages`` (and optionally on disk).

    Files are numbered after those already in ``directory``, so a restart never
    overwrites earlier mail.
    """

    def __init__(self, directory: Path | None = None, *, hostname: str = "mailcatcher.localhost"):
        self.directory = directory
        self.messages: list[EmailMessage] = []
        self.port = 0
        self._numbered = 0  # .eml files already in ``directory`` (kept across restarts)
        self._hostname = hostname
        self._parser = BytesParser(policy=email.policy.default)
        self._received = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()
        self.refused: dict[str, str] = {}
        self.down: str | None = None
        self.transactions = 0

    def refuse(self, address: str, reply: str = "550 5.1.1 Recipient address rejected") -> None:
        """Answer RCPT for ``address`` with ``reply`` until ``accept(address)``."""
        self.refused[address.lower()] = reply

    def accept(self, address: str) -> None:
        """Take mail for ``address`` again."""
        self.refused.pop(address.lower(), None)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port); return the bound port."""
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            numbers = [int(p.stem) for p in self.directory.glob("*.eml") if p.stem.isdigit()]
            self._numbered = max(numbers, default=0)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_session, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("mail catcher listening on %s:%s", host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening and drop open client connections."""
        if self._server is None:
            return
        self._server.close()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        self._sessions.clear()
        await self._server.wait_closed()
        self._server = None

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[EmailMessage]:
        """Wait until at least ``count`` messages arrived; return them all."""
        async with asyncio.timeout(timeout), self._received:
            await self._received.wait_for(lambda: len(self.messages) >= count)
            return list(self.messages)

    def _new_session(self) -> SMTP:
        session = _TrackedSMTP(
            self,
            hostname=self._hostname,
            enable_SMTPUTF8=True,
            loop=asyncio.get_running_loop(),
        )
        self._sessions.add(session)
        return session

    def _forget(self, session: SMTP) -> None:
        self._sessions.discard(session)

    # aiosmtpd handler hooks (called by the SMTP protocol by name).

    async def handle_MAIL(  # noqa: N802 (aiosmtpd's hook name)
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Count the transaction; refuse it while the catcher plays a relay in trouble."""
        self.transactions += 1
        if self.down is not None:
            return self.down
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook name)
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept the recipient unless told to refuse it or its local part asks for that."""
        if address.lower() in self.refused:
            return self.refused[address.lower()]
        local = address.partition("@")[0].lower()
        if local.startswith(REJECT_PREFIX):
            return f"550 5.1.1 <{address}>: Recipient address rejected"
        if local.startswith(DEFER_PREFIX):
            return f"451 4.3.0 <{address}>: Try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        """Parse and keep the message; write it to ``directory`` when set."""
        raw = envelope.original_content or b""
        # Parsed with Python's line endings so get_content() reads naturally; the .eml
        # file keeps the bytes as received.
        message = self._parser.parsebytes(raw.replace(b"\r\n", b"\n"))
        assert isinstance(message, EmailMessage)
        async with self._received:
            self.messages.append(message)
            number = len(self.messages)
            self._received.notify_all()
        if self.directory is not None:
            (self.directory / f"{self._numbered + number:04d}.eml").write_bytes(raw)
        log.info("mail %s to=%s subject=%s", number, message["To"], message["Subject"])
        return f"250 2.0.0 Ok: queued as {number}"


class _TrackedSMTP(SMTP):
    """aiosmtpd's protocol, remembered by the catcher so ``stop()`` can close it."""

    def __init__(self, catcher: MailCatcher, **kwargs: Any) -> None:
        super().__init__(catcher, **kwargs)
        self._catcher = catcher

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the session, then let aiosmtpd clean up."""
        self._catcher._forget(self)
        super().connection_lost(exc)


async def _serve(host: str, port: int, directory: Path | None) -> None:
    catcher = MailCatcher(directory)
    await catcher.start(host, port)
    try:
        await wait_for_shutdown_signal()
    finally:
        await catcher.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the catcher until SIGINT/SIGTERM, logging one line per message."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument("--dir", type=Path, default=None, help="also write NNNN.eml files here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd: a line per connection
    asyncio.run(_serve(args.host, args.port, args.dir))


if __name__ == "__main__":
    main()
