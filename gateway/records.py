"""Notification records written to UserService in groups (group commit).

Concurrent sends each need their record stored before their job is published. Instead
of one CreateNotificationRecord call (two gRPC stacks and a transaction) per send, the
records that arrive while the previous call is out go together in one
CreateNotificationRecords call, one statement in user_svc. Nothing is answered early:
each send still waits for its own record to be stored, then publishes its own job and
waits for the broker's confirm.
"""

from __future__ import annotations

import asyncio

from notify.v1 import common_pb2, delivery_service_pb2_grpc, user_service_pb2

from notify_kit.batching import Batcher
from notify_kit.errors import InvalidArgument, NotFound, Unavailable
from notify_kit.rpc import unary

Record = user_service_pb2.CreateNotificationRecordRequest


class RecordWriter:
    """``create`` stores one record; concurrent calls share a round trip.

    The batch is whatever queued up while the previous call was out (no waiting window,
    so a lone send pays no extra latency), at most ``max_batch``. A batch UserService
    refuses as invalid is sent record by record, so only the bad one fails; an outage
    fails every send of the batch with the same UNAVAILABLE, as a lone call would.
    """

    def __init__(
        self,
        users: delivery_service_pb2_grpc.DeliveryServiceStub,
        *,
        timeout: float,
        max_batch: int = 64,
    ) -> None:
        self._users = users
        self._timeout = timeout
        self._batcher: Batcher[Record, common_pb2.Notification] = Batcher(
            self._send, window=0.0, max_batch=max_batch, name="notification record"
        )

    def start(self) -> None:
        """Start writing."""
        self._batcher.start()

    async def close(self) -> None:
        """Stop writing; sends still waiting fail as our outage (nothing was answered OK)."""
        await self._batcher.close(Unavailable("SHUTTING_DOWN", "the gateway is stopping"))

    async def create(self, record: Record) -> common_pb2.Notification:
        """The stored record (the existing one when its id was recorded before).

        Bounded by two calls' timeouts (the batch out, then its own): past that the send
        answers UNAVAILABLE (a timeout is our outage), and a record still written later
        stays QUEUED with its outbox job for the reconciler.
        """
        async with asyncio.timeout(2 * self._timeout):
            return await self._batcher.submit(record)

    async def _send(self, records: list[Record]) -> list[common_pb2.Notification | BaseException]:
        try:
            response: user_service_pb2.CreateNotificationRecordsResponse = await unary(
                self._users.CreateNotificationRecords,
                user_service_pb2.CreateNotificationRecordsRequest(records=records),
                timeout=self._timeout,
            )
        except InvalidArgument as exc:
            if len(records) == 1:
                return [exc]
            # Records stand alone: resent each on its own, concurrently.
            alone = await asyncio.gather(*(self._send([record]) for record in records))
            return [outcomes[0] for outcomes in alone]
        return [
            result.notification
            if result.user_found
            else NotFound(
                "USER_NOT_FOUND",
                "no such user",
                metadata={"user_id": record.notification.user_id},
            )
            for record, result in zip(records, response.results, strict=True)
        ]
