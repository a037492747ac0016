"""Delivery-stage benchmark: N e-mail jobs already queued, drained by our worker and by a
Celery worker doing only render + send, into the same SMTP sink, in the same run.

Ours: the whole system runs (as ``make run`` does) with the e-mail worker stopped; N
notifications are accepted through Envoy (records in user_svc, jobs in the quorum queue),
then the worker starts and the clock runs from its first delivery to its last: each job
deduped and claimed, rendered in the worker's render process, sent over SMTP, logged,
its status reported, acked. Celery: the same N e-mails as tasks on a queue of the same
RabbitMQ, a threads-pool worker (16, ``acks_late``) renders the same template with
Jinja2's sandbox and sends them over kept SMTP connections, timed the same way. The
ratio of the two rates is the figure; absolute rates drift between machines.

    python -m bench.delivery --count 2000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from bench.peers import Sink, cpu_seconds, ensure_tools
from scripts import gen_certs
from scripts.api import DEMO_TEMPLATE
from scripts.harness import Running, running_system

API_KEY = "bench-key"
BACKING = ("postgres", "beam.smp", "redis-server")


async def _post(session: aiohttp.ClientSession, url: str, body: Any) -> dict[str, Any]:
    """POST as a well-behaved client: a 429 is retried after its Retry-After (pre-filling
    the queue with nobody consuming can outrun the key's default rate limit), any other
    failure ends the run."""
    while True:
        async with session.post(url, json=body, headers={"x-api-key": API_KEY}) as resp:
            got: dict[str, Any] = await resp.json(content_type=None)
            if resp.status == 429:
                wait = float(resp.headers.get("retry-after", "1"))
            elif resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status} {got}")
            else:
                return got
        await asyncio.sleep(wait)


async def _accept(running: Running, users: list[str], count: int, concurrency: int) -> None:
    """``count`` e-mail notifications accepted through Envoy (queued, nobody consuming)."""
    todo = iter(range(count))
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            for i in todo:
                body = {
                    "userId": users[i % len(users)],
                    "templateId": "welcome",
                    "channels": ["CHANNEL_EMAIL"],
                    "variables": {"name": f"n{i}"},
                }
                await _post(session, f"{running.base}/v1/notifications", body)

        await asyncio.gather(*(client() for _ in range(concurrency)))


def _rate(sink: Sink, count: int) -> float:
    """Deliveries per second from the first to the last one (CPU is read over the same
    span, so neither contender's start-up counts)."""
    return (count - 1) / (sink.last - sink.first)


async def ours(running: Running, users: list[str], count: int) -> dict[str, float]:
    """One drain by our e-mail worker into a fresh sink."""
    sink = Sink()
    await sink.start()
    system = running.system
    try:
        await system.kill("email_worker", signal.SIGTERM)
        system.cfg = replace(
            system.cfg, extra_env={**system.cfg.extra_env, "NOTIFY_SMTP_PORT": str(sink.port)}
        )
        await _accept(running, users, count, concurrency=32)
        await system.start_service("email_worker")
        pids = {
            "email_worker": system.procs["email_worker"].pid,
            "user_svc": system.procs["user_svc"].pid,
            "sink": sink.pid,
        }
        await sink.wait_for(1, timeout=120)  # start-up is nobody's per-message cost
        before = cpu_seconds(pids, BACKING)
        await sink.wait_for(count, timeout=600)
        after = cpu_seconds(pids, BACKING)
    finally:
        await sink.stop()
    return {
        "delivered_per_s": _rate(sink, count),
        **{f"cpu_ms_{k}": (after[k] - before[k]) * 1000 / (count - 1) for k in after},
    }


async def celery(amqp_url: str, count: int) -> dict[str, float]:
    """One drain by a Celery threads worker into a fresh sink."""
    from bench.celery_app import create_app  # noqa: PLC0415 (bench-only dependency)

    sink = Sink()
    await sink.start()
    queue = f"bench.celery.{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "BENCH_AMQP_URL": amqp_url,
        "BENCH_QUEUE": queue,
        "BENCH_SMTP_PORT": str(sink.port),
    }
    os.environ.update({"BENCH_AMQP_URL": amqp_url, "BENCH_QUEUE": queue})
    app = create_app()
    await asyncio.to_thread(
        lambda: [
            app.send_task("deliver", args=[f"u{i}@example.com", {"name": f"n{i}"}], queue=queue)
            for i in range(count)
        ]
    )
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.celery_app", env=env, stdout=sys.stderr.fileno()
    )  # its banner is not part of the summary
    try:
        pids = {"celery": worker.pid, "sink": sink.pid}
        await sink.wait_for(1, timeout=120)  # start-up is nobody's per-message cost
        before = cpu_seconds(pids, BACKING)
        await sink.wait_for(count, timeout=600)
        after = cpu_seconds(pids, BACKING)
    finally:
        worker.terminate()
        await worker.wait()
        await sink.stop()
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    return {
        "delivered_per_s": _rate(sink, count),
        **{f"cpu_ms_{k}": (after[k] - before[k]) * 1000 / (count - 1) for k in after},
    }


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


async def amain(args: argparse.Namespace) -> None:
    """Start the system, then alternate the two contenders ``runs`` times."""
    ensure_tools()
    run_id = uuid.uuid4().hex[:8]
    var = Path(tempfile.mkdtemp(prefix="notify-bench-"))
    gen_certs.generate(var / "certs")
    async with running_system(
        var, var / "certs", tag=f"bench{run_id}", api_key=API_KEY, log_level="WARNING",
        extra_env={"NOTIFY_SMTP_HOST": "127.0.0.1", "NOTIFY_SMTP_PORT": "25"},
    ) as running:  # fmt: skip
        async with aiohttp.ClientSession() as session:
            await _post(session, f"{running.base}/v1/templates", DEMO_TEMPLATE)
            users = [
                (await _post(session, f"{running.base}/v1/users", {"email": f"b{i}@example.com"}))[
                    "user"
                ]["id"]
                for i in range(args.users)
            ]
        await ours(running, users, min(200, args.count))  # warm-up
        mine, theirs = [], []
        for _ in range(args.runs):
            mine.append(await ours(running, users, args.count))
            theirs.append(await celery(running.cfg.amqp_url, args.count))
    ours_median, celery_median = _medians(mine), _medians(theirs)
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "python": f"{platform.python_implementation()} {platform.python_version()}",
                "count": args.count,
                "ours": mine,
                "celery": theirs,
                "ours_median": ours_median,
                "celery_median": celery_median,
                "ratio_ours_to_celery": round(
                    ours_median["delivered_per_s"] / celery_median["delivered_per_s"], 3
                ),
            },
            indent=2,
        )
    )


def main() -> None:
    """CLI."""
    parser = argparse.ArgumentParser(description="delivery-stage benchmark vs Celery")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=50)
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
