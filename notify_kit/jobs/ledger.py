"""A worker's delivery log in PostgreSQL: the ``DeliveryLedger`` every worker uses.

Each worker keeps it in its own database (``MIGRATIONS`` beside this module create
``delivery_logs``); the schema and the queries are the same, so they live here once.

Every attempt appends a row; ``delivered`` looks for the one DELIVERED row a
notification can have (a partial unique index guarantees there is at most one, even
when two workers race on a redelivered job).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import asyncpg
from notify.v1 import common_pb2

from notify_kit.jobs.upstream import Status

MIGRATIONS = Path(__file__).parent / "migrations"

_STATUS_PREFIX = "NOTIFICATION_STATUS_"

SELECT_OUTCOME = """
SELECT status, detail FROM delivery_logs
WHERE notification_id = $1
  AND (status = 'DELIVERED'
       OR (replay = $3 AND attempt = $2 AND status IN ('RETRYING', 'FAILED', 'EXPIRED')))
ORDER BY (status = 'DELIVERED') DESC, id DESC
LIMIT 1
"""

# One statement: the outcome is appended and the attempt's claim, its work done, dropped
# (a data-modifying WITH runs whether or not it is referenced).
INSERT_ATTEMPT = """
WITH released AS (
    DELETE FROM delivery_claims WHERE notification_id = $1 AND replay = $6 AND attempt = $2
)
INSERT INTO delivery_logs (notification_id, attempt, status, detail, provider, replay)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (notification_id) WHERE status = 'DELIVERED' DO NOTHING
"""

# Taking an attempt's lease when it is free or already ours: nothing is written (and
# nothing comes back) while another owner's lease is still running.
_LEASE_CONFLICT = """
ON CONFLICT (notification_id, replay, attempt) DO UPDATE
SET owner = EXCLUDED.owner, claimed_until = EXCLUDED.claimed_until
WHERE delivery_claims.claimed_until < now() OR delivery_claims.owner = EXCLUDED.owner
RETURNING claimed_until
"""

# Take the attempt's lease, or extend our own.
CLAIM = f"""
INSERT INTO delivery_claims (notification_id, replay, attempt, owner, claimed_until)
VALUES ($1, $2, $3, $4, now() + $5 * interval '1 second')
{_LEASE_CONFLICT}
"""  # noqa: S608 (composed of the constants above only, no caller text)

# A job's first step in one round trip: the outcome already recorded (SELECT_OUTCOME,
# same parameters), else the attempt's lease, taken only when there is no outcome. One
# row always: status and detail null without an outcome, claimed false while another
# owner's lease runs (or when there was an outcome).
OUTCOME_OR_CLAIM = f"""
WITH earlier AS ({SELECT_OUTCOME}),
claimed AS (
    INSERT INTO delivery_claims (notification_id, replay, attempt, owner, claimed_until)
    SELECT $1, $3, $2, $4, now() + $5 * interval '1 second'
    WHERE NOT EXISTS (SELECT 1 FROM earlier)
    {_LEASE_CONFLICT}
)
SELECT (SELECT status FROM earlier) AS status, (SELECT detail FROM earlier) AS detail,
       EXISTS (SELECT 1 FROM claimed) AS claimed
"""  # noqa: S608 (composed of the constants above only, no caller text)

# A holder giving its claim back without an outcome (its send raised a bug).
RELEASE_CLAIM = """
DELETE FROM delivery_claims
WHERE notification_id = $1 AND replay = $2 AND attempt = $3 AND owner = $4
"""

SELECT_HISTORY = """
SELECT replay, attempt, status, detail, provider, created_at FROM delivery_logs
WHERE notification_id = $1
ORDER BY created_at, id
"""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One row of a notification's delivery history."""

    replay: int
    attempt: int
    status: str
    detail: str
    provider: str  # who delivered; empty for outcomes no provider produced
    created_at: datetime


