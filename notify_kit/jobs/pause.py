"""Pausing consumption while our own side is down, and holding the jobs in hand.

A job that meets our outage (a dependency down, every provider's breaker open) is not
failed, retried or requeued: it waits here, in hand and unacked, and the consumer is
cancelled so no further jobs are taken; they stay safely in RabbitMQ. After a delay
(the breaker's ``retry_in``, or a backoff that grows while the outage lasts) the gate
opens and consumption resumes; the held jobs try again, and if the outage is still
there the first of them pauses again. A success resets the backoff.

The same gate spaces out unexpected errors (bugs): such a message is requeued at once,
never slept on inside its ack scope, and consumption pauses for the backoff, so one
poison message cannot spin the queue and the pause ends on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Pause:
    """The gate every job step passes; ``trip``/``hold`` close it, ``ok`` opens it."""

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
        self._tasks: set[asyncio.Task[None]] = set()
        self.reason = ""

    @property
    def paused(self) -> bool:
        """True while consumption is paused."""
        return self._paused

    async def wait(self) -> None:
        """Return when jobs may proceed (at once unless an outage closed the gate)."""
        await self._open.wait()

    async def trip(self, reason: str, retry_after: float | None = None) -> None:
        """Close the gate and pause consumption for the current backoff (if still open).

        The first caller sets the delay; callers meeting a closed gate change nothing.
        """
        if not self._open.is_set():
            return
        delay = min(self._max, max(retry_after or 0.0, self._base * 2 ** min(self._streak, 16)))
        self._streak += 1
        self._open.clear()
        self.reason = reason
        self._timer = asyncio.get_running_loop().call_later(delay, self._reopen)
        log.warning("pausing consumption for %.1fs: %s", delay, reason)
        if not self._paused:
            self._paused = True
            with contextlib.suppress(Exception):  # the broker may be the outage
                await self._pause_consumer()

    async def hold(self, reason: str, retry_after: float | None = None) -> None:
        """Trip the gate for ``reason`` and wait until the job may try again."""
        await self.trip(reason, retry_after)
        await self._open.wait()

    def settled(self) -> None:
        """A job went through with nothing held: later trouble starts the backoff afresh."""
        if self._open.is_set():
            self._streak = 0

    async def ok(self) -> None:
        """A held step got through: reset the backoff, open the gate, resume consuming."""
        self._streak = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._open.set()
        await self._resume()

    def _reopen(self) -> None:
        self._timer = None
        self._open.set()
        task = asyncio.get_running_loop().create_task(self._resume())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume(self) -> None:
        if self._paused:
            self._paused = False
            log.info("resuming consumption (paused for: %s)", self.reason)
            try:
                await self._resume_consumer()
            except Exception:  # the broker is still away; the robust connection retries
                log.exception("could not resume consuming")
