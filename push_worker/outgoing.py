"""One push as every provider receives it, and what each provider reports back.

A push goes to every device of a user; each device is addressed by what it registered
(an FCM registration token, a Firebase installation ID, or a OneSignal subscription id).
Providers report per target; the handler decides what that means for the job
(delivered when any device took it).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class TargetKind(enum.Enum):
    """What a device's address is, which decides the provider field it goes in."""

    FCM_TOKEN = "fcm_token"  # noqa: S105 (not a secret); FCM registration token: ``message.token``
    FCM_FID = "fcm_fid"  # Firebase installation ID: ``message.fid``
    ONESIGNAL = "onesignal"  # OneSignal subscription id: ``include_subscription_ids``


@dataclass(frozen=True, slots=True)
class Target:
    """One device to reach."""

    address: str
    kind: TargetKind = TargetKind.FCM_TOKEN


@dataclass(frozen=True, slots=True)
class OutgoingPush:
    """A rendered push for one user's devices, identified by its notification id."""

    notification_id: str
    user_id: str
    targets: tuple[Target, ...]
    title: str
    body: str
    data: Mapping[str, str] = field(default_factory=dict)


class Outcome(enum.Enum):
    """What happened to the push on one device."""

    DELIVERED = "delivered"
    UNREGISTERED = "unregistered"  # the address is dead: remove the device from the user
    INVALID = "invalid"  # this target will never work (bad token, wrong sender, ...)
    TRANSIENT = "transient"  # might work later (outage, throttling, timeout)


@dataclass(frozen=True, slots=True)
class TargetResult:
    """One device's result: the provider's message id, or why it failed."""

    address: str
    outcome: Outcome
    detail: str
    retry_after: float | None = None  # the provider's hint for TRANSIENT (seconds)


@dataclass(frozen=True, slots=True)
class PushResult:
    """Every target's result, in the order the targets were given."""

    results: list[TargetResult]

    def of(self, outcome: Outcome) -> list[TargetResult]:
        """The targets that ended with ``outcome``."""
        return [r for r in self.results if r.outcome is outcome]
