"""The circuit breaker's state machine and the failover chain built on it (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from notify_kit.breaker import BreakerSettings, CircuitBreaker, State, Transition
from notify_kit.jobs.errors import Blocked, OutcomeUnknown, PermanentError, TransientError
from notify_kit.jobs.providers import ProviderChain, Skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SETTINGS = BreakerSettings(failure_threshold=3, window=10.0, open_seconds=5.0, probes=1)


def breaker(clock: Clock, changes: list[Transition] | None = None) -> CircuitBreaker:
    hook = changes.append if changes is not None else None
    return CircuitBreaker("email/smtp", SETTINGS, clock=clock, on_change=hook)


def test_opens_after_the_threshold_within_the_window() -> None:
    clock, changes = Clock(), list[Transition]()
    b = breaker(clock, changes)
    for _ in range(2):
        assert b.allow()
        b.failure("451 try later")
    clock.now += 11  # the first two fall out of the window
    b.failure("451")
    b.failure("451")
    assert b.state is State.CLOSED
    b.failure("451")
    assert b.status().state is State.OPEN and not b.allow()
    assert b.retry_in() == pytest.approx(5.0)
    assert [(c.old, c.new) for c in changes] == [(State.CLOSED, State.OPEN)]
    assert "3 failures" in changes[0].reason and "451" in changes[0].reason


def test_half_open_lets_a_bounded_number_of_probes_through() -> None:
    clock, changes = Clock(), list[Transition]()
    b = breaker(clock, changes)
    for _ in range(3):
        b.failure("down")
    clock.now += 5
    assert b.state is State.HALF_OPEN and b.retry_in() == 0
    assert b.allow()  # the one probe
    assert not b.allow()  # a second caller waits for the verdict
    b.failure("still down")
    assert b.status().state is State.OPEN and b.retry_in() == pytest.approx(5.0)
    clock.now += 5
    assert b.allow()
    b.success()
    assert b.status().state is State.CLOSED and b.allow()
    assert [c.new for c in changes] == [
        State.OPEN,
        State.HALF_OPEN,
        State.OPEN,
        State.HALF_OPEN,
        State.CLOSED,
    ]


def test_retry_after_extends_the_open_period_and_release_frees_a_probe() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure("429", retry_after=60)
    assert b.retry_in() == pytest.approx(60)
    clock.now += 60
    assert b.allow()
    b.release()  # cancelled: no verdict, the slot is free again
    assert b.allow()


@dataclass
class FakeProvider:
    name: str
    fail: type[Exception] | None = None
    retry_after: float | None = None
    calls: list[str] = field(default_factory=list)

    async def send(self, message: str) -> str:
        self.calls.append(message)
        if self.fail is TransientError:
            raise TransientError(f"{self.name} down", retry_after=self.retry_after)
        if self.fail is not None:
            raise self.fail(f"{self.name} says no")
        return f"{self.name}-ok"

    async def close(self) -> None:
        pass


async def test_chain_fails_over_and_skips_open_breakers() -> None:
    smtp, sendgrid = FakeProvider("smtp", TransientError), FakeProvider("sendgrid")
    chain: ProviderChain[str, str] = ProviderChain("email", [smtp, sendgrid], SETTINGS)
    for i in range(3):
        sent = await chain.send(f"m{i}")
        assert (sent.provider, sent.result) == ("sendgrid", "sendgrid-ok")
    assert chain.breakers["smtp"].state is State.OPEN
    await chain.send("m3")
    assert smtp.calls == ["m0", "m1", "m2"]  # the open breaker keeps SMTP out
    assert [s.state for s in chain.status()] == [State.OPEN, State.CLOSED]


async def test_chain_blocks_when_every_breaker_is_open() -> None:
    a, b = FakeProvider("a", TransientError), FakeProvider("b", TransientError, retry_after=2)
    chain: ProviderChain[str, str] = ProviderChain("push", [a, b], SETTINGS)
    for _ in range(3):
        with pytest.raises(TransientError) as caught:
            await chain.send("m")
        assert caught.value.retry_after == 2
    with pytest.raises(Blocked) as blocked:
        await chain.send("m")
    assert blocked.value.retry_after == pytest.approx(5.0, abs=0.5)
    assert len(a.calls) == len(b.calls) == 3


async def test_permanent_answers_are_the_provider_working() -> None:
    smtp, other = FakeProvider("smtp", PermanentError), FakeProvider("sendgrid")
    chain: ProviderChain[str, str] = ProviderChain("email", [smtp, other], SETTINGS)
    for _ in range(5):
        with pytest.raises(PermanentError):
            await chain.send("550 for this one")
    assert chain.breakers["smtp"].state is State.CLOSED and other.calls == []


async def test_unknown_outcome_is_never_failed_over() -> None:
    smtp, other = FakeProvider("smtp", OutcomeUnknown), FakeProvider("sendgrid")
    chain: ProviderChain[str, str] = ProviderChain("email", [smtp, other], SETTINGS)
    with pytest.raises(OutcomeUnknown):
        await chain.send("m")
    assert other.calls == []


async def test_providers_that_cannot_reach_the_recipient_are_skipped() -> None:
    fcm, onesignal = FakeProvider("fcm", Skip), FakeProvider("onesignal")
    chain: ProviderChain[str, str] = ProviderChain("push", [fcm, onesignal], SETTINGS)
    assert (await chain.send("m")).provider == "onesignal"
    only: ProviderChain[str, str] = ProviderChain("push", [FakeProvider("fcm", Skip)], SETTINGS)
    with pytest.raises(PermanentError):
        await only.send("m")


def test_retry_plan_jitters_and_honours_retry_after() -> None:
    import random  # noqa: PLC0415

    from notify_kit.amqp import EMAIL, Topology  # noqa: PLC0415

    topo = Topology(prefix="x.", retry_delays_ms=(2_000, 10_000, 30_000, 120_000))
    rng = random.Random(7)
    waits = [topo.retry_plan(EMAIL, 1, None, rng) for _ in range(50)]
    assert {q for q, _ in waits} == {"x.email.retry.1"}
    assert all(1.0 <= w <= 2.0 for _, w in waits) and len({w for _, w in waits}) > 40
    # Retry-After: 25 s after the first attempt waits in the 30 s queue, 25 s at least.
    queue, wait = topo.retry_plan(EMAIL, 1, 25.0, rng)
    assert queue == "x.email.retry.3" and 25.0 <= wait <= 30.0
    # Never shorter than the attempt's own tier, and capped by the longest queue.
    assert topo.retry_plan(EMAIL, 3, 0.5, rng)[0] == "x.email.retry.3"
    assert topo.retry_plan(EMAIL, 2, 10_000, rng) == ("x.email.retry.4", 120.0)
