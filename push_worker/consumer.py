"""The push job handler: render, send to every device through the provider chain, drop
dead devices.

``notify_kit.jobs.runner.JobRunner`` owns the delivery guarantees and
``notify_kit.jobs.providers.ProviderChain`` the failover between FCM and OneSignal;
this module says how a ``PushJob`` becomes an ``OutgoingPush`` and what the per-device
results mean for the job.
"""

from __future__ import annotations

import logging
from typing import Protocol

from notify.v1 import (
    common_pb2,
    delivery_service_pb2_grpc,
    jobs_pb2,
    user_service_pb2,
)

from notify_kit import rpc
from notify_kit.amqp import PUSH
from notify_kit.errors import ServiceError
from notify_kit.jobs.errors import PermanentError, TransientError
from notify_kit.jobs.providers import Provider, ProviderChain, Sent, Skip
from notify_kit.jobs.templates import Templates
from push_worker.outgoing import Outcome, OutgoingPush, PushResult, Target, TargetKind

log = logging.getLogger(__name__)

_KINDS = {
    user_service_pb2.DEVICE_TOKEN_TYPE_UNSPECIFIED: TargetKind.FCM_TOKEN,
    user_service_pb2.DEVICE_TOKEN_TYPE_FCM_REGISTRATION: TargetKind.FCM_TOKEN,
    user_service_pb2.DEVICE_TOKEN_TYPE_FCM_INSTALLATION: TargetKind.FCM_FID,
    user_service_pb2.DEVICE_TOKEN_TYPE_ONESIGNAL_SUBSCRIPTION: TargetKind.ONESIGNAL,
}


class PushProvider(Provider[OutgoingPush, PushResult], Protocol):
    """A push provider, with the kinds of device address it can reach."""

    @property
    def kinds(self) -> frozenset[TargetKind]:
        """Target kinds this provider addresses; the others are not given to it."""


async def attempt(provider: PushProvider, push: OutgoingPush) -> PushResult:
    """One provider's try: only its targets; all of them transient is a provider failure.

    That failure is what the breaker counts and what moves the push to the next
    provider; any other mix of answers means the provider worked.
    """
    mine = tuple(t for t in push.targets if t.kind in provider.kinds)
    if not mine:
        raise Skip(f"{provider.name} reaches none of these devices")
    result = await provider.send(
        OutgoingPush(push.notification_id, push.user_id, mine, push.title, push.body, push.data)
    )
    if result.results and all(r.outcome is Outcome.TRANSIENT for r in result.results):
        hints = [r.retry_after for r in result.results if r.retry_after is not None]
        summary = "; ".join(sorted({r.detail for r in result.results}))[:500]
        raise TransientError(summary, retry_after=max(hints) if hints else None)
    return result


class PushJobHandler:
    """Decodes ``PushJob`` and delivers it: RenderTemplate, the chain, token clean-up.

    Delivered when at least one device accepted it. Devices a provider calls
    UNREGISTERED are removed from the user (DeliveryService.RemoveDeviceToken). With none
    delivered, any transient failure makes the whole job transient; otherwise it
    failed for good.
    """

    kind = PUSH
    channel = common_pb2.CHANNEL_PUSH

    def __init__(
        self,
        templates: Templates,
        users: delivery_service_pb2_grpc.DeliveryServiceStub,
        chain: ProviderChain[OutgoingPush, PushResult],
        *,
        rpc_timeout: float = 5.0,
    ) -> None:
        self._templates = templates
        self._users = users
        self.chain = chain
        self._rpc_timeout = rpc_timeout

    def decode(self, body: bytes) -> jobs_pb2.PushJob:
        """Parse the queue body (``DecodeError`` when it is not a ``PushJob``)."""
        return jobs_pb2.PushJob.FromString(body)

    async def send(self, job: jobs_pb2.PushJob) -> Sent[str]:
        """Render, send to every device, clean up dead tokens, judge the outcome."""
        targets = tuple(
            Target(t.token, _KINDS.get(t.token_type, TargetKind.FCM_TOKEN))
            for t in job.targets
            if t.token
        )
        if not targets:
            raise PermanentError("no devices")
        response = await self._templates.render(
            job.meta.tenant,
            job.template_id,
            job.template_version,
            job.language,
            common_pb2.CHANNEL_PUSH,
            job.variables,
        )
        push = OutgoingPush(
            job.meta.notification_id,
            job.meta.user_id,
            targets,
            response.push.title,
            response.push.body,
        )
        sent = await self.chain.send(push)
        for dead in sent.result.of(Outcome.UNREGISTERED):
            await self._remove_token(job.meta.user_id, dead.address)
        return Sent(sent.provider, _judge(sent.result))

    async def _remove_token(self, user_id: str, token: str) -> None:
        """Best effort: a token that stays is found dead again on the next push."""
        request = user_service_pb2.RemoveDeviceTokenRequest(user_id=user_id, token=token)
        try:
            await rpc.unary(self._users.RemoveDeviceToken, request, timeout=self._rpc_timeout)
        except ServiceError as exc:
            log.warning("could not remove an unregistered token: %s", exc.reason)


def _judge(result: PushResult) -> str:
    """The delivery detail, or the error that decides between retry and dead letter."""
    delivered = result.of(Outcome.DELIVERED)
    if delivered:
        ids = ", ".join(r.detail for r in delivered)
        return f"{len(delivered)}/{len(result.results)} devices: {ids}"
    summary = "; ".join(f"{r.outcome.value}: {r.detail}" for r in result.results)
    if result.of(Outcome.TRANSIENT):
        hints = [r.retry_after for r in result.results if r.retry_after is not None]
        raise TransientError(summary, retry_after=max(hints) if hints else None)
    raise PermanentError(f"no device accepted: {summary}")
