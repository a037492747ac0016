"""The push job handler (render, send to every device, drop dead tokens) and status reports.

``notify_kit.worker.JobRunner`` owns the delivery guarantees; this module only says how
a ``PushJob`` becomes a sent push and which outcomes are worth a retry.
"""

from __future__ import annotations

import logging

from notify.v1 import (
    common_pb2,
    jobs_pb2,
    template_service_pb2,
    template_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)

from notify_kit import rpc
from notify_kit.amqp import PUSH
from notify_kit.errors import ServiceError
from notify_kit.worker import (
    PermanentError,
    TransientError,
    render,
)
from push_worker.sender import Outcome, PushResult, PushSender

log = logging.getLogger(__name__)


class PushJobHandler:
    """Decodes ``PushJob`` and delivers it: RenderTemplate, then ``PushSender`` per device.

    Delivered when at least one device accepted it. Devices FCM calls UNREGISTERED are
    removed from the user (UserService.RemoveDeviceToken). With none delivered, any
    transient failure makes the whole job transient; otherwise it failed for good.
    """

    kind = PUSH
    channel = common_pb2.CHANNEL_PUSH

    def __init__(
        self,
        templates: template_service_pb2_grpc.TemplateServiceStub,
        users: user_service_pb2_grpc.UserServiceStub,
        sender: PushSender,
        *,
        rpc_timeout: float = 5.0,
    ) -> None:
        self._templates = templates
        self._users = users
        self._sender = sender
        self._rpc_timeout = rpc_timeout

    def decode(self, body: bytes) -> jobs_pb2.PushJob:
        """Parse the queue body (``DecodeError`` when it is not a ``PushJob``)."""
        return jobs_pb2.PushJob.FromString(body)

    async def send(self, job: jobs_pb2.PushJob) -> str:
        """Render, send to every device, clean up dead tokens, judge the outcome."""
        tokens = [target.token for target in job.targets if target.token]
        if not tokens:
            raise PermanentError("no devices")
        content = await self._render(job)
        result = await self._sender.send(
            tokens, content.title, content.body, {"notification_id": job.meta.notification_id}
        )
        for dead in result.of(Outcome.UNREGISTERED):
            await self._remove_token(job.meta.user_id, dead.token)
        return _judge(result)

    async def _render(self, job: jobs_pb2.PushJob) -> template_service_pb2.PushContent:
        response = await render(
            self._templates,
            job.template_id,
            job.language,
            common_pb2.CHANNEL_PUSH,
            job.variables,
            timeout=self._rpc_timeout,
        )
        content: template_service_pb2.PushContent = response.push
        return content

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
        raise TransientError(summary)
    raise PermanentError(f"no device accepted: {summary}")
