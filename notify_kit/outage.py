"""The one table of infrastructure failures: exceptions that mean "a dependency of ours is
down or slow", not "this request is wrong" and not "our code has a bug".

Whoever meets one at a boundary treats it as an outage: a worker holds the job and
pauses consumption instead of spending an attempt; a server answers UNAVAILABLE (503 at
the edge, retryable), or DEADLINE_EXCEEDED when what ran out was the caller's own
deadline (``outage_error``). Anything not in the table is a bug and answers INTERNAL.
"""

from __future__ import annotations

import functools
import sys

from notify_kit.errors import DeadlineExceeded, ServiceError, Unavailable

DEPENDENCY_UNAVAILABLE = "DEPENDENCY_UNAVAILABLE"
"""The ErrorInfo reason of every answer to an outage of one of our dependencies."""

Errors = tuple[type[BaseException], ...]


def _asyncpg() -> tuple[Errors, Errors]:
    import asyncpg  # noqa: PLC0415 (loaded already: see _table)

    timeouts: Errors = (asyncpg.QueryCanceledError,)  # statement_timeout (57014)
    return timeouts, (
        asyncpg.PostgresConnectionError,  # class 08: connection failure, does not exist
        asyncpg.InterfaceError,  # connection closed under us, pool closing
        asyncpg.exceptions.OperatorInterventionError,  # 57: admin/crash shutdown, starting up
        asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
        asyncpg.ReadOnlySQLTransactionError,  # a failed-over primary answering as a replica
    )


def _redis() -> tuple[Errors, Errors]:
    import redis.exceptions  # noqa: PLC0415 (loaded already: see _table)

    timeouts: Errors = (redis.exceptions.TimeoutError,)
    return timeouts, (
        redis.exceptions.ConnectionError,  # includes busy loading, max connections
        redis.exceptions.ReadOnlyError,  # a replica after failover
        redis.exceptions.ClusterDownError,  # includes MasterDownError
        redis.exceptions.TryAgainError,
    )


def _aiormq() -> tuple[Errors, Errors]:
    import aiormq.exceptions  # noqa: PLC0415 (loaded already: see _table)

    return (), (
        # aio-pika re-exports aiormq's classes
        aiormq.exceptions.AMQPConnectionError,  # an OSError too; listed for the reader
        aiormq.exceptions.ChannelInvalidStateError,  # the channel closed under a call
    )


_LIBRARIES = (("asyncpg", _asyncpg), ("redis", _redis), ("aiormq", _aiormq))


@functools.cache
def _table(loaded: tuple[str, ...]) -> tuple[Errors, Errors]:
    """(timeouts, every infrastructure error) with the errors of the ``loaded`` libraries.

    A library's errors are named only once the process has loaded it: nothing else can
    raise them, and importing a client only to name its exceptions costs its whole
    package (redis: 8-11 MB in each service that never talks to Redis, push_worker,
    email_worker and template_svc among them).
    """
    timeouts: Errors = (TimeoutError,)  # asyncio.timeout/wait_for, socket timeouts, acquire
    others: Errors = (
        OSError,  # connection refused/reset, includes ConnectionError
        Unavailable,  # our own services and the broker, already mapped
    )
    for name, errors in _LIBRARIES:
        if name in loaded:
            more_timeouts, more = errors()
            timeouts += more_timeouts
            others += more
    return timeouts, timeouts + others


def _current() -> tuple[Errors, Errors]:
    return _table(tuple(name for name, _ in _LIBRARIES if name in sys.modules))


def timeout_errors() -> Errors:
    """The infrastructure errors that mean "too slow" rather than "gone"."""
    return _current()[0]


def infra_errors() -> Errors:
    """Every infrastructure error of this process's libraries (for ``except`` and
    ``suppress``: evaluated when an exception is matched, so a library loaded later is
    covered from then on)."""
    return _current()[1]


DEADLINE_MARGIN = 0.05
"""Seconds: a timeout with less than this left of the caller's deadline used it up."""


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is an infrastructure failure (a group: when all its members are)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_outage(inner) for inner in exc.exceptions)
    return isinstance(exc, infra_errors())


def describe(exc: BaseException) -> str:
    """Type and text of ``exc`` (each member of a group) for the log, never for a caller.

    Not ``repr``: redis-py's errors repr as their category alone ("network:ConnectionError").
    """
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_timeout(inner) for inner in exc.exceptions)
    return isinstance(exc, timeout_errors())


def outage_error(
    exc: BaseException, time_remaining: float | None, metadata: dict[str, str] | None = None
) -> ServiceError:
    """The answer to the outage ``exc`` (see ``is_outage``): no exception text in it.

    A timeout that used up the caller's own deadline (``time_remaining``, of the inbound
    call) is DEADLINE_EXCEEDED: the honest answer, and a retry needs a longer deadline. Any
    other outage, our own outbound timeouts included, is UNAVAILABLE: retry later.
    ``metadata`` must hold only what a client may see (a correlation id).
    """
    if _is_timeout(exc) and time_remaining is not None and time_remaining < DEADLINE_MARGIN:
        return DeadlineExceeded(
            DEPENDENCY_UNAVAILABLE, "a dependency did not answer in time", metadata=metadata
        )
    return Unavailable(
        DEPENDENCY_UNAVAILABLE, "a dependency is down; retry later", metadata=metadata
    )
