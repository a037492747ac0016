"""Open-loop load at a fixed mean rate, in its own process: the API latency a client sees
below saturation.

Requests start at Poisson arrival times (exponential gaps, a fixed seed), each on its own
whatever the earlier ones are doing, so a slow answer cannot hold the next request back
(no coordinated omission) and arrivals do not come in the lockstep bursts of a pool of
workers ticking together. Prints one JSON line: the rate achieved, p50/p90/p99 in ms,
errors.

    python -m bench.paced URL --rate 150 --seconds 10 --users a,b,c --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import aiohttp


def _percentile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def run(url: str, rate: float, seconds: float, users: list[str], api_key: str) -> None:
    """Send for ``seconds`` at ``rate`` requests/s on average; print the summary."""
    arrivals = random.Random(7)
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, headers={"x-api-key": api_key}
    ) as session:

        async def send(i: int) -> None:
            nonlocal errors
            body = {
                "userId": users[i % len(users)],
                "templateId": "welcome",
                "channels": ["CHANNEL_EMAIL"],
                "variables": {"name": f"p{i}"},
            }
            t = time.perf_counter()
            async with session.post(url, json=body) as resp:
                await resp.read()
                ok = resp.status == 200
            latencies.append(time.perf_counter() - t)
            errors += not ok

        tasks = []
        start = time.perf_counter()
        at = start
        i = 0
        while at - start < seconds:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))  # the arrival schedule
            tasks.append(asyncio.create_task(send(i)))
            i += 1
            at += arrivals.expovariate(rate)
        await asyncio.gather(*tasks)
    ordered = sorted(latencies)
    print(
        json.dumps(
            {
                "rate_per_s": len(ordered) / seconds,
                "p50_ms": _percentile(ordered, 50),
                "p90_ms": _percentile(ordered, 90),
                "p99_ms": _percentile(ordered, 99),
                "errors": errors,
            }
        )
    )


def main() -> None:
    """CLI."""
    parser = argparse.ArgumentParser(description="open-loop paced load")
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--users", required=True, help="comma-separated user ids")
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args()
    asyncio.run(run(args.url, args.rate, args.seconds, args.users.split(","), args.api_key))


if __name__ == "__main__":
    main()
