"""The job runner's guarantees, against a fake handler on real RabbitMQ and PostgreSQL.

Each guarantee of ``notify_kit.jobs.runner`` is tested here once; the worker modules test
only what their handlers add (rendering, the providers' wire, failover). The handler
stands for any worker: it can be told that "our side" is down (it raises ``Blocked``, as
a chain whose breakers are all open or a TemplateService outage does), that one job's
sends fail (transiently, permanently, with an unknown outcome, or with a bug), and it
records what it was asked to send and what it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import pytest
from google.protobuf import timestamp_pb2
from notify.v1 import common_pb2, delivery_service_pb2_grpc, jobs_pb2, template_service_pb2_grpc

from notify_kit import db
from notify_kit.amqp import EMAIL, Topology
from notify_kit.jobs.app import Upstreams, WorkerApp
from notify_kit.jobs.errors import Blocked, OutcomeUnknown, PermanentError, TransientError
from notify_kit.jobs.ledger import MIGRATIONS, DeliveryLog
from notify_kit.jobs.providers import ProviderChain, Sent
from notify_kit.jobs.settings import RunnerSettings
from notify_kit.jobs.upstream import StatusReporter
from notify_kit.rpc import secure_channel
from notify_kit.settings import TlsSettings
from scripts.system import poll
from tests import worker_support
from tests.worker_support import (
    DELIVERED,
    EXPIRED,
    FAILED,
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
    """Delivers every e-mail job, except while ``outage`` lasts or as told for one job.

    ``fail(nid, *errors)`` makes the next sends of ``nid`` raise ``errors``, one per send
    (a ``TransientError``, ``PermanentError``, ``OutcomeUnknown``); ``bug`` is raised by
    every send while it is set (an unexpected error). ``calls`` records each send that
    reached the handler as (notification id, attempt); ``sent`` what it delivered.
    """

    kind = EMAIL
    channel = common_pb2.CHANNEL_EMAIL

    def __init__(self, outage: Outage) -> None:
        self.outage = outage
        self.calls: list[tuple[str, int]] = []
        self.sent: list[str] = []
        self.errors: dict[str, list[Exception]] = {}
        self.bug: Exception | None = None
        self.sending = asyncio.Event()  # set when a send began
        self.release = asyncio.Event()  # sends wait for it
        self.release.set()
        self.chain: ProviderChain[str, str] = ProviderChain("email", [FixedProvider()])

    def fail(self, nid: str, *errors: Exception) -> None:
        """The next ``len(errors)`` sends of ``nid`` raise these, in order."""
        self.errors.setdefault(nid, []).extend(errors)

    def decode(self, body: bytes) -> jobs_pb2.EmailJob:
        return jobs_pb2.EmailJob.FromString(body)

    async def send(self, job: jobs_pb2.EmailJob) -> Sent[str]:
        if not self.outage.up.is_set():
            self.outage.blocked_calls += 1
            raise Blocked("template service: UNAVAILABLE", retry_after=0.2)
        nid = job.meta.notification_id
        self.calls.append((nid, job.meta.attempt))
        if self.bug is not None:
            raise self.bug
        if self.errors.get(nid):
            raise self.errors[nid].pop(0)
        self.sending.set()
        await self.release.wait()
        self.sent.append(nid)
        return Sent("fake", f"ok-{len(self.sent)}")

    def attempts_of(self, nid: str) -> list[int]:
        """The attempt of every send of ``nid`` that reached the handler."""
        return [attempt for sent, attempt in self.calls if sent == nid]


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
def runner_settings() -> RunnerSettings | None:
    """The runner's settings where a test needs its own (None: the module's defaults)."""
    return None


@pytest.fixture
async def launch(
    config_fields: Callable[[str], Awaitable[ConfigFields]],
    handler: FakeHandler,
    runner_settings: RunnerSettings | None,
) -> Callable[..., Awaitable[WorkerApp]]:
    fields = await config_fields("email_worker")
    worker = fields["worker"]
    if runner_settings is not None:
        worker = dataclasses.replace(worker, runner=runner_settings)

    async def build(up: Upstreams, stack: contextlib.AsyncExitStack) -> FakeHandler:
        return handler

    async def start(providers: object = None) -> WorkerApp:
        return await WorkerApp.start(fields["common"], fields["dsn"], worker, build)

    return start


@pytest.fixture
async def app(start_worker: Callable[..., Awaitable[WorkerApp]], outage: Outage) -> WorkerApp:
    """A worker running the fake handler with every dependency of ours up."""
    outage.end()
    return await start_worker()


def new_job() -> jobs_pb2.EmailJob:
    return jobs_pb2.EmailJob(meta=job_meta(), to_address="a@example.com", template_id="t")


async def submit(broker: Broker, job: jobs_pb2.EmailJob) -> str:
    """Publish ``job`` to the e-mail queue; its notification id."""
    nid = job.meta.notification_id
    await publish(broker[0], EMAIL, job.SerializeToString(), nid)
    return nid


async def logged(app: WorkerApp, nid: str) -> list[tuple[int, str]]:
    """The (attempt, status) rows the worker's ledger holds for ``nid``."""
    return [(a.attempt, a.status) for a in await app.store.history(nid)]


