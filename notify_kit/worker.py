"""The job runner both workers share: decode, dedupe, send, record, report, then ack.

A worker supplies a ``JobHandler`` (decode its protobuf job, send it) and a
``DeliveryLedger`` (its own delivery log in its own database); the runner owns the
delivery guarantees so they are written once:

* manual ack with bounded prefetch; a message is acked only after its outcome is
  recorded in the ledger and, for retries and dead letters, after the broker confirmed
  the republished copy;
* an undecodable message goes to ``failed.queue`` untouched (never crash, never loop);
* an expired job ends as EXPIRED without being sent;
* a job whose notification the ledger already shows delivered is not sent again
  (redeliveries after a crash), but its DELIVERED status is reported again;
* ``TransientError``: republished to the delay queue of its attempt with ``attempt+1``,
  status RETRYING; after ``Topology.max_attempts`` it goes to ``failed.queue``, status FAILED;
* ``PermanentError``: straight to ``failed.queue``, status FAILED;
* anything unexpected (a bug, a dependency down while recording): the message is
  requeued by ``message.process`` and the runner backs off briefly, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeAlias, TypedDict, TypeVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from notify.v1 import (
    common_pb2,
    jobs_pb2,
    template_service_pb2,
    template_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from opentelemetry import context as otel_context
from opentelemetry import trace

from notify_kit import rpc
from notify_kit.amqp import FAILED_KEY, JobKind, Publisher, Topology, connect
from notify_kit.context import new_correlation_id, set_correlation_id
from notify_kit.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError
from notify_kit.server import GrpcServer
from notify_kit.settings import CommonSettings, env_int, env_optional, env_str
from notify_kit.telemetry import extract_trace_context

log = logging.getLogger(__name__)

Status: TypeAlias = common_pb2.NotificationStatus.ValueType
DELIVERED = common_pb2.NOTIFICATION_STATUS_DELIVERED
FAILED = common_pb2.NOTIFICATION_STATUS_FAILED
RETRYING = common_pb2.NOTIFICATION_STATUS_RETRYING
SENDING = common_pb2.NOTIFICATION_STATUS_SENDING
EXPIRED = common_pb2.NOTIFICATION_STATUS_EXPIRED


class PermanentError(Exception):
    """Retrying cannot help: bad address, SMTP 5xx, unregistered token, bad template."""


class TransientError(Exception):
    """May succeed later: timeouts, SMTP 4xx, HTTP 5xx/429, a dependency down."""


# Upstream answers that will not change on a retry; everything else (UNAVAILABLE,
# DEADLINE_EXCEEDED, INTERNAL, ...) might.
PERMANENT_UPSTREAM = (InvalidArgument, NotFound, FailedPrecondition)

J = TypeVar("J", jobs_pb2.EmailJob, jobs_pb2.PushJob)


class JobHandler(Protocol[J]):
    """What a worker plugs into the runner."""

    kind: JobKind
    channel: common_pb2.Channel.ValueType

    def decode(self, body: bytes) -> J:
        """Parse the queue message body (raise ``DecodeError`` when it is not a job)."""

    async def send(self, job: J) -> str:
        """Deliver the job; return a detail (provider message id) or raise the errors above."""


class DeliveryLedger(Protocol):
    """The worker's delivery log: the record that makes redeliveries harmless."""

    async def outcome(self, notification_id: str, attempt: int) -> tuple[Status, str] | None:
        """An outcome already recorded: DELIVERED by any attempt, or that of ``attempt``.

        With it, a redelivered job (the worker died, or a report failed after the
        outcome was recorded) is re-reported instead of being sent, retried or
        dead-lettered a second time.
        """

    async def record(self, notification_id: str, attempt: int, status: Status, detail: str) -> None:
        """Append one attempt's outcome (DELIVERED, RETRYING, FAILED, EXPIRED)."""


StatusReport = Callable[[str, Status, str, int], Awaitable[None]]


class WorkerFields(TypedDict):
    """The configuration every worker has: broker, topology, upstreams, prefetch."""

    amqp_url: str
    topology: Topology
    user_svc_addr: str
    template_svc_addr: str
    prefetch: int


