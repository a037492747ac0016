"""notify_kit.batching: group commit's guarantees, each caller answered on its own."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from gateway.config import Config
from notify_kit.batching import Batcher
from notify_kit.settings import SettingsError


class Flush:
    """A flush that records its batches and is held open until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(items)
        self.entered.set()
        await self.release.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


@contextlib.asynccontextmanager
async def batcher(flush: Flush, window: float = 0.0):  # type: ignore[no-untyped-def]
    b: Batcher[int, int] = Batcher(flush, window=window, max_batch=3)
    b.start()
    try:
        yield b
    finally:
        await b.close(RuntimeError("closed"))


async def test_items_that_queue_while_a_batch_is_out_go_together() -> None:
    flush = Flush()
    async with batcher(flush) as b:
        assert await b.submit(2) == 20  # alone: no waiting window
        flush.release.clear()
        flush.entered.clear()
        first = asyncio.ensure_future(b.submit(4))
        await flush.entered.wait()
        rest = [asyncio.ensure_future(b.submit(i)) for i in (6, 8, 10, 12)]
        await asyncio.sleep(0)  # let them queue: the batch out holds the flusher
        flush.release.set()
        assert await first == 40
        assert await asyncio.gather(*rest) == [60, 80, 100, 120]
    assert flush.batches == [[2], [4], [6, 8, 10], [12]]  # at most max_batch


async def test_each_caller_gets_its_own_answer_and_a_failed_call_reaches_all() -> None:
    flush = Flush()
    async with batcher(flush, window=0.05) as b:
        got = await asyncio.gather(b.submit(2), b.submit(3), return_exceptions=True)
        assert got[0] == 20
        assert isinstance(got[1], ValueError) and str(got[1]) == "odd 3"

    async def broken(items: list[int]) -> list[int | BaseException]:
        raise OSError("down")

    down: Batcher[int, int] = Batcher(broken, window=0.0, max_batch=8)
    down.start()
    try:
        got = await asyncio.gather(down.submit(1), down.submit(2), return_exceptions=True)
        assert [type(g) for g in got] == [OSError, OSError]
    finally:
        await down.close(RuntimeError("closed"))


async def test_a_cancelled_caller_leaves_its_item_in_the_batch() -> None:
    flush = Flush()
    flush.release.clear()
    async with batcher(flush) as b:
        gone = asyncio.ensure_future(b.submit(2))
        await flush.entered.wait()
        gone.cancel()
        flush.release.set()
        assert await b.submit(4) == 40  # the flusher carried on
    assert flush.batches == [[2], [4]]


async def test_close_fails_every_item_not_answered() -> None:
    flush = Flush()
    flush.release.clear()
    b: Batcher[int, int] = Batcher(flush, window=0.0, max_batch=8)
    b.start()
    out = asyncio.ensure_future(b.submit(2))
    await flush.entered.wait()
    waiting = asyncio.ensure_future(b.submit(4))
    await asyncio.sleep(0)
    await b.close(RuntimeError("closed"))
    for future in (out, waiting):
        with pytest.raises(RuntimeError, match="closed"):
            await future
    with pytest.raises(RuntimeError, match="closed"):
        await b.submit(6)  # and every later one, at once


async def test_a_flush_answering_the_wrong_count_fails_its_batch_not_the_batcher() -> None:
    calls = 0

    async def short(items: list[int]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        return [] if calls == 1 else [i for i in items]

    b: Batcher[int, int] = Batcher(short, window=0.0, max_batch=8)
    b.start()
    try:
        with pytest.raises(RuntimeError, match="0 answers for a batch of 1"):
            await b.submit(1)
        assert await b.submit(2) == 2
    finally:
        await b.close(RuntimeError("closed"))


def test_the_gateway_batch_bound_is_the_contracts(certs_dir: Path) -> None:
    """NOTIFY_RECORD_BATCH_MAX above the contract's max_items would make every batch
    invalid: refused at start-up."""
    tls = {"NOTIFY_TLS_DIR": str(certs_dir)}
    assert Config.from_env({**tls, "NOTIFY_RECORD_BATCH_MAX": "500"}).record_batch_max == 500
    with pytest.raises(SettingsError, match=r"1\.\.500"):
        Config.from_env({**tls, "NOTIFY_RECORD_BATCH_MAX": "501"})
