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
    template_service_pb2,
    template_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)

from notify_kit import rpc
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
) -> template_service_pb2.RenderTemplateResponse:
    """RenderTemplate, with the answer sorted into permanent failures and our outages."""
    request = template_service_pb2.RenderTemplateRequest(
        template_id=template_id, language=language, channel=channel, variables=variables
    )
    try:
        response: template_service_pb2.RenderTemplateResponse = await rpc.unary(
            templates.RenderTemplate, request, timeout=timeout
        )
    except PERMANENT_UPSTREAM as exc:
        raise PermanentError(f"template {template_id!r}: {exc.reason}") from exc
    except ServiceError as exc:
        raise Blocked(f"template service: {exc.reason}") from exc
    field: Literal["email", "push"] = "email" if channel == common_pb2.CHANNEL_EMAIL else "push"
    if not response.HasField(field):
        raise PermanentError(f"template {template_id!r} has no {field} content")
    return response


def status_reporter(
    users: user_service_pb2_grpc.UserServiceStub,
    channel: common_pb2.Channel.ValueType,
    *,
    timeout: float = 5.0,
) -> StatusReport:
    """The runner's ``report`` callback: UserService.UpdateDeliveryStatus over mTLS.

    A report UserService can never accept (unknown notification, invalid request) is
    logged and dropped so the job is not held forever; any other failure is our
    outage (``Blocked``): the runner holds the job and reports again later.
    """

    async def report(
        notification_id: str, status: Status, detail: str, attempt: int, replay: int
    ) -> None:
        request = user_service_pb2.UpdateDeliveryStatusRequest(
            notification_id=notification_id,
            channel=channel,
            status=status,
            detail=detail,
            attempt=attempt,
            replay=replay,
        )
        try:
            await rpc.unary(users.UpdateDeliveryStatus, request, timeout=timeout)
        except PERMANENT_UPSTREAM as exc:
            log.warning(
                "status report rejected: %s",
                exc.reason,
                extra={"notification_id": notification_id},
            )
        except ServiceError as exc:
            raise Blocked(f"user service: {exc.reason}") from exc

    return report
