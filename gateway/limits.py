"""Rate limits in Redis: per API key, per recipient and channel, per client address
for failed key lookups. Each check is one Lua script, so it is atomic across gateways,
one round trip, and every key it writes expires.

* **Per key** (and per address): GCRA, the token bucket kept as one timestamp, the
  "theoretical arrival time". ``rate`` requests per second with bursts of ``burst``;
  a refused request is told how long until one more fits. A key's calls lease tokens
  a chunk at a time (``LeasedBuckets``: 50 ms worth, at most 20), so a busy key costs a
  round trip per chunk, not per call (measured: the per-call check cost the gateway
  0.18 ms a notification, docs/BENCHMARKS.md), and a slow limit stays exact.
* **Per recipient**: at most ``limit`` notifications per channel in any ``window``
  (a sliding log, one sorted set per user and channel with the notification ids as
  members). A bucket would let twice the limit through across a window's edge, which
  is exactly what a user's "10 pushes an hour" must not do. A retry of the same
  notification (same id, as idempotency keys give) does not count twice, and a
  notification for several channels is admitted only if every one has room.

Time is Redis's own (``TIME``), so gateways with skewed clocks share one view.

When Redis cannot answer, every check **passes** and says so in the log (at most once
every 10 s): the limits protect against abuse and floods, while a cache outage that
stopped every notification would be the flood's effect without the flood. Secrets are
256 random bits, so pausing the failed-lookup limit does not make guessing feasible.
docs/SECURITY.md states the policy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from notify_kit import metrics
from notify_kit.cache import LruCache

log = logging.getLogger(__name__)

# Take up to ARGV[3] requests' worth (0: only ask whether one fits); answers
# {granted, wait_ms}: wait_ms > 0 only when nothing was granted.
_GCRA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[1])
local capacity = interval * tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local room = math.floor((capacity - (tat - now)) / interval + 1e-9)
if room < 1 then return {0, math.max(1, math.ceil(tat + interval - capacity - now))} end
if want == 0 then return {1, 0} end
local granted = math.min(room, want)
local new_tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now))
return {granted, 0}
"""

_WINDOW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local member = ARGV[1]
local wait = 0
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[2 * i])
  local limit = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if not redis.call('ZSCORE', key, member) and redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local until_free = tonumber(oldest[2]) + window - now
    if until_free > wait then wait = until_free end
  end
end
if wait > 0 then return math.ceil(wait) end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'NX', now, member)
  redis.call('PEXPIRE', key, ARGV[2 * i])
end
return 0
"""
_WARN_EVERY = 10.0


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_second`` requests per second, up to ``burst`` at once."""

    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Window:
    """At most ``limit`` in any ``seconds``."""

    limit: int
    seconds: float


def in_force(defaults: Mapping[str, Window], own: Mapping[str, Window]) -> dict[str, Window]:
    """The recipient limits a tenant's sends are checked against: its own for the
    channels it names (limit 0: none), the gateway's defaults for the others."""
    merged = {**defaults, **own}
    return {kind: w for kind, w in merged.items() if w.limit > 0}


def key_bucket(key_id: str) -> str:
    """The Redis key of an API key's bucket."""
    return f"notify:rl:key:{key_id}"


def address_bucket(address: str) -> str:
    """The Redis key of a client address's failed-lookup bucket."""
    return f"notify:rl:authfail:{address}"


def recipient_log(user_id: str, channel: str) -> str:
    """The Redis key of a user's sends on one channel (one hash slot per user)."""
    return f"notify:rl:rcpt:{{{user_id}}}:{channel}"


