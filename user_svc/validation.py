"""Request validation for UserService: every field a caller fills is checked here.

Each function collects all problems of one request and raises a single
``InvalidArgument`` whose field violations name them, so a client fixes everything in
one round. Values that end up in e-mail headers (address, display name) must not carry
CR/LF or other control characters: that is how header injection starts.
"""

from __future__ import annotations

import functools
import unicodedata
import uuid
import zoneinfo
from collections.abc import Sequence
from datetime import UTC

from notify.v1 import common_pb2, user_service_pb2

from notify_kit import formats
from notify_kit.errors import InvalidArgument
from notify_kit.status import Status
from user_svc.store import NewDelivery, NewDevice, NewNotification, NewUser, StatusReport

MAX_DISPLAY_NAME = 200
MAX_TOKEN = 4096
MAX_CORRELATION_ID = 64
MAX_DETAIL = 2000
# An outbox job is a whole EmailJob/PushJob: variables and device lists included.
MAX_OUTBOX_JOB = 1 << 20
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
DEFAULT_LOCALE = "en"
DEFAULT_TIMEZONE = "UTC"

# Display names may hold emoji sequences (which use the Cf zero-width joiner).
_NAME_FORBIDDEN = frozenset({"Cc", "Zl", "Zp"})

_Violations = list[tuple[str, str]]


def parse_id(value: str, field: str) -> uuid.UUID:
    """A canonical UUID string, or InvalidArgument(INVALID_ID) naming ``field``."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != value.lower():
        raise InvalidArgument(
            "INVALID_ID", f"{field} must be a UUID", field_violations=[(field, "must be a UUID")]
        )
    return parsed


def new_user(user: user_service_pb2.User) -> NewUser:
    """Validate CreateUser's user (ids, devices and timestamps are output only)."""
    problems: _Violations = []
    _check_email(user.email, "user.email", problems)
    _check_display_name(user.display_name, "user.display_name", problems)
    locale = user.locale or DEFAULT_LOCALE
    if not formats.is_language_tag(locale):
        problems.append(("user.locale", "must be a BCP 47 language tag such as en or fr-CA"))
    timezone = user.timezone or DEFAULT_TIMEZONE
    if timezone not in _timezones():
        problems.append(("user.timezone", "must be an IANA time zone such as Europe/Paris"))
    if problems:
        raise InvalidArgument("INVALID_USER", "the user is invalid", field_violations=problems)
    return NewUser(
        email=user.email,
        display_name=user.display_name,
        locale=locale,
        timezone=timezone,
        email_opt_out=user.preferences.email_opt_out,
        push_opt_out=user.preferences.push_opt_out,
    )


def new_device(device: user_service_pb2.Device) -> NewDevice:
    """Validate RegisterDevice's device (id and create_time are output only)."""
    problems: _Violations = []
    platform = device.platform
    if platform == user_service_pb2.DEVICE_PLATFORM_UNSPECIFIED or platform not in (
        user_service_pb2.DevicePlatform.values()
    ):
        problems.append(("device.platform", "is required"))
    check_token(device.token, "device.token", problems)
    if device.token_type not in user_service_pb2.DeviceTokenType.values():
        problems.append(("device.token_type", "is not a known token type"))
    if problems:
        raise InvalidArgument("INVALID_DEVICE", "the device is invalid", field_violations=problems)
    return NewDevice(platform=platform, token=device.token, token_type=device.token_type)


def check_token(token: str, field: str, problems: _Violations) -> None:
    """A push token is 1..4096 printable ASCII characters."""
    if not token:
        problems.append((field, "is required"))
    elif len(token) > MAX_TOKEN or not (token.isascii() and token.isprintable()):
        problems.append((field, f"must be at most {MAX_TOKEN} printable ASCII characters"))


def device_token(value: str, field: str) -> str:
    """A push token on its own (RemoveDeviceToken), or InvalidArgument(INVALID_DEVICE)."""
    problems: _Violations = []
    check_token(value, field, problems)
    if problems:
        raise InvalidArgument("INVALID_DEVICE", "the token is invalid", field_violations=problems)
    return value


def _outbox_jobs(
    outbox: Sequence[user_service_pb2.OutboxJob], channels: set[int], problems: _Violations
) -> dict[int, user_service_pb2.OutboxJob]:
    """The outbox by channel: each job for one of the record's channels, once, bounded."""
    jobs: dict[int, user_service_pb2.OutboxJob] = {}
    for i, job in enumerate(outbox):
        if job.channel in jobs or job.channel not in channels:
            problems.append((f"outbox[{i}].channel", "must name one of the record's channels once"))
        elif len(job.job) > MAX_OUTBOX_JOB:
            problems.append((f"outbox[{i}].job", f"must be at most {MAX_OUTBOX_JOB} bytes"))
        jobs[job.channel] = job
    return jobs


