"""Dead letters for operators: the consumer that files them, and ``DeadLetterService``.

The consumer reads failed.queue and stores every message, a job or not, before acking
it, so nothing that reaches failed.queue is ever dropped. A replay republishes the job
with its notification id, ``attempt`` 1 and the next replay generation, then reports
QUEUED for that generation: UserService moves the delivery ``FAILED -> QUEUED -> ...``,
and the worker's ledger makes sure a notification delivered meanwhile is not sent again
(replaying twice sends nothing the second time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import uuid
from collections.abc import Callable
from datetime import UTC

import grpc
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from google.protobuf.message import DecodeError
from notify.v1 import (
    common_pb2,
    dead_letter_service_pb2,
    dead_letter_service_pb2_grpc,
    delivery_service_pb2_grpc,
    jobs_pb2,
    user_service_pb2,
)

from gateway.auth import current_api_key
from gateway.dead_letters import (
    DeadLetterStore,
    Filter,
    Incoming,
    Replayable,
    to_message,
)
from gateway.server import CHANNEL_OF_KIND, KIND_OF_CHANNEL
from notify_kit import metrics, rpc
from notify_kit.amqp import EMAIL, KIND_BY_KEY, KIND_BY_TYPE, Publisher, Topology
from notify_kit.errors import InvalidArgument, NotFound, PermissionDenied
from notify_kit.outage import infra_errors
from notify_kit.paging import Cursor, decode_page_token, encode_page_token
from notify_kit.tenancy import DEFAULT_TENANT

log = logging.getLogger(__name__)

DEFAULT_PAGE = 50
_JOB_TYPES: dict[str, Callable[[bytes], jobs_pb2.EmailJob | jobs_pb2.PushJob]] = {
    "email": jobs_pb2.EmailJob.FromString,
    "push": jobs_pb2.PushJob.FromString,
}


def _header(message: AbstractIncomingMessage, name: str) -> str:
    value = (message.headers or {}).get(name, "")
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def incoming(message: AbstractIncomingMessage) -> Incoming:
    """What a failed.queue message says about itself (headers set by the job runner)."""
    # The runner names the kind; a job the broker parked by its delivery limit has only
    # the message type the gateway published it with.
    typed = KIND_BY_TYPE.get(message.type or "")
    kind = _header(message, "x-notify-kind") or (typed.key if typed else "unknown")
    try:
        job = _JOB_TYPES[kind](message.body)
        nid, generation = job.meta.notification_id, job.meta.replay
        correlation = job.meta.correlation_id
    except (KeyError, DecodeError):
        nid, generation, correlation = "", 0, message.correlation_id or ""
    # A job is keyed by itself; anything else gets one row per distinct message.
    key = f"{kind}:{nid}" if nid else f"raw:{hashlib.sha256(message.body).hexdigest()}"
    attempts = _header(message, "x-notify-attempts")
    return Incoming(
        job_key=key,
        kind=kind,
        notification_id=nid,
        generation=generation,
        reason=_header(message, "x-notify-error") or "dead-lettered by the broker",
        attempts=int(attempts) if attempts.isdigit() else 0,
        correlation_id=correlation,
        body=message.body,
        history=_header(message, "x-notify-history") or "[]",
    )


class DeadLetterConsumer:
    """Files every failed.queue message in the store, then acks it.

    While the database is down the message is requeued after a pause (growing while the
    outage lasts, on this one small consumer), never dropped.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        store: DeadLetterStore,
        *,
        max_pause: float = 30.0,
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._store = store
        self._max_pause = max_pause
        self._failures = 0
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self) -> None:
        """Consume failed.queue with a small prefetch."""
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=8)
        await self._topology.declare(channel)
        self._queue = await channel.get_queue(self._topology.failed_queue)
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stop consuming (bounded; the broker may be gone)."""
        if self._queue is not None and self._tag is not None:
            try:
                await asyncio.wait_for(self._queue.cancel(self._tag), 5)
            except (TimeoutError, ConnectionError, RuntimeError):
                log.warning("could not cancel the dead-letter consumer cleanly")

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            letter = incoming(message)
            await self._store.put(letter)
        except infra_errors():
            self._failures += 1
            pause = min(self._max_pause, 0.5 * 2 ** min(self._failures, 10))
            log.exception("could not file a dead letter; requeued in %.1fs", pause)
            await asyncio.sleep(pause)
            await message.reject(requeue=True)
            return
        self._failures = 0
        await message.ack()
        log.warning(
            "dead letter filed",
            extra={"notification_id": letter.notification_id, "reason": letter.reason[:200]},
        )


def _filter(proto: dead_letter_service_pb2.DeadLetterFilter) -> Filter:
    kind = ""
    if proto.channel != common_pb2.CHANNEL_UNSPECIFIED:
        if proto.channel not in KIND_OF_CHANNEL:
            raise InvalidArgument(
                "INVALID_FILTER", "unknown channel", field_violations=[("filter.channel", "")]
            )
        kind = KIND_OF_CHANNEL[proto.channel]
    return Filter(
        kind=kind,
        reason=proto.reason_contains[:200],
        since=proto.since.ToDatetime(tzinfo=UTC) if proto.HasField("since") else None,
        until=proto.until.ToDatetime(tzinfo=UTC) if proto.HasField("until") else None,
        state=int(proto.state),
        # Stored as str(uuid) writes it; the contract accepts any case.
        notification_id=str(uuid.UUID(proto.notification_id)) if proto.notification_id else "",
        correlation_id=proto.correlation_id,
    )


def _dead_letter_id(value: str) -> uuid.UUID:
    """The id as a UUID: its format is the contract's rule, checked before the handler."""
    return uuid.UUID(value)


