"""The dead-letter store: jobs from failed.queue, queryable, replayable (PostgreSQL).

Rows are keyed by the job (kind + notification id), so a copy redelivered by the broker
and a replayed job that fails again update one row instead of piling up; a copy of an
older generation never overwrites a newer one. Filters are bound parameters only.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from notify.v1 import common_pb2, dead_letter_service_pb2

from gateway.server import CHANNEL_OF_KIND
from notify_kit.paging import Cursor
from notify_kit.timestamps import to_timestamp

PARKED = dead_letter_service_pb2.DEAD_LETTER_STATE_PARKED
REPLAYED = dead_letter_service_pb2.DEAD_LETTER_STATE_REPLAYED

_UPSERT = """
INSERT INTO dead_letters
    (job_key, kind, notification_id, generation, reason, attempts, correlation_id, body, history)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)
ON CONFLICT (job_key) DO UPDATE
SET generation = EXCLUDED.generation, reason = EXCLUDED.reason, attempts = EXCLUDED.attempts,
    body = EXCLUDED.body, history = EXCLUDED.history, state = 1, created_at = now()
WHERE dead_letters.generation < EXCLUDED.generation
"""

_COLUMNS = """id, kind, notification_id, generation, reason, attempts, correlation_id, state,
replay_count, replayed_at, created_at"""

# $1 channel kind or '', $2 reason text or '', $3 since, $4 until, $5 state or 0,
# $6 notification id or '', $7 correlation id or '' (Filter.args, in this order).
_WHERE = """
($1 = '' OR kind = $1)
AND ($2 = '' OR strpos(lower(reason), lower($2)) > 0)
AND ($3::timestamptz IS NULL OR created_at >= $3)
AND ($4::timestamptz IS NULL OR created_at < $4)
AND ($5 = 0 OR state = $5)
AND ($6 = '' OR notification_id = $6)
AND ($7 = '' OR correlation_id = $7)
"""

# Composed of the constants above only (no caller text): hence the S608 waivers.
_LIST = f"""
SELECT {_COLUMNS} FROM dead_letters
WHERE {_WHERE} AND ($8::timestamptz IS NULL OR (created_at, id) < ($8, $9))
ORDER BY created_at DESC, id DESC
LIMIT $10
"""  # noqa: S608

_GET = f"SELECT {_COLUMNS}, body, history FROM dead_letters WHERE id = $1"  # noqa: S608
_SELECT_FOR_REPLAY = f"SELECT id, kind, generation, body FROM dead_letters WHERE {_WHERE}"  # noqa: S608
_MARK_REPLAYED = """
UPDATE dead_letters SET state = 2, replay_count = replay_count + 1, replayed_at = now()
WHERE id = $1 AND generation = $2
"""
_PURGE = f"DELETE FROM dead_letters WHERE {_WHERE} RETURNING id"  # noqa: S608
_PURGE_ONE = "DELETE FROM dead_letters WHERE id = $1 RETURNING id"
_BY_JOB = "SELECT generation, reason FROM dead_letters WHERE job_key = $1"


@dataclass(frozen=True, slots=True)
class Filter:
    """A validated ``DeadLetterFilter`` (empty values match everything)."""

    kind: str = ""
    reason: str = ""
    since: datetime | None = None
    until: datetime | None = None
    state: int = 0
    notification_id: str = ""
    correlation_id: str = ""

    def args(self) -> tuple[Any, ...]:
        """The seven ``_WHERE`` parameters."""
        return (
            self.kind,
            self.reason,
            self.since,
            self.until,
            self.state,
            self.notification_id,
            self.correlation_id,
        )


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message from failed.queue, as the consumer read it."""

    job_key: str
    kind: str
    notification_id: str
    generation: int
    reason: str
    attempts: int
    correlation_id: str
    body: bytes
    history: str  # JSON list


@dataclass(frozen=True, slots=True)
class Filed:
    """What the reconciler needs to know of a job's dead letter."""

    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class Replayable:
    """What replaying one dead letter needs."""

    id: uuid.UUID
    kind: str
    generation: int
    body: bytes


