"""End-to-end benchmark: JSON posted through Envoy until every e-mail is at the SMTP sink
and every status reads DELIVERED, at saturation and at half of it, with the baselines
measured in the same run.

The system runs exactly as ``make run`` runs it (the five services and Envoy as
processes, via ``scripts.harness``), on free ports with throwaway databases and a private
RabbitMQ prefix, sending its mail to Postfix's ``smtp-sink``. The load generator is
``wrk`` (saturation: fixed connections, as fast as answers come) and ``bench.paced``
(half load: open-loop Poisson arrivals at a fixed rate), each in its own process with its
CPU reported. Per run:

1. **saturation**: ``wrk`` for ``--seconds`` with ``--connections`` connections, each
   request a new notification for one of the users. accepted/s is wrk's answered/s (each
   answer came after the broker's confirm); delivered/s counts the records created from
   the first request to the last e-mail at the sink; then every delivery's status is read
   from user_svc's database and must be DELIVERED. CPU per notification for every process
   (services with their render processes, Envoy, PostgreSQL, RabbitMQ, Redis, the sink,
   the load generator) over the same span; RSS and PSS of every service, peak;
2. **half load**: ``bench.paced`` at half of that run's accepted/s, the API latency a
   client sees;
3. **baselines**: the same sink fed directly over one SMTP connection (the floor of any
   pipeline), and a Celery 5 worker (threads, ``acks_late``) draining the same number of
   render + send tasks from the same RabbitMQ (``bench.delivery.celery``).

    python -m bench.e2e --seconds 10 --connections 32 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import asyncpg
from notify.v1 import common_pb2

from bench.delivery import celery
from bench.peers import Sink, cpu_seconds, ensure_tools
from scripts import gen_certs
from scripts.api import DEMO_TEMPLATE
from scripts.harness import Running, running_system
from scripts.system import poll

API_KEY = "bench-key"
BACKING = ("postgres", "beam.smp", "redis-server")
SERVICES = ("gateway", "user_svc", "template_svc", "email_worker", "push_worker", "envoy")

# wrk's script: each request a new notification, spread over the users; one JSON line out.
_WRK_SCRIPT = """
local users = {%(users)s}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = "%(key)s"
request = function()
  i = i + 1
  local body = string.format(
    '{"userId":"%%s","templateId":"welcome","channels":["CHANNEL_EMAIL"],'
    .. '"variables":{"name":"n%%d"}}', users[(i %% #users) + 1], i)
  return wrk.format(nil, "/v1/notifications", nil, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%%d,"duration_us":%%d,"non2xx":%%d,"socket_errors":%%d,'
    .. '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children (the load generators, once done)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process and its descendants in kB; PSS shares pages fairly, so a
    forked render process is not counted twice."""
    rss = pss = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue  # exited while we looked
        pending.extend(int(c) for c in children)
    return rss, pss


class MemoryPeaks:
    """Samples every service's memory (with its children) while the load runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.rss_mb: dict[str, float] = dict.fromkeys(pids, 0.0)
        self.pss_mb: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._pids = pids
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling every 250 ms."""
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def stop(self) -> None:
        """Stop sampling (one last sample first)."""
        self._take()
        if self._task is not None:
            self._task.cancel()

    def _take(self) -> None:
        for name, pid in self._pids.items():
            rss, pss = _memory_kb(pid)
            self.rss_mb[name] = max(self.rss_mb[name], round(rss / 1024, 1))
            self.pss_mb[name] = max(self.pss_mb[name], round(pss / 1024, 1))

    async def _sample(self) -> None:
        while True:
            self._take()
            await asyncio.sleep(0.25)  # the sampling interval


class Deliveries:
    """user_svc's deliveries table, read directly: the truth about what was accepted."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def counts(self) -> tuple[int, int]:
        """(deliveries recorded, deliveries DELIVERED) so far."""
        row = await self._conn.fetchrow(
            "SELECT count(*), count(*) FILTER (WHERE status = $1) FROM deliveries",
            common_pb2.NOTIFICATION_STATUS_DELIVERED,
        )
        assert row is not None
        return int(row[0]), int(row[1])

    async def all_delivered(self, since: int) -> int:
        """Until every delivery recorded reads DELIVERED; how many were recorded after the
        first ``since``."""
        recorded, _ = await poll(
            self.counts, lambda c: c[0] == c[1], timeout=300, what="every delivery DELIVERED"
        )
        return recorded - since


async def saturation(
    running: Running, sink: Sink, deliveries: Deliveries, script: Path, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float], MemoryPeaks]:
    """One wrk run as fast as answers come, drained to the sink and read back."""
    system = running.system
    pids = {name: system.procs[name].pid for name in SERVICES} | {"sink": sink.pid}
    memory = MemoryPeaks({name: system.procs[name].pid for name in SERVICES})
    recorded_before, _ = await deliveries.counts()
    sunk_before = sink.count
    memory.start()
    cpu_before, load_before = cpu_seconds(pids, BACKING), _children_cpu()
    t0 = time.perf_counter()
    wrk = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--timeout", "10s",
        "-s", str(script), running.base,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await wrk.communicate()
    load_cpu = _children_cpu() - load_before
    got: dict[str, int] = json.loads(out.decode().strip().splitlines()[-1])
    # Requests in flight when wrk stopped were answered to nobody but still complete
    # (the gateway finishes a send whose caller left): the database, not wrk, says how
    # many notifications there are to deliver.
    count = await deliveries.all_delivered(recorded_before)
    await sink.wait_for(sunk_before + count, timeout=60)
    delivered_at = sink.last
    cpu_after = cpu_seconds(pids, BACKING)
    await memory.stop()
    if sink.count != sunk_before + count:
        raise RuntimeError(f"{sink.count - sunk_before} e-mails for {count} notifications")
    answered = got["requests"] - got["non2xx"]
    result = {
        "accepted_per_s": answered / (got["duration_us"] / 1e6),
        "delivered_per_s": count / (delivered_at - t0),
        "notifications": float(count),
        "p50_ms": got["p50_us"] / 1000,
        "p90_ms": got["p90_us"] / 1000,
        "p99_ms": got["p99_us"] / 1000,
        "errors": float(got["non2xx"] + got["socket_errors"]),
    }
    cpu = {k: (cpu_after[k] - cpu_before[k]) * 1000 / count for k in cpu_after}
    cpu["load generator (wrk)"] = load_cpu * 1000 / count
    return result, cpu, memory


async def half_load(
    running: Running, sink: Sink, deliveries: Deliveries, users: list[str], rate: float,
    seconds: int,
) -> dict[str, float]:  # fmt: skip
    """Open-loop load at ``rate`` (``bench.paced``): the latency a client sees below
    saturation."""
    recorded_before, _ = await deliveries.counts()
    sunk_before = sink.count
    load_before = _children_cpu()
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.paced", f"{running.base}/v1/notifications",
        "--rate", f"{rate:.1f}", "--seconds", str(seconds), "--users", ",".join(users),
        "--api-key", API_KEY,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await client.communicate()
    load_cpu = _children_cpu() - load_before
    got: dict[str, float] = json.loads(out)
    count = await deliveries.all_delivered(recorded_before)
    await sink.wait_for(sunk_before + count, timeout=60)
    return {
        **got,
        "cpu_ms_load_generator_python": load_cpu * 1000 / count,
    }


async def direct_smtp(sink: Sink, count: int) -> float:
    """Messages/s sent straight to the sink over one connection."""
    start = sink.count
    body = b"Subject: baseline\r\nFrom: a@example.com\r\nTo: b@example.com\r\n\r\nhello\r\n"
    t0 = time.perf_counter()
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, timeout=10)
    await smtp.connect()
    for _ in range(count):
        await smtp.sendmail("a@example.com", ["b@example.com"], body)
    await smtp.quit()
    await sink.wait_for(start + count, timeout=120)
    return count / (time.perf_counter() - t0)


def _medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}


async def _setup(running: Running, users: int, run_id: str) -> list[str]:
    async with aiohttp.ClientSession(headers={"x-api-key": API_KEY}) as session:
        async with session.post(f"{running.base}/v1/templates", json=DEMO_TEMPLATE) as resp:
            resp.raise_for_status()
        ids = []
        for i in range(users):
            body = {"email": f"bench{i}-{run_id}@example.com"}
            async with session.post(f"{running.base}/v1/users", json=body) as resp:
                resp.raise_for_status()
                ids.append((await resp.json())["user"]["id"])
    return ids


async def amain(args: argparse.Namespace) -> None:
    """Start the system, warm up, run, print a JSON summary."""
    ensure_tools()
    run_id = uuid.uuid4().hex[:8]
    var = Path(tempfile.mkdtemp(prefix="notify-bench-"))
    gen_certs.generate(var / "certs")
    sink = Sink()
    await sink.start()
    try:
        async with running_system(
            var, var / "certs", tag=f"bench{run_id}", api_key=API_KEY, log_level="WARNING",
            extra_env={
                "NOTIFY_SMTP_HOST": "127.0.0.1",
                "NOTIFY_SMTP_PORT": str(sink.port),
                **dict(kv.split("=", 1) for kv in args.env),
            },
        ) as running:  # fmt: skip
            users = await _setup(running, args.users, run_id)
            script = var / "bench.lua"
            script.write_text(
                _WRK_SCRIPT % {"users": ",".join(f'"{u}"' for u in users), "key": API_KEY}
            )
            conn = await asyncpg.connect(f"{running.cfg.pg_base}/{running.cfg.db_prefix}user")
            try:
                summary = await _measure(running, sink, Deliveries(conn), users, script, args)
            finally:
                await conn.close()
    finally:
        await sink.stop()
    print(json.dumps(summary, indent=2))


async def _measure(
    running: Running,
    sink: Sink,
    deliveries: Deliveries,
    users: list[str],
    script: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    warm = argparse.Namespace(**{**vars(args), "seconds": 3})
    await saturation(running, sink, deliveries, script, warm)
    runs, cpus, halves, directs, celeries = [], [], [], [], []
    rss: dict[str, list[float]] = {}
    pss: dict[str, list[float]] = {}
    for _ in range(args.runs):
        result, cpu, memory = await saturation(running, sink, deliveries, script, args)
        runs.append(result)
        cpus.append(cpu)
        for name in memory.rss_mb:
            rss.setdefault(name, []).append(memory.rss_mb[name])
            pss.setdefault(name, []).append(memory.pss_mb[name])
        # Half of what the system sustains end to end: accepting faster than it delivers
        # only fills the queue, so the accepted rate is not a maximum the system can hold.
        sustained = min(result["accepted_per_s"], result["delivered_per_s"])
        halves.append(
            await half_load(running, sink, deliveries, users, sustained / 2, args.seconds)
        )
        directs.append(await direct_smtp(sink, 2000))
        celeries.append(await celery(running.cfg.amqp_url, 2000))
    med = _medians(runs)
    direct = statistics.median(directs)
    celery_rate = statistics.median(c["delivered_per_s"] for c in celeries)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": f"{platform.python_implementation()} {platform.python_version()} "
        f"({sys.executable}), uvloop in services",
        "env": args.env,
        "seconds": args.seconds,
        "connections": args.connections,
        "saturation": runs,
        "saturation_median": med,
        "cpu_ms_per_notification": _medians(cpus),
        "services_cpu_ms_per_notification": round(
            sum(v for k, v in _medians(cpus).items() if k in SERVICES and k != "envoy"), 3
        ),
        "peak_rss_mb": {k: max(v) for k, v in rss.items()},
        "peak_pss_mb": {k: max(v) for k, v in pss.items()},
        "half_load": halves,
        "half_load_median": _medians(halves),
        "direct_smtp_per_s": round(direct, 1),
        "celery_worker_only": celeries,
        "celery_worker_only_per_s": round(celery_rate, 1),
        "ratio_delivered_to_celery": round(med["delivered_per_s"] / celery_rate, 3),
        "ratio_delivered_to_direct_smtp": round(med["delivered_per_s"] / direct, 3),
    }


def main() -> None:
    """CLI."""
    parser = argparse.ArgumentParser(description="end-to-end benchmark through Envoy")
    parser.add_argument("--seconds", type=int, default=10, help="length of each load phase")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for every service (an A/B knob)"
    )
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
