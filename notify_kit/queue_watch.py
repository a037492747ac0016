"""Queue depth for the metrics: the consumer of a queue reads it every few seconds.

``notify_queue_messages`` and ``notify_queue_consumers`` come from a passive declare
(the broker's own count, no management API or plugin needed), made by the process that
consumes the queue: a worker for its work and retry queues, the gateway for the dead
letters. A backlog growing while nothing is consumed is then visible from the
consumer's own metrics, and an alert can tell "slow" from "stopped". The read runs on a
channel of its own, so a failed read never touches the channel that consumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from notify_kit import metrics
from notify_kit.amqp import Topology

log = logging.getLogger(__name__)

_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    TimeoutError,
)


class QueueWatch:
    """Refreshes the depth gauges of ``queues`` every ``interval`` seconds."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        queues: Sequence[str],
        *,
        interval: float = 5.0,
        timeout: float = 5.0,
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._queues = tuple(queues)
        self._interval = interval
        self._timeout = timeout
        self._channel: AbstractChannel | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin refreshing (the first read happens at once)."""
        self._task = asyncio.create_task(self._loop(), name="queue-watch")

    async def close(self) -> None:
        """Stop refreshing and close the channel."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*_ERRORS):
                await self._channel.close()

    async def refresh(self) -> bool:
        """Read every queue once; False (and the gauges left as they were) on failure."""
        try:
            if self._channel is None or self._channel.is_closed:
                self._channel = await asyncio.wait_for(self._connection.channel(), self._timeout)
            for name in self._queues:
                queue = await self._channel.declare_queue(name, passive=True, timeout=self._timeout)
                result = queue.declaration_result
                label = self._topology.label(name)
                metrics.QUEUE_MESSAGES.labels(label).set(result.message_count or 0)
                metrics.QUEUE_CONSUMERS.labels(label).set(result.consumer_count or 0)
        except _ERRORS as exc:
            log.debug("queue depth not read: %r", exc)
            self._channel = None
            return False
        return True

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)  # a timer: there is no event to wait on