async def depth(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        return int(count or 0)


# --- delivery, retries, dead letters ---------------------------------------------------


async def test_delivers_and_reports_delivered(
    app: WorkerApp, broker: Broker, users: RecordingUsers, handler: FakeHandler
) -> None:
    nid = await submit(broker, new_job())

    updates = await users.wait_status(nid, DELIVERED)
    assert statuses(updates) == [SENDING, DELIVERED]
    assert {u.channel for u in updates} == {common_pb2.CHANNEL_EMAIL}
    assert [u.attempt for u in updates] == [1, 1]
    assert updates[-1].detail == "fake: ok-1"
    assert handler.sent == [nid]
    assert await logged(app, nid) == [(1, "DELIVERED")]
    assert [a.provider for a in await app.store.history(nid)] == ["fake"]


FOLDING = RunnerSettings(prefetch=8, sending_report_after=0.5)


@pytest.mark.parametrize("runner_settings", [FOLDING])
async def test_a_quick_send_reports_its_outcome_only(
    app: WorkerApp, broker: Broker, users: RecordingUsers, handler: FakeHandler
) -> None:
    """SENDING would be replaced at once: the quick send makes one status report."""
    ok = await submit(broker, new_job())
    retried = new_job()
    handler.fail(retried.meta.notification_id, TransientError("provider busy"))
    await submit(broker, retried)

    assert statuses(await users.wait_status(ok, DELIVERED)) == [DELIVERED]
    updates = await users.wait_status(retried.meta.notification_id, DELIVERED)
    assert statuses(updates) == [RETRYING, DELIVERED]
    assert await logged(app, ok) == [(1, "DELIVERED")]


@pytest.mark.parametrize("runner_settings", [RunnerSettings(prefetch=32, sending_report_after=0.5)])
async def test_reports_made_together_go_out_in_one_call(
    app: WorkerApp, broker: Broker, users: RecordingUsers, handler: FakeHandler
) -> None:
    """A busy worker makes one status RPC for many deliveries, each still applied."""
    handler.release.clear()  # let 20 jobs reach the handler, then finish them together
    ids = [await submit(broker, new_job()) for _ in range(20)]
    await poll(
        lambda: asyncio.sleep(0, len(handler.calls)), lambda n: n >= 20, timeout=20, what="sends"
    )
    users.batches.clear()
    handler.release.set()
    for nid in ids:
        assert statuses(await users.wait_status(nid, DELIVERED))[-1] == DELIVERED
    assert sum(users.batches) >= 20 and len(users.batches) < 20


async def test_a_report_user_svc_refuses_is_dropped_alone(
    upstreams: tuple[int, int], users: RecordingUsers, tls_for: Callable[[str], TlsSettings]
) -> None:
    """A report the contract refuses fails its whole batch; the others must still land."""
    channel = secure_channel(f"127.0.0.1:{upstreams[0]}", tls_for("email_worker"))
    reporter = StatusReporter(
        delivery_service_pb2_grpc.DeliveryServiceStub(channel),
        common_pb2.CHANNEL_EMAIL,
        window=0.05,
    )
    reporter.start()
    good, bad = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        await asyncio.gather(
            reporter(good, DELIVERED, "ok", 1, 0),
            reporter(bad, DELIVERED, "ok", -1, 0),  # a negative attempt: INVALID_ARGUMENT
        )
    finally:
        await reporter.close()
        await channel.close()
    assert statuses(users.of(good)) == [DELIVERED]
    assert users.of(bad) == []


@pytest.mark.parametrize("runner_settings", [FOLDING])
async def test_a_slow_send_reports_sending_first(
    app: WorkerApp, broker: Broker, users: RecordingUsers, handler: FakeHandler
) -> None:
    handler.release.clear()  # the send waits until we let it finish
    nid = await submit(broker, new_job())
    await users.wait_status(nid, SENDING)  # reported while the send still runs
    assert handler.sent == []
    handler.release.set()

    assert statuses(await users.wait_status(nid, DELIVERED)) == [SENDING, DELIVERED]


async def test_transient_failure_is_retried_then_delivered(
    app: WorkerApp, broker: Broker, users: RecordingUsers, handler: FakeHandler
) -> None:
    job = new_job()
    handler.fail(job.meta.notification_id, TransientError("provider busy"))
    nid = await submit(broker, job)

    updates = await users.wait_status(nid, DELIVERED)
    assert statuses(updates) == [SENDING, RETRYING, SENDING, DELIVERED]
    assert [u.attempt for u in updates] == [1, 1, 2, 2]
    assert updates[1].detail == "provider busy"
    assert handler.attempts_of(nid) == [1, 2]
    assert handler.sent == [nid]
    assert await logged(app, nid) == [(1, "RETRYING"), (2, "DELIVERED")]
    assert nid not in broker[1].counts


async def test_retries_run_out_into_the_failed_queue(
    app: WorkerApp,
    broker: Broker,
    users: RecordingUsers,
    handler: FakeHandler,
    topo: Topology,
) -> None:
    job = new_job()
    last = topo.max_attempts
    handler.fail(
        job.meta.notification_id, *(TransientError(f"busy #{a}") for a in range(1, last + 1))
    )
    nid = await submit(broker, job)

    updates = await users.wait_status(nid, FAILED)
    assert statuses(updates) == [SENDING, RETRYING] * (last - 1) + [SENDING, FAILED]
    assert [u.attempt for u in updates] == [a for a in range(1, last + 1) for _ in (0, 1)]
    assert updates[-1].detail == f"gave up after {last} attempts: busy #{last}"
    assert handler.attempts_of(nid) == list(range(1, last + 1))
    assert handler.sent == []

    dead = await broker[1].wait_for(nid)
    assert dead.headers["x-notify-kind"] == "email"
    assert dead.headers["x-notify-attempts"] == str(last)
    assert dead.headers["x-notify-error"] == updates[-1].detail
    body = jobs_pb2.EmailJob.FromString(dead.body)
    assert body.meta.notification_id == nid and body.meta.attempt == last
    history = json.loads(str(dead.headers["x-notify-history"]))
    assert [(h["attempt"], h["status"]) for h in history] == [
        *((a, "RETRYING") for a in range(1, last)),
        (last, "FAILED"),
    ]
    assert [h["detail"] for h in history[:-1]] == [f"busy #{a}" for a in range(1, last)]
    assert await logged(app, nid) == [
        *((a, "RETRYING") for a in range(1, last)),
        (last, "FAILED"),
    ]
    assert broker[1].counts[nid] == 1


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PermanentError("mailbox does not exist"), "permanent: mailbox does not exist"),
        (
            OutcomeUnknown("no answer after DATA"),
            "outcome unknown, not resent: no answer after DATA",
        ),
    ],
    ids=["permanent", "outcome-unknown"],
)
async def test_permanent_or_unknown_outcome_fails_at_once(
    app: WorkerApp,
    broker: Broker,
    users: RecordingUsers,
    handler: FakeHandler,
    error: Exception,
    reason: str,
) -> None:
    job = new_job()
    handler.fail(job.meta.notification_id, error)
    nid = await submit(broker, job)

    updates = await users.wait_status(nid, FAILED)
    assert statuses(updates) == [SENDING, FAILED]
    assert [u.attempt for u in updates] == [1, 1]
    assert updates[-1].detail == reason
    dead = await broker[1].wait_for(nid)
    assert jobs_pb2.EmailJob.FromString(dead.body) == job
    assert dead.headers["x-notify-attempts"] == "1"
    assert dead.headers["x-notify-error"] == reason
    history = json.loads(str(dead.headers["x-notify-history"]))
    assert [(h["attempt"], h["status"], h["detail"]) for h in history] == [(1, "FAILED", reason)]
    assert handler.attempts_of(nid) == [1]  # one send, never retried nor resent
    assert handler.sent == []
    assert await logged(app, nid) == [(1, "FAILED")]


