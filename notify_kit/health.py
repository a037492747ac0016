"""gRPC health that follows the dependencies: SERVING only while they answer.

Each service names what it cannot work without (its database, the broker, for a worker
at least one provider whose breaker is not open) as probes; ``DependencyHealth`` runs
them every ``interval`` seconds, each within ``timeout``, and sets the server's health
to NOT_SERVING as soon as one fails and back to SERVING once all pass again. Envoy's
active health checks and the compose probes read that status, so a gateway that lost
its database leaves the rotation within seconds instead of answering UNAVAILABLE.

A probe can also be *degraded*: checked, logged and exported
(``notify_dependency_up``), but never a reason to leave the rotation. Redis is one for
every service: each use of it has a fallback (caches miss, limits pass, written down in
docs/SECURITY.md), so taking a service out because Redis is down would turn a cache
outage into a full outage.

A transition is logged once (WARNING when a dependency goes, INFO when it is back), not
on every check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grpc_health.v1 import health, health_pb2

from notify_kit import metrics
from notify_kit.breaker import State

if TYPE_CHECKING:
    import asyncpg
    import redis.asyncio as aioredis
    from aio_pika.abc import AbstractRobustConnection

    from notify_kit.jobs.providers import ProviderChain

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class Dependency:
    """One probe: True when the dependency answers; ``critical`` ones decide health."""

    name: str
    probe: Probe
    critical: bool = True


class DependencyHealth:
    """Keeps ``servicer``'s status for ``names`` in step with ``dependencies``."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        names: Sequence[str],
        dependencies: Sequence[Dependency],
        *,
        interval: float = 2.0,
        timeout: float = 1.5,
    ) -> None:
        self._servicer = servicer
        self._names = tuple(names)
        self._dependencies = tuple(dependencies)
        self._interval = interval
        self._timeout = timeout
        self._up: dict[str, bool] = {}
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def up(self) -> Mapping[str, bool]:
        """Each dependency's state as last checked."""
        return dict(self._up)

    async def check(self) -> bool:
        """Probe every dependency once, update the health status; True when serving."""
        results = await asyncio.gather(*(self._probe(d) for d in self._dependencies))
        for dependency, ok in zip(self._dependencies, results, strict=True):
            if self._up.get(dependency.name) != ok:
                level = logging.INFO if ok else logging.WARNING
                log.log(level, "dependency %s is %s", dependency.name, "up" if ok else "down",
                        extra={"dependency": dependency.name})  # fmt: skip
            self._up[dependency.name] = ok
            metrics.DEPENDENCY_UP.labels(dependency.name).set(1 if ok else 0)
        serving = all(ok for d, ok in zip(self._dependencies, results, strict=True) if d.critical)
        if serving != self._serving:
            self._serving = serving
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in self._names:
                await self._servicer.set(name, status)
        return serving

    def start(self) -> None:
        """Check every ``interval`` seconds from now on."""
        self._task = asyncio.create_task(self._loop(), name="dependency-health")

    async def stop(self) -> None:
        """Stop checking (the server's graceful shutdown already made every later
        ``set`` a no-op, so a probe finishing meanwhile cannot undo NOT_SERVING)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _probe(self, dependency: Dependency) -> bool:
        try:
            return await asyncio.wait_for(dependency.probe(), self._timeout)
        except Exception as exc:
            log.debug("probe %s failed: %r", dependency.name, exc)
            return False

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)  # a timer: the dependencies send no events
            await self.check()


def postgres(pool: asyncpg.Pool, timeout: float = 1.0) -> Dependency:
    """The service's database answers a query (a free connection, or a new one).

    A pool whose every connection is open and busy for longer than ``timeout`` is a
    loaded service, not a database outage: it stays in the rotation (leaving it would
    move its load onto replicas that are as busy), and a dead database still shows, as
    the busy connections' statements fail."""

    async def probe() -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # one budget for both steps, within the check's
        try:
            connection = await pool.acquire(timeout=timeout)
        except TimeoutError:
            busy: bool = pool.get_size() >= pool.get_max_size() and pool.get_idle_size() == 0
            return busy
        try:
            left = max(deadline - loop.time(), 0.05)
            return bool(await connection.fetchval("SELECT 1", timeout=left) == 1)
        finally:
            await pool.release(connection)

    return Dependency("postgresql", probe)


def redis(client: aioredis.Redis) -> Dependency:
    """Redis answers PING. Degraded only: every use of Redis has a fallback."""

    async def probe() -> bool:
        return bool(await client.ping())

    return Dependency("redis", probe, critical=False)


def broker(*connections: AbstractRobustConnection) -> Dependency:
    """Every connection to RabbitMQ is up (not closed, not reconnecting)."""

    async def probe() -> bool:
        return all(
            not c.is_closed and c.connected.is_set() and not c.reconnecting for c in connections
        )

    return Dependency("rabbitmq", probe)


def providers(chain: ProviderChain[Any, Any]) -> Dependency:
    """At least one of the channel's providers has a breaker that is not open."""

    async def probe() -> bool:
        return any(b.state is not State.OPEN for b in chain.breakers.values())

    return Dependency(f"{chain.channel} providers", probe)
