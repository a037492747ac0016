"""PostgreSQL access for users, devices and notification records (asyncpg only).

Every query runs on a connection taken from the pool with an acquire timeout; the pool
itself (``notify_kit.db.create_pool``) gives each statement a server and a client
timeout. Methods take validated values and return protobuf messages, so the servicer
only validates and routes. Constraint violations are mapped here, next to the SQL that
causes them: the unique e-mail index becomes EMAIL_TAKEN and a missing user behind a
foreign key becomes USER_NOT_FOUND, which keeps check-then-write races out.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from notify.v1 import common_pb2, user_service_pb2

from notify_kit.errors import AlreadyExists, NotFound
from notify_kit.paging import Cursor
from notify_kit.status import ACCEPTED, QUEUED, TERMINAL, Status, aggregate_status
from notify_kit.timestamps import to_timestamp

_ACQUIRE_TIMEOUT = 5.0
_DEADLOCK_TRIES = 3  # runs of one status statement PostgreSQL aborted as a deadlock victim

INSERT_USER = """
INSERT INTO users (email, display_name, locale, timezone, email_opt_out, push_opt_out, tenant)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING id, email, display_name, locale, timezone, email_opt_out, push_opt_out, created_at,
    tenant
"""

SELECT_USER = """
SELECT id, email, display_name, locale, timezone, email_opt_out, push_opt_out, created_at,
    tenant
FROM users WHERE id = $1
"""

USER_TENANT = "SELECT tenant FROM users WHERE id = $1"

SELECT_DEVICES = """
SELECT id, platform, token, token_type, created_at FROM devices WHERE user_id = $1
ORDER BY created_at, id
"""

UPDATE_PREFERENCES = """
UPDATE users SET email_opt_out = $2, push_opt_out = $3 WHERE id = $1
RETURNING email_opt_out, push_opt_out
"""

# A token names one physical device: registering it again keeps the row (and its id),
# registering it for another user moves it. ``previous_user_id`` tells the caller whose
# cached profile lost a device. Reads in the CTE see the table as it was before.
UPSERT_DEVICE = """
WITH previous AS (SELECT user_id FROM devices WHERE token = $3)
INSERT INTO devices (user_id, platform, token, token_type) VALUES ($1, $2, $3, $4)
ON CONFLICT (token) DO UPDATE
SET user_id = EXCLUDED.user_id, platform = EXCLUDED.platform, token_type = EXCLUDED.token_type
RETURNING id, platform, token, token_type, created_at,
    (SELECT user_id FROM previous) AS previous_user_id
"""

DELETE_DEVICE = "DELETE FROM devices WHERE id = $1 AND user_id = $2 RETURNING id"

DELETE_REGISTRATION = "DELETE FROM devices WHERE user_id = $1 AND token = $2 RETURNING id"

# Many records in one statement (atomic on its own, no transaction round trips): the
# notifications not recorded before, then their deliveries; the foreign keys are checked
# at the statement's end, so a delivery may point at a notification inserted beside it.
# Answers the inserted records' rows with their deliveries; an id already recorded
# inserts nothing and is read afterwards.
INSERT_NOTIFICATIONS = """
WITH n AS (
    INSERT INTO notifications (id, user_id, template_id, correlation_id)
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[])
    ON CONFLICT (id) DO NOTHING
    RETURNING id, user_id, template_id, correlation_id, created_at
), d AS (
    INSERT INTO deliveries (notification_id, channel, status, detail, attempts, job, expire_at)
    SELECT * FROM unnest(
        $5::uuid[], $6::smallint[], $7::smallint[], $8::text[], $9::integer[], $10::bytea[],
        $11::timestamptz[]
    ) AS x (notification_id, channel, status, detail, attempts, job, expire_at)
    WHERE x.notification_id IN (SELECT id FROM n)
    RETURNING notification_id, channel, status, detail, attempts, updated_at
)
SELECT n.id, n.user_id, n.template_id, n.correlation_id, n.created_at,
       d.channel, d.status, d.detail, d.attempts, d.updated_at