class RateLimiter:
    """The checks; each answers 0.0 (admitted) or the seconds until it would be."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._gcra = redis.register_script(_GCRA)
        self._window = redis.register_script(_WINDOW)
        self._warned = -_WARN_EVERY

    async def take(self, bucket: str, rate: Rate) -> float:
        """Spend one request from ``bucket``; 0.0, or the wait (nothing spent)."""
        _, wait = await self.lease(bucket, rate, 1)
        return wait

    async def would_take(self, bucket: str, rate: Rate) -> float:
        """Whether one more request would fit, spending nothing."""
        _, wait = await self.lease(bucket, rate, 0)
        return wait

    async def lease(self, bucket: str, rate: Rate, want: int) -> tuple[int, float]:
        """Take up to ``want`` requests' worth from ``bucket`` at once: (granted, 0.0), or
        (0, the wait) when not even one fits. ``want`` 0 only asks."""
        args: list[str | int | float] = [repr(1000.0 / rate.per_second), rate.burst, want]
        answer = await self._run(self._gcra, [bucket], args)
        if answer is None:
            return max(want, 1), 0.0  # Redis is down: the policy is to let it pass
        granted, wait_ms = (int(v) for v in answer)
        return granted, wait_ms / 1000.0

    async def admit(self, member: str, windows: Mapping[str, Window]) -> float:
        """Record ``member`` in every log of ``windows`` if each has room; else the wait."""
        if not windows:
            return 0.0
        args: list[str | int | float] = [member]
        for window in windows.values():
            args += [math.ceil(window.seconds * 1000), window.limit]
        wait_ms = await self._run(self._window, list(windows), args)
        return 0.0 if wait_ms is None else int(wait_ms) / 1000.0

    async def _run(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int | float]
    ) -> Any:
        """The script's answer; None when Redis cannot answer (logged, throttled)."""
        try:
            return await script(keys=list(keys), args=list(args))
        except (RedisError, OSError, TimeoutError) as exc:
            metrics.REDIS_ERRORS.labels("rate_limit").inc()
            now = time.monotonic()
            if now - self._warned >= _WARN_EVERY:
                self._warned = now
                log.warning("rate limits not enforced, Redis does not answer: %r", exc)
            return None


@dataclass(slots=True)
class _Lease:
    tokens: int
    until: float


class LeasedBuckets:
    """Per-key limits that cost a Redis round trip per chunk of calls, not per call.

    A key's calls take tokens from its bucket in Redis a chunk at a time (what the rate
    allows in ``chunk_seconds``, at most ``max_chunk``) and spend them here; tokens not
    spent within ``lease_seconds`` are dropped. So several gateways sharing a key never
    admit more than its limit together (a leased token is spent once, here, or never),
    and may refuse a little early when another gateway holds unspent tokens. A slow
    limit (a chunk of one) is exact: every call asks Redis.
    """

    def __init__(
        self,
        limiter: RateLimiter,
        *,
        chunk_seconds: float = 0.05,
        max_chunk: int = 20,
        lease_seconds: float = 1.0,
    ) -> None:
        self._limiter = limiter
        self._chunk_seconds = chunk_seconds
        self._max_chunk = max_chunk
        self._lease_seconds = lease_seconds
        self._leases: LruCache[str, _Lease] = LruCache(4096)
        # A bucket's refill in flight; it resolves to the refusal's wait (0.0 when it
        # leased tokens, None when its caller was cancelled).
        self._refills: dict[str, asyncio.Future[float | None]] = {}

    async def take(self, bucket: str, rate: Rate) -> float:
        """Admit one call (0.0), or the wait until one would fit.

        One refill per bucket at a time: concurrent callers that find the lease spent
        wait for the refill in flight and share its chunk. Each leasing a chunk of its
        own (and each lease replacing the last) drained a key's bucket many times faster
        than its calls did: 32 concurrent clients at 500/s were refused with a limit of
        1000/s (bench.e2e, 2026-12-04)."""
        while True:
            now = time.monotonic()
            lease = self._leases.get(bucket)
            if lease is not None and lease.tokens > 0 and lease.until > now:
                lease.tokens -= 1
                return 0.0
            refill = self._refills.get(bucket)
            if refill is None:
                break
            wait = await asyncio.shield(refill)
            if wait:  # the refill found no room: neither is there any for this call
                return wait
        refill = asyncio.get_running_loop().create_future()
        self._refills[bucket] = refill
        wait = None  # a cancelled refill: its waiters try again
        try:
            chunk = max(
                1, min(self._max_chunk, rate.burst, int(rate.per_second * self._chunk_seconds))
            )
            granted, wait = await self._limiter.lease(bucket, rate, chunk)
            if granted > 1:
                self._leases.put(bucket, _Lease(granted - 1, now + self._lease_seconds))
            return wait if granted == 0 else 0.0
        finally:
            del self._refills[bucket]
            refill.set_result(wait)
