"""The delivery-profile cache's layout, shared by its writer (user_svc) and its cheap
reader (the gateway).

user_svc owns delivery profiles and keeps each one in Redis as a serialized
``DeliveryProfile`` (``user_svc.cache``: filled after a database read, deleted right
after every change commits, guarded by a generation counter). Every send needs the
recipient's profile, so the gateway reads that entry itself, one Redis GET, and asks
user_svc (``GetDeliveryProfile``, which fills the entry) only on a miss. A change is
visible to the next send exactly as when the gateway always asked user_svc: both read
the same entry, and user_svc deletes it before it answers the change.

Best effort: a Redis error or an entry that does not parse is a miss.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from notify.v1 import user_service_pb2
from redis.exceptions import RedisError

from notify_kit import metrics
from notify_kit.tenancy import DEFAULT_TENANT

log = logging.getLogger(__name__)


def profile_key(user_id: str) -> str:
    """Key of a user's cached ``DeliveryProfile``."""
    return f"notify:user:{{{user_id}}}:profile"


def generation_key(user_id: str) -> str:
    """Key of a user's invalidation counter (same hash slot as the profile)."""
    return f"notify:user:{{{user_id}}}:gen"


async def cached_profile(
    client: aioredis.Redis, user_id: str
) -> user_service_pb2.DeliveryProfile | None:
    """The cached profile of ``user_id``, or None (not cached, unreadable, Redis down)."""
    try:
        raw = await client.get(profile_key(user_id))
    except RedisError as exc:
        metrics.REDIS_ERRORS.labels("profile_read").inc()
        log.warning("profile cache unreadable, asking user_svc: %s", exc)
        return None
    if not isinstance(raw, bytes):  # None: not cached (our clients never decode replies)
        return None
    try:
        return user_service_pb2.DeliveryProfile.FromString(raw)
    except DecodeError:
        return None


def profile_tenant(profile: user_service_pb2.DeliveryProfile) -> str:
    """The profile's tenant: a reader acting for another one must treat the user as
    absent (a profile cached before tenants existed is the default tenant's)."""
    return profile.tenant or DEFAULT_TENANT
