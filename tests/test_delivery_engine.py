"""The delivery engine through Envoy: breakers, failover, held queues, retries, dead letters.

One system of its own for the module (breaker state must not leak into the shared e2e
system), with short breaker and retry settings so every case runs in seconds. The tests
script the in-process peers (the real SMTP server, the SendGrid, FCM and OneSignal
stand-ins), restore them in a ``finally``, and the ``closed_breakers`` fixture drives
every breaker back to CLOSED (through real traffic, polling ``GetProviderStatus``)
around each test, so the cases are independent of their order.

Bounds on what reaches a provider come from the breaker settings: while CLOSED a breaker
lets calls through until ``THRESHOLD`` failures are counted, and calls admitted before
it opened still go out (at most the jobs in hand, ``PREFETCH``, minus the one that
opened it); after that each open period of ``OPEN_SECONDS`` ends in at most ``PROBES``
probes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from notify.v1 import worker_admin_pb2, worker_admin_pb2_grpc

from notify_kit import rpc
from notify_kit.settings import TlsSettings
from scripts.system import poll
from tests.conftest import RUN_ID
from tests.e2e_support import E2E, IN_FLIGHT, Samples, e2e_system

pytestmark = pytest.mark.timeout(120)

THRESHOLD = 5
WINDOW = 30.0
OPEN_SECONDS = 2.0
PROBES = 1
RETRY_DELAYS_MS = (300, 600, 900, 1200)
MAX_ATTEMPTS = len(RETRY_DELAYS_MS) + 1
PREFETCH = 4  # jobs a worker holds at once: bounds the calls admitted before a breaker opens
# Parallel API requests of the tests: few, so the system's database pools stay small on a
# PostgreSQL server that other systems share.
CLIENTS = 2
ENV = {
    "NOTIFY_BREAKER_THRESHOLD": str(THRESHOLD),
    "NOTIFY_BREAKER_WINDOW": str(WINDOW),
    "NOTIFY_BREAKER_OPEN_SECONDS": str(OPEN_SECONDS),
    "NOTIFY_BREAKER_PROBES": str(PROBES),
    "NOTIFY_RETRY_DELAYS_MS": ",".join(map(str, RETRY_DELAYS_MS)),
    "NOTIFY_PREFETCH": str(PREFETCH),
    "NOTIFY_HEALTH_INTERVAL": "0.2",
}

CLOSED = worker_admin_pb2.BREAKER_STATE_CLOSED
OPEN = worker_admin_pb2.BREAKER_STATE_OPEN
HALF_OPEN = worker_admin_pb2.BREAKER_STATE_HALF_OPEN
DELIVERED = "NOTIFICATION_STATUS_DELIVERED"
FAILED = "NOTIFICATION_STATUS_FAILED"
SMTP_DOWN = "451 4.3.0 try later"
Status = worker_admin_pb2.GetProviderStatusResponse


def calls_allowed(elapsed: float) -> int:
    """Most calls one provider's breaker lets through in ``elapsed`` seconds of outage."""
    periods = int(elapsed // OPEN_SECONDS) + 1
    return THRESHOLD + (PREFETCH - 1) + PROBES * periods


@dataclass
class Engine:
    """The module's system, with the operator's view of both workers."""

    sys: E2E
    admin: dict[str, worker_admin_pb2_grpc.WorkerAdminServiceStub]
    health: dict[str, health_pb2_grpc.HealthStub]

    async def serving(self, channel: str) -> bool:
        """Whether the worker's gRPC health says SERVING."""
        reply = await self.health[channel].Check(health_pb2.HealthCheckRequest(), timeout=5)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def status(self, channel: str) -> Status:
        """``GetProviderStatus`` of the ``email`` or ``push`` worker."""
        reply: Status = await self.admin[channel].GetProviderStatus(
            worker_admin_pb2.GetProviderStatusRequest()
        )
        return reply

    async def states(self, channel: str) -> dict[str, int]:
        """Each provider's breaker state, by provider name."""
        return {p.name: p.state for p in (await self.status(channel)).providers}

    async def wait_status(
        self, channel: str, done: Callable[[Status], bool], what: str, timeout: float = 20.0
    ) -> Status:
        """Poll the worker's status until ``done``."""
        return await poll(lambda: self.status(channel), done, timeout=timeout, what=what)

    async def send(self, user_id: str, channel: str = "CHANNEL_EMAIL") -> str:
        """One notification on one channel through Envoy; returns its id."""
        status, body = await self.sys.api(
            "POST",
            "/v1/notifications",
            {
                "userId": user_id,
                "templateId": "welcome",
                "channels": [channel],
                "variables": {"name": "Ada"},
            },
        )
        assert status == 200, body
        nid: str = body["notification"]["id"]
        return nid

    async def send_many(self, user_ids: list[str], count: int) -> list[str]:
        """``count`` e-mail notifications, ``CLIENTS`` requests at a time; their ids in order."""
        gate = asyncio.Semaphore(CLIENTS)

        async def one(i: int) -> str:
            async with gate:
                return await self.send(user_ids[i % len(user_ids)])

        return list(await asyncio.gather(*(one(i) for i in range(count))))

    async def delivery(self, nid: str) -> dict[str, Any]:
        """The notification's only delivery, as the public API shows it now."""
        status, body = await self.sys.api("GET", f"/v1/notifications/{nid}")
        assert status == 200, body
        (delivery,) = body["notification"]["deliveries"]
        result: dict[str, Any] = delivery
        return result

    async def settled(self, nid: str, timeout: float = 45.0) -> dict[str, Any]:
        """The notification's only delivery once it left the in-flight states."""
        body = await self.sys.settle(nid, timeout=timeout)
        (delivery,) = body["notification"]["deliveries"]
        result: dict[str, Any] = delivery
        return result

    async def settled_all(self, ids: list[str], timeout: float = 60.0) -> list[dict[str, Any]]:
        """``settled`` for many notifications, ``CLIENTS`` at a time; in the order of ``ids``."""
        gate = asyncio.Semaphore(CLIENTS)

        async def one(nid: str) -> dict[str, Any]:
            async with gate:
                return await self.settled(nid, timeout)

        return list(await asyncio.gather(*(one(nid) for nid in ids)))

    async def deliveries(self, ids: list[str]) -> list[dict[str, Any]]:
        """``delivery`` for many notifications, ``CLIENTS`` at a time; in the order of ``ids``."""
        gate = asyncio.Semaphore(CLIENTS)

        async def one(nid: str) -> dict[str, Any]:
            async with gate:
                return await self.delivery(nid)

        return list(await asyncio.gather(*(one(nid) for nid in ids)))

    async def dead_letters(self, channel: str = "CHANNEL_EMAIL") -> list[dict[str, Any]]:
        """Every dead letter of ``channel`` the gateway has filed."""
        status, body = await self.sys.api(
            "GET", f"/v1/dead-letters?filter.channel={channel}&pageSize=500"
        )
        assert status == 200, body
        letters: list[dict[str, Any]] = body.get("deadLetters", [])
        return letters

    def arrivals(self, nid: str) -> int:
        """How many times the e-mail of ``nid`` reached SMTP or SendGrid."""
        by_smtp = sum(str(m["X-Notify-Notification-Id"]) == nid for m in self.sys.mail.messages)
        return by_smtp + sum(sendgrid_id(r) == nid for r in self.sys.sendgrid.received)


def sendgrid_id(received: dict[str, Any]) -> str:
    """The notification id SendGrid got in ``personalizations[0].custom_args``."""
    personalization = received["request"]["personalizations"][0]
    nid: str = personalization.get("custom_args", {}).get("notification_id", "")
    return nid


def fresh_address(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}@example.com"


def breakers(status: Status) -> dict[str, int]:
    return {p.name: p.state for p in status.providers}


def none_open(status: Status) -> bool:
    """No breaker waits out an open period (reading the state moves it to HALF_OPEN)."""
    return all(p.state != OPEN for p in status.providers)


def all_closed(status: Status) -> bool:
    return all(p.state == CLOSED for p in status.providers)


# --- bringing the breakers back to CLOSED -------------------------------------------------


async def _barrier_email(engine: Engine, *, smtp_refuses: bool) -> dict[str, Any]:
    """Deliver one e-mail to a fresh user (optionally refused by SMTP with a 451)."""
    address = fresh_address("barrier")
    user_id = await engine.sys.new_user(devices=0, email=address)
    if smtp_refuses:
        engine.sys.mail.refuse(address, "451 4.3.0 barrier deferred")
    try:
        delivery = await engine.settled(await engine.send(user_id))
    finally:
        engine.sys.mail.accept(address)
    assert delivery["status"] == DELIVERED, delivery
    return delivery


async def close_email_breakers(engine: Engine) -> None:
    """Drive both e-mail breakers to CLOSED, with no failures counted, by real traffic.

    A HALF_OPEN breaker closes on its first successful call. SMTP gets every e-mail first;
    SendGrid only sees one that SMTP failed transiently, so a barrier that SMTP defers
    (451 for its address) is what closes SendGrid's breaker. A failure that this leaves in
    SMTP's window is cleared the only way a breaker forgets failures: more such barriers
    open it (SendGrid delivers them), and a clean probe closes it after the open period.
    """
    for _ in range(THRESHOLD + 6):
        status = await engine.status("email")
        state = {p.name: p for p in status.providers}
        smtp, sendgrid = state["smtp"], state["sendgrid"]
        if sendgrid.state == CLOSED:
            assert sendgrid.recent_failures == 0, status
        if all_closed(status) and smtp.recent_failures == 0:
            return
        if sendgrid.state != CLOSED:
            await engine.wait_status("email", none_open, "e-mail breakers past their open period")
            await _barrier_email(engine, smtp_refuses=True)
        elif smtp.state == CLOSED:
            await _barrier_email(engine, smtp_refuses=True)
        else:
            await engine.wait_status("email", none_open, "SMTP breaker past its open period")
            await _barrier_email(engine, smtp_refuses=False)
    raise AssertionError(f"e-mail breakers did not close: {await engine.status('email')}")


async def close_push_breakers(engine: Engine) -> None:
    """Drive the push breakers to CLOSED: a push to an FCM device is FCM's probe."""
    for _ in range(3):
        status = await engine.status("push")
        if all_closed(status):
            assert all(p.recent_failures == 0 for p in status.providers), status
            return
        assert breakers(status)["onesignal"] == CLOSED, status  # never scripted to fail
        await engine.wait_status("push", none_open, "FCM breaker out of its open period")
        user_id = await engine.sys.new_user(devices=1)
        delivery = await engine.settled(await engine.send(user_id, "CHANNEL_PUSH"))
        assert delivery["status"] == DELIVERED, delivery
    raise AssertionError(f"push breakers did not close: {await engine.status('push')}")


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def engine(
    tmp_path_factory: pytest.TempPathFactory,
    certs_dir: Path,
    tls_for: Callable[[str], TlsSettings],
) -> AsyncIterator[Engine]:
    """The module's own system with short breaker and retry settings (see ``ENV``)."""
    async with e2e_system(
        tmp_path_factory.mktemp("delivery-engine"), certs_dir, f"t{RUN_ID}de", ENV
    ) as sys:
        ports = sys.cfg.ports
        email = rpc.secure_channel(f"127.0.0.1:{ports.email_worker}", tls_for("operator"))
        push = rpc.secure_channel(f"127.0.0.1:{ports.push_worker}", tls_for("operator"))
        async with email, push:
            yield Engine(
                sys,
                {
                    "email": worker_admin_pb2_grpc.WorkerAdminServiceStub(email),
                    "push": worker_admin_pb2_grpc.WorkerAdminServiceStub(push),
                },
                {
                    "email": health_pb2_grpc.HealthStub(email),
                    "push": health_pb2_grpc.HealthStub(push),
                },
            )


@pytest.fixture(autouse=True)
async def closed_breakers(engine: Engine) -> AsyncIterator[None]:
    """Every breaker CLOSED (with no failures counted) before and after each test."""
    await close_email_breakers(engine)
    await close_push_breakers(engine)
    yield
    await close_email_breakers(engine)
    await close_push_breakers(engine)


def restore_email_peers(engine: Engine, addresses: Iterable[str] = ()) -> None:
    engine.sys.mail.down = None
    engine.sys.sendgrid.set_down(None)
    for address in addresses:
        engine.sys.mail.accept(address)


# --- the cases ----------------------------------------------------------------------------


async def test_outage_of_every_email_provider_opens_the_breakers_and_loses_nothing(
    engine: Engine,
) -> None:
    sys = engine.sys
    users = [await sys.new_user(devices=0) for _ in range(5)]
    smtp_before, sendgrid_before = sys.mail.transactions, sys.sendgrid.attempts
    transitions = (await engine.status("email")).providers[0].transitions
    started = time.monotonic()
    sys.mail.down = SMTP_DOWN
    sys.sendgrid.set_down(503)
    try:
        ids = await engine.send_many(users, 100)
        await engine.wait_status(
            "email",
            lambda s: not s.consuming and all(p.state != CLOSED for p in s.providers),
            "both e-mail breakers open, consumption paused",
        )
        # No provider can take a message: the worker says so in its health (the breakers
        # alternate between open and a half-open probe, so wait for a moment of both open).
        await poll(
            lambda: engine.serving("email"), lambda ok: not ok, timeout=10, what="NOT_SERVING"
        )
        assert await engine.serving("push")
        # The outage lasts until SMTP's breaker has re-opened after two failed probes:
        # closed -> open -> half_open -> open -> half_open -> open.
        await engine.wait_status(
            "email",
            lambda s: (
                s.providers[0].transitions - transitions >= 5 and s.providers[0].state == OPEN
            ),
            "two failed SMTP probes",
        )
        elapsed = time.monotonic() - started
        smtp_calls = sys.mail.transactions - smtp_before
        sendgrid_calls = sys.sendgrid.attempts - sendgrid_before
        assert THRESHOLD <= smtp_calls <= calls_allowed(elapsed), (smtp_calls, elapsed)
        assert THRESHOLD <= sendgrid_calls <= calls_allowed(elapsed), (sendgrid_calls, elapsed)
        held = await engine.deliveries(ids)
        assert not [d for d in held if d["status"] not in IN_FLIGHT], held
    finally:
        restore_email_peers(engine)

    for nid, delivery in zip(ids, await engine.settled_all(ids), strict=True):
        assert delivery["status"] == DELIVERED, (nid, delivery)
        assert 1 <= delivery["attempts"] <= MAX_ATTEMPTS, (nid, delivery)
        assert engine.arrivals(nid) == 1, nid
    assert await poll(lambda: engine.serving("email"), bool, timeout=10, what="SERVING again")
    dead = {d["notificationId"] for d in await engine.dead_letters()}
    assert not dead & set(ids)
    print(
        f"100 e-mails through a {elapsed:.1f}s outage: {smtp_calls} SMTP and "
        f"{sendgrid_calls} SendGrid calls (bound {calls_allowed(elapsed)})"
    )


async def test_smtp_down_fails_over_to_sendgrid_and_traffic_returns_after_the_probe(
    engine: Engine,
) -> None:
    sys = engine.sys
    users = [await sys.new_user(devices=0) for _ in range(4)]
    smtp_before = sys.mail.transactions
    started = time.monotonic()
    sys.mail.down = SMTP_DOWN
    try:
        ids = await engine.send_many(users, 20)
        for delivery in await engine.settled_all(ids):
            assert delivery["status"] == DELIVERED, delivery
            assert delivery["detail"].startswith("sendgrid:"), delivery
            assert delivery["attempts"] == 1, delivery  # failover within the same attempt
        by_sendgrid = [sendgrid_id(r) for r in sys.sendgrid.received]
        assert all(by_sendgrid.count(nid) == 1 for nid in ids)
        assert not any(m["X-Notify-Notification-Id"] in ids for m in sys.mail.messages)
        smtp_calls = sys.mail.transactions - smtp_before
        assert THRESHOLD <= smtp_calls <= calls_allowed(time.monotonic() - started)
        assert (await engine.states("email"))["smtp"] != CLOSED
    finally:
        sys.mail.down = None

    # SMTP is back: once its open period ends, the next e-mail is its probe, and with
    # the breaker closed again traffic stays on SMTP.
    await engine.wait_status("email", none_open, "SMTP breaker half-open")
    probe = await engine.settled(await engine.send(users[0]))
    assert probe["status"] == DELIVERED and probe["detail"].startswith("smtp:"), probe
    assert await engine.states("email") == {"smtp": CLOSED, "sendgrid": CLOSED}
    after = await engine.send_many(users, 8)
    for delivery in await engine.settled_all(after):
        assert delivery["status"] == DELIVERED and delivery["detail"].startswith("smtp:"), delivery
    arrived = [m["X-Notify-Notification-Id"] for m in sys.mail.messages]
    assert all(arrived.count(nid) == 1 for nid in after)
    assert not any(sendgrid_id(r) in after for r in sys.sendgrid.received)


async def test_every_email_provider_down_holds_the_queue_while_push_flows(
    engine: Engine,
) -> None:
    sys = engine.sys
    users = [await sys.new_user(devices=0) for _ in range(3)]
    push_users = [await sys.new_user(devices=1) for _ in range(3)]
    smtp_before, sendgrid_before = sys.mail.transactions, sys.sendgrid.attempts
    transitions = (await engine.status("email")).providers[0].transitions
    started = time.monotonic()
    sys.mail.down = SMTP_DOWN
    sys.sendgrid.set_down(503)
    try:
        ids = await engine.send_many(users, 12)
        paused = await engine.wait_status(
            "email", lambda s: not s.consuming, "the e-mail worker pauses consumption"
        )
        assert all(p.state != CLOSED for p in paused.providers), paused
        assert paused.pause_reason, paused

        # Pushes are another worker and another queue: they keep flowing meanwhile.
        for user_id in push_users:
            delivery = await engine.settled(await engine.send(user_id, "CHANNEL_PUSH"))
            assert delivery["status"] == DELIVERED and delivery["detail"].startswith("fcm:")

        # Held for at least one more open period: the e-mails wait, unsent and unfailed.
        await engine.wait_status(
            "email",
            lambda s: (
                s.providers[0].transitions - transitions >= 3
                and s.providers[0].state == OPEN
                and not s.consuming
            ),
            "a failed SMTP probe while paused",
        )
        elapsed = time.monotonic() - started
        smtp_calls = sys.mail.transactions - smtp_before
        sendgrid_calls = sys.sendgrid.attempts - sendgrid_before
        assert smtp_calls <= calls_allowed(elapsed), (smtp_calls, elapsed)
        assert sendgrid_calls <= calls_allowed(elapsed), (sendgrid_calls, elapsed)
        held = await engine.deliveries(ids)
        assert all(d["status"] in IN_FLIGHT for d in held), held
        # An attempt is spent only by a provider's answer: retries beyond the first
        # attempt are bounded by the calls the breakers let through.
        spent = sum(max(0, d["attempts"] - 1) for d in held)
        assert spent <= smtp_calls + sendgrid_calls, (spent, held)
        assert all(d["attempts"] < MAX_ATTEMPTS for d in held), held
    finally:
        restore_email_peers(engine)

    for nid, delivery in zip(ids, await engine.settled_all(ids), strict=True):
        assert delivery["status"] == DELIVERED, delivery
        assert engine.arrivals(nid) == 1, nid
    resumed = await engine.wait_status("email", lambda s: s.consuming, "consumption resumed")
    assert not resumed.pause_reason


async def test_a_550_fails_one_recipient_at_once_and_leaves_the_breaker_closed(
    engine: Engine,
) -> None:
    sys = engine.sys
    address = fresh_address("gone")
    refused_user = await sys.new_user(devices=0, email=address)
    others = [await sys.new_user(devices=0) for _ in range(3)]
    before = {p.name: p for p in (await engine.status("email")).providers}
    sendgrid_before = sys.sendgrid.attempts
    sys.mail.refuse(address, "550 5.1.1 no such user")
    try:
        refused = await engine.send(refused_user)
        fine = [await engine.send(u) for u in others for _ in range(2)]
        delivery = await engine.settled(refused)
        assert delivery["status"] == FAILED and delivery["attempts"] == 1, delivery
        assert "550" in delivery["detail"], delivery
        for nid in fine:
            ok = await engine.settled(nid)
            assert ok["status"] == DELIVERED and ok["detail"].startswith("smtp:"), ok
    finally:
        sys.mail.accept(address)

    after = {p.name: p for p in (await engine.status("email")).providers}
    assert after["smtp"].state == CLOSED
    assert after["smtp"].recent_failures == before["smtp"].recent_failures == 0
    assert after["smtp"].transitions == before["smtp"].transitions
    assert sys.sendgrid.attempts == sendgrid_before  # a permanent refusal is not failed over
    assert not any(m["X-Notify-Notification-Id"] == refused for m in sys.mail.messages)
    assert refused in {d["notificationId"] for d in await engine.dead_letters()}


async def test_an_always_deferred_recipient_is_dead_lettered_and_replayed_once(
    engine: Engine,
) -> None:
    sys = engine.sys
    address = fresh_address("busy")
    user_id = await sys.new_user(devices=0, email=address)
    smtp_before, sendgrid_before = sys.mail.transactions, sys.sendgrid.attempts
    # Both providers defer this mail on every attempt (SendGrid is down, so only this one
    # notification is sent while they are scripted): each attempt counts one failure
    # against each breaker, so with THRESHOLD == MAX_ATTEMPTS both open on the last one.
    worker_before, gateway_before = await sys.metrics("email_worker"), await sys.metrics("gateway")
    sys.mail.refuse(address, "451 4.2.0 mailbox busy")
    sys.sendgrid.set_down(503)
    try:
        nid = await engine.send(user_id)
        delivery = await engine.settled(nid)
        assert delivery["status"] == FAILED, delivery
        assert delivery["attempts"] == MAX_ATTEMPTS, delivery
        assert sys.mail.transactions - smtp_before == MAX_ATTEMPTS
        assert sys.sendgrid.attempts - sendgrid_before == MAX_ATTEMPTS
        letters = await poll(
            engine.dead_letters,
            lambda ls: any(d["notificationId"] == nid for d in ls),
            timeout=20,
            what=f"dead letter of {nid}",
        )
        (letter,) = [d for d in letters if d["notificationId"] == nid]
        assert letter["attempts"] == MAX_ATTEMPTS, letter
        status, got = await sys.api("GET", f"/v1/dead-letters/{letter['id']}")
        assert status == 200, got
        history = [h["status"] for h in got["deadLetter"]["history"]]
        expected = ["NOTIFICATION_STATUS_RETRYING"] * (MAX_ATTEMPTS - 1) + [FAILED]
        assert history == expected, got
        assert engine.arrivals(nid) == 0
    finally:
        restore_email_peers(engine, [address])

    # The mailbox and SendGrid recovered: a replay delivers it exactly once.
    status, replayed = await sys.api("POST", "/v1/dead-letters:replay", {"id": letter["id"]})
    assert (status, replayed["replayed"], replayed["skipped"]) == (200, 1, 0), replayed
    delivery = await engine.settled(nid)
    assert delivery["status"] == DELIVERED, delivery
    assert engine.arrivals(nid) == 1
    status, got = await sys.api("GET", f"/v1/dead-letters/{letter['id']}")
    assert got["deadLetter"]["state"] == "DEAD_LETTER_STATE_REPLAYED", got

    # Replaying it again sends nothing: a later job on the same queue is the barrier.
    status, replayed = await sys.api("POST", "/v1/dead-letters:replay", {"id": letter["id"]})
    assert (status, replayed["replayed"]) == (200, 1), replayed
    barrier = await engine.settled(await engine.send(await sys.new_user(devices=0)))
    assert barrier["status"] == DELIVERED, barrier
    assert engine.arrivals(nid) == 1
    assert (await engine.settled(nid))["status"] == DELIVERED

    # The metrics saw all of it: retries, the failure, the dead letter, both breakers
    # opening, two replays (the second found nothing to send).
    worker, gateway = await sys.metrics("email_worker"), await sys.metrics("gateway")

    def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved(worker, worker_before, "notify_delivery_retries_total", channel="email") == (
        MAX_ATTEMPTS - 1
    )
    assert moved(worker, worker_before, "notify_deliveries_total", channel="email",
                 provider="none", outcome="failed") == 1  # fmt: skip
    assert moved(worker, worker_before, "notify_dead_letters_total", channel="email") == 1
    for provider in ("smtp", "sendgrid"):
        assert moved(worker, worker_before, "notify_breaker_transitions_total",
                     channel="email", provider=provider, state="open") >= 1, provider  # fmt: skip
        assert (
            moved(
                worker,
                worker_before,
                "notify_provider_call_duration_seconds_count",
                channel="email",
                provider=provider,
                outcome="transient",
            )
            == MAX_ATTEMPTS
        )
    assert moved(gateway, gateway_before, "notify_dead_letter_replays_total", channel="email") == 2


async def test_push_fails_over_to_onesignal_and_unregistered_devices_are_removed(
    engine: Engine,
) -> None:
    sys = engine.sys
    users = [await sys.new_user(devices=1) for _ in range(THRESHOLD)]
    fcm_before = len(sys.fcm.messages)
    # 429 is not retried inside firebase-admin, so each push uses up exactly one failure
    # and the THRESHOLD-th opens FCM's breaker: nothing is left scripted afterwards.
    sys.fcm.fail_next(THRESHOLD, 429)
    for user_id in users:
        nid = await engine.send(user_id, "CHANNEL_PUSH")
        delivery = await engine.settled(nid)
        assert delivery["status"] == DELIVERED, delivery
        assert delivery["detail"].startswith("onesignal:"), delivery
        assert delivery["attempts"] == 1, delivery
        sent = [r for r in sys.onesignal.received if r["request"]["idempotency_key"] == nid]
        assert len(sent) == 1 and sent[0]["recipients"] == [f"external_id:{user_id}"], sent
    assert len(sys.fcm.messages) == fcm_before
    status = await engine.status("push")
    assert breakers(status)["fcm"] != CLOSED and breakers(status)["onesignal"] == CLOSED

    # FCM is back: its probe closes the breaker and pushes go to FCM again.
    await engine.wait_status("push", none_open, "FCM breaker half-open")
    nid = await engine.send(users[0], "CHANNEL_PUSH")
    delivery = await engine.settled(nid)
    assert delivery["status"] == DELIVERED and delivery["detail"].startswith("fcm:"), delivery
    assert [m for m in sys.fcm.messages if m["data"]["notification_id"] == nid]
    assert breakers(await engine.status("push")) == {"fcm": CLOSED, "onesignal": CLOSED}

    # A device FCM calls UNREGISTERED is removed from its user; the live one stays.
    user_id = await sys.new_user(devices=1)
    dead_token = f"unregistered-{uuid.uuid4().hex}"
    status_code, got = await sys.api(
        "POST",
        f"/v1/users/{user_id}/devices",
        {"platform": "DEVICE_PLATFORM_ANDROID", "token": dead_token},
    )
    assert status_code == 200, got
    delivery = await engine.settled(await engine.send(user_id, "CHANNEL_PUSH"))
    assert delivery["status"] == DELIVERED and delivery["detail"].startswith("fcm:"), delivery

    async def tokens() -> list[str]:
        code, body = await sys.api("GET", f"/v1/users/{user_id}")
        assert code == 200, body
        return [d["token"] for d in body["user"].get("devices", [])]

    left = await poll(tokens, lambda ts: dead_token not in ts, timeout=20, what="device removal")
    assert len(left) == 1 and left[0].startswith("tok-"), left
