"""The one table of infrastructure failures: exceptions that mean "a dependency of ours is
down or slow", not "this request is wrong" and not "our code has a bug".

Whoever meets one at a boundary treats it as an outage: a worker holds the job and
pauses consumption instead of spending an attempt; a server answers UNAVAILABLE.
"""

from __future__ import annotations

import asyncpg
import redis.exceptions

from notify_kit.errors import Unavailable

INFRA_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # connection refused/reset, includes ConnectionError
    TimeoutError,  # asyncio and socket timeouts
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # connection closed under us, pool closing
    asyncpg.QueryCanceledError,  # statement_timeout
    asyncpg.TooManyConnectionsError,
    asyncpg.CannotConnectNowError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    Unavailable,  # our own services and the broker, already mapped
)
