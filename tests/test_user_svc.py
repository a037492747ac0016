"""UserService against real PostgreSQL and Redis, called over mTLS as the mesh would.

The service runs in-process on port 0; calls go through a real channel with the
gateway's certificate (or a worker's, for the access-control checks). Assertions look
at status codes and ErrorInfo reasons, never at message text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from notify.v1 import common_pb2, delivery_service_pb2_grpc, user_service_pb2, user_service_pb2_grpc

import user_svc.app
from email_worker import mime
from gateway.records import RecordWriter
from notify_kit import db
from notify_kit.acl import SERVICE_KEY_HEADER
from notify_kit.errors import InvalidArgument, NotFound, error_info, field_violations
from notify_kit.kv import redis_client
from notify_kit.profiles import profile_key
from notify_kit.rpc import secure_channel
from notify_kit.settings import CommonSettings, SettingsError, TlsSettings
from notify_kit.status import aggregate_status
from notify_kit.tls import channel_credentials
from scripts.system import poll
from user_svc.app import App
from user_svc.cache import ProfileCache
from user_svc.config import Config
from user_svc.store import NewDelivery, NewNotification, NewUser, StatusReport, UserStore

if TYPE_CHECKING:
    # The async stub types exist for type checkers only.
    from notify.v1.delivery_service_pb2_grpc import DeliveryServiceAsyncStub
    from notify.v1.user_service_pb2_grpc import UserServiceAsyncStub

pb = user_service_pb2
TIMEOUT = 5.0
S = common_pb2


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
async def user_dsn(database: Callable[[str], Awaitable[str]]) -> str:
    """The service's own database for this module."""
    return await database("user_svc")


@pytest.fixture(scope="module")
async def user_app(
    user_dsn: str, redis_url: str, common_for: Callable[[str], CommonSettings]
) -> AsyncIterator[App]:
    """user_svc running in-process on an ephemeral port."""
    app = await App.start(Config(common=common_for("user_svc"), dsn=user_dsn, redis_url=redis_url))
    yield app
    await app.stop()


async def _connect(port: int, tls: TlsSettings) -> grpc.aio.Channel:
    channel = secure_channel(f"127.0.0.1:{port}", tls)
    await asyncio.wait_for(channel.channel_ready(), TIMEOUT)
    return channel


class Stub:
    """user_svc's two services on one channel: the public UserService and the internal
    DeliveryService (records, status reports, profiles, dead tokens)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        # grpc has no type information, so the stubs' overloads cannot pick the async one.
        self.users = cast("UserServiceAsyncStub", user_service_pb2_grpc.UserServiceStub(channel))
        self.delivery = cast(
            "DeliveryServiceAsyncStub", delivery_service_pb2_grpc.DeliveryServiceStub(channel)
        )


def _stub(channel: grpc.aio.Channel) -> Stub:
    return Stub(channel)


@pytest.fixture(scope="module")
async def gateway(user_app: App, tls_for: Callable[[str], TlsSettings]) -> AsyncIterator[Stub]:
    """A stub calling as the gateway (public methods, records, its own status reports)."""
    channel = await _connect(user_app.port, tls_for("gateway"))
    yield _stub(channel)
    await channel.close()


@pytest.fixture(scope="module")
async def push_worker(user_app: App, tls_for: Callable[[str], TlsSettings]) -> AsyncIterator[Stub]:
    """A stub calling as the push worker (batched status reports, dead device tokens)."""
    channel = await _connect(user_app.port, tls_for("push_worker"))
    yield _stub(channel)
    await channel.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the suite's Redis database, to look at what the service cached."""
    client = redis_client(redis_url)
    yield client
    await client.aclose(close_connection_pool=True)