class DeliveryLedger(Protocol):
    """The worker's delivery log: the record that makes redeliveries harmless."""

    async def outcome(
        self, notification_id: str, attempt: int, replay: int = 0
    ) -> tuple[Status, str] | None:
        """An outcome already recorded: DELIVERED by any attempt, or that of ``attempt``
        in replay generation ``replay``.

        With it, a redelivered job (the worker died, or a report failed after the
        outcome was recorded) is re-reported instead of being sent, retried or
        dead-lettered a second time.
        """

    async def outcome_or_claim(
        self, notification_id: str, attempt: int, replay: int, owner: str, lease: float
    ) -> tuple[tuple[Status, str] | None, bool]:
        """``outcome``, and when there is none, ``claim`` too, in one round trip: a job's
        first step. (outcome, False) with an outcome; (None, claimed) without."""

    async def record(
        self,
        notification_id: str,
        attempt: int,
        status: Status,
        detail: str,
        provider: str = "",
        replay: int = 0,
    ) -> None:
        """Append one attempt's outcome (DELIVERED, RETRYING, FAILED, EXPIRED)."""

    async def history(self, notification_id: str) -> list[Attempt]:
        """Every attempt of a notification, oldest first."""

    async def claim(
        self, notification_id: str, attempt: int, replay: int, owner: str, lease: float
    ) -> bool:
        """Take (or extend) the lease on sending this attempt; False while another holds it."""

    async def release(self, notification_id: str, attempt: int, replay: int, owner: str) -> None:
        """Give back ``owner``'s claim without an outcome (the copy requeued takes it)."""


def _status(name: str) -> Status:
    """``DELIVERED`` -> ``NOTIFICATION_STATUS_DELIVERED`` (from the table)."""
    return common_pb2.NotificationStatus.Value(_STATUS_PREFIX + name)


def status_name(status: Status) -> str:
    """``NOTIFICATION_STATUS_DELIVERED`` -> ``DELIVERED`` (what the table stores)."""
    return common_pb2.NotificationStatus.Name(status).removeprefix(_STATUS_PREFIX)


class DeliveryLog:
    """asyncpg queries over ``delivery_logs``; implements ``DeliveryLedger``.

    Every call bounds both the wait for a pooled connection and the statement itself.
    """

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 5.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def outcome(
        self, notification_id: str, attempt: int, replay: int = 0
    ) -> tuple[Status, str] | None:
        """DELIVERED by any attempt, else the recorded outcome of ``attempt``, if any."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            row = await conn.fetchrow(
                SELECT_OUTCOME, notification_id, attempt, replay, timeout=self._timeout
            )
        if row is None:
            return None
        return _status(row["status"]), row["detail"]

    async def outcome_or_claim(
        self, notification_id: str, attempt: int, replay: int, owner: str, lease: float
    ) -> tuple[tuple[Status, str] | None, bool]:
        """The recorded outcome, else the lease taken if free (one statement)."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            row = await conn.fetchrow(
                OUTCOME_OR_CLAIM,
                notification_id,
                attempt,
                replay,
                owner,
                lease,
                timeout=self._timeout,
            )
        if row["status"] is not None:
            return (_status(row["status"]), row["detail"]), False
        return None, bool(row["claimed"])

    async def record(
        self,
        notification_id: str,
        attempt: int,
        status: Status,
        detail: str,
        provider: str = "",
        replay: int = 0,
    ) -> None:
        """Append an attempt (and drop its claim); a second DELIVERED row is ignored."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.execute(
                INSERT_ATTEMPT,
                notification_id,
                attempt,
                status_name(status),
                detail,
                provider,
                replay,
                timeout=self._timeout,
            )

    async def claim(
        self, notification_id: str, attempt: int, replay: int, owner: str, lease: float
    ) -> bool:
        """Take (or extend) the lease on sending this attempt; False while another holds it."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            row = await conn.fetchrow(
                CLAIM, notification_id, replay, attempt, owner, lease, timeout=self._timeout
            )
        return row is not None

    async def release(self, notification_id: str, attempt: int, replay: int, owner: str) -> None:
        """Give back ``owner``'s claim without an outcome (the copy requeued takes it)."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.execute(
                RELEASE_CLAIM, notification_id, replay, attempt, owner, timeout=self._timeout
            )

    async def history(self, notification_id: str) -> list[Attempt]:
        """Every attempt of a notification, oldest first (for operators and tests)."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(SELECT_HISTORY, notification_id, timeout=self._timeout)
        return [
            Attempt(
                r["replay"], r["attempt"], r["status"], r["detail"], r["provider"], r["created_at"]
            )
            for r in rows
        ]
