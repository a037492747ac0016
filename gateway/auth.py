"""API-key authentication and scope checks for every external method.

Runs as a server interceptor inside the shared one, so a call without a valid key, or
with a key lacking the method's scope, never reaches a handler. The scope each method
needs is declared on the RPC in its proto (``notify.v1.access``, read by
``notify_kit.acl``); a method without one is internal and no key opens it. Keys are
looked up by hash and cached in-process for a short TTL (revocation takes effect within
it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from gateway.store import ApiKey, KeyStore
from notify_kit import acl
from notify_kit.cache import LruCache
from notify_kit.errors import PermissionDenied, Unauthenticated
from notify_kit.interceptors import metadata_value, wrap_unary

API_KEY_HEADER = "x-api-key"

_CALLER: ContextVar[ApiKey] = ContextVar("api_key")


class Authenticator:
    """Resolves raw keys to ``ApiKey`` with a small TTL cache in front of the store."""

    def __init__(self, store: KeyStore, *, ttl: float) -> None:
        self._store = store
        self._cache: LruCache[str, ApiKey | None] = LruCache(4096, ttl=ttl)

    async def authenticate(self, raw: str | None) -> ApiKey:
        """The key's owner, or ``Unauthenticated``."""
        if not raw or len(raw) > 256:
            raise Unauthenticated(
                "API_KEY_MISSING", f"send an API key in the {API_KEY_HEADER} header"
            )
        hit = self._cache.lookup(raw)
        key = hit[0] if hit is not None else await self._store.find(raw)
        if hit is None:
            self._cache.put(raw, key)  # unknown keys too, so guessing costs no DB reads
        if key is None:
            raise Unauthenticated("API_KEY_INVALID", "the API key is unknown or revoked")
        return key


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorises ``/notify.v1.*`` calls; health/reflection pass."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

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
        auth = self._auth

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            key = await auth.authenticate(metadata_value(context, API_KEY_HEADER))
            if scope is None or not acl.grants(key.scopes, scope):
                raise PermissionDenied(
                    "SCOPE_MISSING",
                    f"this API key lacks the scope {scope or 'internal'!r}",
                    metadata={"required_scope": scope or "internal", "key": key.name},
                )
            _CALLER.set(key)  # each RPC runs in its own task: this stays with the call
            return await inner(request, context)

        return wrap_unary(handler, wrapped)


def current_api_key() -> ApiKey:
    """The API key that authenticated the current call (set by the interceptor)."""
    return _CALLER.get()