def worker_fields_from_env(env: Mapping[str, str] | None = None) -> WorkerFields:
    """Read ``NOTIFY_AMQP_URL``/``_PREFIX``, the upstream addresses and ``NOTIFY_PREFETCH``."""
    return WorkerFields(
        amqp_url=env_str("NOTIFY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/", env),
        topology=Topology(prefix=env_optional("NOTIFY_AMQP_PREFIX", env)),
        user_svc_addr=env_str("NOTIFY_USER_SVC_ADDR", "127.0.0.1:50052", env),
        template_svc_addr=env_str("NOTIFY_TEMPLATE_SVC_ADDR", "127.0.0.1:50053", env),
        prefetch=env_int("NOTIFY_PREFETCH", 32, env),
    )


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """How many jobs one process holds at once, and how long it may take to stop."""

    prefetch: int = 32
    unexpected_error_backoff: float = 0.5
    max_backoff: float = 30.0
    stop_timeout: float = 10.0


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
        settings: RunnerSettings = RunnerSettings(),
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._publisher = publisher
        self._handler: JobHandler[J] = handler
        self._ledger = ledger
        self._report_status = report
        self._settings = settings
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._tracer = trace.get_tracer(__name__)
        self._failures = 0

    async def start(self) -> None:
        """Open a channel with bounded prefetch and start consuming."""
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._settings.prefetch)
        await self._topology.declare(channel)
        self._queue = await channel.get_queue(self._topology.queue(self._handler.kind))
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stop taking jobs, let those in hand finish (their acks still go out).

        Bounded: with the broker unreachable the cancel would wait for a reconnect and
        the jobs could not ack anyway; they are redelivered to another worker.
        """
        timeout = self._settings.stop_timeout
        if self._queue is not None and self._tag is not None:
            try:
                await asyncio.wait_for(self._queue.cancel(self._tag), timeout)
            except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError):
                log.warning("could not cancel the consumer cleanly; stopping anyway")
            self._tag = None
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=timeout)
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
        async with message.process(requeue=True, ignore_processed=True):
            try:
                await self._handle(message)
                self._failures = 0
            except Exception:
                # A bug or a dependency down while recording: requeue, but only after a
                # pause that grows while failures continue, so a UserService outage
                # does not spin the queue (the pause runs before the reject).
                self._failures += 1
                pause = min(
                    self._settings.max_backoff,
                    self._settings.unexpected_error_backoff * 2 ** min(self._failures, 16),
                )
                log.exception("job failed unexpectedly; requeued in %.1fs", pause)
                await asyncio.sleep(pause)
                raise

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            job = self._handler.decode(message.body)
        except DecodeError:
            set_correlation_id(message.correlation_id or new_correlation_id())
            log.error("undecodable job moved to the failed queue")
            await self._dead_letter(message.body, message.message_id or "", 0, "undecodable")
            return
        meta = job.meta
        set_correlation_id(meta.correlation_id or new_correlation_id())
        token = otel_context.attach(extract_trace_context(meta.trace_context))
        try:
            with self._tracer.start_as_current_span(f"{self._handler.kind.key} job"):
                await self._run(job, meta)
        finally:
            otel_context.detach(token)

    async def _run(self, job: J, meta: jobs_pb2.JobMeta) -> None:
        nid, attempt = meta.notification_id, meta.attempt or 1
        earlier = await self._ledger.outcome(nid, attempt)
        if earlier is not None:
            log.info("outcome already recorded; re-reported", extra={"notification_id": nid})
            await self._report(nid, earlier[0], earlier[1], attempt)
            return
        if meta.HasField("expire_time") and _past(meta.expire_time):
            await self._ledger.record(nid, attempt, EXPIRED, "expired before sending")
            await self._report(nid, EXPIRED, "expired before sending", attempt)
            return
        await self._report(nid, SENDING, "", attempt)
        try:
            detail = await self._handler.send(job)
        except PermanentError as exc:
            await self._fail(job, nid, attempt, f"permanent: {exc}")
            return
        except TransientError as exc:
            if attempt >= self._topology.max_attempts:
                await self._fail(job, nid, attempt, f"gave up after {attempt} attempts: {exc}")
            else:
                await self._retry(job, nid, attempt, str(exc))
            return
        await self._ledger.record(nid, attempt, DELIVERED, detail)
        await self._report(nid, DELIVERED, detail, attempt)
        log.info("delivered", extra={"notification_id": nid, "attempt": attempt})

    async def _retry(self, job: J, nid: str, attempt: int, reason: str) -> None:
        job.meta.attempt = attempt + 1
        await self._publisher.publish(
            self._topology.retry_queue(self._handler.kind, attempt),
            job.SerializeToString(),
            message_type=self._handler.kind.message_type,
            message_id=nid,
            correlation_id=job.meta.correlation_id,
            direct_to_queue=True,
        )
        await self._ledger.record(nid, attempt, RETRYING, reason)
        await self._report(nid, RETRYING, reason, attempt)
        log.warning("retry scheduled", extra={"notification_id": nid, "attempt": attempt})

    async def _fail(self, job: J, nid: str, attempt: int, reason: str) -> None:
        await self._dead_letter(job.SerializeToString(), nid, attempt, reason)
        await self._ledger.record(nid, attempt, FAILED, reason)
        await self._report(nid, FAILED, reason, attempt)
        log.error("delivery failed", extra={"notification_id": nid, "reason": reason})

    async def _dead_letter(self, body: bytes, nid: str, attempt: int, reason: str) -> None:
        await self._publisher.publish(
            FAILED_KEY,
            body,
            message_type=self._handler.kind.message_type,
            message_id=nid,
            correlation_id=job_correlation(body, self._handler),
            headers={
                "x-notify-kind": self._handler.kind.key,
                "x-notify-error": reason[:1000],
                "x-notify-attempts": str(attempt),
            },
        )

    async def _report(self, nid: str, status: Status, detail: str, attempt: int) -> None:
        await self._report_status(nid, status, detail[:1000], attempt)


def job_correlation(body: bytes, handler: JobHandler[J]) -> str:
    """The correlation id inside ``body``, or a fresh one if it does not decode."""
    try:
        return handler.decode(body).meta.correlation_id or new_correlation_id()
    except DecodeError:
        return new_correlation_id()


def _past(ts: timestamp_pb2.Timestamp) -> bool:
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return (ts.seconds, ts.nanos) < (now.seconds, now.nanos)


async def start_worker(
    stack: contextlib.AsyncExitStack,
    common: CommonSettings,
    amqp_url: str,
    topology: Topology,
    handler: JobHandler[J],
    ledger: DeliveryLedger,
    report: StatusReport,
    settings: RunnerSettings,
) -> int:
    """Connect, open the confirming publisher, serve health, start consuming.

    Everything is entered into ``stack`` in that order, so closing the stack drains the
    runner first, then stops the health server, then closes the broker. Returns the
    health server's port.
    """
    connection = await connect(amqp_url)
    stack.push_async_callback(connection.close)
    publisher = Publisher(connection, topology)
    await publisher.start()
    stack.push_async_callback(publisher.close)
    server = GrpcServer(common, registrars=(), service_names=())
    port = await server.start()
    stack.push_async_callback(server.stop)
    runner = JobRunner(connection, topology, publisher, handler, ledger, report, settings)
    await runner.start()
    stack.push_async_callback(runner.stop)
    log.info("%s consuming %s", common.service, topology.queue(handler.kind))
    return port


async def render(
    templates: template_service_pb2_grpc.TemplateServiceStub,
    template_id: str,
    language: str,
    channel: common_pb2.Channel.ValueType,
    variables: struct_pb2.Struct,
    *,
    timeout: float,
) -> template_service_pb2.RenderTemplateResponse:
    """RenderTemplate, with the answer sorted into permanent and transient failures.

    A template that is missing, lacks the channel or a variable will not render on a
    retry either; a TemplateService that is down or slow might.
    """
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
        raise TransientError(f"template service: {exc.reason}") from exc
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
    logged and dropped so the job is not requeued forever; any other failure raises,
    and the runner requeues the job to report again later.
    """

    async def report(notification_id: str, status: Status, detail: str, attempt: int) -> None:
        request = user_service_pb2.UpdateDeliveryStatusRequest(
            notification_id=notification_id,
            channel=channel,
            status=status,
            detail=detail,
            attempt=attempt,
        )
        try:
            await rpc.unary(users.UpdateDeliveryStatus, request, timeout=timeout)
        except PERMANENT_UPSTREAM as exc:
            log.warning(
                "status report rejected: %s",
                exc.reason,
                extra={"notification_id": notification_id},
            )

    return report


__all__ = [
    "DeliveryLedger",
    "JobHandler",
    "JobRunner",
    "PermanentError",
    "RunnerSettings",
    "StatusReport",
    "TransientError",
    "render",
    "start_worker",
    "status_reporter",
]
