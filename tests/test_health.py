"""Health follows the dependencies: NOT_SERVING within seconds of losing one that matters,
SERVING again once it is back; a degraded one (Redis) is reported, never a reason to
leave the rotation. The worker side (every breaker open) is in test_delivery_engine."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from notify_kit import health, metrics, rpc
from notify_kit.db import close_pool, create_pool
from notify_kit.kv import redis_client
from notify_kit.server import GrpcServer
from notify_kit.settings import CommonSettings, TlsSettings
from scripts.system import poll
from template_svc.app import App
from template_svc.config import Config
from tests.conftest import PG_BASE, RUN_ID
from tests.database_link import DatabaseLink, via

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_critical_dependency_decides_and_a_degraded_one_does_not(
    common_for: Callable[[str], CommonSettings],
) -> None:
    state = {"postgresql": True, "redis": True}

    def probe(name: str) -> health.Probe:
        async def check() -> bool:
            return state[name]

        return check

    server = GrpcServer(
        common_for("user_svc"),
        [],
        ["notify.v1.UserService"],
        dependencies=[
            health.Dependency("postgresql", probe("postgresql")),
            health.Dependency("redis", probe("redis"), critical=False),
        ],
    )
    await server.start()
    try:
        watch = server.dependencies

        async def status(name: str = "") -> int:
            answer = await server.health.Check(health_pb2.HealthCheckRequest(service=name), None)
            return int(answer.status)

        assert await status() == SERVING
        state["redis"] = False
        assert await watch.check() is True and await status() == SERVING
        assert metrics.DEPENDENCY_UP.labels("redis")._value.get() == 0
        state["postgresql"] = False
        assert await watch.check() is False
        assert await status() == NOT_SERVING
        assert await status("notify.v1.UserService") == NOT_SERVING
        state.update(postgresql=True, redis=True)
        assert await watch.check() is True and await status() == SERVING
    finally:
        await server.stop()
    assert await status() == NOT_SERVING  # draining stays NOT_SERVING


async def test_template_svc_leaves_and_rejoins_as_postgresql_goes_and_comes(
    common_for: Callable[[str], CommonSettings],
    tls_for: Callable[[str], TlsSettings],
    database: Callable[[str], Awaitable[str]],
) -> None:
    await database("template_svc_health")
    base = urlsplit(PG_BASE)
    link = DatabaseLink(base.hostname or "127.0.0.1", base.port or 5432)
    await link.restore()
    through = via(link, f"notify_t{RUN_ID}_template_svc_health")
    common = dataclasses.replace(common_for("template_svc"), health_interval=0.2)
    app = await App.start(Config(common=common, dsn=through))
    channel = rpc.secure_channel(f"127.0.0.1:{app.port}", tls_for("gateway"))
    stub = health_pb2_grpc.HealthStub(channel)

    async def status() -> int:
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return -1
        return int(answer.status)

    try:
        assert await status() == SERVING
        await link.cut()
        await poll(status, lambda s: s == NOT_SERVING, timeout=5, what="NOT_SERVING")
        await link.restore()
        await poll(status, lambda s: s == SERVING, timeout=10, what="SERVING again")
    finally:
        await channel.close()
        await app.stop()
        await link.cut()


async def test_the_broker_and_redis_probes_say_down_when_they_are(
    common_for: Callable[[str], CommonSettings],
) -> None:
    """The probes themselves: a broker connection closed or reconnecting is down, a Redis
    that does not answer is down (and only degraded)."""

    @dataclasses.dataclass
    class Connection:  # what health.broker reads of aio-pika's robust connection
        is_closed: bool = False
        reconnecting: bool = False
        connected: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    up, closed, reconnecting = Connection(), Connection(is_closed=True), Connection()
    for connection in (up, closed, reconnecting):
        connection.connected.set()
    reconnecting.reconnecting = True
    assert await health.broker(up).probe()  # type: ignore[arg-type]
    assert not await health.broker(up, closed).probe()  # type: ignore[arg-type]
    assert not await health.broker(reconnecting).probe()  # type: ignore[arg-type]

    gone = redis_client("redis://127.0.0.1:1/0")  # nothing listens there
    try:
        probe = health.redis(gone)
        assert not probe.critical
        watch = health.DependencyHealth(
            GrpcServer(common_for("user_svc"), [], []).health, [""], [probe]
        )
        assert await watch.check() is True  # degraded: still serving
        assert watch.up == {"redis": False}
    finally:
        await gone.aclose()


async def test_a_busy_pool_is_not_a_database_outage(
    common_for: Callable[[str], CommonSettings],
) -> None:
    """Every connection taken for longer than the probe waits: still up. A pool with
    room whose new connection hangs (the database host answers nothing), or is refused:
    down."""
    dsn = f"{PG_BASE}/postgres"
    pool = await create_pool(dsn, application="health-test", min_size=1, max_size=1)
    try:
        probe = health.postgres(pool, timeout=0.2)
        assert await probe.probe()
        async with pool.acquire():
            assert await probe.probe()  # waited 0.2 s for a connection, none came
    finally:
        await close_pool(pool)
    base = urlsplit(PG_BASE)
    link = DatabaseLink(base.hostname or "127.0.0.1", base.port or 5432)
    await link.restore()
    try:
        pool = await create_pool(via(link, "postgres"), application="health-test", max_size=1)
        try:
            watch = health.DependencyHealth(
                GrpcServer(common_for("user_svc"), [], []).health,
                [""],
                [health.postgres(pool, timeout=0.2)],
            )
            assert await watch.check() is True
            await link.stall()
            await pool.expire_connections()  # the next acquire connects, and hangs: the
            # acquire times out with the pool not full, which is no load
            assert await watch.check() is False
            assert watch.up == {"postgresql": False}
            await link.restore()
            assert await watch.check() is True
            await link.cut()
            assert await watch.check() is False
        finally:
            await close_pool(pool)
    finally:
        await link.cut()
