"""notify_kit against real servers: migrations, publishing, shutdown, errors, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aio_pika
import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from notify.v1 import user_service_pb2, user_service_pb2_grpc
from prometheus_client import REGISTRY

from notify_kit import db, formats
from notify_kit.amqp import EMAIL, Publisher, Topology
from notify_kit.context import set_correlation_id
from notify_kit.errors import (
    InvalidArgument,
    NotFound,
    Unavailable,
    error_info,
    from_rpc_error,
)
from notify_kit.interceptors import ClientInterceptor
from notify_kit.logs import JsonFormatter
from notify_kit.rpc import secure_channel, unary
from notify_kit.server import GrpcServer
from notify_kit.settings import CommonSettings, SettingsError, TlsSettings, env_int, env_str
from scripts.harness import delete_topology

# Ids are UUIDs by the contract.
SOME_USER = "00000000-0000-4000-8000-000000000001"
MISSING_USER = "00000000-0000-4000-8000-000000000002"


async def test_migrations_apply_once_under_concurrent_starts(
    database: Callable[[str], Awaitable[str]], tmp_path: Path
) -> None:
    (tmp_path / "001_one.sql").write_text("CREATE TABLE one (id int PRIMARY KEY);")
    (tmp_path / "002_two.sql").write_text("INSERT INTO one VALUES (1);")
    dsn = await database("kit_migrate")
    pools = [await db.create_pool(dsn, application="t", max_size=2) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(db.migrate(p, tmp_path) for p in pools))
        assert sorted(len(a) for a in applied) == [0, 0, 2]
        assert await pools[0].fetchval("SELECT count(*) FROM one") == 1
        assert await db.migrate(pools[0], tmp_path) == []
    finally:
        for pool in pools:
            await db.close_pool(pool)


async def test_migrations_are_not_bound_by_the_request_statement_timeout(
    database: Callable[[str], Awaitable[str]], tmp_path: Path
) -> None:
    (tmp_path / "001_slow.sql").write_text("SELECT pg_sleep(1);")
    pool = await db.create_pool(
        await database("kit_slow"), application="t", statement_timeout_ms=300
    )
    try:
        assert await db.migrate(pool, tmp_path) == ["001_slow.sql"]
        assert await pool.fetchval("SHOW statement_timeout") == "300ms"  # reset after
    finally:
        await db.close_pool(pool)


async def test_a_failed_migration_leaves_no_lock_and_no_timeout_on_the_pooled_connection(
    database: Callable[[str], Awaitable[str]], tmp_path: Path
) -> None:
    """The pool does not reset a released connection: migrate must undo its own."""
    (tmp_path / "001_broken.sql").write_text("SELECT no_such_function();")
    dsn = await database("kit_broken")
    pool = await db.create_pool(dsn, application="t", max_size=1, statement_timeout_ms=300)
    other = await asyncpg.connect(dsn)
    try:
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await db.migrate(pool, tmp_path)
        assert await pool.fetchval("SHOW statement_timeout") == "300ms"
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", db._LOCK_KEY) is True
    finally:
        await other.close()
        await db.close_pool(pool)


async def test_a_released_connection_costs_no_reset_round_trip_and_keeps_no_transaction(
    database: Callable[[str], Awaitable[str]],
) -> None:
    dsn = await database("kit_reset")
    pool = await db.create_pool(dsn, application="kit-reset", max_size=1)
    other = await asyncpg.connect(dsn)
    try:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 41 + 1")
        last = "SELECT query FROM pg_stat_activity WHERE application_name = 'kit-reset'"
        assert await other.fetchval(last) == "SELECT 41 + 1"  # not asyncpg's reset query
        async with pool.acquire() as conn:
            await conn.transaction().start()  # left open: a bug, but not the next caller's
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
    finally:
        await other.close()
        await db.close_pool(pool)


async def test_badly_named_migration_is_refused(
    database: Callable[[str], Awaitable[str]], tmp_path: Path
) -> None:
    (tmp_path / "1_bad.sql").write_text("SELECT 1;")
    pool = await db.create_pool(await database("kit_badname"), application="t")
    try:
        with pytest.raises(ValueError, match="NNN_name"):
            await db.migrate(pool, tmp_path)
    finally:
        await db.close_pool(pool)


async def test_published_jobs_are_persistent_and_typed(amqp_url: str) -> None:
    topo = Topology(prefix=f"kit{uuid.uuid4().hex[:6]}.")
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        publisher = Publisher(connection, topo)
        await publisher.start()
        await publisher.publish(
            "email",
            b"\x0a\x00",
            message_type=EMAIL.message_type,
            message_id="m1",
            correlation_id="c1",
        )
        channel = await connection.channel()
        queue = await channel.get_queue(topo.queue(EMAIL))
        message = await queue.get(timeout=5)
        assert message is not None
        await message.ack()
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert (message.type, message.message_id, message.correlation_id) == (
            "notify.v1.EmailJob",
            "m1",
            "c1",
        )
        # The queue is durable and quorum: redeclaring it as a classic queue is refused.
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await channel.declare_queue(
                topo.queue(EMAIL), durable=True, arguments={"x-queue-type": "classic"}
            )
    finally:
        await connection.close()
        await delete_topology(amqp_url, topo)


async def test_unroutable_publish_is_an_error_not_a_silent_drop(amqp_url: str) -> None:
    topo = Topology(prefix=f"kit{uuid.uuid4().hex[:6]}.")
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        publisher = Publisher(connection, topo)
        await publisher.start()
        with pytest.raises(Unavailable) as err:
            await publisher.publish(
                "no-such-key", b"x", message_type="t", message_id="m", correlation_id="c"
            )
        assert err.value.reason in {"QUEUE_UNAVAILABLE", "QUEUE_REJECTED"}
        # A publish that did not end in a confirm is timed too, under its outcome.
        outcome = "failed" if err.value.reason == "QUEUE_UNAVAILABLE" else "rejected"
        observed = REGISTRY.get_sample_value(
            "notify_queue_publish_duration_seconds_count",
            {"queue": "no-such-key.queue", "outcome": outcome},
        )
        assert observed is not None and observed >= 1
    finally:
        await connection.close()
        await delete_topology(amqp_url, topo)


class _SlowUsers(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> user_service_pb2.GetUserResponse:
        self.entered.set()
        await self.release.wait()
        if request.id == MISSING_USER:
            raise NotFound("USER_NOT_FOUND", "no such user", metadata={"user_id": request.id})
        return user_service_pb2.GetUserResponse(user=user_service_pb2.User(id=request.id))


async def test_shutdown_turns_health_off_first_and_finishes_in_flight_calls(
    common_for: Callable[[str], CommonSettings], tls_for: Callable[[str], TlsSettings]
) -> None:
    servicer = _SlowUsers()  # type: ignore[abstract]  # only GetUser is needed
    server = GrpcServer(
        common_for("user_svc"),
        [lambda s: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, s)],
        ["notify.v1.UserService"],
    )
    port = await server.start()
    channel = secure_channel(f"127.0.0.1:{port}", tls_for("gateway"))
    try:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        call = asyncio.ensure_future(
            unary(stub.GetUser, user_service_pb2.GetUserRequest(id=SOME_USER), timeout=10)
        )
        await servicer.entered.wait()
        stopping = asyncio.ensure_future(server.stop())
        await asyncio.sleep(0)  # let stop() flip health before we look
        status = await server.health.Check(health_pb2.HealthCheckRequest(), None)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        servicer.release.set()
        assert (await call).user.id == SOME_USER  # the in-flight call completed
        await stopping
    finally:
        servicer.release.set()
        await channel.close()


async def test_errors_travel_with_their_reason_and_metadata(
    common_for: Callable[[str], CommonSettings], tls_for: Callable[[str], TlsSettings]
) -> None:
    servicer = _SlowUsers()  # type: ignore[abstract]  # only GetUser is needed
    servicer.release.set()
    server = GrpcServer(
        common_for("user_svc"),
        [lambda s: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, s)],
        ["notify.v1.UserService"],
    )
    port = await server.start()
    gateway = tls_for("gateway")
    try:
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}",
            _creds(gateway),
            interceptors=[ClientInterceptor(5.0, gateway.service_key)],  # what mesh calls carry
        ) as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await stub.GetUser(user_service_pb2.GetUserRequest(id=MISSING_USER), timeout=5)
            assert raw.value.code() == grpc.StatusCode.NOT_FOUND
            info = error_info(raw.value.trailing_metadata())
            assert (info.reason, info.domain, dict(info.metadata)) == (
                "USER_NOT_FOUND",
                "notify.dev",
                {"user_id": MISSING_USER},
            )
            mapped = from_rpc_error(raw.value)
            assert isinstance(mapped, NotFound) and mapped.reason == "USER_NOT_FOUND"
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await stub.GetUser(user_service_pb2.GetUserRequest(id="bad"), timeout=5)
            mapped = from_rpc_error(raw.value)  # field details survive a hop
            assert isinstance(mapped, InvalidArgument)  # the contract's rule, before the handler
            assert mapped.reason == "INVALID_REQUEST"
            assert mapped.field_violations == [("id", "must be a UUID")]
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop()


def _creds(tls: TlsSettings) -> grpc.ChannelCredentials:
    from notify_kit.tls import channel_credentials  # noqa: PLC0415

    return channel_credentials(tls)


def test_settings_fail_fast_with_the_variable_name() -> None:
    with pytest.raises(SettingsError, match="NOTIFY_X"):
        env_str("NOTIFY_X", env={})
    with pytest.raises(SettingsError, match="NOTIFY_N must be an integer"):
        env_int("NOTIFY_N", env={"NOTIFY_N": "ten"})
    with pytest.raises(SettingsError, match="make certs"):
        TlsSettings.for_service("gateway", env={"NOTIFY_TLS_DIR": "/nonexistent"})


def test_tracing_is_off_unless_spans_have_somewhere_to_go(certs_dir: Path) -> None:
    """Off installs nothing (no provider, no grpc interceptors); an unknown mode is refused."""
    from opentelemetry import trace  # noqa: PLC0415

    from notify_kit.telemetry import inject_trace_context, setup_tracing  # noqa: PLC0415

    env = {"NOTIFY_TLS_DIR": str(certs_dir)}
    assert CommonSettings.from_env("gateway", 1, env).tracing == "off"
    with pytest.raises(SettingsError, match="NOTIFY_TRACING must be one of off, console"):
        CommonSettings.from_env("gateway", 1, {**env, "NOTIFY_TRACING": "jaeger"})
    # A collector turns it on (sampled at 10% unless told); otlp needs one.
    collector = {**env, "NOTIFY_OTLP_ENDPOINT": "http://collector:4317"}
    traced = CommonSettings.from_env("gateway", 1, collector)
    assert (traced.tracing, traced.otlp_endpoint, traced.trace_sample_ratio) == (
        "otlp",
        "http://collector:4317",
        0.1,
    )
    with pytest.raises(SettingsError, match="needs NOTIFY_OTLP_ENDPOINT"):
        CommonSettings.from_env("gateway", 1, {**env, "NOTIFY_TRACING": "otlp"})
    with pytest.raises(SettingsError, match="between 0 and 1"):
        CommonSettings.from_env("gateway", 1, {**collector, "NOTIFY_TRACE_SAMPLE_RATIO": "2"})
    before = trace.get_tracer_provider()
    assert setup_tracing("gateway", "off") is None
    assert trace.get_tracer_provider() is before
    assert inject_trace_context() == {}  # no span, nothing for a job to carry


def test_json_logs_carry_the_correlation_id() -> None:
    set_correlation_id("corr-123")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.notification_id = "n1"
    line = json.loads(JsonFormatter("svc").format(record))
    assert line["msg"] == "hello you"
    assert line["correlation_id"] == "corr-123"
    assert (line["service"], line["notification_id"]) == ("svc", "n1")
    set_correlation_id("")


class _HangingQueue:
    """A consumer cancel that never returns, as on a robust channel waiting to reconnect."""

    def __init__(self) -> None:
        self.cancel_called = asyncio.Event()

    async def cancel(self, tag: str) -> None:
        self.cancel_called.set()
        await asyncio.Event().wait()


async def test_worker_stop_is_bounded_when_the_broker_is_gone() -> None:
    from notify_kit.jobs.runner import JobRunner  # noqa: PLC0415
    from notify_kit.jobs.settings import RunnerSettings  # noqa: PLC0415

    unused: Any = None  # stop() touches none of the collaborators
    handler: Any = SimpleNamespace(kind=EMAIL)  # only its kind, for the queue's counters
    runner: JobRunner[Any] = JobRunner(
        unused, Topology(), unused, handler, unused, unused, RunnerSettings(stop_timeout=0.2)
    )
    queue = _HangingQueue()
    runner._queue, runner._tag = queue, "ctag"  # type: ignore[assignment]

    async def never() -> None:
        await asyncio.Event().wait()

    stuck = asyncio.ensure_future(never())
    runner._inflight.add(stuck)  # a job that cannot finish (its ack has nowhere to go)
    async with asyncio.timeout(5):
        await runner.stop()
    assert queue.cancel_called.is_set()
    await asyncio.sleep(0)  # let the cancellation land
    assert stuck.cancelled()


def test_cache_expires_entries_and_evicts_one_at_a_time() -> None:
    from notify_kit.cache import LruCache  # noqa: PLC0415

    cache: LruCache[str, str | None] = LruCache(2, ttl=0.0)
    cache.put("unknown-key", None)
    assert cache.lookup("unknown-key") is None  # expired at once with ttl=0
    lasting: LruCache[str, str | None] = LruCache(2, ttl=60)
    lasting.put("a", None)
    assert lasting.lookup("a") == (None,)  # a cached None is a hit
    lasting.put("b", "B")
    lasting.put("c", "C")  # evicts only "a", the least recently used
    assert (lasting.get("b"), lasting.get("c"), len(lasting)) == ("B", "C", 2)


def test_trace_context_survives_the_trip_through_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry import trace  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415

    from notify_kit import telemetry  # noqa: PLC0415
    from notify_kit.telemetry import extract_trace_context, inject_trace_context  # noqa: PLC0415

    monkeypatch.setattr(telemetry, "_tracing_on", True)  # as setup_tracing leaves a process
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("gateway send") as span:
        carried = inject_trace_context()  # what the gateway puts into JobMeta.trace_context
    assert "traceparent" in carried
    restored = trace.get_current_span(extract_trace_context(carried)).get_span_context()
    assert restored.trace_id == span.get_span_context().trace_id


def test_cache_keeps_the_last_known_value_for_when_the_source_is_down() -> None:
    from notify_kit.cache import LruCache  # noqa: PLC0415

    cache: LruCache[str, str] = LruCache(2, ttl=0.0)
    cache.put("welcome", "v3")
    assert cache.lookup("welcome") is None  # expired: fetch it again
    assert cache.stale("welcome") == ("v3",)  # but it is there if the fetch fails
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.stale("welcome") is None  # still bounded by size


async def test_an_outage_of_ours_answers_unavailable_not_internal(
    common_for: Callable[[str], CommonSettings], tls_for: Callable[[str], TlsSettings]
) -> None:
    import asyncpg  # noqa: PLC0415

    from notify_kit.errors import error_info  # noqa: PLC0415

    class DatabaseDown(user_service_pb2_grpc.UserServiceServicer):
        async def GetUser(
            self, request: user_service_pb2.GetUserRequest, context: grpc.aio.ServicerContext
        ) -> user_service_pb2.GetUserResponse:
            raise asyncpg.TooManyConnectionsError("sorry, too many clients already")

    servicer = DatabaseDown()  # type: ignore[abstract]
    server = GrpcServer(
        common_for("user_svc"),
        [lambda s: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, s)],
        ["notify.v1.UserService"],
    )
    port = await server.start()
    try:
        channel = secure_channel(f"127.0.0.1:{port}", tls_for("gateway"))
        async with channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetUser(user_service_pb2.GetUserRequest(id=SOME_USER), timeout=5)
    finally:
        await server.stop()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value.trailing_metadata()).reason == "DEPENDENCY_UNAVAILABLE"
    assert "clients" not in (caught.value.details() or "")  # no internals reach the caller


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("a" * 64 + "@example.com", None),
        ("a" * 65 + "@example.com", "local part must be at most 64 characters"),
        ("a@" + "b" * 63 + ".com", None),
        ("a@" + "b" * 64 + ".com", "domain must be a host name"),
        ("a" * 64 + "@" + "d" * 63 + "." + "e" * 63 + "." + "f" * 57 + ".com", None),
        ("a" * 64 + "@" + "d" * 63 + "." + "e" * 63 + "." + "f" * 58 + ".com", "at most 254"),
        ("user@xn--e1afmkfd.xn--p1ai", None),
        ("user@XN--E1AFMKFD.XN--P1AI", None),
        ("user@пример.рф", "must be ASCII"),
        ("user@xn--zz.com", "domain must be a host name"),
        ("user@xn--abc-.com", "domain must be a host name"),
        ("=?utf-8?q?=0D=0A?=@example.com", "must not contain =?"),
        ('"quoted"@example.com', "local part may hold"),
        ("a\r\n@example.com", "whitespace or control"),
    ],
)
def test_email_address_rule_limits_and_idna(address: str, problem: str | None) -> None:
    found = formats.email_address_problem(address)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
        # Reasons reach external clients: they never echo the address back.
        assert address not in found


def test_an_rpc_without_its_access_declaration_is_refused_not_opened() -> None:
    """A contract that forgets ``notify.v1.access`` fails loudly when the matrix is read."""
    from google.protobuf import descriptor_pb2, descriptor_pool  # noqa: PLC0415
    from notify.v1 import access_pb2  # noqa: PLC0415

    from notify_kit import acl  # noqa: PLC0415

    def service_with(options: descriptor_pb2.MethodOptions) -> Any:
        proto = descriptor_pb2.FileDescriptorProto(
            name=f"t{uuid.uuid4().hex}.proto", package="t", syntax="proto3"
        )
        proto.message_type.add(name="M")
        service = proto.service.add(name="S")
        service.options.Extensions[access_pb2.served_by].servers.append(
            access_pb2.IDENTITY_USER_SVC
        )
        service.method.add(name="Call", input_type=".t.M", output_type=".t.M", options=options)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(proto)
        return pool.FindServiceByName("t.S")

    identities: dict[int, str] = {
        access_pb2.IDENTITY_GATEWAY: "gateway",
        access_pb2.IDENTITY_PUSH_WORKER: "push_worker",
        access_pb2.IDENTITY_USER_SVC: "user_svc",
    }
    undeclared = service_with(descriptor_pb2.MethodOptions())
    with pytest.raises(ValueError, match=r"/t\.S/Call: declare exactly one of scope and callers"):
        acl._declaration(undeclared, undeclared.methods[0], acl.scope_names(), identities)
    both = descriptor_pb2.MethodOptions()
    both.Extensions[access_pb2.access].scope = access_pb2.SCOPE_ADMIN
    both.Extensions[access_pb2.access].callers.append(access_pb2.IDENTITY_GATEWAY)
    service = service_with(both)
    with pytest.raises(ValueError, match="declare exactly one"):
        acl._declaration(service, service.methods[0], acl.scope_names(), identities)
    internal = descriptor_pb2.MethodOptions()
    internal.Extensions[access_pb2.access].callers.append(access_pb2.IDENTITY_PUSH_WORKER)
    service = service_with(internal)
    declared = acl._declaration(service, service.methods[0], acl.scope_names(), identities)
    assert declared.allowed_on("user_svc") == {"push_worker"}
    assert declared.allowed_on("gateway") == set()  # not served there: nobody


def test_metrics_are_served_where_configured_and_not_when_empty(certs_dir: Path) -> None:
    env = {"NOTIFY_TLS_DIR": str(certs_dir)}
    assert CommonSettings.from_env("gateway", 1, env).metrics_listen == "127.0.0.1:9461"
    moved = {**env, "NOTIFY_GATEWAY_METRICS_LISTEN": "0.0.0.0:9000"}
    assert CommonSettings.from_env("gateway", 1, moved).metrics_listen == "0.0.0.0:9000"
    off = {**env, "NOTIFY_GATEWAY_METRICS_LISTEN": ""}
    assert CommonSettings.from_env("gateway", 1, off).metrics_listen == ""


async def test_queue_watch_reads_the_depth_afresh_each_time(
    amqp_url: str, topology: Topology
) -> None:
    """Each refresh asks the broker (a robust channel's cached passive declare would
    leave the gauges at their first values, and the backlog alert would never fire)."""
    from notify_kit import metrics  # noqa: PLC0415
    from notify_kit.queue_watch import QueueWatch  # noqa: PLC0415

    name = f"{topology.prefix}watch-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, auto_delete=False)
        watch = QueueWatch(connection, topology, [name])
        gauge = metrics.QUEUE_MESSAGES.labels(topology.label(name))
        depths = []
        for _ in range(3):
            assert await watch.refresh()
            depths.append(gauge._value.get())
            await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=name)
        await watch.close()
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    assert depths == [0, 1, 2]


def test_only_a_well_formed_traceparent_says_not_sampled() -> None:
    """A malformed one (or none) starts a trace here, sampled at the ratio, as the W3C
    spec says; only a valid "not sampled" is followed without a span."""
    from notify_kit.telemetry import sampled_or_new  # noqa: PLC0415

    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    assert sampled_or_new(f"00-{trace_id}-{span_id}-00") is False
    assert sampled_or_new(f"00-{trace_id}-{span_id}-01") is True
    for malformed in (
        None,
        "",
        "garbage-00",
        f"00-{'0' * 32}-{span_id}-00",  # an all-zero trace id is invalid
        f"00-{trace_id}-{'0' * 16}-00",
        f"00-{trace_id.upper()}-{span_id}-00",
        f"00-{trace_id}-{span_id}-00-extra",
    ):
        assert sampled_or_new(malformed) is True, malformed


def _modules_loaded(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.split()


@pytest.mark.parametrize(
    ("service", "unused"),
    [
        ("push_worker", ("redis", "aiohttp")),
        ("email_worker", ("redis",)),
        ("template_svc", ("redis", "aiormq")),
    ],
)
def test_a_service_loads_no_client_it_does_not_use(service: str, unused: tuple[str, ...]) -> None:
    """A client loaded only to name its exceptions or to instrument it costs the whole
    package (redis 8-11 MB, aiohttp 7 MB): push_worker's RSS was over its 80 MB budget."""
    tracing_on = "from notify_kit.telemetry import setup_tracing\nsetup_tracing('t', 'console')"
    assert _modules_loaded(f"import {service}.app\n{tracing_on}", unused) == []


def test_a_librarys_errors_count_as_outages_from_when_it_is_loaded() -> None:
    code = (
        "from notify_kit import outage\n"
        "before = outage.infra_errors()\n"
        "import redis.exceptions\n"
        "error = redis.exceptions.ConnectionError('refused')\n"
        "assert not isinstance(error, before), before\n"
        "assert outage.is_outage(error)\n"
        "assert outage.outage_error(redis.exceptions.TimeoutError(), 0.0).code.name"
        " == 'DEADLINE_EXCEEDED'\n"
    )
    assert _modules_loaded(code, ()) == []
