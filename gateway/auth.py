"""API-key authentication and scope checks for every external method.

Runs as a server interceptor inside the shared one, so a call without a valid key, or
with a key lacking the method's scope, never reaches a handler. The scope each method
needs is declared on the RPC in its proto (``notify.v1.access``, read by
``notify_kit.acl``); a method without one is internal and no key opens it. Keys are
looked up by the SHA-256 of the presented secret and cached in-process under that digest
(never the secret itself) for ``NOTIFY_AUTH_CACHE_TTL``, 2 s: a revocation, a rotation's
end of grace or an expiry is refused by every gateway within it, for one database read
per key per gateway every 2 s. A cached key is also dropped the moment its secret's
validity ends. The key's last-used time is written at most once a minute, off the call.

Then the key's rate limit (its own, else the gateway's default) spends a token leased
from Redis a chunk at a time (``gateway.limits.LeasedBuckets``: a Redis round trip per
chunk, not per call). Failed lookups are limited per client address (the address Envoy
wrote in ``x-forwarded-for``, else the gRPC peer), checked before the database is asked,
so guessing costs the guesser a 429 rather than us a query.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import grpc

from gateway.limits import LeasedBuckets, Rate, RateLimiter, address_bucket, key_bucket
from gateway.store import ApiKey, KeyStore, hash_key
from notify_kit import acl, metrics
from notify_kit.cache import LruCache
from notify_kit.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from notify_kit.interceptors import metadata_value, wrap_unary
from notify_kit.tenancy import DEFAULT_TENANT

API_KEY_HEADER = "x-api-key"

_CALLER: ContextVar[ApiKey] = ContextVar("api_key")
_TOUCH_EVERY = 60.0
log = logging.getLogger(__name__)


class Authenticator:
    """Resolves raw keys to ``ApiKey`` with a small TTL cache in front of the store."""

    def __init__(
        self, store: KeyStore, limiter: RateLimiter, *, ttl: float, failure_rate: Rate
    ) -> None:
        self._store = store
        self._limiter = limiter
        self._failure_rate = failure_rate
        self._cache: LruCache[bytes, ApiKey | None] = LruCache(4096, ttl=ttl)
        self._touched: dict[str, float] = {}  # key id -> when its last use was written
        self._touching: set[asyncio.Task[None]] = set()

    async def authenticate(self, raw: str | None, address: str) -> ApiKey:
        """The key's owner; ``Unauthenticated``, or ``ResourceExhausted`` for an address
        that failed too often."""
        if not raw or len(raw) > 256:
            raise Unauthenticated(
                "API_KEY_MISSING", f"send an API key in the {API_KEY_HEADER} header"
            )
        digest = hash_key(raw)
        hit = self._cache.lookup(digest)
        if hit is not None and hit[0] is not None and _ended(hit[0]):
            hit = None  # its secret stopped working while cached
        if hit is None:
            await self._failures_allowed(address, spend=False)  # before asking the database
            key = await self._store.find(raw)
            self._cache.put(digest, key)  # unknown keys too: a burst of one costs one read
        else:
            key = hit[0]
        if key is None:
            await self._failures_allowed(address, spend=True)
            raise Unauthenticated("API_KEY_INVALID", "the API key is unknown, expired or revoked")
        self._note_use(key.id)
        return key

    async def _failures_allowed(self, address: str, *, spend: bool) -> None:
        bucket, rate = address_bucket(address), self._failure_rate
        limiter = self._limiter
        wait = await (limiter.take(bucket, rate) if spend else limiter.would_take(bucket, rate))
        if wait:
            metrics.RATE_LIMITED.labels("failed_key_lookups").inc()
            raise ResourceExhausted(
                "TOO_MANY_FAILED_KEYS",
                "too many calls with unknown API keys from this address; retry later",
                retry_after=wait,
            )

    def _note_use(self, key_id: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(key_id, -_TOUCH_EVERY) < _TOUCH_EVERY:
            return
        self._touched[key_id] = now
        task = asyncio.get_running_loop().create_task(self._touch(key_id))
        self._touching.add(task)
        task.add_done_callback(self._touching.discard)

    async def _touch(self, key_id: str) -> None:
        try:
            await self._store.touch(key_id)
        except Exception as exc:
            log.warning("cannot record the last use of key %s: %r", key_id, exc)
            self._touched.pop(key_id, None)


def _ended(key: ApiKey) -> bool:
    return key.valid_until is not None and key.valid_until <= datetime.now(UTC)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorises ``/notify.v1.*`` calls; health/reflection pass."""

    def __init__(
        self, authenticator: Authenticator, limiter: RateLimiter, *, default_rate: Rate | None
    ) -> None:
        self._auth = authenticator
        self._limiter = LeasedBuckets(limiter)
        self._default_rate = default_rate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap unary handlers of external methods with the key and scope check."""
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith("/notify."):
            return handler
        scope = acl.scope_of(method)
        inner = handler.unary_unary
        auth, limiter, default_rate = self._auth, self._limiter, self._default_rate

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            raw = metadata_value(context, API_KEY_HEADER)
            key = await auth.authenticate(raw, client_address(context))
            if scope is None or not acl.grants(key.scopes, scope):
                raise PermissionDenied(
                    "SCOPE_MISSING",
                    f"this API key lacks the scope {scope or 'internal'!r}",
                    metadata={"required_scope": scope or "internal", "key": key.name},
                )
            rate = key.rate or default_rate
            if rate is not None:
                wait = await limiter.take(key_bucket(key.id), rate)
                if wait:
                    metrics.RATE_LIMITED.labels("api_key").inc()
                    raise ResourceExhausted(
                        "API_KEY_RATE_LIMITED",
                        f"this API key may make {rate.per_second:g} calls a second"
                        f" (bursts of {rate.burst}); retry later",
                        metadata={"key": key.name},
                        retry_after=wait,
                    )
            _CALLER.set(key)  # each RPC runs in its own task: this stays with the call
            return await inner(request, context)

        return wrap_unary(handler, wrapped)


def client_address(context: grpc.aio.ServicerContext) -> str:
    """Who is calling: the address Envoy saw (the last ``x-forwarded-for`` hop, which
    Envoy itself wrote, since it drops the client's own), else the gRPC peer's host."""
    forwarded = metadata_value(context, "x-forwarded-for")
    if forwarded:
        return forwarded.rsplit(",", 1)[-1].strip()
    peer = context.peer() or "unknown"  # "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"
    return peer.rsplit(":", 1)[0]


def current_tenant() -> str:
    """The tenant the current call acts for: its key's. In the gateway every external
    call has passed ``ApiKeyInterceptor``; a handler wired without it (a test of the
    forwarder alone) acts for the default tenant."""
    key = _CALLER.get(None)
    return key.tenant if key is not None else DEFAULT_TENANT


def current_api_key() -> ApiKey:
    """The API key that authenticated the current call (set by the interceptor)."""
    return _CALLER.get()
