"""Wiring of the push worker: database, upstream channels, FCM, RabbitMQ, health server."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from notify.v1 import jobs_pb2, template_service_pb2_grpc, user_service_pb2_grpc

from notify_kit import amqp, db, rpc
from notify_kit.server import GrpcServer
from notify_kit.worker import JobRunner, RunnerSettings
from push_worker.config import SERVICE, Config
from push_worker.consumer import PushJobHandler, status_reporter
from push_worker.sender import FcmSender, PushSender
from push_worker.store import DeliveryStore

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class App:
    """A running push worker; ``stop()`` drains in-flight jobs, then closes everything."""

    def __init__(self, port: int, store: DeliveryStore, stack: contextlib.AsyncExitStack) -> None:
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
            stack.push_async_callback(pool.close)
            await db.migrate(pool, MIGRATIONS)
            store = DeliveryStore(pool)

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

            connection = await amqp.connect(config.amqp_url)
            stack.push_async_callback(connection.close)
            publisher = amqp.Publisher(connection, config.topology)
            await publisher.start()
            stack.push_async_callback(publisher.close)

            server = GrpcServer(config.common, registrars=(), service_names=())
            port = await server.start()
            stack.push_async_callback(server.stop)

            runner: JobRunner[jobs_pb2.PushJob] = JobRunner(
                connection,
                config.topology,
                publisher,
                handler,
                store,
                report,
                RunnerSettings(prefetch=config.prefetch),
            )
            await runner.start()
            stack.push_async_callback(runner.stop)
            log.info("push worker consuming %s", config.topology.queue(handler.kind))
            return cls(port, store, stack.pop_all())

    async def stop(self) -> None:
        """Drain and close, in reverse start order."""
        await self._stack.aclose()
