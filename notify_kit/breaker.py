"""A circuit breaker per provider instance: CLOSED -> OPEN -> HALF_OPEN -> CLOSED.

* CLOSED: every call goes through; transient failures are counted in a sliding window.
  ``failure_threshold`` of them within ``window`` seconds open the breaker. A success
  does not erase the window (a provider failing every other call still opens), but
  failures older than the window fall out of it.
* OPEN: no call goes through for ``open_seconds`` (or longer, when the provider's own
  ``Retry-After`` asks for it). ``retry_in()`` says how long is left, so callers can
  pause instead of polling.
* HALF_OPEN: at most ``probes`` calls at once go through; a success closes the
  breaker, a failure opens it again for another full period.

Only what a caller reports counts: a permanent error for one recipient (an SMTP 550) is
the provider working correctly and is reported as a success. Every state change is
logged with the provider and the reason and passed to ``on_change`` (metrics, the
worker's status RPC). Single-threaded by design: it lives on one event loop.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from notify_kit import metrics

log = logging.getLogger(__name__)


class State(enum.Enum):
    """The breaker's state."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When a breaker opens and for how long."""

    failure_threshold: int = 5
    window: float = 30.0
    open_seconds: float = 10.0
    probes: int = 1


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change, as logged and reported."""

    name: str
    old: State
    new: State
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """A snapshot for operators."""

    name: str
    state: State
    recent_failures: int
    last_failure: str
    retry_in: float
    transitions: int


class CircuitBreaker:
    """The state machine of the module docstring for one provider."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings = BreakerSettings(),
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[Transition], None] | None = None,
    ) -> None:
        self.name = name
        self._settings = settings
        self._clock = clock
        self._on_change = on_change
        self._state = State.CLOSED
        self._failures: deque[float] = deque()
        self._open_until = 0.0
        self._probing = 0
        self._last_failure = ""
        self._transitions = 0
        self._labels = metrics.breaker_labels(name)
        metrics.BREAKER_STATE.labels(*self._labels).set(0)  # exists before any change

    @property
    def state(self) -> State:
        """The current state (an OPEN breaker whose period ended is HALF_OPEN)."""
        if self._state is State.OPEN and self._clock() >= self._open_until:
            self._move(State.HALF_OPEN, "open period over; probing")
        return self._state

    def allow(self) -> bool:
        """May a call go through now? In HALF_OPEN this takes one probe slot.

        Every ``True`` must be followed by exactly one of ``success``, ``failure`` or
        ``release``.
        """
        state = self.state
        if state is State.CLOSED:
            return True
        if state is State.HALF_OPEN and self._probing < self._settings.probes:
            self._probing += 1
            return True
        return False

    def retry_in(self) -> float:
        """Seconds until ``allow()`` can be true again (0 when it may be now)."""
        state = self.state
        if state is State.OPEN:
            return max(0.0, self._open_until - self._clock())
        return 0.0

    def success(self) -> None:
        """The provider answered (delivered, or refused this one message for good)."""
        self._release_probe()
        if self._state is State.HALF_OPEN:
            self._failures.clear()
            self._move(State.CLOSED, "probe succeeded")

    def failure(self, reason: str, retry_after: float | None = None) -> None:
        """The provider failed transiently (timeout, 4xx session, 5xx, 429)."""
        self._release_probe()
        now = self._clock()
        self._last_failure = reason
        if self._state is State.HALF_OPEN:
            self._open(now, f"probe failed: {reason}", retry_after)
            return
        if self._state is State.OPEN:  # a call that was let through before it opened
            return
        self._failures.append(now)
        while self._failures and self._failures[0] <= now - self._settings.window:
            self._failures.popleft()
        if len(self._failures) >= self._settings.failure_threshold:
            reason = f"{len(self._failures)} failures in {self._settings.window:g}s: {reason}"
            self._open(now, reason, retry_after)

    def release(self) -> None:
        """A call that was allowed ended without a verdict on the provider (cancelled)."""
        self._release_probe()

    def status(self) -> BreakerStatus:
        """What operators see."""
        return BreakerStatus(
            name=self.name,
            state=self.state,
            recent_failures=len(self._failures),
            last_failure=self._last_failure,
            retry_in=self.retry_in(),
            transitions=self._transitions,
        )

    def _open(self, now: float, reason: str, retry_after: float | None) -> None:
        self._open_until = now + max(self._settings.open_seconds, retry_after or 0.0)
        self._failures.clear()
        self._move(State.OPEN, reason)

    def _release_probe(self) -> None:
        if self._probing:
            self._probing -= 1

    def _move(self, new: State, reason: str) -> None:
        old, self._state = self._state, new
        self._transitions += 1
        metrics.BREAKER_STATE.labels(*self._labels).set(metrics.BREAKER_STATES[new.value])
        metrics.BREAKER_TRANSITIONS.labels(*self._labels, new.value).inc()
        if new is not State.HALF_OPEN:
            self._probing = 0
        level = logging.WARNING if new is State.OPEN else logging.INFO
        log.log(
            level,
            "circuit breaker %s: %s -> %s (%s)",
            self.name,
            old.value,
            new.value,
            reason,
            extra={"provider": self.name, "breaker_state": new.value},
        )
        if self._on_change is not None:
            self._on_change(Transition(self.name, old, new, reason, self._clock()))