_STATUS_PREFIX = "NOTIFICATION_STATUS_"


def _attempt(row: dict[str, Any]) -> dead_letter_service_pb2.DeliveryAttempt:
    status = common_pb2.NotificationStatus.Value(_STATUS_PREFIX + str(row.get("status", "")))
    return dead_letter_service_pb2.DeliveryAttempt(
        replay=int(row.get("replay", 0)),
        attempt=int(row.get("attempt", 0)),
        status=status,
        provider=str(row.get("provider", "")),
        detail=str(row.get("detail", "")),
        time=to_timestamp(datetime.fromisoformat(str(row["time"]))) if row.get("time") else None,
    )


def to_message(row: Any, *, with_history: bool = False) -> dead_letter_service_pb2.DeadLetter:
    """A stored row as the contract's ``DeadLetter``."""
    message = dead_letter_service_pb2.DeadLetter(
        id=str(row["id"]),
        notification_id=row["notification_id"],
        channel=CHANNEL_OF_KIND.get(row["kind"], common_pb2.CHANNEL_UNSPECIFIED),
        reason=row["reason"],
        attempts=row["attempts"],
        correlation_id=row["correlation_id"],
        create_time=to_timestamp(row["created_at"]),
        state=row["state"],
        replay_count=row["replay_count"],
        replay_time=to_timestamp(row["replayed_at"]),
    )
    if with_history:
        history = row["history"]
        rows = json.loads(history) if isinstance(history, str) else history
        message.history.extend(_attempt(r) for r in rows if isinstance(r, dict))
    return message


class DeadLetterStore:
    """asyncpg over ``dead_letters``; every call bounds the pool wait and the statement."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 5.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def put(self, letter: Incoming) -> None:
        """Store a dead letter (idempotent for copies of the same generation)."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.execute(
                _UPSERT,
                letter.job_key,
                letter.kind,
                letter.notification_id,
                letter.generation,
                letter.reason,
                letter.attempts,
                letter.correlation_id,
                letter.body,
                letter.history,
                timeout=self._timeout,
            )

    async def page(self, where: Filter, after: Cursor | None, limit: int) -> list[Any]:
        """A page, newest first, strictly after ``after``."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return list(
                await conn.fetch(
                    _LIST,
                    *where.args(),
                    after.created_at if after else None,
                    after.id if after else None,
                    limit,
                    timeout=self._timeout,
                )
            )

    async def get(self, ident: uuid.UUID) -> Any | None:
        """One row with its body and history."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return await conn.fetchrow(_GET, ident, timeout=self._timeout)

    async def by_job(self, job_key: str) -> Filed | None:
        """The dead letter of one job (``kind:notification_id``), if it was filed."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            row = await conn.fetchrow(_BY_JOB, job_key, timeout=self._timeout)
        return None if row is None else Filed(row["generation"], row["reason"])

    async def replayable(self, where: Filter) -> list[Replayable]:
        """The dead letters a replay of ``where`` covers."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(_SELECT_FOR_REPLAY, *where.args(), timeout=self._timeout)
        return [Replayable(r["id"], r["kind"], r["generation"], r["body"]) for r in rows]

    async def replayable_one(self, ident: uuid.UUID) -> Replayable | None:
        """One dead letter to replay, whatever its state."""
        row = await self.get(ident)
        if row is None:
            return None
        return Replayable(row["id"], row["kind"], row["generation"], row["body"])

    async def mark_replayed(self, ident: uuid.UUID, generation: int) -> None:
        """Record a replay (unless the row was overwritten by a newer failure meanwhile)."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.execute(_MARK_REPLAYED, ident, generation, timeout=self._timeout)

    async def purge(self, where: Filter | None, ident: uuid.UUID | None = None) -> int:
        """Delete one row or those matching ``where``; return how many went."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            if ident is not None:
                rows: Sequence[Any] = await conn.fetch(_PURGE_ONE, ident, timeout=self._timeout)
            else:
                assert where is not None
                rows = await conn.fetch(_PURGE, *where.args(), timeout=self._timeout)
        return len(rows)
