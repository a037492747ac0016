"""Redis cache of delivery profiles (redis.asyncio only), best effort by design.

Every send asks for a profile, so profiles are cached as serialized ``DeliveryProfile``
messages with an explicit TTL (the layout is ``notify_kit.profiles``: the gateway reads
the entries directly), and every change to a user, its preferences or its
devices invalidates the entry right after the database commit.

Deleting after the commit is not enough on its own: a reader that loaded the old row
just before the commit could write it back just after the delete. So each user also has
a generation counter that invalidation increments; a reader notes the generation before
it reads the database and fills the cache only if the generation is unchanged (checked
and written atomically by a Lua script). Both keys share a hash tag, so the script also
works on Redis Cluster.

Redis is an optimisation here, not a dependency: an error is logged and the caller
reads the database, so a Redis outage never fails an RPC. While Redis is unreachable an
invalidation can be lost, which the TTL bounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from notify.v1 import user_service_pb2
from redis.exceptions import RedisError

from notify_kit import metrics
from notify_kit.profiles import generation_key, profile_key

log = logging.getLogger(__name__)

# KEYS[1] profile, KEYS[2] generation; ARGV[1] generation seen before the database read,
# ARGV[2] serialized profile, ARGV[3] TTL in seconds. A missing counter reads as "".
_FILL_IF_UNCHANGED = """
local current = redis.call('GET', KEYS[2]) or ''
if current ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

# The counter must outlive any reader still in flight (bounded by RPC deadlines).
_GENERATION_GRACE_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Lookup:
    """A cache read: the profile on a hit; on a miss, the generation to fill under.

    ``generation`` is None when Redis could not be read, and then nothing is filled.
    """

    profile: user_service_pb2.DeliveryProfile | None
    generation: str | None


class ProfileCache:
    """Delivery profiles in Redis, keyed by user id, expiring after ``ttl`` seconds."""

    def __init__(self, client: aioredis.Redis, ttl: int) -> None:
        self._client = client
        self._ttl = ttl
        self._fill = client.register_script(_FILL_IF_UNCHANGED)

    async def lookup(self, user_id: str) -> Lookup:
        """Read the profile and the generation in one round trip."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(profile_key(user_id))
                pipe.get(generation_key(user_id))
                raw, generation = await pipe.execute()
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("profile_read").inc()
            log.warning(
                "profile cache read failed for user %s, using the database: %s", user_id, exc
            )
            return Lookup(profile=None, generation=None)
        seen = generation.decode() if generation is not None else ""
        if raw is None:
            return Lookup(profile=None, generation=seen)
        try:
            return Lookup(user_service_pb2.DeliveryProfile.FromString(raw), generation=seen)
        except DecodeError:
            log.warning("cached profile of user %s does not parse; refilling", user_id)
            return Lookup(profile=None, generation=seen)

    async def fill(
        self, user_id: str, profile: user_service_pb2.DeliveryProfile, generation: str
    ) -> bool:
        """Cache ``profile`` unless the user changed since ``generation`` was read."""
        try:
            stored = await self._fill(
                keys=[profile_key(user_id), generation_key(user_id)],
                args=[generation, profile.SerializeToString(), self._ttl],
            )
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("profile_fill").inc()
            log.warning("profile cache fill failed for user %s: %s", user_id, exc)
            return False
        return bool(stored)

    async def invalidate(self, *user_ids: str) -> None:
        """Drop the users' profiles and bump their generations (after the commit).

        Not a MULTI: the keys of two users live in different cluster slots, and since
        the database already holds the change, no order of these commands can let a
        reader cache a stale profile.
        """
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id in user_ids:
                    pipe.incr(generation_key(user_id))
                    pipe.expire(generation_key(user_id), self._ttl + _GENERATION_GRACE_SECONDS)
                    pipe.delete(profile_key(user_id))
                await pipe.execute()
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("profile_invalidate").inc()
            # The change is committed; failing the RPC would only make the caller retry a
            # write that already happened. The TTL bounds how long the old profile lives.
            log.error("profile cache invalidation failed for users %s: %s", user_ids, exc)
