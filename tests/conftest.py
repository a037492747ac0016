"""Shared fixtures: real PostgreSQL, Redis and RabbitMQ on this machine, isolated per run.

Each run gets its own databases (``notify_t<run>_<name>``), its own RabbitMQ names (a
unique topology prefix) and its own Redis database, all removed at the end, so the suite
never touches a developer's data and can run next to ``make run``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from notify_kit import db
from notify_kit.amqp import Topology
from notify_kit.settings import CommonSettings, TlsSettings
from scripts import gen_certs
from scripts.harness import delete_topology

RUN_ID = uuid.uuid4().hex[:8]
PG_BASE = os.environ.get("NOTIFY_PG_DSN_BASE", "postgresql://postgres@127.0.0.1:5432")
AMQP_URL = os.environ.get("NOTIFY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("NOTIFY_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh dev CA and a certificate per identity."""
    directory = tmp_path_factory.mktemp("certs")
    gen_certs.generate(directory)
    return directory


@pytest.fixture(scope="session")
def tls_for(certs_dir: Path) -> Callable[[str], TlsSettings]:
    """The mesh credentials of one identity (certificate, key, service key), as it loads them."""

    def make(identity: str) -> TlsSettings:
        return TlsSettings.for_service(identity, env={"NOTIFY_TLS_DIR": str(certs_dir)})

    return make


@pytest.fixture(scope="session")
def common_for(tls_for: Callable[[str], TlsSettings]) -> Callable[[str], CommonSettings]:
    """Server settings of one service, listening on an ephemeral port."""

    def make(service: str) -> CommonSettings:
        return CommonSettings(
            service=service,
            listen="127.0.0.1:0",
            tls=tls_for(service),
            log_level="INFO",
            shutdown_grace=1.0,
        )

    return make


@pytest.fixture(scope="session")
async def database() -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """Factory of fresh, empty databases (dropped at the end); returns the DSN."""
    created: list[str] = []

    async def make(name: str) -> str:
        dsn = f"{PG_BASE}/notify_t{RUN_ID}_{name}"
        await db.ensure_database(dsn)
        created.append(dsn)
        return dsn

    yield make
    for dsn in created:
        await db.drop_database(dsn)


@pytest.fixture(scope="session")
async def redis_url() -> AsyncIterator[str]:
    """A Redis database of the suite's own, flushed before and after."""
    client = aioredis.from_url(REDIS_URL)
    await client.flushdb()
    yield REDIS_URL
    await client.flushdb()
    await client.aclose()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The broker on this machine."""
    return AMQP_URL


@pytest.fixture(scope="session")
async def topology(amqp_url: str) -> AsyncIterator[Topology]:
    """RabbitMQ names unique to this run; every queue and the exchange deleted at the end."""
    topo = Topology(prefix=f"t{RUN_ID}.", retry_delays_ms=(200, 400, 800, 1600))
    yield topo
    await delete_topology(amqp_url, topo)


# The whole system as processes behind Envoy, shared by every end-to-end module.
from tests.e2e_support import e2e  # noqa: E402, F401
