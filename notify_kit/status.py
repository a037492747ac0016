"""The lifecycle rules of ``notify.v1.NotificationStatus``, written once.

Both the gateway (answering ``SendNotification``) and UserService (storing records) need
the same terminal set and the same aggregate, so they live next to the contract's other
shared code rather than in either service.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

from notify.v1 import common_pb2

Status: TypeAlias = common_pb2.NotificationStatus.ValueType
S = common_pb2

TERMINAL: frozenset[Status] = frozenset(
    {
        S.NOTIFICATION_STATUS_DELIVERED,
        S.NOTIFICATION_STATUS_FAILED,
        S.NOTIFICATION_STATUS_SUPPRESSED,
        S.NOTIFICATION_STATUS_EXPIRED,
    }
)

# How far an in-flight delivery has come; the aggregate shows the least advanced one.
PROGRESS: dict[Status, int] = {
    S.NOTIFICATION_STATUS_ACCEPTED: 0,
    S.NOTIFICATION_STATUS_QUEUED: 1,
    S.NOTIFICATION_STATUS_DEFERRED: 2,
    S.NOTIFICATION_STATUS_RETRYING: 3,
    S.NOTIFICATION_STATUS_SENDING: 4,
}


def is_terminal(status: Status) -> bool:
    """True for DELIVERED, FAILED, SUPPRESSED and EXPIRED."""
    return status in TERMINAL


def aggregate(statuses: Iterable[Status]) -> Status:
    """One status for a notification from its deliveries' statuses.

    While any delivery is in flight: the least advanced in-flight status. When all are
    terminal: DELIVERED if any channel delivered, else the first delivery's status.
    """
    all_ = list(statuses)
    in_flight = [s for s in all_ if s not in TERMINAL]
    if in_flight:
        return min(in_flight, key=lambda s: PROGRESS.get(s, 0))
    if S.NOTIFICATION_STATUS_DELIVERED in all_:
        return S.NOTIFICATION_STATUS_DELIVERED
    return all_[0] if all_ else S.NOTIFICATION_STATUS_UNSPECIFIED
