"""What the e-mail and push worker tests share: stand-in upstreams, the broker, fixtures.

UserService and TemplateService are stood in for by tiny in-process servicers behind the
real ``GrpcServer`` (mTLS, access matrix), so the worker tests own every input a worker
sees; the end-to-end suite runs the same workers against the real services.

The fixtures here are bound into each worker test module by name (``broker =
worker_support.broker``, ``topo = worker_support.own_topology("ew.")``), which is how
pytest finds them there. They expect the module to provide ``templates`` (its
TemplateService stand-in) and ``launch`` (how to start its worker with an optional
sender).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypedDict

import aio_pika
import grpc
import pytest
from aio_pika.abc import AbstractIncomingMessage
from grpc_health.v1 import health_pb2, health_pb2_grpc
from notify.v1 import (
    common_pb2,
    delivery_service_pb2_grpc,
    jobs_pb2,
    template_service_pb2_grpc,
    user_service_pb2,
)

from notify_kit import rpc
from notify_kit.amqp import JobKind, Publisher, Topology
from notify_kit.errors import Aborted
from notify_kit.jobs.settings import RunnerSettings, WorkerSettings
from notify_kit.server import GrpcServer
from notify_kit.settings import CommonSettings, TlsSettings
from scripts.harness import delete_topology

S = common_pb2.NotificationStatus
SENDING, DELIVERED = S.NOTIFICATION_STATUS_SENDING, S.NOTIFICATION_STATUS_DELIVERED
RETRYING, FAILED = S.NOTIFICATION_STATUS_RETRYING, S.NOTIFICATION_STATUS_FAILED
EXPIRED = S.NOTIFICATION_STATUS_EXPIRED
WAIT = 15.0


# --- stand-ins ------------------------------------------------------------------------


class RecordingUsers(delivery_service_pb2_grpc.DeliveryServiceServicer):
    """Records status reports and token removals so tests can wait for them."""

    def __init__(self) -> None:
        self.updates: list[user_service_pb2.UpdateDeliveryStatusRequest] = []
        self.batches: list[int] = []  # the size of each UpdateDeliveryStatuses call
        self.removed: list[tuple[str, str]] = []
        self.refuse: dict[int, int] = {}  # status -> how many reports of it to refuse
        self._changed = asyncio.Condition()

    async def UpdateDeliveryStatus(
        self,
        request: user_service_pb2.UpdateDeliveryStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> user_service_pb2.UpdateDeliveryStatusResponse:
        if self.refuse.get(request.status, 0) > 0:
            self.refuse[request.status] -= 1
            raise Aborted("DB_DOWN", "simulated failure while reporting (not retried by gRPC)")
        async with self._changed:
            self.updates.append(request)
            self._changed.notify_all()
        return user_service_pb2.UpdateDeliveryStatusResponse(
            delivery=common_pb2.Delivery(
                channel=request.channel,
                status=request.status,
                detail=request.detail,
                attempts=request.attempt,
            )
        )

    async def UpdateDeliveryStatuses(
        self,
        request: user_service_pb2.UpdateDeliveryStatusesRequest,
        context: grpc.aio.ServicerContext,
    ) -> user_service_pb2.UpdateDeliveryStatusesResponse:
        """The batch as DeliveryService applies it: each report in order (a refused status
        fails the whole call, as a database outage would)."""
        for report in request.reports:
            if self.refuse.get(report.status, 0) > 0:
                self.refuse[report.status] -= 1
                raise Aborted("DB_DOWN", "simulated failure while reporting (not retried by gRPC)")
        self.batches.append(len(request.reports))
        results = []
        for report in request.reports:
            answer = await self.UpdateDeliveryStatus(report, context)
            results.append(
                user_service_pb2.DeliveryStatusResult(delivery=answer.delivery, found=True)
            )
        return user_service_pb2.UpdateDeliveryStatusesResponse(results=results)

    async def RemoveDeviceToken(
        self,
        request: user_service_pb2.RemoveDeviceTokenRequest,
        context: grpc.aio.ServicerContext,
    ) -> user_service_pb2.RemoveDeviceTokenResponse:
        self.removed.append((request.user_id, request.token))
        return user_service_pb2.RemoveDeviceTokenResponse(removed=1)

    def of(self, nid: str) -> list[user_service_pb2.UpdateDeliveryStatusRequest]:
        return [u for u in self.updates if u.notification_id == nid]

    async def wait_status(
        self, nid: str, status: int, count: int = 1
    ) -> list[user_service_pb2.UpdateDeliveryStatusRequest]:
        """All updates of ``nid`` once ``status`` was reported ``count`` times."""
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(
                lambda: sum(u.status == status for u in self.of(nid)) >= count
            )
        return self.of(nid)


class DeadLetters:
    """Consumes the failed queue, keeping each message by its message id."""

    def __init__(self) -> None:
        self.by_id: dict[str, AbstractIncomingMessage] = {}
        self.counts: dict[str, int] = {}
        self._arrived = asyncio.Condition()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with message.process(), self._arrived:
            self.by_id[message.message_id or ""] = message
            key = message.message_id or ""
            self.counts[key] = self.counts.get(key, 0) + 1
            self._arrived.notify_all()

    async def wait_for(self, message_id: str) -> AbstractIncomingMessage:
        async with asyncio.timeout(WAIT), self._arrived:
            await self._arrived.wait_for(lambda: message_id in self.by_id)
        return self.by_id[message_id]


# A publisher for jobs and a consumer of the failed queue.
Broker = tuple[Publisher, DeadLetters]


class ConfigFields(TypedDict):
    """The ``Config`` fields both workers have, pointed at the run's peers and stand-ins."""

    common: CommonSettings
    dsn: str
    worker: WorkerSettings


