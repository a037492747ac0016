"""The push worker against real RabbitMQ, PostgreSQL, firebase-admin (FcmFake) and mTLS gRPC.

UserService and TemplateService are stood in for by tiny in-process servicers behind the
real ``GrpcServer`` (mTLS, access matrix), so these tests own every input the worker
sees; the end-to-end suite runs the same worker against the real services.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import pytest
from aio_pika.abc import AbstractIncomingMessage
from firebase_admin import exceptions, messaging
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from notify.v1 import (
    common_pb2,
    jobs_pb2,
    template_service_pb2,
    template_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)

from notify_kit import rpc
from notify_kit.amqp import PUSH, Publisher, Topology
from notify_kit.errors import NotFound
from notify_kit.server import GrpcServer
from notify_kit.settings import CommonSettings, SettingsError, TlsSettings
from notify_kit.worker import PermanentError, TransientError
from push_worker import consumer, sender
from push_worker.app import App
from push_worker.config import DEFAULT_FCM_URL, Config, FcmConfig
from push_worker.sender import FcmSender, InMemoryPushSender, Outcome, PushResult, TargetResult
from scripts.fcm_fake import FcmFake

S = common_pb2.NotificationStatus
SENDING, DELIVERED = S.NOTIFICATION_STATUS_SENDING, S.NOTIFICATION_STATUS_DELIVERED
RETRYING, FAILED = S.NOTIFICATION_STATUS_RETRYING, S.NOTIFICATION_STATUS_FAILED
EXPIRED = S.NOTIFICATION_STATUS_EXPIRED
WAIT = 15.0
PROJECT = "notify-test"


# --- stand-ins for our own UserService and TemplateService --------------------------


class RecordingUsers(user_service_pb2_grpc.UserServiceServicer):
    """Records status reports and token removals so tests can wait for them."""

    def __init__(self) -> None:
        self.updates: list[user_service_pb2.UpdateDeliveryStatusRequest] = []
        self.removed: list[tuple[str, str]] = []
        self._changed = asyncio.Condition()

    async def UpdateDeliveryStatus(
        self,
        request: user_service_pb2.UpdateDeliveryStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> user_service_pb2.UpdateDeliveryStatusResponse:
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


class FixedTemplates(template_service_pb2_grpc.TemplateServiceServicer):
    """Renders one fixed push from the ``name`` variable; ``missing`` does not exist."""

    async def RenderTemplate(
        self,
        request: template_service_pb2.RenderTemplateRequest,
        context: grpc.aio.ServicerContext,
    ) -> template_service_pb2.RenderTemplateResponse:
        if request.template_id == "missing":
            raise NotFound("TEMPLATE_NOT_FOUND", "no such template")
        assert request.channel == common_pb2.CHANNEL_PUSH
        return template_service_pb2.RenderTemplateResponse(
            version=1,
            language=request.language,
            push=template_service_pb2.PushContent(
                title=f"Hi {request.variables['name']}", body="You have a new message"
            ),
        )


class DeadLetters:
    """Consumes the failed queue, keeping each message by its message id."""

    def __init__(self) -> None:
        self.by_id: dict[str, AbstractIncomingMessage] = {}
        self._arrived = asyncio.Condition()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with message.process(), self._arrived:
            self.by_id[message.message_id or ""] = message
            self._arrived.notify_all()

    async def wait_for(self, message_id: str) -> AbstractIncomingMessage:
        async with asyncio.timeout(WAIT), self._arrived:
            await self._arrived.wait_for(lambda: message_id in self.by_id)
        return self.by_id[message_id]


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def users() -> RecordingUsers:
    # Only what the worker calls is implemented; the rest answers UNIMPLEMENTED.
    return RecordingUsers()  # type: ignore[abstract]


@pytest.fixture(scope="module")
async def upstreams(
    common_for: Callable[[str], CommonSettings], users: RecordingUsers
) -> AsyncIterator[tuple[int, int]]:
    """The stand-in user_svc and template_svc, with their real certificates."""
    templates = FixedTemplates()  # type: ignore[abstract]
    user_server = GrpcServer(
        common_for("user_svc"),
        [lambda s: user_service_pb2_grpc.add_UserServiceServicer_to_server(users, s)],
        ["notify.v1.UserService"],
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


@pytest.fixture(scope="module")
async def fcm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[FcmFake, Path]]:
    """The FCM fake and a service account it trusts."""
    fake = FcmFake()
    await fake.start("127.0.0.1", 0)
    path = fake.write_service_account(tmp_path_factory.mktemp("fcm") / "sa.json", PROJECT)
    yield fake, path
    await fake.stop()


@pytest.fixture(scope="module")
async def topo(topology: Topology, amqp_url: str) -> AsyncIterator[Topology]:
    """This module's own names under the run's prefix, so its failed queue is its own."""
    own = Topology(prefix=f"{topology.prefix}pw.", retry_delays_ms=topology.retry_delays_ms)
    yield own
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for name in own.all_queues():
            await channel.queue_delete(name)
        await channel.exchange_delete(own.exchange)


@pytest.fixture(scope="module")
async def broker(amqp_url: str, topo: Topology) -> AsyncIterator[tuple[Publisher, DeadLetters]]:
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


@pytest.fixture(scope="module")
async def config(
    common_for: Callable[[str], CommonSettings],
    database: Callable[[str], Awaitable[str]],
    amqp_url: str,
    topo: Topology,
    upstreams: tuple[int, int],
    fcm: tuple[FcmFake, Path],
) -> Config:
    fake, credentials = fcm
    return Config(
        common=common_for("push_worker"),
        dsn=await database("push_worker"),
        amqp_url=amqp_url,
        topology=topo,
        user_svc_addr=f"127.0.0.1:{upstreams[0]}",
        template_svc_addr=f"127.0.0.1:{upstreams[1]}",
        fcm=FcmConfig(credentials=credentials, url=fake.url, timeout=5.0),
        prefetch=8,
    )


@pytest.fixture
async def start_worker(
    config: Config, broker: tuple[Publisher, DeadLetters]
) -> AsyncIterator[Callable[..., Awaitable[App]]]:
    """Start a worker (real firebase-admin unless a sender is given); stopped after the test."""
    apps: list[App] = []

    async def start(push_sender: InMemoryPushSender | None = None) -> App:
        app = await App.start(config, sender=push_sender)
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


def push_job(*tokens: str, template: str = "welcome", user: str = "user-1") -> jobs_pb2.PushJob:
    job = jobs_pb2.PushJob(
        meta=jobs_pb2.JobMeta(
            notification_id=str(uuid.uuid4()),
            attempt=1,
            correlation_id=uuid.uuid4().hex,
            user_id=user,
        ),
        targets=[
            jobs_pb2.PushTarget(
                device_id=f"dev-{i}", token=token, platform=user_service_pb2.DEVICE_PLATFORM_ANDROID
            )
            for i, token in enumerate(tokens)
        ],
        template_id=template,
        language="en",
    )
    job.variables.update({"name": "Zoë"})
    return job


async def publish(publisher: Publisher, body: bytes, message_id: str) -> None:
    await publisher.publish(
        PUSH.key,
        body,
        message_type=PUSH.message_type,
        message_id=message_id,
        correlation_id=uuid.uuid4().hex,
    )


def pushes_for(fake: FcmFake, nid: str) -> list[dict[str, Any]]:
    return [m for m in fake.messages if m.get("data", {}).get("notification_id") == nid]


def statuses(updates: list[user_service_pb2.UpdateDeliveryStatusRequest]) -> list[int]:
    return [u.status for u in updates]


# --- the worker -----------------------------------------------------------------------


async def test_pushes_to_every_device_through_firebase_admin(
    start_worker: Callable[..., Awaitable[App]],
    broker: tuple[Publisher, DeadLetters],
    users: RecordingUsers,
    fcm: tuple[FcmFake, Path],
    tls_for: Callable[[str], TlsSettings],
) -> None:
    app = await start_worker()
    job = push_job("device-a", "device-b")
    nid = job.meta.notification_id
    await publish(broker[0], job.SerializeToString(), nid)

    updates = await users.wait_status(nid, DELIVERED)
    assert statuses(updates) == [SENDING, DELIVERED]
    assert {u.channel for u in updates} == {common_pb2.CHANNEL_PUSH}
    assert updates[-1].detail.startswith("2/2 devices: projects/notify-test/messages/")

    pushes = pushes_for(fcm[0], nid)
    assert sorted(p["fid"] for p in pushes) == ["device-a", "device-b"]
    assert pushes[0]["notification"] == {"title": "Hi Zoë", "body": "You have a new message"}
    assert [(a.attempt, a.status) for a in await app.store.history(nid)] == [(1, "DELIVERED")]

    channel = rpc.secure_channel(f"127.0.0.1:{app.port}", tls_for("operator"))
    async with channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_unregistered_token_is_removed_and_the_rest_delivered(
    start_worker: Callable[..., Awaitable[App]],
    broker: tuple[Publisher, DeadLetters],
    users: RecordingUsers,
    fcm: tuple[FcmFake, Path],
) -> None:
    await start_worker()
    job = push_job("device-c", "unregistered-d", user="user-2")
    nid = job.meta.notification_id
    await publish(broker[0], job.SerializeToString(), nid)

    updates = await users.wait_status(nid, DELIVERED)
    assert updates[-1].detail.startswith("1/2 devices:")
    assert ("user-2", "unregistered-d") in users.removed
    assert [p["fid"] for p in pushes_for(fcm[0], nid)] == ["device-c"]


async def test_only_dead_tokens_fail_permanently(
    start_worker: Callable[..., Awaitable[App]],
    broker: tuple[Publisher, DeadLetters],
    users: RecordingUsers,
) -> None:
    await start_worker()
    job = push_job("unregistered-e", user="user-3")
    nid = job.meta.notification_id
    await publish(broker[0], job.SerializeToString(), nid)

    updates = await users.wait_status(nid, FAILED)
    assert statuses(updates) == [SENDING, FAILED]
    assert ("user-3", "unregistered-e") in users.removed
    dead = await broker[1].wait_for(nid)
    assert dead.headers["x-notify-kind"] == "push"
    assert jobs_pb2.PushJob.FromString(dead.body) == job


async def test_throttled_push_is_retried_then_delivered(
    start_worker: Callable[..., Awaitable[App]],
    broker: tuple[Publisher, DeadLetters],
    users: RecordingUsers,
    fcm: tuple[FcmFake, Path],
) -> None:
    # 429 rather than 503: firebase-admin retries 500/503 itself for ~7 s before giving up.
    app = await start_worker()
    fcm[0].fail_next(1, 429)
    job = push_job("device-f")
    nid = job.meta.notification_id
    await publish(broker[0], job.SerializeToString(), nid)

    updates = await users.wait_status(nid, DELIVERED)
    assert statuses(updates) == [SENDING, RETRYING, SENDING, DELIVERED]
    assert [u.attempt for u in updates] == [1, 1, 2, 2]
    assert len(pushes_for(fcm[0], nid)) == 1
    history = await app.store.history(nid)
    assert [(a.attempt, a.status) for a in history] == [(1, "RETRYING"), (2, "DELIVERED")]


async def test_retries_run_out_into_the_failed_queue(
    start_worker: Callable[..., Awaitable[App]],
    broker: tuple[Publisher, DeadLetters],
    users: RecordingUsers,
    topo: Topology,
) -> None:
    memory = InMemoryPushSender()
    memory.fail_next(topo.max_attempts)
    await start_worker(memory)
    job = push_job("device-g")
    nid = job.meta.notification_id
    await publish(broker[0], job.SerializeToString(), nid)

    updates = await users.wait_status(nid, FAILED)
    assert statuses(updates) == [SENDING, RETRYING] * (topo.max_attempts - 1) + [SENDING, FAILED]
    dead = await broker[1].wait_for(nid)
    assert dead.headers["x-notify-attempts"] == str(topo.max_attempts)
    assert memory.sent == []


@pytest.mark.parametrize(("tokens", "template"), [((), "welcome"), (("device-h",), "missing")])
async def test_no_devices_or_unknown_template_fail_permanently(
    start_worker: Callable[..., Awaitable[App]],
    broker: tuple[Publisher, DeadLetters],
    users: RecordingUsers,
    tokens: tuple[str, ...],
    template: str,
) -> None:
    await start_worker()
    job = push_job(*tokens, template=template)
    nid = job.meta.notification_id
    await publish(broker[0], job.SerializeToString(), nid)

    updates = await users.wait_status(nid, FAILED)
    assert statuses(updates) == [SENDING, FAILED]
    await broker[1].wait_for(nid)


async def test_undecodable_message_is_dead_lettered_and_work_goes_on(
    start_worker: Callable[..., Awaitable[App]],
    broker: tuple[Publisher, DeadLetters],
    users: RecordingUsers,
) -> None:
    await start_worker()
    garbage_id = f"garbage-{uuid.uuid4()}"
    await publish(broker[0], b"\x0f not a job", garbage_id)
    dead = await broker[1].wait_for(garbage_id)
    assert dead.headers["x-notify-error"] == "undecodable"

    job = push_job("device-i")
    await publish(broker[0], job.SerializeToString(), job.meta.notification_id)
    await users.wait_status(job.meta.notification_id, DELIVERED)


async def test_redelivered_job_is_not_pushed_twice(
    start_worker: Callable[..., Awaitable[App]],
    broker: tuple[Publisher, DeadLetters],
    users: RecordingUsers,
    fcm: tuple[FcmFake, Path],
) -> None:
    await start_worker()
    job = push_job("device-j")
    nid = job.meta.notification_id
    await publish(broker[0], job.SerializeToString(), nid)
    await users.wait_status(nid, DELIVERED)
    await publish(broker[0], job.SerializeToString(), nid)

    updates = await users.wait_status(nid, DELIVERED, count=2)
    assert statuses(updates) == [SENDING, DELIVERED, DELIVERED]
    assert len(pushes_for(fcm[0], nid)) == 1


async def test_expired_job_is_not_pushed(
    start_worker: Callable[..., Awaitable[App]],
    broker: tuple[Publisher, DeadLetters],
    users: RecordingUsers,
    fcm: tuple[FcmFake, Path],
) -> None:
    app = await start_worker()
    job = push_job("device-k")
    job.meta.expire_time.CopyFrom(timestamp_pb2.Timestamp(seconds=1_600_000_000))
    nid = job.meta.notification_id
    await publish(broker[0], job.SerializeToString(), nid)

    updates = await users.wait_status(nid, EXPIRED)
    assert statuses(updates) == [EXPIRED]
    assert [a.status for a in await app.store.history(nid)] == ["EXPIRED"]
    assert pushes_for(fcm[0], nid) == []


# --- the FCM sender and the outcome rules ---------------------------------------------


async def test_fcm_sender_with_credentials_fcm_rejects_is_transient(
    fcm: tuple[FcmFake, Path], tmp_path: Path
) -> None:
    fake = fcm[0]
    stranger = FcmFake()
    await stranger.start("127.0.0.1", 0)
    info = json.loads(stranger.write_service_account(tmp_path / "other.json", PROJECT).read_text())
    await stranger.stop()
    info["token_uri"] = fake.token_url  # a key the fake never issued
    (tmp_path / "other.json").write_text(json.dumps(info))

    fcm_sender = FcmSender(tmp_path / "other.json", url=fake.url, timeout=2.0)
    try:
        with pytest.raises(TransientError):
            await fcm_sender.send(["device-x"], "t", "b", {})
    finally:
        await fcm_sender.close()


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (messaging.UnregisteredError("gone"), Outcome.UNREGISTERED),
        (exceptions.UnavailableError("down"), Outcome.TRANSIENT),
        (messaging.QuotaExceededError("slow down"), Outcome.TRANSIENT),
        (exceptions.DeadlineExceededError("slow"), Outcome.TRANSIENT),
        (exceptions.InvalidArgumentError("bad token"), Outcome.INVALID),
        (messaging.SenderIdMismatchError("not yours"), Outcome.INVALID),
    ],
)
def test_fcm_errors_are_classified(error: exceptions.FirebaseError, outcome: Outcome) -> None:
    result = sender._classify("tok", messaging.SendResponse(None, error))
    assert result.outcome is outcome


def result(*outcomes: Outcome) -> PushResult:
    return PushResult([TargetResult(f"t{i}", o, o.value) for i, o in enumerate(outcomes)])


def test_outcome_rules() -> None:
    delivered = consumer._judge(result(Outcome.DELIVERED, Outcome.TRANSIENT, Outcome.INVALID))
    assert delivered.startswith("1/3 devices:")
    with pytest.raises(TransientError):
        consumer._judge(result(Outcome.TRANSIENT, Outcome.UNREGISTERED))
    with pytest.raises(PermanentError):
        consumer._judge(result(Outcome.UNREGISTERED, Outcome.INVALID))


async def test_in_memory_sender_records_and_fails_as_told() -> None:
    memory = InMemoryPushSender(unregistered={"old"})
    memory.fail_next(1)
    failed = await memory.send(["a"], "t", "b", {})
    assert failed.of(Outcome.TRANSIENT)[0].token == "a"
    sent = await memory.send(["a", "old", "unregistered-1"], "t", "b", {"k": "v"})
    assert [r.outcome for r in sent.results] == [
        Outcome.DELIVERED,
        Outcome.UNREGISTERED,
        Outcome.UNREGISTERED,
    ]
    assert [(p.token, p.data) for p in memory.sent] == [("a", {"k": "v"})]


def test_config_from_env(certs_dir: Path, tmp_path: Path) -> None:
    env = {"NOTIFY_TLS_DIR": str(certs_dir)}
    with pytest.raises(SettingsError):
        Config.from_env(env)  # NOTIFY_FCM_CREDENTIALS is required
    with pytest.raises(SettingsError):
        Config.from_env({**env, "NOTIFY_FCM_CREDENTIALS": str(tmp_path / "absent.json")})
    credentials = tmp_path / "sa.json"
    credentials.write_text("{}")
    env["NOTIFY_FCM_CREDENTIALS"] = str(credentials)
    config = Config.from_env(env)
    assert config.common.listen == "127.0.0.1:50055"
    assert config.dsn == "postgresql://postgres@127.0.0.1:5432/notify_push"
    assert config.fcm == FcmConfig(credentials=credentials, url=DEFAULT_FCM_URL, timeout=10.0)
    assert config.topology == Topology(prefix="")
    with pytest.raises(SettingsError):
        Config.from_env({**env, "NOTIFY_FCM_URL": "http://127.0.0.1:8089/send"})
