"""The workers' calls to our own services: rendering and status reports.

Answers are sorted here into what the runner understands: a template that is missing
or lacks the channel is ``PermanentError`` (a retry renders the same); a service that
is down or slow is ``Blocked`` (our outage: no attempt is spent on it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Literal, TypeAlias

from google.protobuf import struct_pb2
from notify.v1 import (
    common_pb2,
    delivery_service_pb2_grpc,
    template_service_pb2,
    template_service_pb2_grpc,
    user_service_pb2,
)

from notify_kit import rpc
from notify_kit.batching import Batcher
from notify_kit.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError
from notify_kit.jobs.errors import Blocked, PermanentError

log = logging.getLogger(__name__)

Status: TypeAlias = common_pb2.NotificationStatus.ValueType
# (notification id, status, detail, attempt, replay generation)
StatusReport = Callable[[str, Status, str, int, int], Awaitable[None]]

# Upstream answers that will not change on a retry; everything else (UNAVAILABLE,
# DEADLINE_EXCEEDED, INTERNAL, ...) might.
PERMANENT_UPSTREAM = (InvalidArgument, NotFound, FailedPrecondition)


async def render(
    templates: template_service_pb2_grpc.TemplateServiceStub,
    template_id: str,
    language: str,
    channel: common_pb2.Channel.ValueType,
    variables: struct_pb2.Struct,
    *,
    timeout: float,
    metadata: tuple[tuple[str, str], ...],
) -> template_service_pb2.RenderTemplateResponse:
    """RenderTemplate (``metadata`` names the tenant), with the answer sorted into
    permanent failures and our outages."""
    request = template_service_pb2.RenderTemplateRequest(
        template_id=template_id, language=language, channel=channel, variables=variables
    )
    try:
        response: template_service_pb2.RenderTemplateResponse = await rpc.unary(
            templates.RenderTemplate, request, timeout=timeout, metadata=metadata
        )
    except PERMANENT_UPSTREAM as exc:
        raise PermanentError(f"template {template_id!r}: {exc.reason}") from exc
    except ServiceError as exc:
        raise Blocked(f"template service: {exc.reason}") from exc
    field: Literal["email", "push"] = "email" if channel == common_pb2.CHANNEL_EMAIL else "push"
    if not response.HasField(field):
        raise PermanentError(f"template {template_id!r} has no {field} content")
    return response


class StatusReporter:
    """The runner's ``report`` callback: status reports to UserService, in batches.

    Reports arriving within ``window`` seconds of the first one (at most ``max_batch``)
    go out as one ``UpdateDeliveryStatuses`` call, applied in order: a busy worker makes
    one RPC for many deliveries instead of one each. Every caller still learns the fate
    of its own report: a report UserService can never accept (no such delivery, an
    invalid request) is logged and dropped so the job is not held forever; any other
    failure of the call is our outage (``Blocked``) for every report in it, and each
    caller's runner holds its job and reports again.
    """

    def __init__(
        self,
        users: delivery_service_pb2_grpc.DeliveryServiceStub,
        channel: common_pb2.Channel.ValueType,
        *,
        timeout: float = 5.0,
        window: float = 0.002,
        max_batch: int = 128,
    ) -> None:
        self._users = users
        self._channel = channel
        self._timeout = timeout
        self._batcher: Batcher[user_service_pb2.UpdateDeliveryStatusRequest, None] = Batcher(
            self._send, window=window, max_batch=max_batch, name="status report"
        )

    def start(self) -> None:
        """Start sending batches."""
        self._batcher.start()

    async def close(self) -> None:
        """Stop sending; reports still queued fail as our outage (their jobs are held)."""
        await self._batcher.close(Blocked("status reporter stopped"))

    async def __call__(
        self, notification_id: str, status: Status, detail: str, attempt: int, replay: int
    ) -> None:
        await self._batcher.submit(
            user_service_pb2.UpdateDeliveryStatusRequest(
                notification_id=notification_id,
                channel=self._channel,
                status=status,
                detail=detail,
                attempt=attempt,
                replay=replay,
            )
        )

    async def _send(
        self, reports: list[user_service_pb2.UpdateDeliveryStatusRequest]
    ) -> list[BaseException | None]:
        request = user_service_pb2.UpdateDeliveryStatusesRequest(reports=reports)
        try:
            response: user_service_pb2.UpdateDeliveryStatusesResponse = await rpc.unary(
                self._users.UpdateDeliveryStatuses, request, timeout=self._timeout
            )
        except PERMANENT_UPSTREAM as exc:
            if len(reports) > 1:
                # One bad report refuses the whole call: send each alone, so only the
                # bad one is dropped and the others are still applied.
                return [(await self._send([report]))[0] for report in reports]
            log.warning(
                "status report rejected: %s",
                exc.reason,
                extra={"notification_id": reports[0].notification_id},
            )
            return [None]
        except ServiceError as exc:
            return [Blocked(f"user service: {exc.reason}")] * len(reports)
        for report, result in zip(reports, response.results, strict=True):
            if not result.found:
                log.warning(
                    "status report rejected: DELIVERY_NOT_FOUND",
                    extra={"notification_id": report.notification_id},
                )
        return [None] * len(reports)
