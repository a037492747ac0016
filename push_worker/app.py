"""Wiring of the push worker: database, upstream channels, FCM, RabbitMQ, health server."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from notify.v1 import template_service_pb2_grpc, user_service_pb2_grpc

from notify_kit import db, rpc
from notify_kit.ledger import DeliveryLog
from notify_kit.worker import RunnerSettings, start_worker, status_reporter
from push_worker.config import SERVICE, Config
from push_worker.consumer import PushJobHandler
from push_worker.sender import FcmSender, PushSender

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class App:
    """A running push worker; ``stop()`` drains in-flight jobs, then closes everything."""

    def __init__(self, port: int, store: DeliveryLog, stack: contextlib.AsyncExitStack) -> None:
        self.port = port
        self.store = store
        self._stack = stack

    @classmethod
    async def start(cls, config: Config, *, sender: PushSender | None = None) -> App:
        """Start consuming ``push.queue``; ``sender`` replaces FCM (tests, other providers).

        Resources are entered into one exit stack in start order, so a failure half-way
        closes what was opened and ``stop()`` closes in reverse: the runner first (it
        drains), then the health server, the broker, the sender, the channels, the pool.
        """
        async with contextlib.AsyncExitStack() as stack:
            await db.ensure_database(config.dsn)
            pool = await db.create_pool(config.dsn, application=SERVICE)
            stack.push_async_callback(db.close_pool, pool)
            await db.migrate(pool, MIGRATIONS)
            store = DeliveryLog(pool)

            templates = rpc.secure_channel(config.template_svc_addr, config.common.tls)
            stack.push_async_callback(templates.close)
            users = rpc.secure_channel(config.user_svc_addr, config.common.tls)
            stack.push_async_callback(users.close)
            users_stub = user_service_pb2_grpc.UserServiceStub(users)

            if sender is None:
                fcm = FcmSender(
                    config.fcm.credentials, url=config.fcm.url, timeout=config.fcm.timeout
                )
                stack.push_async_callback(fcm.close)
                sender = fcm
            handler = PushJobHandler(
                template_service_pb2_grpc.TemplateServiceStub(templates),
                users_stub,
                sender,
                rpc_timeout=config.rpc_timeout,
            )
            report = status_reporter(users_stub, handler.channel, timeout=config.rpc_timeout)

            port = await start_worker(
                stack,
                config.common,
                config.amqp_url,
                config.topology,
                handler,
                store,
                report,
                RunnerSettings(prefetch=config.prefetch),
            )
            return cls(port, store, stack.pop_all())

    async def stop(self) -> None:
        """Drain and close, in reverse start order."""
        await self._stack.aclose()