async def test_undecodable_message_is_dead_lettered_and_work_goes_on(
    app: WorkerApp, broker: Broker, users: RecordingUsers, handler: FakeHandler
) -> None:
    garbage_id = f"garbage-{uuid.uuid4()}"
    await publish(broker[0], EMAIL, b"\xff\xff not a job", garbage_id)
    dead = await broker[1].wait_for(garbage_id)
    assert dead.body == b"\xff\xff not a job"
    assert dead.headers["x-notify-error"] == "undecodable"
    assert dead.headers["x-notify-kind"] == "email"
    assert dead.headers["x-notify-attempts"] == "0"

    nid = await submit(broker, new_job())
    assert statuses(await users.wait_status(nid, DELIVERED)) == [SENDING, DELIVERED]
    assert handler.sent == [nid]
    assert users.of(garbage_id) == []
    assert broker[1].counts[garbage_id] == 1


async def test_redelivered_job_is_not_sent_twice(
    app: WorkerApp, broker: Broker, users: RecordingUsers, handler: FakeHandler
) -> None:
    job = new_job()
    nid = await submit(broker, job)
    await users.wait_status(nid, DELIVERED)
    await submit(broker, job)  # the same job again, as after a crash before the ack

    updates = await users.wait_status(nid, DELIVERED, count=2)
    assert statuses(updates) == [SENDING, DELIVERED, DELIVERED]
    assert updates[1].detail == updates[2].detail == "fake: ok-1"
    assert handler.attempts_of(nid) == [1]
    assert handler.sent == [nid]
    assert await logged(app, nid) == [(1, "DELIVERED")]


