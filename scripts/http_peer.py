"""Serving a provider stand-in's aiohttp app on a port: what every stand-in shares."""

from __future__ import annotations

import logging

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
