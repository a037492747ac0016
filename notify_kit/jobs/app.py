"""A worker's composition, written once: database and ledger, upstream channels, the
broker, the health server, the runner. Each worker supplies only its handler.

Resources are entered into one exit stack in start order, so a failure half-way closes
what was opened and ``stop()`` closes in reverse: the runner first (it drains), then the
health server, the broker connections, what the handler opened, the channels, the pool.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from notify.v1 import delivery_service_pb2_grpc, template_service_pb2_grpc, worker_admin_pb2_grpc

from notify_kit import db, health, rpc
from notify_kit.amqp import Publisher, connect
from notify_kit.jobs.admin import WorkerAdmin
from notify_kit.jobs.ledger import MIGRATIONS, DeliveryLog
from notify_kit.jobs.runner import JobHandler, JobRunner
from notify_kit.jobs.settings import WorkerSettings
from notify_kit.jobs.templates import Templates
from notify_kit.jobs.upstream import StatusReporter
from notify_kit.queue_watch import QueueWatch
from notify_kit.server import GrpcServer
from notify_kit.settings import CommonSettings
from notify_kit.templating.renderer import Renderer

log = logging.getLogger(__name__)

ADMIN_SERVICE = "notify.v1.WorkerAdminService"


@dataclass(frozen=True, slots=True)
class Upstreams:
    """Stubs of our own services a handler may call (over mTLS, the access matrix)."""

    templates: Templates  # renders the jobs' pinned versions in our render processes
    users: delivery_service_pb2_grpc.DeliveryServiceStub


HandlerFactory = Callable[[Upstreams, contextlib.AsyncExitStack], Awaitable[JobHandler[Any]]]


class WorkerApp:
    """A running worker; ``stop()`` drains in-flight jobs, then closes everything."""

    def __init__(
        self,
        port: int,
        store: DeliveryLog,
        runner: JobRunner[Any],
        stack: contextlib.AsyncExitStack,
    ) -> None:
        self.port = port
        self.store = store
        self.runner = runner
        self._stack = stack

    @classmethod
    async def start(
        cls,
        common: CommonSettings,
        dsn: str,
        settings: WorkerSettings,
        build: HandlerFactory,
    ) -> WorkerApp:
        """Start consuming the handler's queue with everything it needs."""
        async with contextlib.AsyncExitStack() as stack:
            await db.ensure_database(dsn)
            pool = await db.create_pool(dsn, application=common.service)
            stack.push_async_callback(db.close_pool, pool)
            await db.migrate(pool, MIGRATIONS)
            store = DeliveryLog(pool)

            templates = rpc.secure_channel(settings.template_svc_addr, common.tls)
            stack.push_async_callback(templates.close)
            users = rpc.secure_channel(settings.user_svc_addr, common.tls)
            stack.push_async_callback(users.close)
            users_stub = delivery_service_pb2_grpc.DeliveryServiceStub(users)
            renderer = Renderer(settings.render)
            await renderer.start()
            stack.push_async_callback(renderer.close)
            rendering = Templates(
                template_service_pb2_grpc.TemplateServiceStub(templates),
                renderer,
                rpc_timeout=settings.rpc_timeout,
            )
            upstreams = Upstreams(rendering, users_stub)
            handler = await build(upstreams, stack)
            report = StatusReporter(users_stub, handler.channel, timeout=settings.rpc_timeout)
            report.start()
            stack.push_async_callback(report.close)

            # Publishing (retries, dead letters) has a connection of its own: a broker
            # that blocks publishers (flow control, a resource alarm) must never stop
            # the acks that go out on the consuming connection.
            consuming = await connect(settings.amqp_url)
            stack.push_async_callback(consuming.close)
            publishing = await connect(settings.amqp_url)
            stack.push_async_callback(publishing.close)
            publisher = Publisher(publishing, settings.topology)
            await publisher.start()
            stack.push_async_callback(publisher.close)

            runner = JobRunner(
                consuming, settings.topology, publisher, handler, store, report, settings.runner
            )
            admin = WorkerAdmin(handler.chain, runner.pause)
            server = GrpcServer(
                common,
                registrars=[
                    lambda s: worker_admin_pb2_grpc.add_WorkerAdminServiceServicer_to_server(
                        admin, s
                    )
                ],
                service_names=[ADMIN_SERVICE],
                # Serving while this worker can deliver: its ledger, the broker, and at
                # least one provider of its channel whose breaker is not open.
                dependencies=[
                    health.postgres(pool),
                    health.broker(consuming, publishing),
                    health.providers(handler.chain),
                ],
            )
            port = await server.start()
            stack.push_async_callback(server.stop)
            await runner.start()
            stack.push_async_callback(runner.stop)
            depth = QueueWatch(
                consuming, settings.topology, settings.topology.queues_of(handler.kind)
            )
            depth.start()
            stack.push_async_callback(depth.close)
            log.info("%s consuming %s", common.service, settings.topology.queue(handler.kind))
            return cls(port, store, runner, stack.pop_all())

    async def stop(self) -> None:
        """Drain and close, in reverse start order."""
        await self._stack.aclose()
