"""PostgreSQL: pools with timeouts everywhere, database creation, numbered migrations.

Migrations are ``NNN_name.sql`` files applied in order at start-up, each in its own
transaction, recorded in ``schema_migrations``, under a session advisory lock so that
several replicas starting together apply each file exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import asyncpg

from notify_kit import metrics

log = logging.getLogger(__name__)

_MIGRATION = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_MIGRATION_TIMEOUT_S = 300
_MIGRATION_TIMEOUT_MS = _MIGRATION_TIMEOUT_S * 1000
_LOCK_KEY = 0x6E6F74  # "not": one advisory lock id per database is enough
_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def create_pool(
    dsn: str,
    *,
    application: str,
    min_size: int = 1,
    max_size: int = 10,
    statement_timeout_ms: int = 5_000,
    connect_timeout: float = 5.0,
) -> asyncpg.Pool:
    """A pool whose statements time out on the server and the client alike."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=connect_timeout,
        command_timeout=statement_timeout_ms / 1000 + 1,
        reset=_nothing_to_reset,
        server_settings={
            "application_name": application,
            "statement_timeout": str(statement_timeout_ms),
            "idle_in_transaction_session_timeout": "30000",
        },
    )
    assert pool is not None
    metrics.POOLS.add(pool, application)  # notify_db_pool_* at scrape time
    return pool


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """A released connection's reset: nothing, instead of asyncpg's default query.

    The default runs ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``
    at every release: one more round trip per acquire, three per job in a worker, and
    a quarter of the spans of a recorded trace. Our code leaves no session state on a
    pooled connection (no LISTEN, session-level SET, session advisory lock, or cursor
    outside a transaction; ``migrate``, the one that takes a lock and sets a timeout,
    resets its connection itself), and asyncpg still rolls back a transaction left
    open before this runs.
    """


async def close_pool(pool: asyncpg.Pool, *, timeout: float = 10.0) -> None:
    """Close a pool; a connection leaked by a stuck task must not hang shutdown."""
    metrics.POOLS.discard(pool)
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except TimeoutError:
        log.warning("database pool did not close in %ss; terminating", timeout)
        pool.terminate()


async def ensure_database(dsn: str, *, timeout: float = 5.0) -> None:
    """Create the database named in ``dsn`` if it does not exist (dev and tests)."""
    base, _, name = dsn.rpartition("/")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"refusing to create database with name {name!r}")
    conn = await asyncpg.connect(f"{base}/postgres", timeout=timeout)
    try:
        exists = await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", name, timeout=timeout
        )
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{name}"', timeout=timeout)
            except asyncpg.DuplicateDatabaseError:
                pass  # created concurrently by another process: fine
    finally:
        await conn.close()


async def drop_database(dsn: str, *, timeout: float = 10.0) -> None:
    """Drop the database named in ``dsn`` (tests clean up with it)."""
    base, _, name = dsn.rpartition("/")
    conn = await asyncpg.connect(f"{base}/postgres", timeout=timeout)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=timeout)
    finally:
        await conn.close()


def _migration_files(directory: Path) -> list[tuple[int, Path]]:
    files = []
    for path in sorted(directory.iterdir()):
        match = _MIGRATION.match(path.name)
        if match:
            files.append((int(match.group(1)), path))
        elif path.suffix == ".sql":
            raise ValueError(f"migration {path.name} does not match NNN_name.sql")
    versions = [v for v, _ in files]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration numbers in {directory}")
    return files


async def migrate(pool: asyncpg.Pool, directory: Path) -> list[str]:
    """Apply pending migrations from ``directory``; return the names applied."""
    applied: list[str] = []
    async with pool.acquire(timeout=10) as conn:
        # The pool's statement_timeout (seconds) is for requests; waiting for another
        # replica's migrations and running long DDL need their own bound.
        try:
            await conn.execute(f"SET statement_timeout = {_MIGRATION_TIMEOUT_MS}")
            await conn.execute(
                "SELECT pg_advisory_lock($1)", _LOCK_KEY, timeout=_MIGRATION_TIMEOUT_S
            )
            await conn.execute(_CREATE_LEDGER)
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, path in _migration_files(directory):
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text(), timeout=_MIGRATION_TIMEOUT_S)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        path.name,
                    )
                applied.append(path.name)
                log.info("migration applied", extra={"migration": path.name})
        finally:
            await conn.reset()  # the lock and the timeout: the pool does not reset
    return applied
