"""The correlation id of the work in progress, carried by a context variable.

Set by the server interceptor (from ``x-correlation-id`` metadata or freshly made) and by
consumers (from the job), read by the log formatter, the client interceptor and the
publisher, so every log line, outbound RPC and queue message of one request shares it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

CORRELATION_HEADER = "x-correlation-id"
_correlation_id: ContextVar[str] = ContextVar("correlation_id", default="")


def new_correlation_id() -> str:
    """A fresh id: 32 hex characters."""
    return uuid.uuid4().hex


def get_correlation_id() -> str:
    """The current id, or an empty string outside any request."""
    return _correlation_id.get()


def set_correlation_id(value: str) -> None:
    """Bind ``value`` for the rest of the current task."""
    _correlation_id.set(value)


@contextmanager
def bound_correlation_id(value: str) -> Iterator[None]:
    """Bind ``value`` for the block only (a long-lived task doing one caller's work)."""
    token = _correlation_id.set(value)
    try:
        yield
    finally:
        _correlation_id.reset(token)


def sanitize_correlation_id(value: str | None) -> str:
    """Accept a caller's id only when it is short printable ASCII; else make a new one.

    A correlation id ends up in every log line, so a hostile one (newlines, megabytes)
    must not get through.
    """
    if value and len(value) <= 64 and value.isascii() and value.isprintable() and " " not in value:
        return value
    return new_correlation_id()
