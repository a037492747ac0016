"""Wiring of user_svc: database, migrations, Redis, servicer and gRPC server.

``App.start`` is what ``__main__`` runs and what tests run in-process on port 0. It opens
resources on an ``AsyncExitStack``, so a failure half-way (a bad migration, a busy
port) closes whatever was already open, and ``stop`` closes them in reverse order:
the server drains first, then Redis and the pool go.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import grpc
from notify.v1 import (
    delivery_service_pb2,
    delivery_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)

from notify_kit import health
from notify_kit.db import close_pool, create_pool, ensure_database, migrate
from notify_kit.kv import redis_client
from notify_kit.server import GrpcServer
from user_svc.cache import ProfileCache
from user_svc.config import Config
from user_svc.server import UserServicer
from user_svc.store import UserStore

log = logging.getLogger(__name__)


class App:
    """A running user_svc; ``port`` is the bound gRPC port."""

    def __init__(self, port: int, resources: contextlib.AsyncExitStack) -> None:
        self.port = port
        self._resources = resources

    @classmethod
    async def start(cls, config: Config) -> App:
        """Migrate the database, connect to Redis, serve; return once accepting calls."""
        async with contextlib.AsyncExitStack() as stack:
            await ensure_database(config.dsn)
            pool = await create_pool(config.dsn, application=config.common.service)
            stack.push_async_callback(close_pool, pool)
            await migrate(pool, Path(__file__).with_name("migrations"))
            redis = redis_client(config.redis_url)
            stack.push_async_callback(redis.aclose)
            store, cache = UserStore(pool), ProfileCache(redis, ttl=config.profile_cache_ttl)
            # One servicer for both services: UserService's deprecated copies of the
            # DeliveryService methods are the same code (UserServicer extends it).
            users = UserServicer(store, cache)

            def register(server: grpc.aio.Server) -> None:
                user_service_pb2_grpc.add_UserServiceServicer_to_server(users, server)
                delivery_service_pb2_grpc.add_DeliveryServiceServicer_to_server(users, server)

            server = GrpcServer(
                config.common,
                [register],
                [
                    user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name,
                    delivery_service_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name,
                ],
                dependencies=[health.postgres(pool), health.redis(redis)],
            )
            stack.push_async_callback(server.stop)
            port = await server.start()
            resources = stack.pop_all()
        return cls(port, resources)

    async def stop(self) -> None:
        """Stop serving (in-flight calls get the grace period), then release everything."""
        await self._resources.aclose()
