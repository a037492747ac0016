"""Outbound gRPC channels: one pooled mTLS channel per upstream, built once at start-up.

The service config retries only UNAVAILABLE (the call never reached a handler, so a
retry is safe for every method) with capped exponential backoff; every call gets a
default deadline from the client interceptor.

Reconnecting is tuned so that a restarted upstream is reached within about a second
of coming back, and a call made while it restarts waits for it instead of failing
fast, but never past its deadline and never longer than ``reconnect_wait``: an upstream
that is really down still answers UNAVAILABLE (503 at the edge, ``Blocked`` in the
workers) in bounded time, with the connection error as its message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from notify_kit.errors import DETAILS_KEY, from_rpc_error
from notify_kit.interceptors import ClientInterceptor
from notify_kit.settings import TlsSettings
from notify_kit.tls import channel_credentials

R = TypeVar("R")

# The retry policy absorbs a connection that breaks under a call (GOAWAY, reset) and
# an upstream's own short UNAVAILABLE. It cannot wait out a restart: gRPC draws each
# retry's pause uniformly from [0, backoff] and caps maxAttempts at 5, so the whole
# series may last a few milliseconds, and while the channel is in TRANSIENT_FAILURE
# every attempt fails at once. Waiting for the upstream is ``_ReconnectWait``'s job.
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

# gRPC's defaults (first retry after 1 s, x1.6 with 20 % jitter, up to 120 s) grow the
# pause between connection attempts while an upstream is down, even with no calls:
# measured here, after a 10 s outage the next attempt was 4.6 s away, so the restarted
# upstream stayed unreachable ("failed to connect to all addresses") for 5.8 s. Capped
# at 1 s, the channel tries again at most 1.2 s (with jitter) after the upstream is
# back; a refused connection costs microseconds, so a down upstream is cheap to poll.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),  # gRPC's floor
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # Despite its name, the shortest time one connection attempt (TCP + TLS) is given
    # before it is abandoned (default 20 s): an address that swallows SYNs is given up
    # after one default call deadline, so the next attempt can find the restarted peer.
    ("grpc.min_reconnect_backoff_ms", 5_000),
    # A restarted container may come back on a new address; the default rate limit on
    # re-resolving a name is 30 s, which would keep callers on the old one that long.
    ("grpc.dns_min_time_between_resolutions_ms", 1_000),
)

# Keepalive notices a peer that vanished without closing its connections (host gone,
# network cut): pings only while calls are active, so the server's ping policy (one per
# 5 min without data) is never offended. A restart on the same host does not need it:
# the kernel resets the old connection and the channel sees that at once.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)

DEFAULT_RECONNECT_WAIT = 3.0


def secure_channel(
    target: str,
    tls: TlsSettings,
    *,
    default_timeout: float = 5.0,
    reconnect_wait: float = DEFAULT_RECONNECT_WAIT,
) -> grpc.aio.Channel:
    """An mTLS channel to ``target`` (``host:port``) with retries and default deadlines.

    A call that finds no connection waits up to ``reconnect_wait`` seconds (never past
    its deadline) for one, then runs once more; see ``_ReconnectWait``.
    """
    options = [
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        *RECONNECT_OPTIONS,
        *KEEPALIVE_OPTIONS,
    ]
    waiter = _ReconnectWait(reconnect_wait)
    channel = grpc.aio.secure_channel(
        target,
        channel_credentials(tls),
        options=options,
        # The first one is outermost: the deadline is set before the waiter reads it.
        interceptors=[ClientInterceptor(default_timeout, tls.service_key), waiter],
    )
    waiter.channel = channel
    return channel


class _ReconnectWait(grpc.aio.UnaryUnaryClientInterceptor):
    """Lets a call that found no connection wait, bounded, for the channel to reconnect.

    Without it a call made while the upstream restarts fails at once: the channel is in
    TRANSIENT_FAILURE and the retry policy's attempts fail with it. ``wait_for_ready``
    would wait, but for the whole deadline, so a dead upstream would surface as
    DEADLINE_EXCEEDED (504 at the edge) after the full deadline, and a permanent
    failure (a bad certificate) would lose its message. Here the wait is bounded by
    ``min(wait, what is left of the deadline)`` and, when it runs out, the caller gets
    the original UNAVAILABLE.

    Invariant: only an UNAVAILABLE that carries no ``google.rpc.Status`` details is
    waited on. Our servers attach an ErrorInfo to every error they raise, so one without
    it came from the transport (no connection, or the connection broke): the same calls
    the retry policy already treats as safe to send again. An upstream's own
    UNAVAILABLE ("my database is down") is returned as it is, at once. The call is
    sent again at most once, with whatever remains of its deadline.
    """

    def __init__(self, wait: float) -> None:
        self._wait = wait
        self.channel: grpc.aio.Channel | None = None

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Run the call; after a connection failure wait for READY and run it once more."""
        loop = asyncio.get_running_loop()
        timeout = client_call_details.timeout
        deadline = loop.time() + (self._wait if timeout is None else timeout)
        call = await continuation(client_call_details, request)
        try:
            await call
            return call
        except grpc.aio.AioRpcError as exc:
            if not await self._reconnected(exc, min(self._wait, deadline - loop.time())):
                raise
        retry = grpc.aio.ClientCallDetails(
            method=client_call_details.method,
            timeout=max(0.001, deadline - loop.time()),
            metadata=client_call_details.metadata,
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
        )
        return await continuation(retry, request)

    async def _reconnected(self, exc: grpc.aio.AioRpcError, budget: float) -> bool:
        """Whether ``exc`` was a connection failure and the channel is READY again."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE or self.channel is None or budget <= 0:
            return False
        if any(key == DETAILS_KEY for key, _ in exc.trailing_metadata() or ()):
            return False  # the upstream answered UNAVAILABLE itself: no connection problem
        channel = self.channel
        try:
            async with asyncio.timeout(budget):
                state = channel.get_state(try_to_connect=True)
                while state != grpc.ChannelConnectivity.READY:
                    if state == grpc.ChannelConnectivity.SHUTDOWN:
                        return False
                    await channel.wait_for_state_change(state)
                    state = channel.get_state(try_to_connect=True)
        except TimeoutError:
            return False
        return True


def clamp_timeout(remaining: float | None, ceiling: float) -> float:
    """The deadline to pass on: what the caller has left, never more than ``ceiling``.

    ``time_remaining()`` is effectively infinite when the caller set no deadline, so it
    must be clamped before reuse.
    """
    if remaining is None:
        return ceiling
    return max(0.001, min(remaining, ceiling))


async def unary(
    method: Callable[..., Awaitable[R]],
    request: Any,
    *,
    timeout: float | None = None,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> R:
    """Call a stub method, turning ``AioRpcError`` into our ``ServiceError`` types.

    Callers never see the raw gRPC error, so upstream NOT_FOUND stays NOT_FOUND with its
    reason, and a dead upstream becomes ``Unavailable``.
    """
    try:
        if metadata is None:
            return await method(request, timeout=timeout)
        return await method(request, timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc
