"""What the benchmarks measure with: a cheap SMTP sink and CPU readings from /proc.

The measuring side must not eat the budget it measures, so mail goes to Postfix's
``smtp-sink`` (about 0.2 ms of CPU per message, its counter read from its stdout), not to
a Python SMTP server, and every process's CPU is reported on its own: ours (with their
children: the render processes), the backing servers (PostgreSQL, RabbitMQ, Redis), the
sink and the load generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from scripts.system import free_port

SMTP_SINK = "/usr/sbin/smtp-sink"
_COUNT = re.compile(rb"mesg=(\d+)")
# The backing servers, by the command name the kernel shows.
BACKING = {"postgres": "PostgreSQL", "beam.smp": "RabbitMQ", "redis-server": "Redis"}


def ensure_tools() -> None:
    """Install smtp-sink and wrk from Debian when they are missing (needs root)."""
    missing = [tool for tool in ("wrk",) if shutil.which(tool) is None]
    if Path(SMTP_SINK).exists() and not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs postfix (smtp-sink) and wrk: apt-get install")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix", "wrk"],
        check=True,
        env=env,
        timeout=600,
    )


class Sink:
    """``smtp-sink`` on a free port, counting the messages it accepted.

    ``first`` and ``last`` are when the first and the latest message were counted, so a
    drain rate can leave out whatever happened before the first delivery (a worker's
    start-up) for every contender alike.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def pid(self) -> int:
        """The sink's process id."""
        assert self._process is not None
        return self._process.pid

    async def start(self) -> None:
        """Start the sink and wait until it accepts connections."""
        self._process = await asyncio.create_subprocess_exec(
            SMTP_SINK, "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "256",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        for _ in range(100):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            await asyncio.sleep(0.05)  # the sink's start-up: nothing to wait on but the port
        raise RuntimeError("smtp-sink did not start")

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        while chunk := await self._process.stdout.read(65536):
            found = _COUNT.findall(chunk)
            if found:
                count = int(found[-1])
                if count > self.count:
                    now = time.perf_counter()
                    if self.count == 0:
                        self.first = now
                    self.count, self.last = count, now
                    self._changed.set()

    async def wait_for(self, count: int, timeout: float) -> None:
        """Until ``count`` messages arrived (TimeoutError after ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()

    async def stop(self) -> None:
        """Stop the sink."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.terminate()
            await self._process.wait()
        if self._reader is not None:
            await self._reader


def _stats() -> dict[int, tuple[int, str, float]]:
    """Every process: pid -> (parent pid, command name, CPU seconds used, reaped children's
    included)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, str, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited while we looked
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        used = sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
        out[int(stat.parent.name)] = (int(fields[1]), name, used)
    return out


def cpu_seconds(pids: Mapping[str, int], names: Iterable[str] = ()) -> dict[str, float]:
    """CPU seconds used so far by each named process with its descendants (a measured
    process is not part of its parent's figure), and by every process whose command is
    one of ``names`` (all PostgreSQL backends, say)."""
    stats = _stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    roots = set(pids.values())
    out: dict[str, float] = {}
    for label, root in pids.items():
        total, pending = 0.0, [root]
        while pending:
            pid = pending.pop()
            total += stats[pid][2] if pid in stats else 0.0
            pending.extend(c for c in children.get(pid, []) if c not in roots)
        out[label] = total
    for name in names:
        out[BACKING.get(name, name)] = sum(used for _, n, used in stats.values() if n == name)
    return out
