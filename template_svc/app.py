"""Wiring of the template service: database, migrations, renderer, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import asyncpg
import grpc
from notify.v1 import template_service_pb2, template_service_pb2_grpc

from notify_kit.db import create_pool, ensure_database, migrate
from notify_kit.server import GrpcServer
from template_svc.cache import LruCache
from template_svc.config import SERVICE, Config
from template_svc.renderer import Renderer
from template_svc.server import TemplateServicer
from template_svc.store import TemplateStore

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE_NAME = template_service_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name
_POOL_CLOSE_TIMEOUT = 10.0


class App:
    """A running template service; ``stop()`` releases everything ``start()`` opened."""

    def __init__(self, server: GrpcServer, resources: contextlib.AsyncExitStack) -> None:
        self._server = server
        self._resources = resources
        self.port: int = server.port

    @classmethod
    async def start(cls, config: Config) -> App:
        """Create and migrate the database, then serve; undo everything on a failure."""
        async with contextlib.AsyncExitStack() as stack:
            await ensure_database(config.dsn)
            pool = await create_pool(config.dsn, application=SERVICE)
            stack.push_async_callback(_close_pool, pool)
            await migrate(pool, MIGRATIONS)
            renderer = Renderer(
                timeout=config.render_timeout,
                max_bytes=config.render_max_bytes,
                compiled=LruCache(),
            )
            stack.callback(renderer.close)
            servicer = TemplateServicer(
                TemplateStore(pool),
                renderer,
                LruCache(),
                render_timeout=config.render_timeout,
            )

            def register(server: grpc.aio.Server) -> None:
                template_service_pb2_grpc.add_TemplateServiceServicer_to_server(servicer, server)

            server = GrpcServer(config.common, [register], [SERVICE_NAME])
            stack.push_async_callback(server.stop)
            await server.start()
            app = cls(server, stack.pop_all())
        return app

    async def stop(self) -> None:
        """Drain the server, then close the renderer and the pool."""
        await self._resources.aclose()


async def _close_pool(pool: asyncpg.Pool) -> None:
    """Close gracefully; terminate if a connection will not come back in time."""
    try:
        await asyncio.wait_for(pool.close(), _POOL_CLOSE_TIMEOUT)
    except TimeoutError:
        log.warning("pool did not close in %ss; terminating", _POOL_CLOSE_TIMEOUT)
        pool.terminate()
