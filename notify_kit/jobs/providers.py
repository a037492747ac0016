"""Failover across a channel's providers, each behind its own circuit breaker.

Providers are tried in the configured order. One whose breaker is open is skipped; a
transient failure counts against its breaker and the same attempt goes to the next
closed provider; a permanent error (this recipient, this message) is the provider
working and ends the attempt at once. When every breaker is open nothing is sent and
the job is ``Blocked`` until the first breaker lets a probe through, so an outage of
every provider spends no attempts. ``OutcomeUnknown`` is never failed over: the first
provider may have delivered.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from notify_kit import metrics
from notify_kit.breaker import BreakerSettings, BreakerStatus, CircuitBreaker
from notify_kit.jobs.errors import Blocked, OutcomeUnknown, PermanentError, TransientError
from notify_kit.telemetry import span

log = logging.getLogger(__name__)

M_contra = TypeVar("M_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)
M = TypeVar("M")
R = TypeVar("R")


class Provider(Protocol[M_contra, R_co]):
    """One provider of a channel (SMTP, SendGrid, FCM, OneSignal)."""

    @property
    def name(self) -> str:
        """Stable name, used in configuration, the ledger and the breaker."""

    async def send(self, message: M_contra) -> R_co:
        """Deliver; raise ``TransientError``/``PermanentError`` when not delivered."""

    async def close(self) -> None:
        """Release connections."""


def retry_after_seconds(value: str | None) -> float | None:
    """An HTTP ``Retry-After`` (delta-seconds or an HTTP date) as seconds, or None.

    What HTTP providers (SendGrid, OneSignal) pass on in ``TransientError.retry_after``.
    """
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


class Skip(Exception):
    """This provider cannot reach this message's recipient: try the next one.

    Says nothing about the provider's health, so it does not touch the breaker.
    """


@dataclass(frozen=True, slots=True)
class Sent(Generic[R]):
    """What the chain delivered, and through which provider."""

    provider: str
    result: R


# A try's outcome label, by what it raised: the first matching class wins, in the order
# ``ProviderChain.send`` tells them apart; anything else is "error".
_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (Skip, "skipped"),
    (OutcomeUnknown, "unknown"),
    (TransientError, "transient"),
    (PermanentError, "permanent"),
)


def _outcome(exc: BaseException) -> str:
    return next((label for kind, label in _OUTCOMES if isinstance(exc, kind)), "error")


class ProviderChain(Generic[M, R]):
    """The failover policy of the module docstring over ``providers``.

    ``attempt(provider, message)`` is one provider's try (default: ``provider.send``);
    a channel passes its own to judge results or skip providers (typed ``Any`` for the
    provider because a channel's providers may offer more than ``Provider``).
    """

    def __init__(
        self,
        channel: str,
        providers: Sequence[Provider[M, R]],
        settings: BreakerSettings | None = None,
        *,
        attempt: Callable[[Any, M], Awaitable[R]] | None = None,
    ) -> None:
        if not providers:
            raise ValueError(f"no {channel} provider is configured")
        self.channel = channel
        self.providers = list(providers)
        self.breakers = {
            p.name: CircuitBreaker(f"{channel}/{p.name}", settings or BreakerSettings())
            for p in providers
        }
        self._attempt = attempt or (lambda provider, message: provider.send(message))

    async def send(self, message: M) -> Sent[R]:
        """Deliver through the first provider that can; see the module docstring."""
        failures: list[str] = []
        retry_after: float | None = None
        skipped = 0
        for provider in self.providers:
            breaker = self.breakers[provider.name]
            if not breaker.allow():
                continue
            try:
                result = await self._try(provider, message)
            except Skip:
                breaker.release()
                skipped += 1
                continue
            except OutcomeUnknown as exc:
                breaker.failure(str(exc))
                raise
            except TransientError as exc:
                breaker.failure(str(exc), exc.retry_after)
                failures.append(f"{provider.name}: {exc}")
                if exc.retry_after is not None:
                    retry_after = max(retry_after or 0.0, exc.retry_after)
                continue
            except PermanentError:
                breaker.success()
                raise
            except BaseException:
                breaker.release()
                raise
            breaker.success()
            if failures:
                log.warning("delivered by %s after: %s", provider.name, "; ".join(failures))
            return Sent(provider.name, result)
        if skipped == len(self.providers):
            raise PermanentError(f"no {self.channel} provider can reach this recipient")
        if not failures:
            wait = min(b.retry_in() for b in self.breakers.values())
            raise Blocked(f"every {self.channel} provider's breaker is open", retry_after=wait)
        raise TransientError("; ".join(failures), retry_after=retry_after)

    async def _try(self, provider: Provider[M, R], message: M) -> R:
        """One provider's try, timed by outcome (``notify_provider_call_duration_seconds``;
        a provider that skips the recipient made no call)."""
        started, outcome = time.perf_counter(), "ok"
        try:
            with span(
                f"{self.channel} {provider.name}", channel=self.channel, provider=provider.name
            ):
                return await self._attempt(provider, message)
        except BaseException as exc:
            outcome = _outcome(exc)
            raise
        finally:
            if outcome != "skipped":
                metrics.PROVIDER_CALLS.labels(self.channel, provider.name, outcome).observe(
                    time.perf_counter() - started
                )

    def status(self) -> list[BreakerStatus]:
        """Each provider's breaker, in failover order."""
        return [self.breakers[p.name].status() for p in self.providers]

    async def close(self) -> None:
        """Close every provider."""
        for provider in self.providers:
            await provider.close()