async def test_expired_job_is_not_sent(
    app: WorkerApp, broker: Broker, users: RecordingUsers, handler: FakeHandler
) -> None:
    job = new_job()
    job.meta.expire_time.CopyFrom(timestamp_pb2.Timestamp(seconds=1_600_000_000))
    nid = await submit(broker, job)

    updates = await users.wait_status(nid, EXPIRED)
    assert statuses(updates) == [EXPIRED]
    assert updates[0].detail == "expired before sending"
    assert handler.calls == []
    assert await logged(app, nid) == [(1, "EXPIRED")]
    assert nid not in broker[1].counts


async def test_failed_report_after_dead_lettering_does_not_send_or_dead_letter_again(
    app: WorkerApp, broker: Broker, users: RecordingUsers, handler: FakeHandler
) -> None:
    job = new_job()
    nid = job.meta.notification_id
    handler.fail(nid, PermanentError("rejected"))
    users.refuse[FAILED] = 2  # UserService refuses the FAILED report twice
    try:
        await submit(broker, job)
        updates = await users.wait_status(nid, FAILED)
    finally:
        refusals_left = users.refuse.pop(FAILED)
    assert refusals_left == 0  # both refusals happened
    assert statuses(updates) == [SENDING, FAILED]
    await broker[1].wait_for(nid)
    assert broker[1].counts[nid] == 1
    assert handler.attempts_of(nid) == [1]
    assert await logged(app, nid) == [(1, "FAILED")]


