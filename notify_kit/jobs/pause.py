"""Holding jobs while our own side is down, with consumption paused meanwhile.

A job that meets our outage (a dependency down, every provider's breaker open) is not
failed, retried or requeued: the job waits here, in hand, unacked, and the consumer is
cancelled so no further jobs are taken; they stay safely in RabbitMQ. After a delay
(the breaker's ``retry_in`` or a backoff growing while the outage lasts) the held jobs
try again; the first success resumes consumption at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Pause:
    """The gate every job passes; ``hold`` closes it, ``ok`` opens it and resumes."""

    def __init__(
        self,
        pause_consumer: Callable[[], Awaitable[None]],
        resume_consumer: Callable[[], Awaitable[None]],
        *,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
    ) -> None:
        self._pause_consumer = pause_consumer
        self._resume_consumer = resume_consumer
        self._base = base_delay
        self._max = max_delay
        self._open = asyncio.Event()
        self._open.set()
        self._paused = False
        self._streak = 0
        self._timer: asyncio.TimerHandle | None = None
        self.reason = ""

    @property
    def paused(self) -> bool:
        """True while consumption is paused for an outage."""
        return self._paused

    async def wait(self) -> None:
        """Return when jobs may proceed (at once unless an outage closed the gate)."""
        await self._open.wait()

    async def hold(self, reason: str, retry_after: float | None = None) -> None:
        """Wait until the job that met ``reason`` may try again.

        The first job to meet an outage pauses the consumer and sets the delay; jobs
        meeting it while the gate is already closed just wait for it to open.
        """
        if self._open.is_set():
            delay = min(self._max, max(retry_after or 0.0, self._base * 2 ** min(self._streak, 16)))
            self._streak += 1
            self._open.clear()
            self.reason = reason
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(delay, self._open.set)
            if not self._paused:
                self._paused = True
                log.warning("pausing consumption: %s (next try in %.1fs)", reason, delay)
                with contextlib.suppress(Exception):  # the broker may be the outage
                    await self._pause_consumer()
            else:
                log.info("still paused: %s (next try in %.1fs)", reason, delay)
        await self._open.wait()

    async def ok(self) -> None:
        """A job got through: open the gate and resume consumption if it was paused."""
        self._streak = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._open.set()
        if self._paused:
            self._paused = False
            log.warning("resuming consumption after: %s", self.reason)
            await self._resume_consumer()
