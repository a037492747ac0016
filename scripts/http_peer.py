"""Serving a provider stand-in's aiohttp app on a port: what every stand-in shares."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


async def serve(app: web.Application, host: str, port: int, name: str) -> tuple[web.AppRunner, int]:
    """Listen on ``host:port`` (0 picks a free port); return the runner and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound: int = runner.addresses[0][1]
    log.info("%s listening on %s:%s", name, host, bound)
    return runner, bound


async def shut(runner: web.AppRunner | None) -> None:
    """Stop listening and close open connections (nothing when not started)."""
    if runner is not None:
        await runner.cleanup()


class Received:
    """What a stand-in accepted, in order, with a wait for it and a JSON listing.

    Tests ``await wait_for(n)`` instead of sleeping; developers open ``GET /messages``
    (``listing``) to see what ``make run`` sent.
    """

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def add(self, item: dict[str, Any]) -> None:
        """Keep ``item`` and wake whoever waits."""
        async with self._changed:
            self.items.append(item)
            self._changed.notify_all()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` items arrived; return them all."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.items) >= count)
            return list(self.items)

    async def listing(self, request: web.Request) -> web.Response:
        """The ``GET /messages`` handler: everything so far, newest last."""
        return web.json_response(self.items)
