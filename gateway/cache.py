"""Idempotency records in Redis.

Idempotency (AIP-155): the first request with a key claims it with ``SET NX`` and a short
lease; when it succeeds the stored value becomes the serialized response for the TTL
(24 h). A repeat with the same body fingerprint gets that response (marked as a
replay); with another body it is refused as a client bug (FAILED_PRECONDITION
``IDEMPOTENCY_KEY_REUSED``); while the first is still in flight the repeat is told to
wait and retry (ABORTED ``REQUEST_IN_PROGRESS`` with a retry delay), so concurrent
duplicates create exactly one notification and a client can tell the two apart.

A claim carries a random token: only the request that holds it may complete or release
it (a compare-and-set script), so a request whose lease ran out cannot release or
overwrite a claim that another request took over meanwhile.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from notify_kit import metrics
from notify_kit.errors import Aborted, FailedPrecondition, Unavailable

_PENDING = b"P"
_DONE = b"D"
_TOKEN_BYTES = 16
_FINGERPRINT_BYTES = 32  # SHA-256
_LEASE_SECONDS = 30
# How long a repeat is told to wait for the first request (which takes milliseconds).
IN_PROGRESS_RETRY_AFTER = 1.0

# Replace the value only if it still is our claim, or it is gone (our lease ran out and
# nobody took the key): never someone else's.
_COMPLETE = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def idempotency_key(api_key_id: str, key: str) -> str:
    """Redis key of one client idempotency key (scoped to the API key that used it)."""
    return f"notify:idem:{api_key_id}:{key}"


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming a key: either ours to fulfil, or a stored answer."""

    redis_key: str
    response: bytes | None
    pending: bytes = b""  # the value our claim wrote: what proves it is ours


class IdempotencyCache:
    """Claims, completes and releases idempotency keys."""

    def __init__(self, client: aioredis.Redis, *, ttl: int) -> None:
        self._redis = client
        self._ttl = ttl
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)

    async def claim(self, api_key_id: str, key: str, fingerprint: bytes) -> Claim:
        """Claim ``key``; return the stored response if it was already fulfilled."""
        redis_key = idempotency_key(api_key_id, key)
        pending = _PENDING + secrets.token_bytes(_TOKEN_BYTES) + fingerprint
        try:
            if await self._redis.set(redis_key, pending, nx=True, ex=_LEASE_SECONDS):
                return Claim(redis_key, None, pending)
            stored = cast("bytes | None", await self._redis.get(redis_key))
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("idempotency_claim").inc()
            raise Unavailable("IDEMPOTENCY_STORE_UNAVAILABLE", "idempotency store is down") from exc
        if stored is None:  # expired between the two calls: try once more
            return await self.claim(api_key_id, key, fingerprint)
        state, rest = stored[:1], stored[1 + _TOKEN_BYTES :]
        if rest[:_FINGERPRINT_BYTES] != fingerprint:
            raise FailedPrecondition(
                "IDEMPOTENCY_KEY_REUSED",
                "this idempotency key was used with a different request",
                metadata={"idempotency_key": key},
            )
        if state == _PENDING:
            raise Aborted(
                "REQUEST_IN_PROGRESS",
                "a request with this idempotency key is still being processed; retry",
                metadata={"idempotency_key": key},
                retry_after=IN_PROGRESS_RETRY_AFTER,
            )
        return Claim(redis_key, rest[_FINGERPRINT_BYTES:])

    async def complete(self, claim: Claim, fingerprint: bytes, response: bytes) -> None:
        """Store the answer for the TTL, unless another request holds the key now."""
        done = _DONE + bytes(_TOKEN_BYTES) + fingerprint + response
        try:
            await self._complete(keys=[claim.redis_key], args=[claim.pending, done, self._ttl])
        except RedisError:
            metrics.REDIS_ERRORS.labels("idempotency_complete").inc()
            # The work is done and durable; a lost record only weakens dedupe of a later
            # retry, which the deterministic notification id still absorbs.
            pass

    async def release(self, claim: Claim) -> None:
        """Give our claim back after a failure so the client can retry (never another's)."""
        try:
            await self._release(keys=[claim.redis_key], args=[claim.pending])
        except RedisError:
            metrics.REDIS_ERRORS.labels("idempotency_release").inc()  # the lease expires
