"""Rate limits in Redis: per API key, per recipient and channel, per client address
for failed key lookups. Each check is one Lua script, so it is atomic across gateways,
one round trip, and every key it writes expires.

* **Per key** (and per address): GCRA, the token bucket kept as one timestamp, the
  "theoretical arrival time". ``rate`` requests per second with bursts of ``burst``;
  a refused request is told how long until one more fits.
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

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_GCRA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[1])
local capacity = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - capacity - now
if wait > 0 then return math.ceil(wait) end
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now))
end
return 0
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
        return await self._gcra_call(bucket, rate, spend=True)

    async def would_take(self, bucket: str, rate: Rate) -> float:
        """Whether one more request would fit, spending nothing."""
        return await self._gcra_call(bucket, rate, spend=False)

    async def _gcra_call(self, bucket: str, rate: Rate, *, spend: bool) -> float:
        interval_ms = 1000.0 / rate.per_second
        return await self._run(
            self._gcra, [bucket], [repr(interval_ms), rate.burst, "1" if spend else "0"]
        )

    async def admit(self, member: str, windows: Mapping[str, Window]) -> float:
        """Record ``member`` in every log of ``windows`` if each has room; else the wait."""
        if not windows:
            return 0.0
        args: list[str | int | float] = [member]
        for window in windows.values():
            args += [math.ceil(window.seconds * 1000), window.limit]
        return await self._run(self._window, list(windows), args)

    async def _run(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int | float]
    ) -> float:
        try:
            wait_ms = await script(keys=list(keys), args=list(args))
        except (RedisError, OSError, TimeoutError) as exc:
            now = time.monotonic()
            if now - self._warned >= _WARN_EVERY:
                self._warned = now
                log.warning("rate limits not enforced, Redis does not answer: %r", exc)
            return 0.0
        return int(wait_ms) / 1000.0
