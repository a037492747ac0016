"""Redis clients with bounded pools and timeouts on every call."""

from __future__ import annotations

import redis.asyncio as aioredis


def redis_client(url: str, *, timeout: float = 1.0, max_connections: int = 64) -> aioredis.Redis:
    """A client whose pool blocks (bounded) instead of opening unbounded connections."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool
