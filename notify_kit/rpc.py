"""Outbound gRPC channels: one pooled mTLS channel per upstream, built once at start-up.

The service config retries only UNAVAILABLE (the call never reached a handler, so a
retry is safe for every method) with capped exponential backoff; every call gets a
default deadline from the client interceptor.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from notify_kit.errors import from_rpc_error
from notify_kit.interceptors import ClientInterceptor
from notify_kit.settings import TlsSettings
from notify_kit.tls import channel_credentials

R = TypeVar("R")

_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def secure_channel(
    target: str, tls: TlsSettings, *, default_timeout: float = 5.0
) -> grpc.aio.Channel:
    """An mTLS channel to ``target`` (``host:port``) with retries and default deadlines."""
    options = [
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    return grpc.aio.secure_channel(
        target,
        channel_credentials(tls),
        options=options,
        interceptors=[ClientInterceptor(default_timeout)],
    )


def clamp_timeout(remaining: float | None, ceiling: float) -> float:
    """The deadline to pass on: what the caller has left, never more than ``ceiling``.

    ``time_remaining()`` is effectively infinite when the caller set no deadline, so it
    must be clamped before reuse.
    """
    if remaining is None:
        return ceiling
    return max(0.001, min(remaining, ceiling))


async def unary(
    method: Callable[..., Awaitable[R]], request: Any, *, timeout: float | None = None
) -> R:
    """Call a stub method, turning ``AioRpcError`` into our ``ServiceError`` types.

    Callers never see the raw gRPC error, so upstream NOT_FOUND stays NOT_FOUND with its
    reason, and a dead upstream becomes ``Unavailable``.
    """
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc
