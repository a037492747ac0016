"""Idempotency records in Redis.

Idempotency (AIP-155): the first request with a key claims it with ``SET NX`` and a short
lease; when it succeeds the stored value becomes the serialized response for the TTL
(24 h). A repeat with the same body fingerprint gets that response; with another body it
is rejected; while the first is still in flight the repeat gets ABORTED (retry later),
so concurrent duplicates create exactly one notification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from notify_kit.errors import Aborted, AlreadyExists, Unavailable

_PENDING = b"P"
_DONE = b"D"
_LEASE_SECONDS = 30


def idempotency_key(api_key_id: str, key: str) -> str:
    """Redis key of one client idempotency key (scoped to the API key that used it)."""
    return f"notify:idem:{api_key_id}:{key}"


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming a key: either ours to fulfil, or a stored answer."""

    redis_key: str
    response: bytes | None


class IdempotencyCache:
    """Claims, completes and releases idempotency keys."""

    def __init__(self, client: aioredis.Redis, *, ttl: int) -> None:
        self._redis = client
        self._ttl = ttl

    async def claim(self, api_key_id: str, key: str, fingerprint: bytes) -> Claim:
        """Claim ``key``; return the stored response if it was already fulfilled."""
        redis_key = idempotency_key(api_key_id, key)
        try:
            if await self._redis.set(redis_key, _PENDING + fingerprint, nx=True, ex=_LEASE_SECONDS):
                return Claim(redis_key, None)
            stored = cast("bytes | None", await self._redis.get(redis_key))
        except RedisError as exc:
            raise Unavailable("IDEMPOTENCY_STORE_UNAVAILABLE", "idempotency store is down") from exc
        if stored is None:  # expired between the two calls: try once more
            return await self.claim(api_key_id, key, fingerprint)
        state, rest = stored[:1], stored[1:]
        if rest[: len(fingerprint)] != fingerprint:
            raise AlreadyExists(
                "IDEMPOTENCY_KEY_REUSED",
                "this idempotency key was used with a different request",
                metadata={"idempotency_key": key},
            )
        if state == _PENDING:
            raise Aborted(
                "REQUEST_IN_PROGRESS",
                "a request with this idempotency key is still being processed; retry",
                metadata={"idempotency_key": key},
            )
        return Claim(redis_key, rest[len(fingerprint) :])

    async def complete(self, claim: Claim, fingerprint: bytes, response: bytes) -> None:
        """Store the answer for the TTL."""
        try:
            await self._redis.set(claim.redis_key, _DONE + fingerprint + response, ex=self._ttl)
        except RedisError:
            # The work is done and durable; a lost record only weakens dedupe of a later
            # retry, which the deterministic notification id still absorbs.
            pass

    async def release(self, claim: Claim) -> None:
        """Give the key back after a failure so the client can retry."""
        try:
            await self._redis.delete(claim.redis_key)
        except RedisError:
            pass  # the lease expires on its own
