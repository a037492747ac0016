"""Wiring of the template service: database, migrations, renderer, gRPC server."""

from __future__ import annotations

import contextlib
from pathlib import Path

import grpc
from notify.v1 import template_service_pb2, template_service_pb2_grpc

from notify_kit import health
from notify_kit.cache import LruCache
from notify_kit.db import close_pool, create_pool, ensure_database, migrate
from notify_kit.server import GrpcServer
from notify_kit.templating.renderer import Renderer
from template_svc.config import SERVICE, Config
from template_svc.server import TemplateServicer
from template_svc.store import TemplateStore

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE_NAME = template_service_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name


class App:
    """A running template service; ``stop()`` releases everything ``start()`` opened."""

    def __init__(
        self, server: GrpcServer, renderer: Renderer, resources: contextlib.AsyncExitStack
    ) -> None:
        self._server = server
        self._renderer = renderer
        self._resources = resources
        self.port: int = server.port

    @property
    def render_pids(self) -> list[int]:
        """The render processes' ids (they are replaced when one is killed)."""
        return self._renderer.pids

    @classmethod
    async def start(cls, config: Config) -> App:
        """Create and migrate the database, then serve; undo everything on a failure."""
        async with contextlib.AsyncExitStack() as stack:
            await ensure_database(config.dsn)
            pool = await create_pool(config.dsn, application=SERVICE)
            stack.push_async_callback(close_pool, pool)
            await migrate(pool, MIGRATIONS)
            renderer = Renderer(config.render)
            await renderer.start()
            stack.push_async_callback(renderer.close)
            # Versions never change once written (the database forbids it), so loaded
            # versions are cached without expiry (the render processes keep the compiled
            # templates the same way); the "current version" pointer is never cached, so
            # every replica sees a new one at once.
            servicer = TemplateServicer(
                TemplateStore(pool),
                renderer,
                LruCache(),
                render_timeout=config.render.timeout,
            )

            def register(server: grpc.aio.Server) -> None:
                template_service_pb2_grpc.add_TemplateServiceServicer_to_server(servicer, server)

            server = GrpcServer(
                config.common, [register], [SERVICE_NAME], dependencies=[health.postgres(pool)]
            )
            stack.push_async_callback(server.stop)
            await server.start()
            app = cls(server, renderer, stack.pop_all())
        return app

    async def stop(self) -> None:
        """Drain the server, then stop the render processes and close the pool."""
        await self._resources.aclose()
