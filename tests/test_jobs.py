"""The job runner's outage guarantees, against a fake handler on real RabbitMQ and PostgreSQL.

The handler stands for any worker: it can be told that "our side" is down (it raises
``Blocked``, as a chain whose breakers are all open or a TemplateService outage does).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aio_pika
import pytest
from notify.v1 import common_pb2, jobs_pb2, template_service_pb2_grpc

from notify_kit.amqp import EMAIL, Topology
from notify_kit.jobs.app import Upstreams, WorkerApp
from notify_kit.jobs.errors import Blocked
from notify_kit.jobs.providers import ProviderChain, Sent
from scripts.system import poll
from tests import worker_support
from tests.worker_support import (
    DELIVERED,
    RETRYING,
    SENDING,
    WAIT,
    Broker,
    ConfigFields,
    RecordingUsers,
    job_meta,
    publish,
    statuses,
)

users = worker_support.users
upstreams = worker_support.upstreams
topo = worker_support.own_topology("jr.")
config_fields = worker_support.config_fields
broker = worker_support.broker
start_worker = worker_support.start_worker


class Outage:
    """A dependency of ours that is down until ``end()``."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.blocked_calls = 0

    def end(self) -> None:
        self.up.set()


class FixedProvider:
    """The chain the admin service reports on; the fake handler sends by itself."""

    name = "fake"

    async def send(self, message: str) -> str:
        return "ok"

    async def close(self) -> None:
        pass


class FakeHandler:
    """Delivers every e-mail job, except while ``outage`` lasts."""

    kind = EMAIL
    channel = common_pb2.CHANNEL_EMAIL

    def __init__(self, outage: Outage) -> None:
        self.outage = outage
        self.sent: list[str] = []
        self.chain: ProviderChain[str, str] = ProviderChain("email", [FixedProvider()])

    def decode(self, body: bytes) -> jobs_pb2.EmailJob:
        return jobs_pb2.EmailJob.FromString(body)

    async def send(self, job: jobs_pb2.EmailJob) -> Sent[str]:
        if not self.outage.up.is_set():
            self.outage.blocked_calls += 1
            raise Blocked("template service: UNAVAILABLE", retry_after=0.2)
        self.sent.append(job.meta.notification_id)
        return Sent("fake", "ok")


@pytest.fixture(scope="module")
async def templates() -> template_service_pb2_grpc.TemplateServiceServicer:
    return template_service_pb2_grpc.TemplateServiceServicer()  # type: ignore[abstract]


@pytest.fixture
def outage() -> Outage:
    return Outage()


@pytest.fixture
async def launch(
    config_fields: Callable[[str], Awaitable[ConfigFields]], outage: Outage
) -> Callable[..., Awaitable[WorkerApp]]:
    fields = await config_fields("email_worker")

    async def build(up: Upstreams, stack: contextlib.AsyncExitStack) -> FakeHandler:
        return FakeHandler(outage)

    async def start(providers: object = None) -> WorkerApp:
        return await WorkerApp.start(fields["common"], fields["dsn"], fields["worker"], build)

    return start


async def depth(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        return int(count or 0)


async def test_our_outage_spends_no_attempt_and_pauses_consumption(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
    topo: Topology,
    outage: Outage,
    amqp_url: str,
) -> None:
    app = await start_worker()
    jobs = []
    for _ in range(20):
        job = jobs_pb2.EmailJob(meta=job_meta(), to_address="a@example.com", template_id="t")
        jobs.append(job)
        await publish(broker[0], EMAIL, job.SerializeToString(), job.meta.notification_id)

    async def consumer_cancelled() -> bool:
        return app.runner.pause.paused and app.runner._tag is None

    await poll(consumer_cancelled, bool, timeout=WAIT, what="the paused consumer")
    # The consumer is cancelled: what was not prefetched (prefetch 8) stays in the queue.
    assert await depth(amqp_url, topo.queue(EMAIL)) >= 20 - 8
    calls_while_paused = outage.blocked_calls
    outage.end()

    for job in jobs:
        updates = await users.wait_status(job.meta.notification_id, DELIVERED)
        assert statuses(updates) == [SENDING, DELIVERED]
        assert RETRYING not in statuses(updates)
        assert {u.attempt for u in updates} == {1}
    assert not app.runner.pause.paused
    # Held jobs retried on the pause's schedule, not in a tight loop.
    assert calls_while_paused <= 8 * 4
