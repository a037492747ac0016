"""A pool of render processes: untrusted templates run where a runaway hurts nothing else.

A template is code written by API clients. Inside one process no check can stop a
single C call that holds the GIL (a big-integer product, a sort of a million items), and
no check bounds the memory of every possible step. So rendering runs in child processes,
each with an address-space limit (``RLIMIT_AS``), one job at a time, and a child that is
still busy when its job's deadline passes is killed and replaced. The invariant: a
template costs at most one render process, for at most its deadline; the service's event
loop, its health checks and the other children are never touched.

The protocol is one frame per message, both ways (``frames``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

from notify_kit.errors import Unavailable
from notify_kit.templating.frames import HEADER, Message, encode

log = logging.getLogger(__name__)

# Time a child gets to stop at its own deadline (it checks as it goes) before it is killed.
_GRACE = 0.05
_RESPAWN_BACKOFF = (0.1, 5.0)


class ProcessStopped(Exception):
    """The child died or broke the protocol while rendering (it has been replaced)."""


class _Child:
    """One render process and its pipes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def ask(self, request: Mapping[str, Any], max_answer: int) -> Message:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(encode(request))
            await stdin.drain()
            return await self.read(max_answer)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise ProcessStopped(f"render process {self.process.pid}: {exc!r}") from exc

    async def read(self, max_answer: int) -> Message:
        stdout = self.process.stdout
        assert stdout is not None
        size = int.from_bytes(await stdout.readexactly(HEADER), "big")
        if size > max_answer:
            raise ValueError(f"answer of {size} bytes")
        answer = json.loads(await stdout.readexactly(size))
        if not isinstance(answer, dict):
            raise ValueError("answer is not an object")
        return answer

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()


class ProcessPool:
    """``size`` children of ``python -m module``, each serving one request at a time.

    ``call`` waits for a free child until the deadline (UNAVAILABLE if none frees up in
    time: the pool is saturated, retry later), sends the request and waits for the answer
    until the deadline; a child that has not answered by then, died, or was abandoned by a
    cancelled caller is killed and a fresh one is started in the background.
    """

    def __init__(self, module: str, args: list[str], *, size: int, max_answer: int) -> None:
        self._command = [sys.executable, "-m", module, *args]
        self._size = size
        self._max_answer = max_answer
        self._idle: asyncio.Queue[_Child] = asyncio.Queue()
        self._children: set[_Child] = set()  # alive: idle or busy
        self._spawning: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """The children's process ids (idle and busy), for measuring and tests."""
        return [child.process.pid for child in self._children]

    async def start(self) -> None:
        """Start every child and wait until each is ready."""
        children = await asyncio.gather(*(self._spawn() for _ in range(self._size)))
        for child in children:
            self._idle.put_nowait(child)

    async def close(self) -> None:
        """Kill every child (a running render is abandoned) and wait for them."""
        self._closed = True
        for task in self._spawning:
            task.cancel()
        for child in self._children:
            child.kill()
        for child in list(self._children):
            await child.process.wait()
        self._children.clear()

    async def call(self, request: Mapping[str, Any], timeout: float) -> Message:
        """Send ``request`` to a free child; its answer, within ``timeout`` seconds.

        Raises TimeoutError when the child ran past the deadline (it is replaced),
        ProcessStopped when it died on the request, Unavailable when no child was free.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            child = await asyncio.wait_for(self._idle.get(), timeout)
        except TimeoutError:
            raise Unavailable(
                "RENDERER_BUSY", "every render process is busy; retry later"
            ) from None
        healthy = False
        try:
            answer = await asyncio.wait_for(
                child.ask(request, self._max_answer), max(deadline - loop.time(), 0) + _GRACE
            )
            healthy = not answer.get("exiting", False)
            return answer
        finally:
            if healthy:
                self._idle.put_nowait(child)
            else:  # timed out, died, cancelled with a frame half-written, or quitting
                child.kill()
                self._children.discard(child)
                self._replace(child)

    def _replace(self, old: _Child) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._respawn(old))
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _respawn(self, old: _Child) -> None:
        await old.process.wait()  # killed: reaped at once
        delay, ceiling = _RESPAWN_BACKOFF
        while not self._closed:
            try:
                child = await self._spawn()
            except (OSError, ProcessStopped) as exc:
                log.error("cannot start a render process (retrying in %.1fs): %r", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, ceiling)
                continue
            if self._closed:
                child.kill()
                await child.process.wait()
                self._children.discard(child)
            else:
                self._idle.put_nowait(child)
            return

    async def _spawn(self) -> _Child:
        process = await asyncio.create_subprocess_exec(
            *self._command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        child = _Child(process)
        self._children.add(child)
        try:
            ready = await child.read(self._max_answer)
        except (asyncio.IncompleteReadError, ValueError) as exc:
            child.kill()
            await process.wait()
            self._children.discard(child)
            raise ProcessStopped(f"render process did not start: {exc!r}") from exc
        if not ready.get("ready"):
            child.kill()
            await process.wait()
            self._children.discard(child)
            raise ProcessStopped(f"render process said {ready!r} instead of ready")
        return child
