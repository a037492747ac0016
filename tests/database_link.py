"""A TCP relay between a service and PostgreSQL that a test can cut and restore: a
database that becomes unreachable and comes back (tests/test_failure_answers.py,
tests/test_health.py)."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

from scripts.system import free_port
from tests.conftest import PG_BASE


class DatabaseLink:
    """A TCP relay between one service and PostgreSQL that a test can cut and restore.

    Cut: every open connection is reset and new ones are refused, as when the database
    host goes away; stalled: they are reset and new ones are accepted but never answered,
    as when the host is there but hangs; restored: connections pass again on the same
    port.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._stalled = False

    async def restore(self) -> None:
        """Accept connections (again) and relay them."""
        self._stalled = False
        if self._server is None:
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def stall(self) -> None:
        """Reset the open connections; accept new ones and never answer them."""
        await self.restore()
        self._stalled = True
        self._reset_open()

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._reset_open()

    def _reset_open(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stalled:
            self._open.add(writer)
            with contextlib.suppress(OSError):
                await reader.read()  # until the client gives up or the link is reset
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            self._open.discard(writer)
            writer.transport.abort()


def via(link: DatabaseLink, database: str) -> str:
    """The DSN of ``database`` on the suite's PostgreSQL, reached through ``link``."""
    base = urlsplit(PG_BASE)
    netloc = f"{base.username}@127.0.0.1:{link.port}" if base.username else f"127.0.0.1:{link.port}"
    return urlunsplit((base.scheme, netloc, f"/{database}", "", ""))