class Worker(Protocol):
    """What ``start_worker`` needs of either worker's ``App``."""

    async def stop(self) -> None: ...


# --- helpers --------------------------------------------------------------------------


def job_meta(user: str = "00000000-0000-4000-8000-000000000001") -> jobs_pb2.JobMeta:
    """Metadata of a fresh first attempt (new notification and correlation ids)."""
    return jobs_pb2.JobMeta(
        notification_id=str(uuid.uuid4()),
        attempt=1,
        correlation_id=uuid.uuid4().hex,
        user_id=user,
    )


async def publish(publisher: Publisher, kind: JobKind, body: bytes, message_id: str) -> None:
    """Publish ``body`` as a job of ``kind``; the body need not decode (garbage tests)."""
    await publisher.publish(
        kind.key,
        body,
        message_type=kind.message_type,
        message_id=message_id,
        correlation_id=uuid.uuid4().hex,
    )


def statuses(updates: list[user_service_pb2.UpdateDeliveryStatusRequest]) -> list[int]:
    return [u.status for u in updates]


async def health_status(port: int, tls: TlsSettings) -> int:
    """The overall health a worker on ``port`` reports to a caller with ``tls``."""
    channel = rpc.secure_channel(f"127.0.0.1:{port}", tls)
    async with channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        status: int = reply.status
        return status


# --- fixtures (bound into each worker test module) ------------------------------------


@pytest.fixture(scope="module")
async def users() -> RecordingUsers:
    # Only what the workers call is implemented; the rest answers UNIMPLEMENTED.
    return RecordingUsers()  # type: ignore[abstract]


@pytest.fixture(scope="module")
async def upstreams(
    common_for: Callable[[str], CommonSettings],
    users: RecordingUsers,
    templates: template_service_pb2_grpc.TemplateServiceServicer,
) -> AsyncIterator[tuple[int, int]]:
    """The stand-in user_svc and template_svc, with their real certificates."""
    user_server = GrpcServer(
        common_for("user_svc"),
        [lambda s: delivery_service_pb2_grpc.add_DeliveryServiceServicer_to_server(users, s)],
        ["notify.v1.DeliveryService"],
    )
    template_server = GrpcServer(
        common_for("template_svc"),
        [lambda s: template_service_pb2_grpc.add_TemplateServiceServicer_to_server(templates, s)],
        ["notify.v1.TemplateService"],
    )
    ports = (await user_server.start(), await template_server.start())
    yield ports
    await user_server.stop()
    await template_server.stop()


def own_topology(prefix: str) -> object:
    """A module's ``topo`` fixture: its own queue names, so its failed queue is its own.

    The names go under ``prefix`` within the run's prefix; every queue and the exchange
    are deleted after the module. Typed ``object`` because pytest needs nothing of it but
    the name it is bound to in the module.
    """

    @pytest.fixture(scope="module")
    async def topo(topology: Topology, amqp_url: str) -> AsyncIterator[Topology]:
        own = Topology(
            prefix=f"{topology.prefix}{prefix}", retry_delays_ms=topology.retry_delays_ms
        )
        yield own
        await delete_topology(amqp_url, own)

    return topo


@pytest.fixture(scope="module")
def config_fields(
    common_for: Callable[[str], CommonSettings],
    database: Callable[[str], Awaitable[str]],
    amqp_url: str,
    topo: Topology,
    upstreams: tuple[int, int],
) -> Callable[[str], Awaitable[ConfigFields]]:
    """Builds the ``Config`` fields both workers have, for ``service``.

    Its certificate, a fresh database, the module's queues and the stand-in upstreams;
    the module adds its provider's settings.
    """

    async def make(service: str) -> ConfigFields:
        return ConfigFields(
            common=common_for(service),
            dsn=await database(service),
            worker=WorkerSettings(
                amqp_url=amqp_url,
                topology=topo,
                user_svc_addr=f"127.0.0.1:{upstreams[0]}",
                template_svc_addr=f"127.0.0.1:{upstreams[1]}",
                # SENDING before every send, so tests see each step in order.
                runner=RunnerSettings(prefetch=8, sending_report_after=0.0),
            ),
        )

    return make


@pytest.fixture(scope="module")
async def broker(amqp_url: str, topo: Topology) -> AsyncIterator[Broker]:
    """A publisher for jobs and a consumer of the failed queue."""
    connection = await aio_pika.connect_robust(amqp_url, timeout=10)
    publisher = Publisher(connection, topo)
    await publisher.start()
    dead = DeadLetters()
    channel = await connection.channel()
    queue = await channel.get_queue(topo.failed_queue)
    await queue.consume(dead.on_message)
    yield publisher, dead
    await publisher.close()
    await connection.close()


@pytest.fixture
async def start_worker(
    launch: Callable[..., Awaitable[Worker]], broker: Broker
) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Start the module's worker (``launch``), optionally with providers; stopped after the test.

    Asks for ``broker`` so dead letters are collected before any worker can produce one.
    """
    apps: list[Worker] = []

    async def start(*providers: object) -> Worker:
        app = await launch(providers=list(providers) or None)
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()
