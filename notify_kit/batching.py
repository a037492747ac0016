"""Group commit: items submitted by concurrent callers handed to one call in batches.

Used where many small writes to our own services would each cost a round trip through
two gRPC stacks and a statement: the workers' status reports, the gateway's notification
records. Every caller still learns the fate of its own item.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Answers each item of a batch, in order, with its result or the exception its caller
# gets; an exception raised by the call itself goes to every caller of the batch.
Flush = Callable[[list[T]], Awaitable[Sequence["R | BaseException"]]]


@dataclass(frozen=True, slots=True)
class _Pending(Generic[T, R]):
    item: T
    answer: asyncio.Future[R]


class Batcher(Generic[T, R]):
    """Hands submitted items to ``flush`` in batches, one batch out at a time.

    A batch starts with the first waiting item and takes every item that arrives within
    ``window`` seconds, at most ``max_batch``. With ``window`` 0 it takes whatever queued
    up while the previous batch was out: an idle system adds no latency and a busy one
    makes one call for many items (the batch size follows the load). A cancelled caller
    leaves its item in its batch, where it may still be applied; nobody waits for it.
    """

    def __init__(self, flush: Flush[T, R], *, window: float, max_batch: int) -> None:
        self._flush = flush
        self._window = window
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Pending[T, R]] = asyncio.Queue()
        self._out: list[_Pending[T, R]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start handing out batches."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, error: BaseException) -> None:
        """Stop; every item not answered yet fails with ``error``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        waiting = self._out + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        for pending in waiting:
            if not pending.answer.done():
                pending.answer.set_exception(error)

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and wait for its own answer."""
        answer: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, answer))
        return await answer

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._window
            while len(batch) < self._max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            self._out = batch
            await self._apply(batch)
            self._out = []

    async def _apply(self, batch: list[_Pending[T, R]]) -> None:
        outcomes: Sequence[R | BaseException]
        try:
            outcomes = await self._flush([p.item for p in batch])
        except Exception as exc:  # the call failed: every caller of the batch learns why
            outcomes = [exc] * len(batch)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.answer.done():
                continue  # its caller was cancelled
            if isinstance(outcome, BaseException):
                pending.answer.set_exception(outcome)
            else:
                pending.answer.set_result(outcome)