def _one_target(has_id: bool, has_filter: bool, everything: bool) -> None:
    if [has_id, has_filter, everything].count(True) != 1:
        raise InvalidArgument(
            "INVALID_REQUEST",
            "give exactly one of id, filter or all",
            field_violations=[("id", "exactly one of id, filter, all")],
        )


def _operators_only() -> None:
    """Dead letters hold every tenant's jobs: they are the operators' (the default
    tenant's admin keys), not a tenant's."""
    if current_api_key().tenant != DEFAULT_TENANT:
        raise PermissionDenied(
            "OPERATORS_ONLY", "dead letters are for the default tenant's admin keys"
        )


class DeadLetterServicer(dead_letter_service_pb2_grpc.DeadLetterServiceServicer):
    """List, read, replay and purge dead letters (scope ``admin``)."""

    def __init__(
        self,
        store: DeadLetterStore,
        publisher: Publisher,
        users: delivery_service_pb2_grpc.DeliveryServiceStub,
        *,
        upstream_timeout: float,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._users = users
        self._timeout = upstream_timeout

    async def ListDeadLetters(  # noqa: N802 (gRPC method name)
        self,
        request: dead_letter_service_pb2.ListDeadLettersRequest,
        context: grpc.aio.ServicerContext,
    ) -> dead_letter_service_pb2.ListDeadLettersResponse:
        """A page, newest first, with a keyset page token."""
        _operators_only()
        size = request.page_size or DEFAULT_PAGE  # 0..500 by the contract
        after = decode_page_token(request.page_token) if request.page_token else None
        rows = await self._store.page(_filter(request.filter), after, size + 1)
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(Cursor(page[-1]["created_at"], page[-1]["id"])) if more else ""
        return dead_letter_service_pb2.ListDeadLettersResponse(
            dead_letters=[to_message(r) for r in page], next_page_token=token
        )

    async def GetDeadLetter(  # noqa: N802 (gRPC method name)
        self,
        request: dead_letter_service_pb2.GetDeadLetterRequest,
        context: grpc.aio.ServicerContext,
    ) -> dead_letter_service_pb2.GetDeadLetterResponse:
        """One dead letter with its delivery history."""
        _operators_only()
        row = await self._store.get(_dead_letter_id(request.id))
        if row is None:
            raise NotFound("DEAD_LETTER_NOT_FOUND", "no such dead letter")
        return dead_letter_service_pb2.GetDeadLetterResponse(
            dead_letter=to_message(row, with_history=True)
        )

    async def ReplayDeadLetters(  # noqa: N802 (gRPC method name)
        self,
        request: dead_letter_service_pb2.ReplayDeadLettersRequest,
        context: grpc.aio.ServicerContext,
    ) -> dead_letter_service_pb2.ReplayDeadLettersResponse:
        """Republish one, a filter's worth, or every parked dead letter."""
        _operators_only()
        _one_target(bool(request.id), request.HasField("filter"), request.all)
        if request.id:
            one = await self._store.replayable_one(_dead_letter_id(request.id))
            if one is None:
                raise NotFound("DEAD_LETTER_NOT_FOUND", "no such dead letter")
            targets = [one]
        else:
            where = _filter(request.filter) if request.HasField("filter") else Filter()
            if where.state == 0:  # a bulk replay takes parked ones unless told otherwise
                where = dataclasses.replace(
                    where, state=dead_letter_service_pb2.DEAD_LETTER_STATE_PARKED
                )
            targets = await self._store.replayable(where)
        replayed = skipped = 0
        for target in targets:
            if await self._replay(target):
                replayed += 1
            else:
                skipped += 1
        return dead_letter_service_pb2.ReplayDeadLettersResponse(replayed=replayed, skipped=skipped)

    async def PurgeDeadLetters(  # noqa: N802 (gRPC method name)
        self,
        request: dead_letter_service_pb2.PurgeDeadLettersRequest,
        context: grpc.aio.ServicerContext,
    ) -> dead_letter_service_pb2.PurgeDeadLettersResponse:
        """Delete one, a filter's worth, or all."""
        _operators_only()
        _one_target(bool(request.id), request.HasField("filter"), request.all)
        if request.id:
            purged = await self._store.purge(None, _dead_letter_id(request.id))
        else:
            where = _filter(request.filter) if request.HasField("filter") else Filter()
            purged = await self._store.purge(where)
        return dead_letter_service_pb2.PurgeDeadLettersResponse(purged=purged)

    async def _replay(self, target: Replayable) -> bool:
        """Republish, report QUEUED for the new generation, mark; False if not a job."""
        decode = _JOB_TYPES.get(target.kind)
        if decode is None:
            return False
        try:
            job = decode(target.body)
        except DecodeError:
            return False
        meta = job.meta
        if not meta.notification_id:
            return False
        meta.replay = target.generation + 1
        meta.attempt = 1
        kind = KIND_BY_KEY.get(target.kind, EMAIL)
        await self._publisher.publish(
            kind.key,
            job.SerializeToString(),
            message_type=kind.message_type,
            message_id=meta.notification_id,
            correlation_id=meta.correlation_id,
        )
        report = user_service_pb2.UpdateDeliveryStatusRequest(
            notification_id=meta.notification_id,
            channel=CHANNEL_OF_KIND[target.kind],
            status=common_pb2.NOTIFICATION_STATUS_QUEUED,
            detail="replayed from the dead letters",
            attempt=0,
            replay=meta.replay,
        )
        await rpc.unary(self._users.UpdateDeliveryStatus, report, timeout=self._timeout)
        await self._store.mark_replayed(target.id, target.generation)
        metrics.DEAD_LETTER_REPLAYS.labels(kind.key).inc()
        log.warning(
            "dead letter replayed",
            extra={"notification_id": meta.notification_id, "replay": meta.replay},
        )
        return True