# ---------------------------------------------------------------------------- helpers


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error a call fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def reason(err: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call."""
    found: str = error_info(err.trailing_metadata()).reason
    return found


def violated_fields(err: grpc.aio.AioRpcError) -> set[str]:
    """The fields named by the BadRequest detail of a failed call."""
    return {field for field, _ in field_violations(err.trailing_metadata())}


def unique_email() -> str:
    return f"u{uuid.uuid4().hex}@example.com"


async def create_user(stub: Stub, **fields: Any) -> pb.User:
    fields.setdefault("email", unique_email())
    request = pb.CreateUserRequest(user=pb.User(**fields))
    response: pb.CreateUserResponse = await stub.users.CreateUser(request, timeout=TIMEOUT)
    return response.user


def android(token: str) -> pb.Device:
    return pb.Device(platform=pb.DEVICE_PLATFORM_ANDROID, token=token)


async def register(stub: Stub, user_id: str, token: str) -> pb.Device:
    response: pb.RegisterDeviceResponse = await stub.users.RegisterDevice(
        pb.RegisterDeviceRequest(user_id=user_id, device=android(token)), timeout=TIMEOUT
    )
    return response.device


async def profile(stub: Stub, user_id: str) -> pb.DeliveryProfile:
    response: pb.GetDeliveryProfileResponse = await stub.delivery.GetDeliveryProfile(
        pb.GetDeliveryProfileRequest(user_id=user_id), timeout=TIMEOUT
    )
    return response.profile


def notification(
    user_id: str, *channels: common_pb2.Channel.ValueType, template_id: str = "welcome"
) -> common_pb2.Notification:
    return common_pb2.Notification(
        id=str(uuid.uuid4()),
        user_id=user_id,
        template_id=template_id,
        deliveries=[common_pb2.Delivery(channel=c) for c in channels or (S.CHANNEL_EMAIL,)],
    )


async def record(stub: Stub, note: common_pb2.Notification) -> common_pb2.Notification:
    response: pb.CreateNotificationRecordResponse = await stub.delivery.CreateNotificationRecord(
        pb.CreateNotificationRecordRequest(notification=note), timeout=TIMEOUT
    )
    return response.notification


def delivered_report(notification_id: str) -> pb.UpdateDeliveryStatusesRequest:
    """A worker's batch of one report: the e-mail of ``notification_id`` was delivered."""
    return pb.UpdateDeliveryStatusesRequest(
        reports=[
            pb.UpdateDeliveryStatusRequest(
                notification_id=notification_id,
                channel=S.CHANNEL_EMAIL,
                status=S.NOTIFICATION_STATUS_DELIVERED,
                attempt=1,
            )
        ]
    )


async def report(
    stub: Stub,
    notification_id: str,
    status: common_pb2.NotificationStatus.ValueType,
    *,
    attempt: int = 1,
    detail: str = "",
    channel: common_pb2.Channel.ValueType = S.CHANNEL_EMAIL,
) -> common_pb2.Delivery:
    response: pb.UpdateDeliveryStatusResponse = await stub.delivery.UpdateDeliveryStatus(
        pb.UpdateDeliveryStatusRequest(
            notification_id=notification_id,
            channel=channel,
            status=status,
            detail=detail,
            attempt=attempt,
        ),
        timeout=TIMEOUT,
    )
    return response.delivery


# -------------------------------------------------------------------------- users


async def test_create_and_get_user_with_defaults(gateway: Stub) -> None:
    created = await create_user(gateway, display_name="Zoë 👩‍💻", locale="fr-CA")
    assert uuid.UUID(created.id)
    assert (created.locale, created.timezone) == ("fr-CA", "UTC")
    assert not created.preferences.email_opt_out and not created.preferences.push_opt_out
    assert created.create_time.seconds > 0

    got = (await gateway.users.GetUser(pb.GetUserRequest(id=created.id), timeout=TIMEOUT)).user
    assert got == created

    plain = await create_user(gateway, timezone="Europe/Paris")
    assert (plain.locale, plain.timezone) == ("en", "Europe/Paris")


async def test_email_is_unique_regardless_of_case(gateway: Stub) -> None:
    email = unique_email()
    await create_user(gateway, email=email)
    err = await failure(create_user(gateway, email=email.upper()))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reason(err) == "EMAIL_TAKEN"


@pytest.mark.parametrize(
    ("fields", "field", "expected"),
    [
        ({"email": "victim@example.com\r\nBcc: all@example.com"}, "user.email", "INVALID_USER"),
        ({"email": ""}, "user.email", "INVALID_REQUEST"),
        ({"email": "no-at-sign.example.com"}, "user.email", "INVALID_USER"),
        ({"email": "a@b@example.com"}, "user.email", "INVALID_USER"),
        ({"email": "@example.com"}, "user.email", "INVALID_USER"),
        ({"email": "x" * 250 + "@example.com"}, "user.email", "INVALID_REQUEST"),
        ({"email": "zero\u200bwidth@example.com"}, "user.email", "INVALID_USER"),
        ({"display_name": "Mallory\r\nSubject: hi"}, "user.display_name", "INVALID_USER"),
        ({"display_name": "n" * 201}, "user.display_name", "INVALID_REQUEST"),
        ({"locale": "english please"}, "user.locale", "INVALID_REQUEST"),
        ({"timezone": "Mars/Olympus_Mons"}, "user.timezone", "INVALID_USER"),
        ({"timezone": "../../etc/passwd"}, "user.timezone", "INVALID_USER"),
    ],
)
async def test_invalid_user_is_rejected_with_its_field(
    gateway: Stub, fields: dict[str, str], field: str, expected: str
) -> None:
    """The contract's field rules answer INVALID_REQUEST, user_svc's own INVALID_USER."""
    user = pb.User(email=unique_email())
    for name, value in fields.items():
        setattr(user, name, value)
    err = await failure(gateway.users.CreateUser(pb.CreateUserRequest(user=user)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(err) == expected
    assert violated_fields(err) == {field}


# Addresses and whether they can be a user's: accepted only if the e-mail worker can send
# to them (notify_kit.formats.email_address_problem is the one rule both apply). Accepted
# ones differ case-insensitively, since each becomes a user of this module's database.
_LONGEST_DOMAIN = "d" * 63 + "." + "e" * 63 + "." + "f" * 57 + ".com"  # 189 characters
TRICKY_ADDRESSES = [
    ("plain@example.com", True),
    ("o'brien+tag@sub.example.co.uk", True),
    ("Mixed.Case@Example.COM", True),
    ("!#$%&'*+/?=^_`{|}~-@example.com", True),  # all of atext, "=?" excepted
    ("user@xn--e1afmkfd.xn--p1ai", True),  # an IDN in its A-label form
    ("l" * 64 + "@example.com", True),
    ("m" * 64 + "@" + _LONGEST_DOMAIN, True),  # 254 in all
    ("n" * 64 + "@g" + _LONGEST_DOMAIN, False),  # 255
    ("o" * 65 + "@example.com", False),
    ("user@" + "l" * 64 + ".com", False),  # a 64-character label
    ("victim@example.com, evil@example.com", False),
    ("victim@example.com,evil@example.com", False),
    ("Evil <evil@example.com>", False),
    ("<evil@example.com>", False),
    ("evil@example.com>", False),
    ("evil(comment)@example.com", False),
    ("evil@example.com(comment)", False),
    ("evil@(comment)example.com", False),
    ('"quoted"@example.com', False),
    ('"a b"@example.com', False),
    ('"a@b"@example.com', False),
    ("a..b@example.com", False),
    (".lead@example.com", False),
    ("trail.@example.com", False),
    (" space@example.com", False),
    ("space@example.com ", False),
    ("tab\t@example.com", False),
    ("nb\u00a0sp@example.com", False),
    ("zero\u200bwidth@example.com", False),
    ("bidi\u202e@example.com", False),
    ("victim@example.com\r\nBcc: all@example.com", False),
    ("lf\n@example.com", False),
    ("nul\x00@example.com", False),
    ("=?utf-8?q?=0D=0A?=@example.com", False),
    ("semi;colon@example.com", False),
    ("colon:group@example.com", False),
    ("back\\slash@example.com", False),
    ("zoë@example.com", False),
    ("user@пример.рф", False),  # an IDN in Unicode form: both refuse it alike
    ("user@xn--zz.com", False),  # not Punycode
    ("user@[192.0.2.1]", False),
    ("user@localhost", False),
    ("user@-bad.example.com", False),
    ("user@bad-.example.com", False),
    ("user@example..com", False),
    ("user@example.com.", False),
    ("user@exa_mple.com", False),
    ("user@example.c0m", False),
    ("a@b@example.com", False),
]


def builder_accepts(address: str) -> bool:
    """Whether the e-mail worker's MIME builder sends to ``address``, read back parsed."""
    try:
        raw = mime.build_message(
            from_header="n@example.com",
            to_address=address,
            to_name="Ann",
            subject="Hi",
            text_body="x",
            html_body="",
            notification_id="n1",
        )
    except mime.MessageError:
        return False
    to = email.message_from_bytes(raw, policy=email.policy.default)["To"]
    assert [a.addr_spec for a in to.addresses] == [address]
    return True


@pytest.mark.parametrize(("address", "sendable"), TRICKY_ADDRESSES)
async def test_user_svc_accepts_exactly_the_addresses_the_email_builder_sends_to(
    gateway: Stub, address: str, sendable: bool
) -> None:
    """A user created with an address no e-mail can ever reach would be a broken promise."""
    assert builder_accepts(address) is sendable
    request = pb.CreateUserRequest(user=pb.User(email=address))
    if sendable:
        created = (await gateway.users.CreateUser(request, timeout=TIMEOUT)).user
        assert created.email == address
    else:
        err = await failure(gateway.users.CreateUser(request, timeout=TIMEOUT))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(err) == {"user.email"}


@pytest.mark.parametrize(
    "call",
    [
        lambda s, uid: s.users.GetUser(pb.GetUserRequest(id=uid)),
        lambda s, uid: s.delivery.GetDeliveryProfile(pb.GetDeliveryProfileRequest(user_id=uid)),
        lambda s, uid: s.users.UpdatePreferences(pb.UpdatePreferencesRequest(user_id=uid)),
        lambda s, uid: s.users.RegisterDevice(
            pb.RegisterDeviceRequest(user_id=uid, device=android(uuid.uuid4().hex))
        ),
        lambda s, uid: s.users.DeleteDevice(
            pb.DeleteDeviceRequest(user_id=uid, device_id=str(uuid.uuid4()))
        ),
        lambda s, uid: s.delivery.CreateNotificationRecord(
            pb.CreateNotificationRecordRequest(notification=notification(uid))
        ),
        lambda s, uid: s.delivery.ListNotificationRecords(
            pb.ListNotificationRecordsRequest(user_id=uid)
        ),
    ],
    ids=["get", "profile", "preferences", "device", "delete", "record", "list"],
)
async def test_unknown_user_is_not_found(
    gateway: Stub, call: Callable[[Stub, str], Awaitable[Any]]
) -> None:
    err = await failure(call(gateway, str(uuid.uuid4())))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert reason(err) == "USER_NOT_FOUND"


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.users.GetUser(pb.GetUserRequest(id="42")),
        lambda s: s.users.GetUser(pb.GetUserRequest(id="")),
        lambda s: s.delivery.GetDeliveryProfile(pb.GetDeliveryProfileRequest(user_id="not-a-uuid")),
        lambda s: s.delivery.GetNotificationRecord(
            pb.GetNotificationRecordRequest(id="'; DROP TABLE")
        ),
        lambda s: s.users.DeleteDevice(
            pb.DeleteDeviceRequest(user_id=str(uuid.uuid4()), device_id="{" + "0" * 32 + "}")
        ),
        lambda s: s.delivery.UpdateDeliveryStatus(
            pb.UpdateDeliveryStatusRequest(
                notification_id="x", channel=S.CHANNEL_EMAIL, status=S.NOTIFICATION_STATUS_QUEUED
            )
        ),
    ],
)
async def test_malformed_id_is_invalid(
    gateway: Stub, call: Callable[[Stub], Awaitable[Any]]
) -> None:
    err = await failure(call(gateway))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(err) == "INVALID_REQUEST"  # the contract's string.uuid rule


async def test_update_preferences_replaces_them(gateway: Stub) -> None:
    user = await create_user(gateway)
    response = await gateway.users.UpdatePreferences(
        pb.UpdatePreferencesRequest(
            user_id=user.id, preferences=pb.Preferences(email_opt_out=True)
        ),
        timeout=TIMEOUT,
    )
    assert response.preferences == pb.Preferences(email_opt_out=True, push_opt_out=False)
    got = (await gateway.users.GetUser(pb.GetUserRequest(id=user.id), timeout=TIMEOUT)).user
    assert got.preferences == response.preferences


# ------------------------------------------------------------------------ devices


async def test_register_device_is_idempotent_per_token_and_moves_between_users(
    gateway: Stub,
) -> None:
    alice = await create_user(gateway)
    bob = await create_user(gateway)
    token = f"fcm:{uuid.uuid4().hex}"

    first = await register(gateway, alice.id, token)
    again = await register(gateway, alice.id, token)
    assert again == first
    assert [d.token for d in (await profile(gateway, alice.id)).devices] == [token]

    moved = await register(gateway, bob.id, token)
    assert moved.id == first.id
    assert [d.id for d in (await profile(gateway, bob.id)).devices] == [first.id]
    # Alice's profile was cached above; the move must have invalidated it too.
    assert list((await profile(gateway, alice.id)).devices) == []


@pytest.mark.parametrize(
    ("device", "field"),
    [
        (pb.Device(token="abc"), "device.platform"),
        (pb.Device(platform=pb.DEVICE_PLATFORM_IOS), "device.token"),
        (pb.Device(platform=pb.DEVICE_PLATFORM_IOS, token="abc\ndef"), "device.token"),
        (pb.Device(platform=pb.DEVICE_PLATFORM_IOS, token="é"), "device.token"),
        (pb.Device(platform=pb.DEVICE_PLATFORM_WEB, token="t" * 4097), "device.token"),
    ],
)
async def test_invalid_device_is_rejected(gateway: Stub, device: pb.Device, field: str) -> None:
    user = await create_user(gateway)
    err = await failure(
        gateway.users.RegisterDevice(pb.RegisterDeviceRequest(user_id=user.id, device=device))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(err) == "INVALID_REQUEST"  # the contract's rules on Device
    assert violated_fields(err) == {field}


async def test_delete_device(gateway: Stub) -> None:
    user = await create_user(gateway)
    device = await register(gateway, user.id, uuid.uuid4().hex)
    request = pb.DeleteDeviceRequest(user_id=user.id, device_id=device.id)
    await gateway.users.DeleteDevice(request, timeout=TIMEOUT)
    got = (await gateway.users.GetUser(pb.GetUserRequest(id=user.id), timeout=TIMEOUT)).user
    assert list(got.devices) == []

    err = await failure(gateway.users.DeleteDevice(request))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert reason(err) == "DEVICE_NOT_FOUND"


# ------------------------------------------------------------------ profile cache


async def test_profile_is_cached_and_invalidated_on_every_change(
    gateway: Stub, push_worker: Stub, redis: aioredis.Redis, user_dsn: str
) -> None:
    user = await create_user(gateway, display_name="Ann")
    first = await profile(gateway, user.id)
    assert (first.user_id, first.email, first.display_name) == (user.id, user.email, "Ann")
    assert 0 < await redis.ttl(profile_key(user.id)) <= 300

    # Served from Redis: a change made behind the service's back is not seen...
    conn = await asyncpg.connect(user_dsn, timeout=TIMEOUT)
    try:
        await conn.execute("UPDATE users SET display_name = 'Changed' WHERE id = $1", user.id)
    finally:
        await conn.close()
    assert (await profile(gateway, user.id)).display_name == "Ann"

    # ...but every change through the service is seen at once.
    device = await register(gateway, user.id, uuid.uuid4().hex)
    assert await redis.exists(profile_key(user.id)) == 0
    fresh = await profile(gateway, user.id)
    assert fresh.display_name == "Changed"
    assert [d.id for d in fresh.devices] == [device.id]

    await gateway.users.UpdatePreferences(
        pb.UpdatePreferencesRequest(user_id=user.id, preferences=pb.Preferences(push_opt_out=True)),
        timeout=TIMEOUT,
    )
    assert (await profile(gateway, user.id)).preferences.push_opt_out

    removed = await push_worker.delivery.RemoveDeviceToken(
        pb.RemoveDeviceTokenRequest(user_id=user.id, token=device.token), timeout=TIMEOUT
    )
    assert removed.removed == 1
    assert list((await profile(gateway, user.id)).devices) == []
    again = await push_worker.delivery.RemoveDeviceToken(
        pb.RemoveDeviceTokenRequest(user_id=user.id, token=device.token), timeout=TIMEOUT
    )
    assert again.removed == 0

    other = await register(gateway, user.id, uuid.uuid4().hex)
    assert len((await profile(gateway, user.id)).devices) == 1
    await gateway.users.DeleteDevice(
        pb.DeleteDeviceRequest(user_id=user.id, device_id=other.id), timeout=TIMEOUT
    )
    assert list((await profile(gateway, user.id)).devices) == []


async def test_fill_is_skipped_when_the_user_changed_during_the_read(
    redis: aioredis.Redis,
) -> None:
    cache = ProfileCache(redis, ttl=60)
    user_id = str(uuid.uuid4())
    stale = pb.DeliveryProfile(user_id=user_id, email="old@example.com")

    before = await cache.lookup(user_id)
    assert before.profile is None and before.generation is not None
    await cache.invalidate(user_id)  # a writer committed while we read the database
    assert not await cache.fill(user_id, stale, before.generation)
    assert await redis.exists(profile_key(user_id)) == 0

    now = await cache.lookup(user_id)
    assert now.generation is not None
    assert await cache.fill(user_id, stale, now.generation)
    assert (await cache.lookup(user_id)).profile == stale


async def test_redis_outage_falls_back_to_the_database(
    database: Callable[[str], Awaitable[str]],
    common_for: Callable[[str], CommonSettings],
    tls_for: Callable[[str], TlsSettings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = Config(
        common=common_for("user_svc"),
        dsn=await database("user_svc_no_redis"),
        redis_url="redis://127.0.0.1:1/0",  # nothing listens there
    )
    app = await App.start(config)
    try:
        channel = await _connect(app.port, tls_for("gateway"))
        async with channel:
            stub = _stub(channel)
            with caplog.at_level(logging.WARNING, logger="user_svc.cache"):
                user = await create_user(stub)
                device = await register(stub, user.id, uuid.uuid4().hex)
                got = await profile(stub, user.id)
            assert [d.id for d in got.devices] == [device.id]
            assert any(r.name == "user_svc.cache" for r in caplog.records)
    finally:
        await app.stop()


async def test_failed_start_releases_what_it_opened(
    user_app: App,
    database: Callable[[str], Awaitable[str]],
    common_for: Callable[[str], CommonSettings],
    redis_url: str,
) -> None:
    dsn = await database("user_svc_failed_start")
    busy = dataclasses.replace(common_for("user_svc"), listen=f"127.0.0.1:{user_app.port}")
    with pytest.raises(RuntimeError):
        await App.start(Config(common=busy, dsn=dsn, redis_url=redis_url))
    conn = await asyncpg.connect(dsn, timeout=TIMEOUT)
    try:
        open_connections = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'user_svc'"
        )
    finally:
        await conn.close()
    assert open_connections == 0


# ---------------------------------------------------------- notification records


async def test_create_notification_record_is_idempotent(gateway: Stub) -> None:
    user = await create_user(gateway)
    note = notification(user.id, S.CHANNEL_EMAIL, S.CHANNEL_PUSH)
    note.deliveries[1].status = S.NOTIFICATION_STATUS_SUPPRESSED
    note.deliveries[1].detail = "push_opt_out"
    response = await gateway.delivery.CreateNotificationRecord(
        pb.CreateNotificationRecordRequest(notification=note),
        metadata=(("x-correlation-id", "corr-idem-1"),),
        timeout=TIMEOUT,
    )
    stored = response.notification
    assert (stored.id, stored.user_id, stored.template_id) == (note.id, user.id, "welcome")
    assert stored.correlation_id == "corr-idem-1"
    assert stored.status == S.NOTIFICATION_STATUS_ACCEPTED
    assert [(d.channel, d.status) for d in stored.deliveries] == [
        (S.CHANNEL_EMAIL, S.NOTIFICATION_STATUS_ACCEPTED),
        (S.CHANNEL_PUSH, S.NOTIFICATION_STATUS_SUPPRESSED),
    ]

    await report(gateway, note.id, S.NOTIFICATION_STATUS_QUEUED)
    retry = common_pb2.Notification()
    retry.CopyFrom(note)
    retry.template_id = "something-else"
    del retry.deliveries[1]
    again = await record(gateway, retry)
    # The first record wins, deliveries are neither duplicated nor reset.
    assert again.template_id == "welcome"
    assert [(d.channel, d.status) for d in again.deliveries] == [
        (S.CHANNEL_EMAIL, S.NOTIFICATION_STATUS_QUEUED),
        (S.CHANNEL_PUSH, S.NOTIFICATION_STATUS_SUPPRESSED),
    ]
    got = await gateway.delivery.GetNotificationRecord(
        pb.GetNotificationRecordRequest(id=note.id), timeout=TIMEOUT
    )
    assert got.notification == again


@pytest.mark.parametrize(
    ("mutate", "field", "expected"),
    [
        (lambda n: n.ClearField("deliveries"), "notification.deliveries", "INVALID_REQUEST"),
        (lambda n: setattr(n, "template_id", ""), "notification.template_id", "INVALID_REQUEST"),
        (
            lambda n: setattr(n, "template_id", "t" * 64),
            "notification.template_id",
            "INVALID_REQUEST",
        ),
        (
            lambda n: n.deliveries.add(channel=S.CHANNEL_EMAIL),
            "notification.deliveries[1].channel",
            "INVALID_NOTIFICATION",
        ),
        (lambda n: n.deliveries.add(), "notification.deliveries[1].channel", "INVALID_REQUEST"),
        (
            lambda n: setattr(n, "correlation_id", "a b"),
            "notification.correlation_id",
            "INVALID_REQUEST",
        ),
    ],
)
async def test_invalid_notification_record_is_rejected(
    gateway: Stub,
    mutate: Callable[[common_pb2.Notification], None],
    field: str,
    expected: str,
) -> None:
    """A template id is 63 characters here as at the gateway: one rule, in the contract."""
    user = await create_user(gateway)
    note = notification(user.id)
    mutate(note)
    err = await failure(
        gateway.delivery.CreateNotificationRecord(
            pb.CreateNotificationRecordRequest(notification=note)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(err) == expected
    assert violated_fields(err) == {field}


async def test_unknown_notification_is_not_found(gateway: Stub) -> None:
    err = await failure(
        gateway.delivery.GetNotificationRecord(
            pb.GetNotificationRecordRequest(id=str(uuid.uuid4()))
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert reason(err) == "NOTIFICATION_NOT_FOUND"


async def test_terminal_status_is_never_overwritten(gateway: Stub) -> None:
    user = await create_user(gateway)
    note = await record(gateway, notification(user.id, S.CHANNEL_EMAIL, S.CHANNEL_PUSH))

    sending = await report(gateway, note.id, S.NOTIFICATION_STATUS_SENDING, attempt=1)
    assert (sending.status, sending.attempts) == (S.NOTIFICATION_STATUS_SENDING, 1)
    delivered = await report(
        gateway, note.id, S.NOTIFICATION_STATUS_DELIVERED, attempt=1, detail="msg-1"
    )
    assert delivered.status == S.NOTIFICATION_STATUS_DELIVERED

    late = await report(gateway, note.id, S.NOTIFICATION_STATUS_SENDING, attempt=2, detail="x")
    assert late == delivered
    failed = await report(gateway, note.id, S.NOTIFICATION_STATUS_FAILED, attempt=3)
    assert failed == delivered

    # Push is still in flight, so the notification reports it; then both are terminal.
    stored = await gateway.delivery.GetNotificationRecord(
        pb.GetNotificationRecordRequest(id=note.id), timeout=TIMEOUT
    )
    assert stored.notification.status == S.NOTIFICATION_STATUS_ACCEPTED
    await report(gateway, note.id, S.NOTIFICATION_STATUS_FAILED, channel=S.CHANNEL_PUSH)
    stored = await gateway.delivery.GetNotificationRecord(
        pb.GetNotificationRecordRequest(id=note.id), timeout=TIMEOUT
    )
    assert stored.notification.status == S.NOTIFICATION_STATUS_DELIVERED
    assert stored.notification.deliveries[0] == delivered


async def test_late_queued_report_does_not_undo_a_worker(gateway: Stub) -> None:
    user = await create_user(gateway)
    note = await record(gateway, notification(user.id))
    queued = await report(gateway, note.id, S.NOTIFICATION_STATUS_QUEUED)
    assert queued.status == S.NOTIFICATION_STATUS_QUEUED
    await report(gateway, note.id, S.NOTIFICATION_STATUS_SENDING, attempt=1)
    late = await report(gateway, note.id, S.NOTIFICATION_STATUS_QUEUED)
    assert late.status == S.NOTIFICATION_STATUS_SENDING


async def test_attempts_only_grow(gateway: Stub) -> None:
    user = await create_user(gateway)
    note = await record(gateway, notification(user.id))
    await report(gateway, note.id, S.NOTIFICATION_STATUS_RETRYING, attempt=3)
    late = await report(gateway, note.id, S.NOTIFICATION_STATUS_SENDING, attempt=2)
    assert (late.status, late.attempts) == (S.NOTIFICATION_STATUS_SENDING, 3)


async def test_update_of_unknown_delivery_is_not_found(gateway: Stub) -> None:
    user = await create_user(gateway)
    note = await record(gateway, notification(user.id, S.CHANNEL_EMAIL))
    for notification_id, channel in (
        (note.id, S.CHANNEL_PUSH),
        (str(uuid.uuid4()), S.CHANNEL_EMAIL),
    ):
        err = await failure(
            report(gateway, notification_id, S.NOTIFICATION_STATUS_SENDING, channel=channel)
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert reason(err) == "DELIVERY_NOT_FOUND"


async def test_a_batch_of_reports_applies_each_in_order(gateway: Stub, push_worker: Stub) -> None:
    """UpdateDeliveryStatuses: what UpdateDeliveryStatus does, report by report."""
    user = await create_user(gateway)
    first = await record(gateway, notification(user.id))
    second = await record(gateway, notification(user.id))
    await report(gateway, second.id, S.NOTIFICATION_STATUS_DELIVERED)  # already terminal

    def one(
        nid: str, status: common_pb2.NotificationStatus.ValueType
    ) -> pb.UpdateDeliveryStatusRequest:
        return pb.UpdateDeliveryStatusRequest(
            notification_id=nid, channel=S.CHANNEL_EMAIL, status=status, attempt=1
        )

    response = await push_worker.delivery.UpdateDeliveryStatuses(
        pb.UpdateDeliveryStatusesRequest(
            reports=[
                one(first.id, S.NOTIFICATION_STATUS_SENDING),
                one(first.id, S.NOTIFICATION_STATUS_DELIVERED),  # after SENDING: wins
                one(str(uuid.uuid4()), S.NOTIFICATION_STATUS_DELIVERED),  # no such delivery
                one(second.id, S.NOTIFICATION_STATUS_FAILED),  # a terminal one stays
            ]
        ),
        timeout=TIMEOUT,
    )
    assert [(r.found, r.delivery.status) for r in response.results] == [
        (True, S.NOTIFICATION_STATUS_SENDING),
        (True, S.NOTIFICATION_STATUS_DELIVERED),
        (False, S.NOTIFICATION_STATUS_UNSPECIFIED),
        (True, S.NOTIFICATION_STATUS_DELIVERED),
    ]
    got = await gateway.delivery.GetNotificationRecord(
        pb.GetNotificationRecordRequest(id=first.id), timeout=TIMEOUT
    )
    assert got.notification.deliveries[0].status == S.NOTIFICATION_STATUS_DELIVERED


async def test_a_batch_applied_in_one_statement_answers_each_report_in_its_place(
    gateway: Stub, push_worker: Stub
) -> None:
    """Reports to distinct deliveries go in one statement, in key order: each answer must
    still land in its report's place, and a delivery reported twice changes twice."""
    user = await create_user(gateway)
    notes = [await record(gateway, notification(user.id)) for _ in range(8)]
    reports = [
        pb.UpdateDeliveryStatusRequest(
            notification_id=n.id,
            channel=S.CHANNEL_EMAIL,
            status=S.NOTIFICATION_STATUS_SENDING,
            detail=f"report {i}",
            attempt=1,
        )
        for i, n in enumerate(reversed(notes))
    ]
    reports.append(
        pb.UpdateDeliveryStatusRequest(
            notification_id=notes[-1].id,  # the first report's delivery, again
            channel=S.CHANNEL_EMAIL,
            status=S.NOTIFICATION_STATUS_DELIVERED,
            detail="report 8",
            attempt=1,
        )
    )
    response = await push_worker.delivery.UpdateDeliveryStatuses(
        pb.UpdateDeliveryStatusesRequest(reports=reports), timeout=TIMEOUT
    )
    assert [r.delivery.detail for r in response.results] == [f"report {i}" for i in range(9)]
    assert [r.delivery.status for r in response.results] == [
        *[S.NOTIFICATION_STATUS_SENDING] * 8,
        S.NOTIFICATION_STATUS_DELIVERED,
    ]


async def test_a_batch_of_records_is_recorded_each_as_alone(gateway: Stub) -> None:
    """CreateNotificationRecords: new records inserted with their deliveries and outbox,
    an id recorded before (or twice in the batch) answered with what is stored, a record
    of an unknown user answered on its own while the others still land."""
    user = await create_user(gateway)
    earlier = await record(gateway, notification(user.id))
    await report(gateway, earlier.id, S.NOTIFICATION_STATUS_DELIVERED)
    fresh = notification(user.id, S.CHANNEL_EMAIL, S.CHANNEL_PUSH)
    fresh.deliveries[1].status = S.NOTIFICATION_STATUS_SUPPRESSED
    fresh.deliveries[1].detail = "user opted out of push"
    again = common_pb2.Notification()
    again.CopyFrom(fresh)
    again.deliveries[0].status = S.NOTIFICATION_STATUS_FAILED  # the first one wins
    orphan = notification(str(uuid.uuid4()))
    outbox = pb.OutboxJob(channel=S.CHANNEL_EMAIL, job=b"job bytes")

    def create(
        note: common_pb2.Notification, *jobs: pb.OutboxJob
    ) -> pb.CreateNotificationRecordRequest:
        return pb.CreateNotificationRecordRequest(notification=note, outbox=jobs)

    response = await gateway.delivery.CreateNotificationRecords(
        pb.CreateNotificationRecordsRequest(
            records=[create(fresh, outbox), create(earlier), create(orphan), create(again)]
        ),
        timeout=TIMEOUT,
    )
    got = [(r.user_found, r.notification.id) for r in response.results]
    assert got == [(True, fresh.id), (True, earlier.id), (False, ""), (True, fresh.id)]
    new, old, _, same = (r.notification for r in response.results)
    assert [(d.channel, d.status, d.detail) for d in new.deliveries] == [
        (S.CHANNEL_EMAIL, S.NOTIFICATION_STATUS_ACCEPTED, ""),
        (S.CHANNEL_PUSH, S.NOTIFICATION_STATUS_SUPPRESSED, "user opted out of push"),
    ]
    assert new.user_id == user.id and new.HasField("create_time")
    assert same == new
    assert old.deliveries[0].status == S.NOTIFICATION_STATUS_DELIVERED  # not reset
    stored = await gateway.delivery.GetNotificationRecord(
        pb.GetNotificationRecordRequest(id=fresh.id), timeout=TIMEOUT
    )
    assert stored.notification == new
    err = await failure(
        gateway.delivery.GetNotificationRecord(
            pb.GetNotificationRecordRequest(id=orphan.id), timeout=TIMEOUT
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_the_gateway_record_writer_answers_each_send_on_its_own(gateway: Stub) -> None:
    """Concurrent sends share CreateNotificationRecords calls; a record user_svc refuses
    as invalid (which refuses its whole batch) and a record of an unknown user fail alone
    while the others are stored."""
    user = await create_user(gateway)
    writer = RecordWriter(
        cast("delivery_service_pb2_grpc.DeliveryServiceStub", gateway.delivery), timeout=TIMEOUT
    )
    writer.start()
    try:
        good = [notification(user.id) for _ in range(6)]
        bad = notification(user.id)
        bad.correlation_id = "has spaces"
        orphan = notification(str(uuid.uuid4()))
        got = await asyncio.gather(
            *(
                writer.create(pb.CreateNotificationRecordRequest(notification=n))
                for n in (*good[:3], bad, orphan, *good[3:])
            ),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    stored = [g for g in got if isinstance(g, common_pb2.Notification)]
    assert [n.id for n in stored] == [n.id for n in good]
    invalid, unknown = got[3], got[4]
    assert isinstance(invalid, InvalidArgument) and invalid.reason == "INVALID_REQUEST"
    assert isinstance(unknown, NotFound) and unknown.reason == "USER_NOT_FOUND"


async def test_invalid_status_report_is_rejected(gateway: Stub) -> None:
    user = await create_user(gateway)
    note = await record(gateway, notification(user.id))
    err = await failure(report(gateway, note.id, S.NOTIFICATION_STATUS_UNSPECIFIED, attempt=-1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(err) == "INVALID_REQUEST"  # the contract's rules on the request
    assert violated_fields(err) == {"status", "attempt"}


async def test_list_notification_records_pages_newest_first(gateway: Stub) -> None:
    user = await create_user(gateway)
    created = [await record(gateway, notification(user.id)) for _ in range(5)]
    await record(gateway, notification((await create_user(gateway)).id))  # someone else's

    pages: list[list[str]] = []
    token = ""
    while True:
        response = await gateway.delivery.ListNotificationRecords(
            pb.ListNotificationRecordsRequest(user_id=user.id, page_size=2, page_token=token),
            timeout=TIMEOUT,
        )
        pages.append([n.id for n in response.notifications])
        token = response.next_page_token
        if not token:
            break
        assert len(pages) < 5, "pagination does not end"
    newest_first = [n.id for n in reversed(created)]
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5]]

    whole = await gateway.delivery.ListNotificationRecords(
        pb.ListNotificationRecordsRequest(user_id=user.id), timeout=TIMEOUT
    )
    assert [n.id for n in whole.notifications] == newest_first
    assert whole.next_page_token == ""
    assert all(n.deliveries for n in whole.notifications)


@pytest.mark.parametrize(
    ("page_size", "page_token", "expected"),
    [
        (101, "", "INVALID_REQUEST"),  # the contract's page_size rule
        (-1, "", "INVALID_REQUEST"),
        (10, "not a token", "INVALID_PAGE_TOKEN"),
        (10, "MTIzOm5vdC1hLXV1aWQ", "INVALID_PAGE_TOKEN"),  # "123:not-a-uuid"
    ],
)
async def test_bad_paging_is_invalid(
    gateway: Stub, page_size: int, page_token: str, expected: str
) -> None:
    user = await create_user(gateway)
    err = await failure(
        gateway.delivery.ListNotificationRecords(
            pb.ListNotificationRecordsRequest(
                user_id=user.id, page_size=page_size, page_token=page_token
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(err) == expected


# ----------------------------------------------------------------- access control


async def test_worker_may_report_status_but_not_manage_users(
    gateway: Stub, user_app: App, tls_for: Callable[[str], TlsSettings]
) -> None:
    """The matrix as access.proto declares it: a worker reports in batches and does
    nothing else here; the gateway's single-report call is not a worker's."""
    user = await create_user(gateway)
    note = await record(gateway, notification(user.id))
    channel = await _connect(user_app.port, tls_for("email_worker"))
    async with channel:
        worker = _stub(channel)
        for denied in (
            create_user(worker),
            report(worker, note.id, S.NOTIFICATION_STATUS_DELIVERED),
            profile(worker, user.id),
            worker.delivery.RemoveDeviceToken(
                pb.RemoveDeviceTokenRequest(user_id=user.id, token="t"), timeout=TIMEOUT
            ),
        ):
            err = await failure(denied)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason(err) == "ACCESS_DENIED"

        response = await worker.delivery.UpdateDeliveryStatuses(
            delivered_report(note.id), timeout=TIMEOUT
        )
        assert response.results[0].delivery.status == S.NOTIFICATION_STATUS_DELIVERED


# ------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], S.NOTIFICATION_STATUS_UNSPECIFIED),
        (
            [S.NOTIFICATION_STATUS_SENDING, S.NOTIFICATION_STATUS_QUEUED],
            S.NOTIFICATION_STATUS_QUEUED,
        ),
        (
            [S.NOTIFICATION_STATUS_RETRYING, S.NOTIFICATION_STATUS_DEFERRED],
            S.NOTIFICATION_STATUS_DEFERRED,
        ),
        (
            [S.NOTIFICATION_STATUS_DELIVERED, S.NOTIFICATION_STATUS_SENDING],
            S.NOTIFICATION_STATUS_SENDING,
        ),
        (
            [S.NOTIFICATION_STATUS_FAILED, S.NOTIFICATION_STATUS_DELIVERED],
            S.NOTIFICATION_STATUS_DELIVERED,
        ),
        (
            [S.NOTIFICATION_STATUS_SUPPRESSED, S.NOTIFICATION_STATUS_FAILED],
            S.NOTIFICATION_STATUS_SUPPRESSED,
        ),
        ([S.NOTIFICATION_STATUS_EXPIRED], S.NOTIFICATION_STATUS_EXPIRED),
    ],
)
def test_aggregate_status(
    statuses: list[common_pb2.NotificationStatus.ValueType],
    expected: common_pb2.NotificationStatus.ValueType,
) -> None:
    assert aggregate_status(statuses) == expected


def test_config_from_env(certs_dir: Path) -> None:
    env = {"NOTIFY_TLS_DIR": str(certs_dir)}
    config = Config.from_env(env)
    assert config.common.listen == "127.0.0.1:50052"
    assert config.dsn == "postgresql://postgres@127.0.0.1:5432/notify_user"
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.profile_cache_ttl == 300

    custom = Config.from_env({**env, "NOTIFY_PROFILE_CACHE_TTL": "30"})
    assert custom.profile_cache_ttl == 30
    with pytest.raises(SettingsError):
        Config.from_env({**env, "NOTIFY_PROFILE_CACHE_TTL": "0"})


async def test_a_worker_certificate_without_its_service_key_is_refused_with_no_effect(
    gateway: Stub, user_app: App, tls_for: Callable[[str], TlsSettings]
) -> None:
    """The certificate says who calls; the service key (access.proto's
    presents_service_key) must come with it: none, or another identity's, opens nothing."""
    user = await create_user(gateway)
    note = await record(gateway, notification(user.id))
    worker, other = tls_for("email_worker"), tls_for("push_worker")
    report = delivered_report(note.id)
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{user_app.port}", channel_credentials(worker)
    ) as channel:
        stub = _stub(channel)
        for metadata in ((), ((SERVICE_KEY_HEADER, other.service_key),)):
            err = await failure(
                stub.delivery.UpdateDeliveryStatuses(report, timeout=TIMEOUT, metadata=metadata)
            )
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reason(err) == "SERVICE_KEY_INVALID"
    got = await gateway.delivery.GetNotificationRecord(
        pb.GetNotificationRecordRequest(id=note.id), timeout=TIMEOUT
    )
    assert got.notification.deliveries[0].status == note.deliveries[0].status  # untouched
    assert note.deliveries[0].status != S.NOTIFICATION_STATUS_DELIVERED
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{user_app.port}", channel_credentials(worker)
    ) as channel:
        answer = await _stub(channel).delivery.UpdateDeliveryStatuses(
            report, timeout=TIMEOUT, metadata=((SERVICE_KEY_HEADER, worker.service_key),)
        )
        assert answer.results[0].delivery.status == S.NOTIFICATION_STATUS_DELIVERED


async def test_user_service_still_answers_the_methods_that_moved(
    gateway: Stub, push_worker: Stub
) -> None:
    """A gateway or worker from before DeliveryService (mid rolling upgrade) calls
    UserService's deprecated copies: same answers, same access matrix."""
    user = await create_user(gateway)
    note = notification(user.id)
    old: pb.CreateNotificationRecordResponse = await gateway.users.CreateNotificationRecord(
        pb.CreateNotificationRecordRequest(notification=note), timeout=TIMEOUT
    )
    got = await gateway.delivery.GetNotificationRecord(
        pb.GetNotificationRecordRequest(id=note.id), timeout=TIMEOUT
    )
    assert got.notification == old.notification
    answer = await push_worker.users.UpdateDeliveryStatuses(
        delivered_report(note.id), timeout=TIMEOUT
    )
    assert answer.results[0].delivery.status == S.NOTIFICATION_STATUS_DELIVERED
    got = await gateway.users.GetNotificationRecord(
        pb.GetNotificationRecordRequest(id=note.id), timeout=TIMEOUT
    )
    assert got.notification.status == S.NOTIFICATION_STATUS_DELIVERED
    profiled = await gateway.users.GetDeliveryProfile(
        pb.GetDeliveryProfileRequest(user_id=user.id), timeout=TIMEOUT
    )
    assert profiled.profile.user_id == user.id
    for denied in (
        push_worker.users.GetDeliveryProfile(
            pb.GetDeliveryProfileRequest(user_id=user.id), timeout=TIMEOUT
        ),
        push_worker.delivery.GetDeliveryProfile(
            pb.GetDeliveryProfileRequest(user_id=user.id), timeout=TIMEOUT
        ),
    ):
        err = await failure(denied)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err


async def test_a_status_batch_that_loses_a_deadlock_is_run_again(
    database: Callable[[str], Awaitable[str]],
) -> None:
    """A batch locks its rows one by one; another session holding one of them and then
    wanting one the batch took makes PostgreSQL abort one statement. When that is the
    batch's, it runs again and every report still lands."""
    dsn = await database("status_deadlock")
    pool = await db.create_pool(dsn, application="t", max_size=2)
    holder = await asyncpg.connect(dsn, server_settings={"deadlock_timeout": "30s"})
    try:
        await db.migrate(pool, Path(user_svc.app.__file__).with_name("migrations"))
        store = UserStore(pool)
        new_user = NewUser("dl@example.com", "", "en", "UTC", False, False)
        user = await store.create_user(new_user, "default")
        queued = (NewDelivery(S.CHANNEL_EMAIL, S.NOTIFICATION_STATUS_QUEUED, "", 0),)
        first, second = sorted(uuid.uuid4() for _ in range(2))  # the batch locks first, first
        await store.create_notifications(
            [NewNotification(n, uuid.UUID(user.id), "t", "", queued) for n in (first, second)]
        )
        touch = "UPDATE deliveries SET detail = 'held' WHERE notification_id = $1"
        held = holder.transaction()
        await held.start()
        await holder.execute(touch, second)
        reports = [
            StatusReport(n, S.CHANNEL_EMAIL, S.NOTIFICATION_STATUS_DELIVERED, "ok", 1)
            for n in (first, second)
        ]
        batch = asyncio.create_task(store.update_deliveries(reports))
        waiting = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 't' AND wait_event_type = 'Lock'"
        )
        await poll(lambda: holder.fetchval(waiting), bool, timeout=10, what="the batch waiting")
        await holder.execute(touch, first)  # a deadlock: the batch's session checks first
        await held.commit()
        stored = await asyncio.wait_for(batch, 10)
        assert [(d.status, d.detail) for d in stored if d is not None] == [
            (S.NOTIFICATION_STATUS_DELIVERED, "ok")
        ] * 2
    finally:
        await holder.close()
        await db.close_pool(pool)
