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

from notify_kit import db
from notify_kit.amqp import EMAIL, Topology
from notify_kit.jobs.app import Upstreams, WorkerApp
from notify_kit.jobs.errors import Blocked
from notify_kit.jobs.ledger import MIGRATIONS, DeliveryLog
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
        self.sending = asyncio.Event()  # set when a send began
        self.release = asyncio.Event()  # sends wait for it
        self.release.set()
        self.chain: ProviderChain[str, str] = ProviderChain("email", [FixedProvider()])

    def decode(self, body: bytes) -> jobs_pb2.EmailJob:
        return jobs_pb2.EmailJob.FromString(body)

    async def send(self, job: jobs_pb2.EmailJob) -> Sent[str]:
        if not self.outage.up.is_set():
            self.outage.blocked_calls += 1
            raise Blocked("template service: UNAVAILABLE", retry_after=0.2)
        self.sending.set()
        await self.release.wait()
        self.sent.append(job.meta.notification_id)
        return Sent("fake", "ok")


@pytest.fixture(scope="module")
async def templates() -> template_service_pb2_grpc.TemplateServiceServicer:
    return template_service_pb2_grpc.TemplateServiceServicer()  # type: ignore[abstract]


@pytest.fixture
def outage() -> Outage:
    return Outage()


@pytest.fixture
def handler(outage: Outage) -> FakeHandler:
    return FakeHandler(outage)


@pytest.fixture
async def launch(
    config_fields: Callable[[str], Awaitable[ConfigFields]], handler: FakeHandler
) -> Callable[..., Awaitable[WorkerApp]]:
    fields = await config_fields("email_worker")

    async def build(up: Upstreams, stack: contextlib.AsyncExitStack) -> FakeHandler:
        return handler

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


async def test_two_copies_of_one_job_consumed_at_once_send_once(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
    outage: Outage,
    handler: FakeHandler,
) -> None:
    outage.end()
    handler.release.clear()
    app = await start_worker()
    job = jobs_pb2.EmailJob(meta=job_meta(), to_address="a@example.com", template_id="t")
    nid = job.meta.notification_id
    await publish(broker[0], EMAIL, job.SerializeToString(), nid)
    await asyncio.wait_for(handler.sending.wait(), WAIT)  # the first copy is mid-send
    await publish(broker[0], EMAIL, job.SerializeToString(), nid)  # a racing copy

    async def second_copy_waits() -> int:
        return sum(u.status == SENDING for u in users.of(nid))

    await poll(second_copy_waits, lambda n: n == 2, timeout=WAIT, what="the second copy")
    handler.release.set()
    updates = await users.wait_status(nid, DELIVERED, count=2)
    assert statuses(updates) == [SENDING, SENDING, DELIVERED, DELIVERED]
    assert handler.sent == [nid]
    assert [a.status for a in await app.store.history(nid)] == ["DELIVERED"]


async def test_a_claim_is_a_lease_that_a_dead_holder_loses(
    database: Callable[[str], Awaitable[str]],
) -> None:
    dsn = await database("claims")
    pool = await db.create_pool(dsn, application="test")
    try:
        await db.migrate(pool, MIGRATIONS)
        ledger = DeliveryLog(pool)
        assert await ledger.claim("n-1", 1, 0, "first", lease=0.3)
        assert await ledger.claim("n-1", 1, 0, "first", lease=0.3)  # the holder extends it
        assert not await ledger.claim("n-1", 1, 0, "second", lease=0.3)
        assert await ledger.claim("n-1", 2, 0, "second", lease=0.3)  # another attempt

        async def taken_over() -> bool:
            return await ledger.claim("n-1", 1, 0, "second", lease=30)

        await poll(taken_over, bool, timeout=WAIT, what="the expired lease")
        await ledger.record("n-1", 1, DELIVERED, "ok", "fake")
        assert await ledger.claim("n-1", 1, 0, "third", lease=30)  # recorded: claim released
    finally:
        await db.close_pool(pool)
