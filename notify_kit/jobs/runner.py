"""The job runner every worker shares: decode, dedupe, send, record, report, then ack.

A worker supplies a ``JobHandler`` (decode its protobuf job, send it through its
providers) and the runner owns the delivery guarantees, written once:

* manual ack with bounded prefetch; a message is acked only after its outcome is
  recorded in the ledger and, for retries and dead letters, after the broker confirmed
  the republished copy;
* an undecodable message goes to ``failed.queue`` untouched (never crash, never loop);
* an expired job ends as EXPIRED without being sent;
* a job whose outcome the ledger already has (DELIVERED by any attempt, or this
  attempt's outcome) is not sent again (redeliveries after a crash); the outcome is
  reported again;
* an attempt is claimed in the ledger (a lease) before it is sent, so two copies of one
  job consumed at once (a redelivery racing the original) send once: the second waits
  for the first's outcome, or takes over when the first died and its lease ran out;
* attempts count provider answers about this notification only: ``TransientError``
  republishes to a delay queue with ``attempt+1`` after a jittered backoff that honours
  the provider's ``Retry-After`` (``Topology.retry_plan``; status RETRYING),
  and after ``Topology.max_attempts`` the job goes to ``failed.queue`` (FAILED);
  ``PermanentError`` and ``OutcomeUnknown`` go there at once;
* our own outage (``Blocked``, or an infrastructure error while recording or
  reporting: ``notify_kit.outage.infra_errors``) never spends an attempt and never
  requeues: the job is held, unacked, consumption pauses (``Pause``), and the same
  step is tried again when the outage ends;
* anything else (a bug): the message is requeued at once by ``message.process`` and
  consumption pauses for a backoff that grows while such failures last, so nothing is
  lost, nothing spins, and the broker's delivery limit parks a poison message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from google.protobuf.message import DecodeError
from notify.v1 import common_pb2, jobs_pb2

from notify_kit import metrics
from notify_kit.amqp import FAILED_KEY, JobKind, Publisher, Topology
from notify_kit.context import new_correlation_id, set_correlation_id
from notify_kit.jobs.errors import Blocked, OutcomeUnknown, PermanentError, TransientError
from notify_kit.jobs.ledger import Attempt, DeliveryLedger
from notify_kit.jobs.pause import Pause
from notify_kit.jobs.providers import ProviderChain, Sent
from notify_kit.jobs.settings import RunnerSettings
from notify_kit.jobs.upstream import Status, StatusReport
from notify_kit.outage import infra_errors
from notify_kit.status import is_past
from notify_kit.telemetry import span

log = logging.getLogger(__name__)

DELIVERED = common_pb2.NOTIFICATION_STATUS_DELIVERED
FAILED = common_pb2.NOTIFICATION_STATUS_FAILED
RETRYING = common_pb2.NOTIFICATION_STATUS_RETRYING
SENDING = common_pb2.NOTIFICATION_STATUS_SENDING
EXPIRED = common_pb2.NOTIFICATION_STATUS_EXPIRED
# The terminal outcomes as notify_deliveries_total names them.
_OUTCOME_LABELS = {DELIVERED: "delivered", FAILED: "failed", EXPIRED: "expired"}

P = ParamSpec("P")
T = TypeVar("T")


def _outcomes() -> tuple[type[BaseException], ...]:
    """What a send may raise that is not a bug: job outcomes, holds, our outages."""
    return (Blocked, TransientError, PermanentError, *infra_errors())


class _ClaimedElsewhere(Exception):
    """Another copy of this job holds the claim on its attempt."""


class _FirstClaim:
    """The claim a job took with its outcome check (``outcome_or_claim``), usable once.

    It saves the send its own claim round trip while it is younger than a third of the
    lease, the age at which a held claim is renewed anyway: a job held through an
    outage in between claims again, as it always did.
    """

    def __init__(self, taken: bool, at: float, lease: float) -> None:
        self._taken = taken
        self._until = at + lease / 3

    def use(self, now: float) -> bool:
        """Whether the first claim still stands (True at most once)."""
        usable, self._taken = self._taken and now < self._until, False
        return usable


@dataclass(frozen=True, slots=True)
class Turn:
    """Which try of which notification a message is: what every record and report names."""

    nid: str
    attempt: int
    replay: int


def history_json(history: Sequence[Attempt], limit: int = 50) -> str:
    """The last ``limit`` attempts as JSON, for the dead letter's ``x-notify-history``."""
    rows = [
        {
            "replay": a.replay,
            "attempt": a.attempt,
            "status": a.status,
            "provider": a.provider,
            "detail": a.detail[:500],
            "time": a.created_at.isoformat(),
        }
        for a in history[-limit:]
    ]
    return json.dumps(rows)


