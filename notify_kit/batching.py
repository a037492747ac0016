"""Group commit: items submitted by concurrent callers handed to one call in batches.

Used where many small writes to our own services would each cost a round trip through
two gRPC stacks and a statement: the workers' status reports, the gateway's notification
records. Every caller still learns the fate of its own item.

Traces: each caller's wait is a span in its own trace (named after the batcher), and the
one call of a batch is a span in the first recorded caller's trace that links to the
other recorded items' waits, so a recorded notification's trace shows its status report
or record and, for one caller of each batch, the call upstream; the batch call shows
whose items it carried. A batch of items none of whose traces is recorded makes no span.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from opentelemetry import trace

from notify_kit.context import bound_correlation_id, get_correlation_id
from notify_kit.telemetry import span, within

T = TypeVar("T")
R = TypeVar("R")

# Answers each item of a batch, in order, with its result or the exception its caller
# gets; an exception raised by the call itself goes to every caller of the batch.
Flush = Callable[[list[T]], Awaitable[Sequence["R | BaseException"]]]


@dataclass(frozen=True, slots=True)
class _Pending(Generic[T, R]):
    item: T
    answer: asyncio.Future[R]
    caller: trace.SpanContext  # the submitting caller's wait, linked from the batch call
    correlation_id: str  # the caller's


class Batcher(Generic[T, R]):
    """Hands submitted items to ``flush`` in batches, one batch out at a time.

    A batch starts with the first waiting item and takes every item that arrives within
    ``window`` seconds of it, at most ``max_batch``. With ``window`` 0 it takes whatever queued
    up while the previous batch was out: an idle system adds no latency and a busy one
    makes one call for many items (the batch size follows the load). A cancelled caller
    leaves its item in its batch, where it may still be applied; nobody waits for it.
    """

    def __init__(
        self, flush: Flush[T, R], *, window: float, max_batch: int, name: str = "batch"
    ) -> None:
        self._flush = flush
        self._name = name
        self._window = window
        self._max_batch = max_batch
        # An item is always in exactly one of these until it is answered, so close()
        # finds every caller still waiting.
        self._waiting: collections.deque[_Pending[T, R]] = collections.deque()
        self._out: list[_Pending[T, R]] = []
        self._arrived = asyncio.Event()
        self._closed: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start handing out batches."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, error: BaseException) -> None:
        """Stop; every item not answered yet, and every later one, fails with ``error``."""
        self._closed = error
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pending in [*self._out, *self._waiting]:
            if not pending.answer.done():
                pending.answer.set_exception(error)
        self._out, self._waiting = [], collections.deque()

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and wait for its own answer."""
        if self._closed is not None:
            raise self._closed
        answer: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        with span(self._name) as waiting:
            self._waiting.append(_Pending(item, answer, waiting, get_correlation_id()))
            self._arrived.set()
            return await answer

    async def _run(self) -> None:
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            if self._window > 0 and len(self._waiting) < self._max_batch:
                await asyncio.sleep(self._window)  # the window: let more reports join
            take = min(self._max_batch, len(self._waiting))
            self._out = [self._waiting.popleft() for _ in range(take)]
            await self._apply(self._out)
            self._out = []

    async def _apply(self, batch: list[_Pending[T, R]]) -> None:
        outcomes: Sequence[R | BaseException]
        recorded = [p for p in batch if p.caller.trace_flags.sampled]
        try:
            with contextlib.ExitStack() as step:
                if recorded:
                    # The call is part of the first recorded caller's trace (a child of
                    # its wait: recorded whenever one of its items is, with that
                    # caller's correlation id, so its server's span and log lines are
                    # found by it) and links to the other recorded callers' waits.
                    first, others = recorded[0], recorded[1:]
                    size: dict[str, Any] = {"batch.size": len(batch)}  # OTel's dotted name
                    step.enter_context(bound_correlation_id(first.correlation_id))
                    step.enter_context(
                        span(
                            f"{self._name} batch",
                            child_of=first.caller,
                            links=[trace.Link(p.caller) for p in others],
                            **size,
                        )
                    )
                else:
                    # No caller's trace is recorded: the call is made in the first one's
                    # (so its server follows the "not sampled"), with no span of its own.
                    step.enter_context(within(batch[0].caller))
                outcomes = await self._flush([p.item for p in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} answers for a batch of {len(batch)}")
        except Exception as exc:  # the call failed: every caller of the batch learns why
            outcomes = [exc] * len(batch)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.answer.done():
                continue  # its caller was cancelled
            if isinstance(outcome, BaseException):
                pending.answer.set_exception(outcome)
            else:
                pending.answer.set_result(outcome)
