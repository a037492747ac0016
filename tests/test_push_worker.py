"""The push worker against real RabbitMQ, PostgreSQL, firebase-admin (FcmFake) and mTLS gRPC.

The stand-in upstreams, the broker and ``start_worker`` are shared with the e-mail worker's
tests (``tests/worker_support.py``); what is here is the push worker's own.
The runner's guarantees (retries, dead letters, redeliveries, expiry, bugs) are tested
once, against a fake handler, in ``tests/test_jobs.py``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from firebase_admin import exceptions, messaging
from grpc_health.v1 import health_pb2
from notify.v1 import (
    common_pb2,
    jobs_pb2,
    template_service_pb2,
    template_service_pb2_grpc,
    user_service_pb2,
)

from notify_kit.amqp import PUSH, Topology
from notify_kit.errors import NotFound
from notify_kit.jobs.app import WorkerApp
from notify_kit.jobs.errors import PermanentError, TransientError
from notify_kit.settings import SettingsError, TlsSettings
from push_worker import app as push_app
from push_worker import consumer, sender
from push_worker.config import DEFAULT_FCM_URL, Config, FcmConfig
from push_worker.outgoing import Outcome, OutgoingPush, PushResult, Target, TargetKind, TargetResult
from push_worker.sender import FcmProvider
from scripts.fcm_fake import FcmFake
from tests import worker_support
from tests.worker_support import (
    DELIVERED,
    FAILED,
    RETRYING,
    SENDING,
    Broker,
    ConfigFields,
    RecordingUsers,
    health_status,
    job_meta,
    publish,
    statuses,
)

PROJECT = "notify-test"

# The shared fixtures, bound here so pytest finds them in this module.
users = worker_support.users
upstreams = worker_support.upstreams
topo = worker_support.own_topology("pw.")
config_fields = worker_support.config_fields
broker = worker_support.broker
start_worker = worker_support.start_worker


# User ids are UUIDs by the contract (RemoveDeviceToken checks them).
USER_1, USER_2, USER_3 = (str(uuid.UUID(int=n)) for n in (1, 2, 3))


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


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def templates() -> FixedTemplates:
    return FixedTemplates()  # type: ignore[abstract]


@pytest.fixture(scope="module")
async def fcm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[FcmFake, Path]]:
    """The FCM fake and a service account it trusts."""
    fake = FcmFake()
    await fake.start("127.0.0.1", 0)
    path = fake.write_service_account(tmp_path_factory.mktemp("fcm") / "sa.json", PROJECT)
    yield fake, path
    await fake.stop()


@pytest.fixture(scope="module")
async def config(
    config_fields: Callable[[str], Awaitable[ConfigFields]],
    fcm: tuple[FcmFake, Path],
) -> Config:
    fake, credentials = fcm
    return Config(
        **await config_fields("push_worker"),
        fcm=FcmConfig(credentials=credentials, url=fake.url, timeout=5.0),
    )


@pytest.fixture(scope="module")
def launch(config: Config) -> Callable[..., Awaitable[WorkerApp]]:
    """How ``start_worker`` starts this worker: real firebase-admin unless a ``sender`` is given."""
    return partial(push_app.start, config)


def push_job(
    *tokens: str,
    template: str = "welcome",
    user: str = USER_1,
    token_type: user_service_pb2.DeviceTokenType.ValueType = (
        user_service_pb2.DEVICE_TOKEN_TYPE_UNSPECIFIED
    ),
) -> jobs_pb2.PushJob:
    job = jobs_pb2.PushJob(
        meta=job_meta(user),
        targets=[
            jobs_pb2.PushTarget(
                device_id=f"dev-{i}",
                token=token,
                platform=user_service_pb2.DEVICE_PLATFORM_ANDROID,
                token_type=token_type,
            )
            for i, token in enumerate(tokens)
        ],
        template_id=template,
        language="en",
    )
    job.variables.update({"name": "Zoë"})
    return job


def pushes_for(fake: FcmFake, nid: str) -> list[dict[str, Any]]:
    return [m for m in fake.messages if m.get("data", {}).get("notification_id") == nid]


# --- the worker -----------------------------------------------------------------------


async def test_pushes_to_every_device_through_firebase_admin(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
    fcm: tuple[FcmFake, Path],
    tls_for: Callable[[str], TlsSettings],
) -> None:
    app = await start_worker()
    job = push_job("device-a", "device-b")
    nid = job.meta.notification_id
    await publish(broker[0], PUSH, job.SerializeToString(), nid)

    updates = await users.wait_status(nid, DELIVERED)
    assert statuses(updates) == [SENDING, DELIVERED]
    assert {u.channel for u in updates} == {common_pb2.CHANNEL_PUSH}
    assert updates[-1].detail.startswith("fcm: 2/2 devices: projects/notify-test/messages/")

    pushes = pushes_for(fcm[0], nid)
    assert sorted(p["token"] for p in pushes) == ["device-a", "device-b"]
    assert pushes[0]["notification"] == {"title": "Hi Zoë", "body": "You have a new message"}
    assert [(a.attempt, a.status) for a in await app.store.history(nid)] == [(1, "DELIVERED")]

    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health_status(app.port, tls_for("operator")) == serving


async def test_installation_ids_are_sent_as_fid(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
    fcm: tuple[FcmFake, Path],
) -> None:
    await start_worker()
    fid = "cAbCdEfGhIjKlMnOpQrStU"
    job = push_job(fid, token_type=user_service_pb2.DEVICE_TOKEN_TYPE_FCM_INSTALLATION)
    nid = job.meta.notification_id
    await publish(broker[0], PUSH, job.SerializeToString(), nid)
    await users.wait_status(nid, DELIVERED)
    assert [p.get("fid") for p in pushes_for(fcm[0], nid)] == [fid]

    # The same ID registered as a registration token is refused by FCM: never delivered.
    wrong = push_job(fid)
    await publish(broker[0], PUSH, wrong.SerializeToString(), wrong.meta.notification_id)
    updates = await users.wait_status(wrong.meta.notification_id, FAILED)
    assert "installation ID belongs in message.fid" in updates[-1].detail


async def test_unregistered_token_is_removed_and_the_rest_delivered(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
    fcm: tuple[FcmFake, Path],
) -> None:
    await start_worker()
    job = push_job("device-c", "unregistered-d", user=USER_2)
    nid = job.meta.notification_id
    await publish(broker[0], PUSH, job.SerializeToString(), nid)

    updates = await users.wait_status(nid, DELIVERED)
    assert updates[-1].detail.startswith("fcm: 1/2 devices:")
    assert (USER_2, "unregistered-d") in users.removed
    assert [p["token"] for p in pushes_for(fcm[0], nid)] == ["device-c"]


async def test_only_dead_tokens_fail_permanently(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
) -> None:
    await start_worker()
    job = push_job("unregistered-e", user=USER_3)
    nid = job.meta.notification_id
    await publish(broker[0], PUSH, job.SerializeToString(), nid)

    updates = await users.wait_status(nid, FAILED)
    assert statuses(updates) == [SENDING, FAILED]
    assert (USER_3, "unregistered-e") in users.removed
    dead = await broker[1].wait_for(nid)
    assert dead.headers["x-notify-kind"] == "push"
    assert jobs_pb2.PushJob.FromString(dead.body) == job


async def test_throttled_push_is_retried_then_delivered(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
    fcm: tuple[FcmFake, Path],
) -> None:
    # FCM's 429 through firebase-admin is transient (the retry itself is the runner's,
    # tested in test_jobs). 429 rather than 503: firebase-admin retries 500/503 itself
    # for ~7 s before giving up.
    await start_worker()
    fcm[0].fail_next(1, 429)
    job = push_job("device-f")
    nid = job.meta.notification_id
    await publish(broker[0], PUSH, job.SerializeToString(), nid)

    updates = await users.wait_status(nid, DELIVERED)
    assert statuses(updates) == [SENDING, RETRYING, SENDING, DELIVERED]
    assert len(pushes_for(fcm[0], nid)) == 1


@pytest.mark.parametrize(("tokens", "template"), [((), "welcome"), (("device-h",), "missing")])
async def test_no_devices_or_unknown_template_fail_permanently(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
    tokens: tuple[str, ...],
    template: str,
) -> None:
    await start_worker()
    job = push_job(*tokens, template=template)
    nid = job.meta.notification_id
    await publish(broker[0], PUSH, job.SerializeToString(), nid)

    updates = await users.wait_status(nid, FAILED)
    assert statuses(updates) == [SENDING, FAILED]
    await broker[1].wait_for(nid)


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

    fcm_sender = FcmProvider(tmp_path / "other.json", url=fake.url, timeout=2.0)
    try:
        with pytest.raises(TransientError):
            await fcm_sender.send(push_of("device-x"))
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


def push_of(*addresses: str, kind: TargetKind = TargetKind.FCM_TOKEN) -> OutgoingPush:
    return OutgoingPush(
        str(uuid.uuid4()), USER_1, tuple(Target(a, kind) for a in addresses), "t", "b", {"k": "v"}
    )


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
    assert config.worker.topology == Topology(prefix="")
    assert config.providers == ("fcm",) and config.onesignal is None
    onesignal = {**env, "NOTIFY_ONESIGNAL_APP_ID": "app", "NOTIFY_ONESIGNAL_API_KEY": "k"}
    assert Config.from_env(onesignal).providers == ("fcm", "onesignal")
    with pytest.raises(SettingsError):
        Config.from_env({**env, "NOTIFY_ONESIGNAL_APP_ID": "app"})  # the key goes with it
    with pytest.raises(SettingsError):
        Config.from_env({**env, "NOTIFY_FCM_URL": "http://127.0.0.1:8089/send"})