FROM n JOIN d ON d.notification_id = n.id
ORDER BY n.id, d.channel
"""

SELECT_NOTIFICATIONS = """
SELECT id, user_id, template_id, correlation_id, created_at FROM notifications
WHERE id = ANY($1::uuid[])
"""

# Deliveries in flight (ACCEPTED, QUEUED, SENDING, RETRYING: $3) untouched for $1
# seconds, oldest first, claimed by moving their update time on; SKIP LOCKED lets
# several reconcilers share the work without taking the same row.
CLAIM_STALE = """
WITH stale AS (
    SELECT notification_id, channel FROM deliveries
    WHERE status = ANY($3::smallint[]) AND updated_at < now() - $1 * interval '1 second'
    ORDER BY updated_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries d SET updated_at = now(), reconciled = d.reconciled + 1
FROM stale WHERE d.notification_id = stale.notification_id AND d.channel = stale.channel
RETURNING d.notification_id, d.channel, d.status, d.replay, d.job, d.expire_at,
    d.reconciled - 1 AS reconciled
"""

IN_FLIGHT = (
    common_pb2.NOTIFICATION_STATUS_ACCEPTED,
    common_pb2.NOTIFICATION_STATUS_QUEUED,
    common_pb2.NOTIFICATION_STATUS_SENDING,
    common_pb2.NOTIFICATION_STATUS_RETRYING,
)

SELECT_NOTIFICATION = """
SELECT id, user_id, template_id, correlation_id, created_at,
    (SELECT tenant FROM users WHERE users.id = notifications.user_id) AS tenant
FROM notifications WHERE id = $1
"""

LIST_NOTIFICATIONS = """
SELECT id, user_id, template_id, correlation_id, created_at FROM notifications
WHERE user_id = $1 AND EXISTS (SELECT 1 FROM users WHERE id = $1 AND tenant = $3)
ORDER BY created_at DESC, id DESC
LIMIT $2
"""

LIST_NOTIFICATIONS_AFTER = """
SELECT id, user_id, template_id, correlation_id, created_at FROM notifications
WHERE user_id = $1 AND (created_at, id) < ($4, $5)
  AND EXISTS (SELECT 1 FROM users WHERE id = $1 AND tenant = $3)
ORDER BY created_at DESC, id DESC
LIMIT $2
"""

SELECT_DELIVERIES = """
SELECT notification_id, channel, status, detail, attempts, updated_at FROM deliveries
WHERE notification_id = ANY($1::uuid[])
ORDER BY notification_id, channel
"""

# One statement for a batch of reports, each to a different delivery, so no report can
# slip between a read of the status and the write. Within one replay generation the
# UPDATE skips terminal rows (and a QUEUED report once a worker has moved on: $7/$8); a
# report of a newer generation (an operator's replay of a dead letter) reopens anything
# but DELIVERED ($9) and restarts the attempt count; a report of an older generation
# changes nothing. The second branch returns the row as stored when the UPDATE skipped
# it (it reads the snapshot from before the UPDATE, hence NOT EXISTS). A report that
# finds no delivery returns no row. ``i`` is the report's place in the batch.
UPDATE_DELIVERIES = """
WITH r AS (
    SELECT * FROM unnest($1::uuid[], $2::smallint[], $3::smallint[], $4::text[],
                         $5::integer[], $6::integer[])
        WITH ORDINALITY AS r (notification_id, channel, status, detail, attempt, replay, i)
),
updated AS (
    UPDATE deliveries d
    SET status = r.status, detail = r.detail, updated_at = now(), replay = r.replay,
        attempts = CASE WHEN r.replay > d.replay THEN r.attempt
                        ELSE greatest(d.attempts, r.attempt) END
    FROM r
    WHERE d.notification_id = r.notification_id AND d.channel = r.channel
      AND (
        (r.replay > d.replay AND d.status <> $9::smallint)
        OR (r.replay = d.replay AND NOT (d.status = ANY($10::smallint[]))
            AND (r.status <> $7::smallint OR d.status = $8::smallint))
      )
    RETURNING r.i, d.channel, d.status, d.detail, d.attempts, d.updated_at
)
SELECT i, channel, status, detail, attempts, updated_at FROM updated
UNION ALL
SELECT r.i, d.channel, d.status, d.detail, d.attempts, d.updated_at
FROM r JOIN deliveries d ON d.notification_id = r.notification_id AND d.channel = r.channel
WHERE NOT EXISTS (SELECT 1 FROM updated u WHERE u.i = r.i)
"""


@dataclass(frozen=True, slots=True)
class NewUser:
    """A validated user to create."""

    email: str
    display_name: str
    locale: str
    timezone: str
    email_opt_out: bool
    push_opt_out: bool


@dataclass(frozen=True, slots=True)
class NewDevice:
    """A validated push device to register."""

    platform: user_service_pb2.DevicePlatform.ValueType
    token: str
    token_type: user_service_pb2.DeviceTokenType.ValueType = (
        user_service_pb2.DEVICE_TOKEN_TYPE_UNSPECIFIED
    )


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """The initial state of one channel of a new notification."""

    channel: common_pb2.Channel.ValueType
    status: Status
    detail: str
    attempts: int
    job: bytes | None = None  # the outbox copy of its queue job
    expire_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class NewNotification:
    """A validated notification record, as the gateway accepted it."""

    id: uuid.UUID
    user_id: uuid.UUID
    template_id: str
    correlation_id: str
    deliveries: tuple[NewDelivery, ...]


@dataclass(frozen=True, slots=True)
class StatusReport:
    """A validated progress report of one delivery."""

    notification_id: uuid.UUID
    channel: common_pb2.Channel.ValueType
    status: Status
    detail: str
    attempt: int
    replay: int = 0


@dataclass(frozen=True, slots=True)
class DeviceRegistration:
    """The stored device, and the user it was taken from when the token moved."""

    device: user_service_pb2.Device
    previous_user_id: uuid.UUID | None


class UserStore:
    """Queries of user_svc over one asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create_user(self, user: NewUser, tenant: str) -> user_service_pb2.User:
        """Insert ``user`` into ``tenant``; AlreadyExists(EMAIL_TAKEN) when the address is
        registered there."""
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            try:
                row = await conn.fetchrow(
                    INSERT_USER,
                    user.email,
                    user.display_name,
                    user.locale,
                    user.timezone,
                    user.email_opt_out,
                    user.push_opt_out,
                    tenant,
                )
            except asyncpg.UniqueViolationError as exc:
                raise AlreadyExists(
                    "EMAIL_TAKEN",
                    "a user with this e-mail address exists",
                    field_violations=[("user.email", "is already registered")],
                ) from exc
        return _user(row, [])

    async def get_user(self, user_id: uuid.UUID) -> user_service_pb2.User | None:
        """The user with preferences and devices, or None."""
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            row = await conn.fetchrow(SELECT_USER, user_id)
            if row is None:
                return None
            devices = await conn.fetch(SELECT_DEVICES, user_id)
        return _user(row, devices)

    async def delivery_profile(self, user_id: uuid.UUID) -> user_service_pb2.DeliveryProfile | None:
        """What senders need to reach the user, or None."""
        user = await self.get_user(user_id)
        if user is None:
            return None
        return user_service_pb2.DeliveryProfile(
            user_id=user.id,
            email=user.email,
            display_name=user.display_name,
            locale=user.locale,
            timezone=user.timezone,
            preferences=user.preferences,
            devices=user.devices,
            tenant=user.tenant,
        )

    async def user_tenant(self, user_id: uuid.UUID) -> str | None:
        """The user's tenant, or None when there is no such user."""
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            tenant: str | None = await conn.fetchval(USER_TENANT, user_id)
        return tenant

    async def update_preferences(
        self, user_id: uuid.UUID, preferences: user_service_pb2.Preferences
    ) -> user_service_pb2.Preferences | None:
        """Replace the preferences; None when the user does not exist."""
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            row = await conn.fetchrow(
                UPDATE_PREFERENCES, user_id, preferences.email_opt_out, preferences.push_opt_out
            )
        if row is None:
            return None
        return user_service_pb2.Preferences(
            email_opt_out=row["email_opt_out"], push_opt_out=row["push_opt_out"]
        )

    async def register_device(self, user_id: uuid.UUID, device: NewDevice) -> DeviceRegistration:
        """Store the device for the user; NotFound(USER_NOT_FOUND) when there is no user."""
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            try:
                row = await conn.fetchrow(
                    UPSERT_DEVICE, user_id, device.platform, device.token, device.token_type
                )
            except asyncpg.ForeignKeyViolationError as exc:
                raise _user_not_found(user_id) from exc
        previous: uuid.UUID | None = row["previous_user_id"]
        return DeviceRegistration(
            device=_device(row), previous_user_id=None if previous == user_id else previous
        )

    async def delete_device(self, user_id: uuid.UUID, device_id: uuid.UUID) -> bool:
        """Delete the user's device; False when the user has no such device."""
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            return bool(await conn.fetch(DELETE_DEVICE, device_id, user_id))

    async def remove_device_token(self, user_id: uuid.UUID, token: str) -> int:
        """Delete the user's device with this token; return how many went (0 or 1)."""
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            return len(await conn.fetch(DELETE_REGISTRATION, user_id, token))

    async def create_notification(self, record: NewNotification) -> common_pb2.Notification:
        """Insert the record and its deliveries once; return what is stored for the id.

        A repeated id (the gateway retrying) inserts nothing and returns the first record,
        so retries never duplicate or reset deliveries.
        """
        [stored] = await self.create_notifications([record])
        if isinstance(stored, NotFound):
            raise stored
        return stored

    async def create_notifications(
        self, records: Sequence[NewNotification]
    ) -> list[common_pb2.Notification | NotFound]:
        """``create_notification`` for many records in one statement, answered in order.

        A record whose user does not exist is answered USER_NOT_FOUND on its own: the
        statement fails as a whole, so the records are then inserted one by one.
        """
        try:
            return await self._insert_notifications(records)
        except asyncpg.ForeignKeyViolationError:
            if len(records) == 1:
                return [_user_not_found(records[0].user_id)]
        return [(await self.create_notifications([r]))[0] for r in records]

    async def _insert_notifications(
        self, records: Sequence[NewNotification]
    ) -> list[common_pb2.Notification | NotFound]:
        first: dict[uuid.UUID, NewNotification] = {}
        for record in records:
            first.setdefault(record.id, record)  # an id twice: the first one wins
        # In id order, so two batches sharing ids lock their rows in the same order.
        unique = sorted(first.values(), key=lambda r: r.id)
        deliveries = [(r.id, d) for r in unique for d in r.deliveries]
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            rows = await conn.fetch(
                INSERT_NOTIFICATIONS,
                [r.id for r in unique],
                [r.user_id for r in unique],
                [r.template_id for r in unique],
                [r.correlation_id for r in unique],
                [nid for nid, _ in deliveries],
                [d.channel for _, d in deliveries],
                [d.status for _, d in deliveries],
                [d.detail for _, d in deliveries],
                [d.attempts for _, d in deliveries],
                [d.job for _, d in deliveries],
                [d.expire_at for _, d in deliveries],
            )
            by_id: dict[uuid.UUID, list[Any]] = {}
            for row in rows:
                by_id.setdefault(row["id"], []).append(row)
            stored = {
                nid: _notification(group[0], [_delivery(row) for row in group])
                for nid, group in by_id.items()
            }
            earlier = [nid for nid in first if nid not in stored]
            if earlier:
                found = await conn.fetch(SELECT_NOTIFICATIONS, earlier)
                for note in await _notifications(conn, found):
                    stored[uuid.UUID(note.id)] = note
        return [stored.get(r.id) or _user_not_found(r.user_id) for r in records]

    async def claim_stale(
        self, older_than: float, limit: int
    ) -> list[user_service_pb2.StaleDelivery]:
        """Claim up to ``limit`` in-flight deliveries untouched for ``older_than`` seconds."""
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            rows = await conn.fetch(CLAIM_STALE, older_than, limit, list(IN_FLIGHT))
        return [
            user_service_pb2.StaleDelivery(
                notification_id=str(r["notification_id"]),
                channel=common_pb2.Channel.ValueType(r["channel"]),
                status=common_pb2.NotificationStatus.ValueType(r["status"]),
                replay=r["replay"],
                job=r["job"] or b"",
                expire_time=to_timestamp(r["expire_at"]),
                reconciled=r["reconciled"],
            )
            for r in rows
        ]

    async def get_notification(
        self, notification_id: uuid.UUID
    ) -> tuple[common_pb2.Notification, str] | None:
        """The record with its deliveries and its user's tenant, or None."""
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            row = await conn.fetchrow(SELECT_NOTIFICATION, notification_id)
            if row is None:
                return None
            found = await _notifications(conn, [row])
        return found[0], row["tenant"]

    async def list_notifications(
        self, user_id: uuid.UUID, tenant: str, page_size: int, after: Cursor | None
    ) -> tuple[list[common_pb2.Notification], Cursor | None]:
        """One page newest first, and the cursor of the next page (None on the last); a
        user of another tenant has none."""
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            # One extra row says whether another page exists without a COUNT.
            if after is None:
                rows = await conn.fetch(LIST_NOTIFICATIONS, user_id, page_size + 1, tenant)
            else:
                rows = await conn.fetch(
                    LIST_NOTIFICATIONS_AFTER,
                    user_id,
                    page_size + 1,
                    tenant,
                    after.created_at,
                    after.id,
                )
            page = rows[:page_size]
            records = await _notifications(conn, page)
        if len(rows) <= page_size:
            return records, None
        last = page[-1]
        return records, Cursor(created_at=last["created_at"], id=last["id"])

    async def update_delivery(self, report: StatusReport) -> common_pb2.Delivery | None:
        """Apply the report unless the delivery is terminal; the stored row, or None."""
        [stored] = await self.update_deliveries([report])
        return stored

    async def update_deliveries(
        self, reports: Sequence[StatusReport]
    ) -> list[common_pb2.Delivery | None]:
        """Apply each report as ``update_delivery`` does, in order: one statement per
        round of reports to distinct deliveries (one round unless a batch carries two
        reports of one delivery, SENDING then DELIVERED, which apply one after the other).

        Each report stands alone (no transaction around the rounds): a report that finds
        no delivery is answered None and the others still apply.
        """
        stored: list[common_pb2.Delivery | None] = [None] * len(reports)
        async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            for places in _rounds(reports):
                batch = [reports[i] for i in places]
                for tries_left in reversed(range(_DEADLOCK_TRIES)):
                    try:
                        rows = await conn.fetch(
                            UPDATE_DELIVERIES,
                            [r.notification_id for r in batch],
                            [r.channel for r in batch],
                            [r.status for r in batch],
                            [r.detail for r in batch],
                            [r.attempt for r in batch],
                            [r.replay for r in batch],
                            QUEUED,
                            ACCEPTED,
                            common_pb2.NOTIFICATION_STATUS_DELIVERED,
                            sorted(TERMINAL),
                        )
                        break
                    except asyncpg.DeadlockDetectedError:
                        # Two batches sharing rows (copies of one job reported by two
                        # workers) locked them in opposite orders; PostgreSQL aborted
                        # this statement whole, so it is simply run again.
                        if not tries_left:
                            raise
                for row in rows:
                    stored[places[row["i"] - 1]] = _delivery(row)
        return stored


def _rounds(reports: Sequence[StatusReport]) -> list[list[int]]:
    """Places of ``reports`` grouped so that no round holds two reports of one delivery
    (one UPDATE cannot change a row twice) and a delivery's reports keep their order;
    each round in key order, the order its rows are locked in (fewer deadlocks)."""
    rounds: list[list[int]] = []
    seen: dict[tuple[uuid.UUID, int], int] = {}
    for place, report in enumerate(reports):
        key = (report.notification_id, report.channel)
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(place)
    for places in rounds:
        places.sort(key=lambda i: (reports[i].notification_id, reports[i].channel))
    return rounds


def _user_not_found(user_id: uuid.UUID) -> NotFound:
    return NotFound("USER_NOT_FOUND", "no such user", metadata={"user_id": str(user_id)})


async def _notifications(
    conn: asyncpg.Connection, rows: Sequence[Any]
) -> list[common_pb2.Notification]:
    """Messages for notification rows, with their deliveries fetched in one query."""
    deliveries: dict[uuid.UUID, list[common_pb2.Delivery]] = {row["id"]: [] for row in rows}
    if deliveries:
        for d in await conn.fetch(SELECT_DELIVERIES, list(deliveries)):
            deliveries[d["notification_id"]].append(_delivery(d))
    return [_notification(row, deliveries[row["id"]]) for row in rows]


def _user(row: Any, devices: Sequence[Any]) -> user_service_pb2.User:
    return user_service_pb2.User(
        id=str(row["id"]),
        email=row["email"],
        display_name=row["display_name"],
        locale=row["locale"],
        timezone=row["timezone"],
        preferences=user_service_pb2.Preferences(
            email_opt_out=row["email_opt_out"], push_opt_out=row["push_opt_out"]
        ),
        devices=[_device(d) for d in devices],
        create_time=to_timestamp(row["created_at"]),
        tenant=row["tenant"],
    )


def _device(row: Any) -> user_service_pb2.Device:
    return user_service_pb2.Device(
        id=str(row["id"]),
        platform=user_service_pb2.DevicePlatform.ValueType(row["platform"]),
        token=row["token"],
        token_type=user_service_pb2.DeviceTokenType.ValueType(row["token_type"]),
        create_time=to_timestamp(row["created_at"]),
    )


def _delivery(row: Any) -> common_pb2.Delivery:
    return common_pb2.Delivery(
        channel=common_pb2.Channel.ValueType(row["channel"]),
        status=Status(row["status"]),
        detail=row["detail"],
        attempts=row["attempts"],
        update_time=to_timestamp(row["updated_at"]),
    )


def _notification(row: Any, deliveries: list[common_pb2.Delivery]) -> common_pb2.Notification:
    return common_pb2.Notification(
        id=str(row["id"]),
        user_id=str(row["user_id"]),
        template_id=row["template_id"],
        status=aggregate_status(d.status for d in deliveries),
        deliveries=deliveries,
        create_time=to_timestamp(row["created_at"]),
        correlation_id=row["correlation_id"],
    )
