"""Wiring of the e-mail worker: database, upstream channels, SMTP, RabbitMQ, health server."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from notify.v1 import jobs_pb2, template_service_pb2_grpc, user_service_pb2_grpc

from email_worker.config import SERVICE, Config
from email_worker.consumer import EmailJobHandler, status_reporter
from email_worker.sender import EmailSender, SmtpSender
from email_worker.store import DeliveryStore
from notify_kit import amqp, db, rpc
from notify_kit.server import GrpcServer
from notify_kit.worker import JobRunner, RunnerSettings

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class App:
    """A running e-mail worker; ``stop()`` drains in-flight jobs, then closes everything."""

    def __init__(self, port: int, store: DeliveryStore, stack: contextlib.AsyncExitStack) -> None:
        self.port = port
        self.store = store
        self._stack = stack

    @classmethod
    async def start(cls, config: Config, *, sender: EmailSender | None = None) -> App:
        """Start consuming ``email.queue``; ``sender`` replaces SMTP (tests, other providers).

        Resources are entered into one exit stack in start order, so a failure half-way
        closes what was opened and ``stop()`` closes in reverse: the runner first (it
        drains), then the health server, the broker, the channels, the pool.
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

            if sender is None:
                smtp = SmtpSender(
                    config.smtp.host,
                    config.smtp.port,
                    timeout=config.smtp.timeout,
                    username=config.smtp.username,
                    password=config.smtp.password,
                    starttls=config.smtp.starttls,
                )
                stack.push_async_callback(smtp.close)
                sender = smtp
            handler = EmailJobHandler(
                template_service_pb2_grpc.TemplateServiceStub(templates),
                sender,
                mail_from=config.mail_from,
                rpc_timeout=config.rpc_timeout,
            )
            report = status_reporter(
                user_service_pb2_grpc.UserServiceStub(users),
                handler.channel,
                timeout=config.rpc_timeout,
            )

            connection = await amqp.connect(config.amqp_url)
            stack.push_async_callback(connection.close)
            publisher = amqp.Publisher(connection, config.topology)
            await publisher.start()
            stack.push_async_callback(publisher.close)

            server = GrpcServer(config.common, registrars=(), service_names=())
            port = await server.start()
            stack.push_async_callback(server.stop)

            runner: JobRunner[jobs_pb2.EmailJob] = JobRunner(
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
            log.info("email worker consuming %s", config.topology.queue(handler.kind))
            return cls(port, store, stack.pop_all())

    async def stop(self) -> None:
        """Drain and close, in reverse start order."""
        await self._stack.aclose()
