"""The lifecycle rules of ``notify.v1.NotificationStatus``, written once.

Which statuses are final, which report may replace which, and a notification's
aggregate status. UserService enforces them when it stores reports; the gateway uses the
aggregate when it answers ``SendNotification``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

from google.protobuf import timestamp_pb2
from notify.v1 import common_pb2

Status: TypeAlias = common_pb2.NotificationStatus.ValueType

# Once a delivery reaches one of these, no later report changes it.
TERMINAL: frozenset[Status] = frozenset(
    {
        common_pb2.NOTIFICATION_STATUS_DELIVERED,
        common_pb2.NOTIFICATION_STATUS_FAILED,
        common_pb2.NOTIFICATION_STATUS_SUPPRESSED,
        common_pb2.NOTIFICATION_STATUS_EXPIRED,
    }
)

# Non-terminal statuses from least to most advanced: while anything is in flight the
# notification reports its slowest delivery, so SENDING means every open channel got there.
_PROGRESS: tuple[Status, ...] = (
    common_pb2.NOTIFICATION_STATUS_ACCEPTED,
    common_pb2.NOTIFICATION_STATUS_QUEUED,
    common_pb2.NOTIFICATION_STATUS_DEFERRED,
    common_pb2.NOTIFICATION_STATUS_RETRYING,
    common_pb2.NOTIFICATION_STATUS_SENDING,
)


# QUEUED is reported by the gateway after the broker confirmed, which can race with a
# worker that already took the job: it may only replace ACCEPTED, never a later status.
QUEUED = common_pb2.NOTIFICATION_STATUS_QUEUED
ACCEPTED = common_pb2.NOTIFICATION_STATUS_ACCEPTED


def aggregate_status(statuses: Iterable[Status]) -> Status:
    """The notification's status from its deliveries' statuses, given in delivery order.

    In flight: the least advanced non-terminal status. All terminal: DELIVERED when any
    channel delivered, else the first delivery's status. No deliveries: UNSPECIFIED.
    """
    ordered = list(statuses)
    pending = [s for s in ordered if s not in TERMINAL]
    if pending:
        return min(pending, key=_rank)
    if common_pb2.NOTIFICATION_STATUS_DELIVERED in ordered:
        return common_pb2.NOTIFICATION_STATUS_DELIVERED
    if ordered:
        return ordered[0]
    return common_pb2.NOTIFICATION_STATUS_UNSPECIFIED


def _rank(status: Status) -> int:
    # Validation keeps other numbers out of the table; were one there, it sorts first
    # rather than hiding behind a more advanced status.
    return _PROGRESS.index(status) if status in _PROGRESS else -1


def is_past(ts: timestamp_pb2.Timestamp) -> bool:
    """True once ``ts`` (a job's ``expire_time``) has passed: the notification is EXPIRED."""
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return (ts.seconds, ts.nanos) < (now.seconds, now.nanos)
