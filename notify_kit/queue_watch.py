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
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

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
        self._channel: AbstractRobustChannel | None = None
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
        await self._drop_channel()

    async def refresh(self) -> bool:
        """Read every queue once; False (and the gauges left as they were) on failure."""
        try:
            if self._channel is None or self._channel.is_closed:
                self._channel = await asyncio.wait_for(self._connection.channel(), self._timeout)
            for name in self._queues:
                # robust=False: a robust channel answers a passive declare of a queue it
                # already knows from its cache, never asking the broker again, and the
                # gauges would keep their first values.
                queue = await self._channel.declare_queue(
                    name, passive=True, timeout=self._timeout, robust=False
                )
                result = queue.declaration_result
                label = self._topology.label(name)
                metrics.QUEUE_MESSAGES.labels(label).set(result.message_count or 0)
                metrics.QUEUE_CONSUMERS.labels(label).set(result.consumer_count or 0)
        except _ERRORS as exc:
            log.debug("queue depth not read: %r", exc)
            await self._drop_channel()
            return False
        return True

    async def _drop_channel(self) -> None:
        """Close the channel (a timed-out one may still be open) and forget it."""
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*_ERRORS):
                await asyncio.wait_for(channel.close(), self._timeout)

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)  # a timer: there is no event to wait on