class Job(Protocol):
    """What the runner needs of a job message: its metadata and its bytes."""

    @property
    def meta(self) -> jobs_pb2.JobMeta:
        """Notification id, attempt, correlation id, trace context, expiry."""

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes:  # noqa: N802 (protobuf)
        """The wire form, republished for retries and dead letters."""


J = TypeVar("J", bound=Job)


class JobHandler(Protocol[J]):
    """What a worker plugs into the runner."""

    @property
    def kind(self) -> JobKind:
        """The queue it consumes."""

    @property
    def channel(self) -> common_pb2.Channel.ValueType:
        """The channel its status reports are for."""

    @property
    def chain(self) -> ProviderChain[Any, Any]:
        """The providers it sends through (their breakers are what operators inspect)."""

    def decode(self, body: bytes) -> J:
        """Parse the queue message body (raise ``DecodeError`` when it is not a job)."""

    async def send(self, job: J) -> Sent[str]:
        """Deliver the job; return the provider and its detail, or raise a job error."""


class JobRunner(Generic[J]):
    """Consumes one job kind with the guarantees described in the module docstring."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        publisher: Publisher,
        handler: JobHandler[J],
        ledger: DeliveryLedger,
        report: StatusReport,
        settings: RunnerSettings | None = None,
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._publisher = publisher
        self._handler: JobHandler[J] = handler
        self._ledger = ledger
        self._report_status = report
        self._settings = settings = settings or RunnerSettings()
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._rng = random.Random()
        # This runner's queue counters, looked up once (each labels() takes a lock).
        queue = topology.label(topology.queue(handler.kind))
        self._consumed = metrics.QUEUE_CONSUMED.labels(queue)
        self._acked = metrics.QUEUE_SETTLED.labels(queue, "acked")
        self._requeued = metrics.QUEUE_SETTLED.labels(queue, "requeued")
        self.pause = Pause(
            self._cancel_consumer,
            self._consume,
            base_delay=settings.unexpected_error_backoff,
            max_delay=settings.max_backoff,
        )

    @property
    def handler(self) -> JobHandler[J]:
        """The worker's handler (its provider chain is what operators inspect)."""
        return self._handler

    async def start(self) -> None:
        """Open a channel with bounded prefetch and start consuming."""
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._settings.prefetch)
        await self._topology.declare(channel)
        self._queue = await channel.get_queue(self._topology.queue(self._handler.kind))
        await self._consume()

    async def _consume(self) -> None:
        if self._queue is not None and self._tag is None:
            self._tag = await self._queue.consume(self._on_message)

    async def _cancel_consumer(self) -> None:
        """Stop taking jobs (those in hand stay ours, unacked); bounded by ``stop_timeout``.

        With the broker unreachable the cancel would wait for a reconnect; the jobs in
        hand are then redelivered to another worker if this one goes away.
        """
        queue, tag, self._tag = self._queue, self._tag, None
        if queue is None or tag is None:
            return
        try:
            await asyncio.wait_for(queue.cancel(tag), self._settings.stop_timeout)
        except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError):
            log.warning("could not cancel the consumer cleanly")

    async def stop(self) -> None:
        """Stop taking jobs, let those in hand finish (their acks still go out)."""
        await self._cancel_consumer()
        self._queue = None  # a resume from a held job must not start consuming again
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=self._settings.stop_timeout)
            for task in pending:
                task.cancel()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            # A failure was logged and paused for in _process; the message is requeued.
            with contextlib.suppress(Exception):
                await self._process(message)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        self._consumed.inc()
        async with message.process(requeue=True, ignore_processed=True):
            try:
                await self._handle(message)
                self.pause.settled()
            except Exception:
                # A bug: the message is requeued at once (by message.process) and
                # consumption pauses for a backoff that grows while bugs repeat, so a
                # crashing job does not spin the queue; its delivery limit parks it.
                log.exception("job failed unexpectedly; requeued")
                self._requeued.inc()
                await self.pause.trip("a job failed unexpectedly")
                raise
        self._acked.inc()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            job = self._handler.decode(message.body)
        except DecodeError:
            set_correlation_id(message.correlation_id or new_correlation_id())
            log.error("undecodable job moved to the failed queue")
            await self._ours(
                self._dead_letter, message.body, message.message_id or "", 0, "undecodable"
            )
            return
        meta = job.meta
        set_correlation_id(meta.correlation_id or new_correlation_id())
        with span(f"{self._handler.kind.key} job", parent=meta.trace_context):
            await self._run(job, meta)

    async def _ours(self, step: Callable[P, Awaitable[T]], *args: P.args, **kw: P.kwargs) -> T:
        """Run a step against our own infrastructure, holding the job through outages.

        Only a step that was held and then succeeded ends the pause: other steps that
        happen to work meanwhile (a status report while TemplateService is down) say
        nothing about the outage that paused consumption.
        """
        held = False
        while True:
            await self.pause.wait()
            try:
                result = await step(*args, **kw)
            except Blocked as exc:
                held = True
                await self.pause.hold(str(exc), exc.retry_after)
            except infra_errors() as exc:
                held = True
                await self.pause.hold(f"{getattr(step, '__name__', 'step')}: {exc!r}")
            else:
                if held:
                    await self.pause.ok()
                return result

    async def _run(self, job: J, meta: jobs_pb2.JobMeta) -> None:
        turn = Turn(meta.notification_id, meta.attempt or 1, meta.replay)
        nid, attempt = turn.nid, turn.attempt
        owner = uuid.uuid4().hex
        lease = self._settings.claim_lease
        earlier, claimed = await self._ours(
            self._ledger.outcome_or_claim, nid, attempt, turn.replay, owner, lease
        )
        first_claim = _FirstClaim(claimed, asyncio.get_running_loop().time(), lease)
        if earlier is not None:
            log.info("outcome already recorded; re-reported", extra={"notification_id": nid})
            await self._ours(self._report, turn, earlier[0], earlier[1])
            return
        if meta.HasField("expire_time") and is_past(meta.expire_time):
            await self._record(turn, EXPIRED, "expired before sending")
            await self._ours(self._report, turn, EXPIRED, "expired before sending")
            return
        sending = await self._sending(turn)
        try:
            try:
                while True:
                    try:
                        sent = await self._ours(self._claimed_send, job, turn, owner, first_claim)
                        break
                    except _ClaimedElsewhere:
                        earlier = await self._ours(self._outcome_elsewhere, turn)
                        if earlier is not None:
                            log.info("a copy sent it; re-reported", extra={"notification_id": nid})
                            await sending.settle()
                            await self._ours(self._report, turn, earlier[0], earlier[1])
                            return
            finally:
                await sending.settle()  # before the outcome is reported: SENDING comes first
        except OutcomeUnknown as exc:
            await self._fail(job, turn, f"outcome unknown, not resent: {exc}")
            return
        except PermanentError as exc:
            await self._fail(job, turn, f"permanent: {exc}")
            return
        except TransientError as exc:
            if attempt >= self._topology.max_attempts:
                await self._fail(job, turn, f"gave up after {attempt} attempts: {exc}")
            else:
                await self._retry(job, turn, str(exc), exc.retry_after)
            return
        detail = f"{sent.provider}: {sent.result}"
        await self._record(turn, DELIVERED, detail, sent.provider)
        await self._ours(self._report, turn, DELIVERED, detail)
        log.info("delivered", extra={"notification_id": nid, "attempt": attempt})

    async def _sending(self, turn: Turn) -> _SendingReport:
        """SENDING, reported once the send has run for ``sending_report_after``."""
        return await _SendingReport(
            lambda: self._ours(self._report, turn, SENDING, ""),
            self._settings.sending_report_after,
        ).begin()

    async def _claimed_send(
        self, job: J, turn: Turn, owner: str, first_claim: _FirstClaim
    ) -> Sent[str]:
        """Claim the attempt, then send while keeping the claim alive.

        Two copies of one job never send at once. The lease is short and renewed every
        third of it while the send runs, so a worker killed mid-send loses its claims
        within one lease, and a copy redelivered after the kill takes over quickly.
        Run again after a hold, so a long outage never sends on a stale claim; the
        claim taken with the job's outcome check stands in for the first one only while
        it is that young.
        """
        lease = self._settings.claim_lease
        claim = self._ledger.claim
        if not first_claim.use(asyncio.get_running_loop().time()) and not await claim(
            turn.nid, turn.attempt, turn.replay, owner, lease
        ):
            raise _ClaimedElsewhere

        async def renew() -> None:
            while True:
                await asyncio.sleep(lease / 3)  # a timer, not a wait for a condition
                with contextlib.suppress(*infra_errors()):
                    await claim(turn.nid, turn.attempt, turn.replay, owner, lease)

        renewal = asyncio.create_task(renew())
        try:
            return await self._handler.send(job)
        except _outcomes():
            raise  # the claim is extended on the retry, or released with the outcome
        except Exception:
            # A bug: the message is requeued, and its next copy must not wait out the
            # lease of a claim nobody holds any more.
            with contextlib.suppress(*infra_errors()):
                await self._ledger.release(turn.nid, turn.attempt, turn.replay, owner)
            raise
        finally:
            renewal.cancel()

    async def _outcome_elsewhere(self, turn: Turn) -> tuple[Status, str] | None:
        """Wait (at most a lease) for the copy holding the claim to record its outcome.

        None when the lease ran out first: its holder died, and this copy takes over.
        """
        deadline = asyncio.get_running_loop().time() + self._settings.claim_lease
        while asyncio.get_running_loop().time() < deadline:
            earlier = await self._ledger.outcome(turn.nid, turn.attempt, turn.replay)
            if earlier is not None:
                return earlier
            await asyncio.sleep(self._settings.claim_poll)  # another process: no event to await
        return None

    async def _retry(self, job: J, turn: Turn, reason: str, retry_after: float | None) -> None:
        job.meta.attempt = turn.attempt + 1
        queue, wait = self._topology.retry_plan(
            self._handler.kind, turn.attempt, retry_after, self._rng
        )
        await self._ours(
            self._publisher.publish,
            queue,
            job.SerializeToString(),
            message_type=self._handler.kind.message_type,
            message_id=turn.nid,
            correlation_id=job.meta.correlation_id,
            direct_to_queue=True,
            expiration=wait,
        )
        await self._record(turn, RETRYING, reason)
        await self._ours(self._report, turn, RETRYING, reason)
        log.warning("retry scheduled", extra={"notification_id": turn.nid, "attempt": turn.attempt})

    async def _fail(self, job: J, turn: Turn, reason: str) -> None:
        """Dead-letter with the delivery history, then record and report FAILED.

        The dead letter goes first: a crash after it leaves a redelivery that re-sends
        it (the dead-letter store dedupes), never a FAILED job missing from the store.
        """
        history = await self._ours(self._ledger.history, turn.nid)
        final = Attempt(turn.replay, turn.attempt, "FAILED", reason, "", datetime.now(UTC))
        await self._ours(
            self._dead_letter,
            job.SerializeToString(),
            turn.nid,
            turn.attempt,
            reason,
            [*history, final],
        )
        await self._record(turn, FAILED, reason)
        await self._ours(self._report, turn, FAILED, reason)
        log.error("delivery failed", extra={"notification_id": turn.nid, "reason": reason})

    async def _record(self, turn: Turn, status: Status, detail: str, provider: str = "") -> None:
        """Record the attempt's outcome in the ledger, then count it (once: a job whose
        outcome was recorded before is re-reported, never recorded again)."""
        await self._ours(
            self._ledger.record, turn.nid, turn.attempt, status, detail, provider, turn.replay
        )
        channel = self._handler.kind.key
        if status == RETRYING:
            metrics.RETRIES.labels(channel).inc()
        elif status in _OUTCOME_LABELS:
            metrics.DELIVERIES.labels(channel, provider or "none", _OUTCOME_LABELS[status]).inc()

    async def _dead_letter(
        self,
        body: bytes,
        nid: str,
        attempt: int,
        reason: str,
        history: Sequence[Attempt] = (),
    ) -> None:
        await self._publisher.publish(
            FAILED_KEY,
            body,
            message_type=self._handler.kind.message_type,
            message_id=nid,
            correlation_id=self._correlation(body),
            headers={
                "x-notify-kind": self._handler.kind.key,
                "x-notify-error": reason[:1000],
                "x-notify-attempts": str(attempt),
                "x-notify-history": history_json(history),
            },
        )
        metrics.DEAD_LETTERS.labels(self._handler.kind.key).inc()

    def _correlation(self, body: bytes) -> str:
        """The correlation id inside ``body``, or a fresh one if it does not decode."""
        try:
            return self._handler.decode(body).meta.correlation_id or new_correlation_id()
        except DecodeError:
            return new_correlation_id()

    async def _report(self, turn: Turn, status: Status, detail: str) -> None:
        await self._report_status(turn.nid, status, detail[:1000], turn.attempt, turn.replay)


