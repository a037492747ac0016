"""Server and client interceptors: correlation id, access control, error mapping, logs.

The server interceptor wraps every unary handler so that (in this order) the
correlation id is bound, the caller's certificate identity is checked against the
access matrix (a denied call never reaches a handler), the handler runs, and any
``ServiceError`` becomes a rich status. Anything else is logged with its traceback and
answered as INTERNAL without leaking internals to the caller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from notify_kit.acl import OPEN_TO_MESH, AccessPolicy
from notify_kit.context import (
    CORRELATION_HEADER,
    get_correlation_id,
    new_correlation_id,
    sanitize_correlation_id,
    set_correlation_id,
)
from notify_kit.errors import Internal, ServiceError, Unavailable, to_status
from notify_kit.outage import INFRA_ERRORS

log = logging.getLogger(__name__)

DEPENDENCY_DOWN = "DEPENDENCY_UNAVAILABLE"

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the caller's verified client certificate, if any."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode() if names else None


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """One invocation-metadata value (text keys only)."""
    for k, v in context.invocation_metadata() or ():
        if k == key and isinstance(v, str):
            return v
    return None


def wrap_unary(handler: grpc.RpcMethodHandler, wrapped: Handler) -> grpc.RpcMethodHandler:
    """A unary-unary handler that runs ``wrapped`` with the original (de)serializers."""
    return grpc.unary_unary_rpc_method_handler(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Binds correlation ids, enforces the access policy, maps errors, logs each call."""

    def __init__(self, policy: AccessPolicy) -> None:
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap unary-unary handlers; only health and reflection may stream."""
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None:
            return handler
        if handler.unary_unary is None:
            # Streaming handlers cannot be wrapped like unary ones; the mesh only streams
            # health Watch and reflection, so anything else is refused (UNIMPLEMENTED)
            # rather than served past the access matrix.
            if method.startswith(OPEN_TO_MESH):
                return handler
            log.warning(
                "streaming method refused: not covered by the access matrix",
                extra={"method": method},
            )
            return None
        inner: Handler = handler.unary_unary
        policy = self._policy

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            set_correlation_id(sanitize_correlation_id(metadata_value(context, CORRELATION_HEADER)))
            start = time.perf_counter()
            outcome, reason = "OK", ""
            try:
                policy.check(peer_identity(context), method)
                return await inner(request, context)
            except ServiceError as err:
                outcome = err.code.name
                reason = err.reason
                await context.abort_with_status(to_status(err))
            except grpc.aio.AbortError:
                outcome = "ABORTED_BY_HANDLER"
                raise
            except INFRA_ERRORS as exc:
                # A database, Redis or socket of ours failed: the caller may retry, and
                # learns nothing of our internals (the detail goes to the log).
                outcome, reason = "UNAVAILABLE", DEPENDENCY_DOWN
                log.warning("dependency unavailable: %r", exc, extra={"method": method})
                await context.abort_with_status(
                    to_status(Unavailable(DEPENDENCY_DOWN, "a dependency is down; retry later"))
                )
            except Exception:
                outcome = "INTERNAL"
                log.exception("unhandled error", extra={"method": method})
                await context.abort_with_status(
                    to_status(Internal("INTERNAL", "internal error; see server logs"))
                )
            finally:
                # One access-log line per call (INFO), so every hop of a request shows up
                # under its correlation id; NOTIFY_LOG_LEVEL=WARNING silences it.
                log.info(
                    "rpc",
                    extra={
                        "method": method,
                        "code": outcome,
                        "reason": reason,
                        "ms": round((time.perf_counter() - start) * 1000, 2),
                    },
                )

        return wrap_unary(handler, wrapped)


class ClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the correlation id and a default deadline to every outbound unary call."""

    def __init__(self, default_timeout: float) -> None:
        self._default_timeout = default_timeout

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Fill in what the caller left out; never override what it set."""
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()))
        if CORRELATION_HEADER not in metadata:
            metadata.add(CORRELATION_HEADER, get_correlation_id() or new_correlation_id())
        timeout = client_call_details.timeout
        details = grpc.aio.ClientCallDetails(
            method=client_call_details.method,
            timeout=self._default_timeout if timeout is None else timeout,
            metadata=metadata,
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
        )
        return await continuation(details, request)
