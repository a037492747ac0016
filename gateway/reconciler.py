"""The reconciler: every notification ends in exactly one terminal state, in bounded time.

Workers end almost every delivery themselves. What they cannot see is a job that never
reached them: the gateway's publish failed after the record was written (a lost confirm
nobody retried), one channel of a multi-channel publish failed, or the broker parked a
poison job in failed.queue by its delivery limit. Every ``interval`` the reconciler
claims deliveries still in flight (ACCEPTED, QUEUED, SENDING, RETRYING) and untouched
for ``after`` seconds (UserService.ClaimStaleDeliveries, shared safely by several
gateways) and resolves each:

* past its TTL: EXPIRED (a worker holding it would expire it too);
* filed in the dead letters for its generation: FAILED, with the dead letter's reason;
* otherwise, the first time: its outbox copy is published again under the same id
  (workers dedupe, so a job that was in the broker after all is sent once); after that
  it is left to finish, or to its TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from google.protobuf import duration_pb2
from notify.v1 import common_pb2, delivery_service_pb2_grpc, user_service_pb2

from gateway.dead_letters import DeadLetterStore
from gateway.server import KIND_OF_CHANNEL
from notify_kit import rpc
from notify_kit.amqp import KIND_BY_KEY, Publisher
from notify_kit.errors import ServiceError
from notify_kit.outage import infra_errors
from notify_kit.status import is_past
from notify_kit.telemetry import span

log = logging.getLogger(__name__)


def _pass_errors() -> tuple[type[BaseException], ...]:
    """What a pass may meet and try again next period: our own outage, an upstream refusing."""
    return (ServiceError, *infra_errors())


@dataclass
class Pass:
    """What one pass did."""

    republished: int = 0
    expired: int = 0
    failed: int = 0
    left: int = 0


class Reconciler:
    """Resolves stale deliveries; see the module docstring."""

    def __init__(
        self,
        users: delivery_service_pb2_grpc.DeliveryServiceStub,
        publisher: Publisher,
        dead_letters: DeadLetterStore,
        *,
        after: float,
        interval: float,
        timeout: float,
        batch: int = 100,
    ) -> None:
        self._users = users
        self._publisher = publisher
        self._dead_letters = dead_letters
        self._after = after
        self._interval = interval
        self._timeout = timeout
        self._batch = batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run passes in the background until ``stop``."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop between passes (or interrupt the current one)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)  # a period, not a wait for a condition
            try:
                # A pass is work of its own, with no request around it: a trace of its
                # own (sampled at the ratio), so the calls it makes are not roots.
                with span("reconcile"):
                    done = await self.run_once()
            except _pass_errors() as exc:
                log.warning("reconciler pass failed: %r; next pass in %.0fs", exc, self._interval)
                continue
            if done.republished or done.expired or done.failed:
                log.warning("reconciler pass: %s", done)

    async def run_once(self, older_than: float | None = None) -> Pass:
        """One pass over up to ``batch`` stale deliveries."""
        age = self._after if older_than is None else older_than
        request = user_service_pb2.ClaimStaleDeliveriesRequest(
            older_than=duration_pb2.Duration(seconds=int(age), nanos=int(age % 1 * 1e9)),
            limit=self._batch,
        )
        response = await rpc.unary(self._users.ClaimStaleDeliveries, request, timeout=self._timeout)
        done = Pass()
        for stale in response.deliveries:
            await self._resolve(stale, done)
        return done

    async def _resolve(self, stale: user_service_pb2.StaleDelivery, done: Pass) -> None:
        kind = KIND_OF_CHANNEL.get(stale.channel, "")
        if stale.HasField("expire_time") and is_past(stale.expire_time):
            await self._report(stale, common_pb2.NOTIFICATION_STATUS_EXPIRED, "expired undelivered")
            done.expired += 1
            return
        letter = await self._dead_letters.by_job(f"{kind}:{stale.notification_id}")
        if letter is not None and letter.generation >= stale.replay:
            reason = f"dead-lettered: {letter.reason}"
            await self._report(
                stale, common_pb2.NOTIFICATION_STATUS_FAILED, reason, letter.generation
            )
            done.failed += 1
            return
        if stale.reconciled == 0 and stale.job and kind in KIND_BY_KEY:
            job_kind = KIND_BY_KEY[kind]
            await self._publisher.publish(
                job_kind.key,
                stale.job,
                message_type=job_kind.message_type,
                message_id=stale.notification_id,
                correlation_id="",
            )
            log.warning(
                "stale delivery republished from the outbox",
                extra={"notification_id": stale.notification_id, "channel": kind},
            )
            done.republished += 1
            return
        done.left += 1

    async def _report(
        self,
        stale: user_service_pb2.StaleDelivery,
        status: common_pb2.NotificationStatus.ValueType,
        detail: str,
        replay: int | None = None,
    ) -> None:
        request = user_service_pb2.UpdateDeliveryStatusRequest(
            notification_id=stale.notification_id,
            channel=stale.channel,
            status=status,
            detail=detail[:1000],
            attempt=0,
            replay=stale.replay if replay is None else replay,
        )
        await rpc.unary(self._users.UpdateDeliveryStatus, request, timeout=self._timeout)
        log.warning(
            "stale delivery resolved: %s",
            common_pb2.NotificationStatus.Name(status),
            extra={"notification_id": stale.notification_id},
        )
