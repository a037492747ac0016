"""RabbitMQ: the topology (declared here and nowhere else) and a confirming publisher.

Topology::

    exchange notify.jobs (direct, durable)          (names take an optional prefix)
      "email"  -> email.queue   (quorum)
      "push"   -> push.queue    (quorum)
      "failed" -> failed.queue  (quorum; dead letters with their history)
    email.retry.N, push.retry.N (quorum, x-message-ttl = backoff of attempt N,
      dead-lettering at-least-once back to notify.jobs with the work routing key)

Every message is persistent and published with ``mandatory`` and a publisher confirm,
so ``publish`` returns only once the broker owns the message; an unroutable message
raises instead of being silently dropped.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from pamqp.common import FieldTable

from notify_kit import metrics
from notify_kit.errors import Unavailable
from notify_kit.settings import SettingsError, env_optional

log = logging.getLogger(__name__)

# Delay before attempt N+1, in milliseconds (attempt 1 failed -> wait 2 s, ...).
RETRY_DELAYS_MS = (2_000, 10_000, 30_000, 120_000)
DELIVERY_LIMIT = 200
_QUORUM: FieldTable = {"x-queue-type": "quorum"}


@dataclass(frozen=True, slots=True)
class JobKind:
    """One kind of job: its routing key and protobuf type name."""

    key: str
    message_type: str


EMAIL = JobKind("email", "notify.v1.EmailJob")
PUSH = JobKind("push", "notify.v1.PushJob")
KINDS = (EMAIL, PUSH)
KIND_BY_KEY = {k.key: k for k in KINDS}
KIND_BY_TYPE = {k.message_type: k for k in KINDS}  # a message's AMQP ``type`` property
FAILED_KEY = "failed"


@dataclass(frozen=True, slots=True)
class Topology:
    """Every exchange and queue name, derived from one optional prefix.

    Production uses no prefix (``email.queue``, ``push.queue``, ``failed.queue``); the
    test suite uses a unique prefix per run so it never steals a developer's messages,
    and short retry delays so retry paths are tested in seconds. A job gets
    ``len(retry_delays_ms) + 1`` attempts.
    """

    prefix: str = ""
    retry_delays_ms: tuple[int, ...] = RETRY_DELAYS_MS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Topology:
        """``NOTIFY_AMQP_PREFIX`` and ``NOTIFY_RETRY_DELAYS_MS`` (comma-separated, one
        delay per retry; a job gets one attempt more than there are delays).

        Every process declaring the topology must read the same values: a queue
        declared again with another TTL is refused by the broker. Changing the delays
        of a running system means new queue names (a new prefix) or deleting the
        retry queues first.
        """
        prefix = env_optional("NOTIFY_AMQP_PREFIX", env)
        raw = env_optional("NOTIFY_RETRY_DELAYS_MS", env)
        if not raw:
            return cls(prefix=prefix)
        try:
            delays = tuple(int(part) for part in raw.split(","))
        except ValueError as exc:
            raise SettingsError(f"NOTIFY_RETRY_DELAYS_MS must be integers, got {raw!r}") from exc
        if not delays or any(d <= 0 for d in delays):
            raise SettingsError("NOTIFY_RETRY_DELAYS_MS needs at least one positive delay")
        return cls(prefix=prefix, retry_delays_ms=delays)

    @property
    def exchange(self) -> str:
        """The direct exchange every job is published to."""
        return f"{self.prefix}notify.jobs"

    @property
    def failed_queue(self) -> str:
        """Dead letters: jobs that failed permanently or ran out of attempts."""
        return f"{self.prefix}failed.queue"

    def queue(self, kind: JobKind) -> str:
        """The work queue of ``kind``."""
        return self.bound_queue(kind.key)

    def bound_queue(self, routing_key: str) -> str:
        """The queue a routing key of the jobs exchange is bound to (one per key)."""
        return f"{self.prefix}{routing_key}.queue"

    def retry_queue(self, kind: JobKind, attempt: int) -> str:
        """The delay queue a job waits in after failing ``attempt`` (1-based)."""
        return f"{self.prefix}{kind.key}.retry.{attempt}"

    def retry_plan(
        self, kind: JobKind, attempt: int, retry_after: float | None, rng: random.Random
    ) -> tuple[str, float]:
        """Where a job that failed ``attempt`` waits, and for how many seconds.

        Equal jitter within the attempt's delay (half of it fixed, half random) keeps
        jobs that failed together from coming back together; a provider's
        ``Retry-After`` raises the wait, and picks the first delay queue long enough
        to hold it (a message's own TTL can shorten its queue's, never lengthen it).
        The wait is capped by the longest delay queue.
        """
        tiers = self.retry_delays_ms
        base = tiers[min(attempt, len(tiers)) - 1]
        wait_ms = base / 2 + rng.uniform(0, base / 2)
        if retry_after is not None:
            wait_ms = max(wait_ms, retry_after * 1000)
        tier = next((i for i, ttl in enumerate(tiers, 1) if ttl >= wait_ms), len(tiers))
        tier = max(tier, min(attempt, len(tiers)))
        return self.retry_queue(kind, tier), min(wait_ms, tiers[tier - 1]) / 1000

    def queues_of(self, kind: JobKind) -> list[str]:
        """The work queue of ``kind`` and its retry delay queues."""
        delays = range(1, len(self.retry_delays_ms) + 1)
        return [self.queue(kind), *(self.retry_queue(kind, a) for a in delays)]

    def label(self, name: str) -> str:
        """A queue's name without this deployment's prefix: its metrics label."""
        return name.removeprefix(self.prefix)

    def all_queues(self) -> list[str]:
        """Every queue name, for purging and deleting in tests and tooling."""
        return [self.failed_queue, *(name for kind in KINDS for name in self.queues_of(kind))]

    @property
    def max_attempts(self) -> int:
        """Attempts a job gets before it is dead-lettered."""
        return len(self.retry_delays_ms) + 1

    async def declare(self, channel: AbstractChannel) -> None:
        """Declare the exchange, work, retry and failed queues (idempotent)."""
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        failed = await channel.declare_queue(self.failed_queue, durable=True, arguments=_QUORUM)
        await failed.bind(exchange, FAILED_KEY)
        for kind in KINDS:
            queue = await channel.declare_queue(
                self.queue(kind),
                durable=True,
                arguments={
                    **_QUORUM,
                    # A message redelivered this often is poison (it crashes or hangs
                    # every worker): park it in failed.queue rather than loop forever or,
                    # on RabbitMQ 4's default limit, be dropped.
                    "x-delivery-limit": DELIVERY_LIMIT,
                    "x-dead-letter-exchange": self.exchange,
                    "x-dead-letter-routing-key": FAILED_KEY,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )
            await queue.bind(exchange, kind.key)
            for attempt, delay in enumerate(self.retry_delays_ms, start=1):
                await channel.declare_queue(
                    self.retry_queue(kind, attempt),
                    durable=True,
                    arguments={
                        **_QUORUM,
                        "x-message-ttl": delay,
                        "x-dead-letter-exchange": self.exchange,
                        "x-dead-letter-routing-key": kind.key,
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": "reject-publish",
                    },
                )


async def connect(url: str, *, timeout: float = 10.0) -> AbstractRobustConnection:
    """A robust connection (reconnects and re-declares on its own)."""
    return await aio_pika.connect_robust(url, timeout=timeout)


class Publisher:
    """Publishes persistent messages and waits for the broker's confirm.

    One channel serves every concurrent request: aio-pika tracks confirms by delivery
    tag, so concurrent ``publish`` calls pipeline instead of waiting one by one.
    """

    def __init__(
        self, connection: AbstractRobustConnection, topology: Topology, *, timeout: float = 5.0
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._timeout = timeout
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def start(self) -> None:
        """Open the confirming channel and make sure the topology exists."""
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self._topology.declare(self._channel)
        self._exchange = await self._channel.get_exchange(self._topology.exchange)

    async def close(self) -> None:
        """Close the channel (the connection belongs to the caller)."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_type: str,
        message_id: str,
        correlation_id: str,
        headers: Mapping[str, str] | None = None,
        direct_to_queue: bool = False,
        expiration: float | None = None,
    ) -> None:
        """Publish and wait for the confirm; raise ``Unavailable`` on any failure.

        ``direct_to_queue`` publishes through the default exchange straight to the
        queue named ``routing_key`` (used for the retry delay queues); ``expiration``
        (seconds) is the message's own TTL there, at most the queue's.
        """
        assert self._channel is not None and self._exchange is not None, "start() first"
        message = aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/x-protobuf",
            type=message_type,
            message_id=message_id,
            correlation_id=correlation_id,
            headers=dict(headers or {}),
            expiration=expiration,
        )
        target = self._channel.default_exchange if direct_to_queue else self._exchange
        queue = self._topology.label(
            routing_key if direct_to_queue else self._topology.bound_queue(routing_key)
        )
        started, outcome = time.perf_counter(), "failed"
        try:
            confirmation = await target.publish(
                message, routing_key, mandatory=True, timeout=self._timeout
            )
        except (
            aio_pika.exceptions.AMQPError,
            aiormq.exceptions.AMQPError,
            TimeoutError,
            ConnectionError,
            RuntimeError,
        ) as exc:
            log.warning("publish failed", extra={"routing_key": routing_key, "error": repr(exc)})
            raise Unavailable("QUEUE_UNAVAILABLE", "the message broker did not confirm") from exc
        else:
            outcome = "confirmed" if isinstance(confirmation, aiormq.spec.Basic.Ack) else "rejected"
        finally:
            # Every publish, however it ended: a slow or timing-out broker is the tail
            # this is read for, not only the publishes that it confirmed in the end.
            metrics.QUEUE_PUBLISH_SECONDS.labels(queue, outcome).observe(
                time.perf_counter() - started
            )
        if outcome == "rejected":
            raise Unavailable("QUEUE_REJECTED", f"the broker refused the message: {confirmation!r}")
        metrics.QUEUE_PUBLISHED.labels(queue).inc()