# --- our outages and bugs --------------------------------------------------------------


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


# With the default 15 s lease: the send that raised gives its claim back, so the requeued
# copy need not wait the lease out (which would outlast WAIT).
async def test_a_bug_requeues_the_job_and_pauses_consumption_until_it_is_fixed(
    app: WorkerApp, broker: Broker, users: RecordingUsers, handler: FakeHandler
) -> None:
    handler.bug = RuntimeError("a bug in the handler")
    nid = await submit(broker, new_job())

    async def consumption() -> tuple[bool, bool, int]:
        runner = app.runner
        return runner.pause.paused, runner._tag is None, len(handler.attempts_of(nid))

    _, cancelled, sends = await poll(
        consumption, lambda c: c[0], timeout=WAIT, what="the pause after the bug"
    )
    assert cancelled and sends >= 1  # the consumer is cancelled while the pause lasts
    handler.bug = None  # the bug is fixed: the requeued job goes through

    updates = await users.wait_status(nid, DELIVERED)
    # Each delivery of the message reports SENDING: it came back after the bug.
    assert statuses(updates)[-1] == DELIVERED
    assert set(statuses(updates)[:-1]) == {SENDING} and len(updates) >= 3
    assert {u.attempt for u in updates} == {1}  # a bug spends no attempt
    assert handler.sent == [nid]
    assert await logged(app, nid) == [(1, "DELIVERED")]
    assert nid not in broker[1].counts  # requeued, never dead-lettered


async def test_a_jobs_first_step_reads_the_outcome_or_takes_the_claim_in_one_statement(
    database: Callable[[str], Awaitable[str]],
) -> None:
    dsn = await database("outcome_or_claim")
    pool = await db.create_pool(dsn, application="test")
    try:
        await db.migrate(pool, MIGRATIONS)
        ledger = DeliveryLog(pool)
        assert await ledger.outcome_or_claim("n-1", 1, 0, "first", 30) == (None, True)
        assert await ledger.outcome_or_claim("n-1", 1, 0, "first", 30) == (None, True)
        assert await ledger.outcome_or_claim("n-1", 1, 0, "second", 30) == (None, False)
        await ledger.record("n-1", 1, RETRYING, "try again", "smtp")
        assert await ledger.outcome_or_claim("n-1", 1, 0, "second", 30) == (
            (RETRYING, "try again"),
            False,
        )
        assert await ledger.claim("n-1", 1, 0, "third", 30)  # an outcome takes no claim
        await ledger.record("n-1", 2, DELIVERED, "ok", "smtp")
        assert await ledger.outcome_or_claim("n-1", 3, 0, "fourth", 30) == (
            (DELIVERED, "ok"),
            False,
        )
    finally:
        await db.close_pool(pool)


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


def test_the_claim_taken_with_the_outcome_check_stands_in_once_and_only_while_young() -> None:
    from notify_kit.jobs.runner import _FirstClaim  # noqa: PLC0415 (the runner's own rule)

    claim = _FirstClaim(True, at=100.0, lease=15.0)
    assert claim.use(104.9) is True
    assert claim.use(104.9) is False  # a send run again (after a hold) claims again
    assert _FirstClaim(True, at=100.0, lease=15.0).use(105.0) is False  # held too long
    assert _FirstClaim(False, at=100.0, lease=15.0).use(100.0) is False  # another held it
