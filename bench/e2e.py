"""End-to-end benchmark: N notifications posted as JSON through Envoy, timed until every
e-mail has arrived at a real SMTP server.

The system runs exactly as ``make run`` runs it (the five services and Envoy as
processes, via ``scripts.system``), on free ports with throwaway databases and a private
RabbitMQ prefix. The SMTP server (aiosmtpd) runs in this process and counts arrivals.

Reported per run: the API latency at a paced (open-loop) load, by default the seed's
target of 1,000 notifications/minute; then, at saturation with a fixed number of
concurrent clients, accepted/s (all POSTs answered), delivered/s (first POST to last
e-mail), and the client-observed API latency through Envoy (p50/p95/p99). The baseline,
measured in the same run against the same SMTP server, is the floor of any pipeline:
the same number of messages sent directly with one aiosmtplib connection.

    python -m bench.e2e --count 2000 --concurrency 32 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib

from bench.peers import cpu_seconds
from scripts import gen_certs
from scripts.api import DEMO_TEMPLATE
from scripts.harness import running_system
from scripts.mailcatcher import MailCatcher

API_KEY = "bench-key"


def _percentiles(seconds: list[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds."""
    ordered = sorted(seconds)
    return {
        f"p{p}_ms": ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000
        for p in (50, 95, 99)
    }


def _email(users: list[str], i: int) -> dict[str, Any]:
    """The i-th benchmark notification: e-mail only, spread over the users."""
    return {
        "userId": users[i % len(users)],
        "templateId": "welcome",
        "channels": ["CHANNEL_EMAIL"],
        "variables": {"name": f"n{i}"},
    }


async def _post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body, headers={"x-api-key": API_KEY}) as resp:
        return resp.status, await resp.json(content_type=None)


async def baseline(mail: MailCatcher, port: int, count: int) -> float:
    """Messages/s sent straight to the SMTP server over one connection."""
    start_count = len(mail.messages)
    body = b"Subject: baseline\r\nFrom: a@example.com\r\nTo: b@example.com\r\n\r\nhello\r\n"
    t0 = time.perf_counter()
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    await smtp.connect()
    for _ in range(count):
        await smtp.sendmail("a@example.com", ["b@example.com"], body)
    await smtp.quit()
    await mail.wait_for(start_count + count, timeout=120)
    return count / (time.perf_counter() - t0)


async def one_run(
    base: str, mail: MailCatcher, users: list[str], count: int, concurrency: int
) -> dict[str, float]:
    """Post ``count`` notifications with ``concurrency`` clients; wait for every e-mail."""
    start_count = len(mail.messages)
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal errors
            while not queue.empty():
                i = queue.get_nowait()
                t = time.perf_counter()
                status, _ = await _post(session, f"{base}/v1/notifications", _email(users, i))
                latencies.append(time.perf_counter() - t)
                if status != 200:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        accepted = time.perf_counter() - t0
    await mail.wait_for(start_count + count - errors, timeout=600)
    delivered = time.perf_counter() - t0
    return {
        "accepted_per_s": count / accepted,
        "delivered_per_s": (count - errors) / delivered,
        **_percentiles(latencies),
        "errors": float(errors),
    }


async def paced_run(
    base: str, mail: MailCatcher, users: list[str], rate: float, count: int
) -> dict[str, float]:
    """Open-loop load at ``rate`` requests/s: the API latency a client sees at that load."""
    start_count = len(mail.messages)
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def send(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))  # the pacing schedule
            t = time.perf_counter()
            status, got = await _post(session, f"{base}/v1/notifications", _email(users, i))
            latencies.append(time.perf_counter() - t)
            if status != 200:
                raise RuntimeError(f"paced request failed: {status} {got}")

        t0 = time.perf_counter()
        await asyncio.gather(*(send(i, t0 + i / rate) for i in range(count)))
    await mail.wait_for(start_count + count, timeout=120)
    return {
        "rate_per_s": rate,
        **_percentiles(latencies),
    }


async def amain(args: argparse.Namespace) -> None:
    """Start the system, warm up, run, print a JSON summary."""
    run_id = uuid.uuid4().hex[:8]
    var = Path(tempfile.mkdtemp(prefix="notify-bench-"))
    gen_certs.generate(var / "certs")
    async with running_system(
        var, var / "certs", tag=f"bench{run_id}", api_key=API_KEY, log_level="WARNING"
    ) as running:
        base, mail = running.base, running.mail
        async with aiohttp.ClientSession() as session:
            await _post(session, f"{base}/v1/templates", DEMO_TEMPLATE)
            users = []
            for i in range(args.users):
                _, got = await _post(
                    session, f"{base}/v1/users", {"email": f"bench{i}-{run_id}@example.com"}
                )
                users.append(got["user"]["id"])
        await one_run(base, mail, users, min(200, args.count), args.concurrency)  # warm-up
        runs, paced, base_rates = [], [], []
        pids = {name: proc.pid for name, proc in running.system.procs.items()}
        pids["bench (client + SMTP server)"] = os.getpid()
        cpu_ms: dict[str, list[float]] = {name: [] for name in pids}
        for _ in range(args.runs):
            paced.append(
                await paced_run(base, mail, users, args.paced_rate, int(args.paced_rate * 15))
            )
            base_rates.append(await baseline(mail, running.cfg.ports.smtp, args.count))
            before = cpu_seconds(pids)
            runs.append(await one_run(base, mail, users, args.count, args.concurrency))
            after = cpu_seconds(pids)
            for name in pids:
                cpu_ms[name].append((after[name] - before[name]) * 1000 / args.count)
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        direct = statistics.median(base_rates)
        summary = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": f"{platform.python_implementation()} {platform.python_version()} "
            f"({sys.executable}), uvloop in services",
            "count": args.count,
            "concurrency": args.concurrency,
            "runs": runs,
            "median": med,
            "median_per_minute": med["delivered_per_s"] * 60,
            "cpu_ms_per_notification": {
                name: round(statistics.median(v), 3) for name, v in cpu_ms.items()
            },
            "paced": paced,
            "paced_median": {k: statistics.median(r[k] for r in paced) for k in paced[0]},
            "baseline_direct_smtp_per_s": direct,
            "ratio_pipeline_to_direct_smtp": med["delivered_per_s"] / direct,
        }
        print(json.dumps(summary, indent=2))


def main() -> None:
    """CLI."""
    parser = argparse.ArgumentParser(description="end-to-end benchmark through Envoy")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument(
        "--paced-rate", type=float, default=1000 / 60, help="open-loop requests/s for latency"
    )
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