class _SendingReport:
    """The SENDING report of one attempt, made only if the send is slow.

    Most sends take milliseconds: reporting SENDING for them costs a status report (an
    RPC and an UPDATE) that nobody ever sees, since the outcome replaces it at once. So
    the report waits ``after`` seconds and is dropped if the send finished first. Once it
    has begun it is let finish (``settle``), so SENDING never arrives after the outcome;
    even then user_svc would refuse it (a terminal status is never replaced). With
    ``after`` 0 it is made before the send, as a plain step.
    """

    def __init__(self, report: Callable[[], Awaitable[None]], after: float) -> None:
        self._report = report
        self._after = after
        self._begun = False
        self._task: asyncio.Task[None] | None = None

    async def begin(self) -> _SendingReport:
        """Schedule the report (or, with ``after`` 0, make it now); returns itself."""
        if self._after <= 0:
            self._begun = True
            await self._report()
        else:
            self._task = asyncio.get_running_loop().create_task(self._later())
        return self

    async def _later(self) -> None:
        await asyncio.sleep(self._after)  # a deadline for the send, not a poll
        self._begun = True
        await self._report()

    async def settle(self) -> None:
        """Drop the report if it has not begun; else wait until it is made. Idempotent."""
        if self._task is None:
            return
        if not self._begun:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