def new_notification(
    notification: common_pb2.Notification,
    default_correlation_id: str,
    outbox: Sequence[user_service_pb2.OutboxJob] = (),
) -> NewNotification:
    """Validate CreateNotificationRecord's record: ids, template and one entry per channel.

    Deliveries start ACCEPTED unless the gateway says otherwise (SUPPRESSED, DEFERRED);
    the correlation id defaults to the one of the current request. Each outbox job
    belongs to one of the record's channels and is at most ``MAX_OUTBOX_JOB`` bytes.
    """
    notification_id = parse_id(notification.id, "notification.id")
    user_id = parse_id(notification.user_id, "notification.user_id")
    problems: _Violations = []
    template_id = notification.template_id  # its format is the contract's rule
    correlation_id = notification.correlation_id or default_correlation_id
    if len(correlation_id) > MAX_CORRELATION_ID or not (
        correlation_id.isascii() and correlation_id.isprintable() and " " not in correlation_id
    ):
        problems.append(
            (
                "notification.correlation_id",
                f"must be at most {MAX_CORRELATION_ID} ASCII characters",
            )
        )
    if not notification.deliveries:
        problems.append(("notification.deliveries", "needs one entry per routed channel"))
    jobs = _outbox_jobs(outbox, {d.channel for d in notification.deliveries}, problems)
    deliveries: list[NewDelivery] = []
    seen: set[int] = set()
    for i, delivery in enumerate(notification.deliveries):
        field = f"notification.deliveries[{i}]"
        if not _is_channel(delivery.channel):
            problems.append((f"{field}.channel", "is required"))
        elif delivery.channel in seen:
            problems.append((f"{field}.channel", "appears twice"))
        seen.add(delivery.channel)
        status = delivery.status or common_pb2.NOTIFICATION_STATUS_ACCEPTED
        if not _is_status(status):
            problems.append((f"{field}.status", "is not a known status"))
        if delivery.attempts < 0:
            problems.append((f"{field}.attempts", "must not be negative"))
        queued = jobs.get(delivery.channel)
        deliveries.append(
            NewDelivery(
                channel=delivery.channel,
                status=status,
                detail=delivery.detail[:MAX_DETAIL],
                attempts=delivery.attempts,
                job=queued.job if queued is not None else None,
                expire_at=(
                    queued.expire_time.ToDatetime(tzinfo=UTC)
                    if queued is not None and queued.HasField("expire_time")
                    else None
                ),
            )
        )
    if problems:
        raise InvalidArgument(
            "INVALID_NOTIFICATION", "the notification is invalid", field_violations=problems
        )
    return NewNotification(
        id=notification_id,
        user_id=user_id,
        template_id=template_id,
        correlation_id=correlation_id,
        deliveries=tuple(deliveries),
    )


def status_report(request: user_service_pb2.UpdateDeliveryStatusRequest) -> StatusReport:
    """Validate UpdateDeliveryStatus; an overlong detail is cut, not rejected.

    The detail is often a provider's error text: losing its tail is better than losing
    the status report.
    """
    notification_id = parse_id(request.notification_id, "notification_id")
    problems: _Violations = []
    if not _is_channel(request.channel):
        problems.append(("channel", "is required"))
    if not _is_status(request.status):
        problems.append(("status", "is required"))
    if request.attempt < 0:
        problems.append(("attempt", "must not be negative"))
    if request.replay < 0:
        problems.append(("replay", "must not be negative"))
    if problems:
        raise InvalidArgument(
            "INVALID_DELIVERY_STATUS", "the status report is invalid", field_violations=problems
        )
    return StatusReport(
        notification_id=notification_id,
        channel=request.channel,
        status=request.status,
        detail=request.detail[:MAX_DETAIL],
        attempt=request.attempt,
        replay=request.replay,
    )


def page_size(value: int) -> int:
    """1..100; 0 means the default (20)."""
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            "INVALID_PAGE_SIZE",
            f"page_size must be between 1 and {MAX_PAGE_SIZE}",
            field_violations=[("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")],
        )
    return value


def _check_email(email: str, field: str, problems: _Violations) -> None:
    """Accept exactly the addresses the e-mail worker can send to.

    The rule is ``formats.email_address_problem``, the one the worker's MIME builder
    checks too: an address accepted here and refused there would be a user told
    "created" whose every e-mail then fails permanently at the worker.
    """
    if not email:
        problems.append((field, "is required"))
        return
    problem = formats.email_address_problem(email)
    if problem is not None:
        problems.append((field, problem))


def _check_display_name(name: str, field: str, problems: _Violations) -> None:
    if len(name) > MAX_DISPLAY_NAME:
        problems.append((field, f"must be at most {MAX_DISPLAY_NAME} characters"))
    elif any(unicodedata.category(ch) in _NAME_FORBIDDEN for ch in name):
        problems.append((field, "must not contain control characters"))


def _is_channel(value: int) -> bool:
    return value != common_pb2.CHANNEL_UNSPECIFIED and value in common_pb2.Channel.values()


def _is_status(value: Status) -> bool:
    return (
        value != common_pb2.NOTIFICATION_STATUS_UNSPECIFIED
        and value in common_pb2.NotificationStatus.values()
    )


@functools.cache
def _timezones() -> frozenset[str]:
    # Read from the tz database once, on first use (not at import).
    return frozenset(zoneinfo.available_timezones())
