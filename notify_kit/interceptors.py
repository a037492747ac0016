"""Server and client interceptors: correlation id, access control, error mapping, logs.

The server interceptor wraps every unary handler so that (in this order) the
correlation id is bound, the caller's certificate identity is checked against the
access matrix (a denied call never reaches a handler), the handler runs, and any
``ServiceError`` becomes a rich status. What else a handler raises meets one table
(``notify_kit.outage``): an infrastructure failure (database, Redis, broker, sockets,
timeouts) answers UNAVAILABLE (or DEADLINE_EXCEEDED when the caller's deadline ran out)
with reason DEPENDENCY_UNAVAILABLE; anything else is a bug and answers INTERNAL. Neither
answer carries exception text: the caller gets the reason and the correlation id, the
log gets the detail under the same correlation id. A relayed upstream error keeps its
code (in the answer and the access log) and loses only transport detail.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from notify_kit import metrics
from notify_kit.acl import OPEN_TO_MESH, SERVICE_KEY_HEADER, AccessPolicy
from notify_kit.context import (
    CORRELATION_HEADER,
    get_correlation_id,
    new_correlation_id,
    sanitize_correlation_id,
    set_correlation_id,
)
from notify_kit.errors import Internal, InvalidArgument, ServiceError, error_info, to_status
from notify_kit.outage import DEPENDENCY_UNAVAILABLE, describe, is_outage, outage_error
from notify_kit.telemetry import (
    continue_unsampled,
    detach,
    pass_on_unsampled,
    tag_current_span,
    traced_call,
    traced_service,
)

log = logging.getLogger(__name__)

DEPENDENCY_DOWN = DEPENDENCY_UNAVAILABLE

# Codes that say "the server side failed": their causes are worth a log line.
_SERVER_SIDE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)

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


class Undecodable:
    """A request body protobuf could not parse (nested past its depth limit, malformed)."""

    __slots__ = ("error",)

    def __init__(self, error: DecodeError) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer``, returning an ``Undecodable`` instead of raising.

    grpcio answers a deserializer's exception itself, as UNKNOWN with the exception's
    text (HTTP 500 through Envoy) before any interceptor runs; this way the shared
    interceptor answers INVALID_ARGUMENT with a reason instead.
    """
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(exc)

    return deserialize


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Binds correlation ids, enforces the access policy, maps errors, logs each call."""

    def __init__(self, policy: AccessPolicy) -> None:
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap unary-unary handlers; only health and reflection may stream. A call
        being traced gets the server span around all of it (the instrumentation's
        interceptor, outermost, as the instrumentor would have put it)."""
        traced = traced_service(handler_call_details)
        if traced is not None:
            ours = functools.partial(self._intercept, continuation)
            handler: grpc.RpcMethodHandler = await traced.intercept_service(
                ours, handler_call_details
            )
            return handler
        return await self._intercept(continuation, handler_call_details)

    async def _intercept(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
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
            correlation_id = sanitize_correlation_id(metadata_value(context, CORRELATION_HEADER))
            set_correlation_id(correlation_id)
            tag_current_span(correlation_id)  # the server span began before the id was known
            unsampled = continue_unsampled(context.invocation_metadata())
            start = time.perf_counter()
            outcome, reason, forwarded = "OK", "", False
            try:
                policy.check(
                    peer_identity(context), method, metadata_value(context, SERVICE_KEY_HEADER)
                )
                if isinstance(request, Undecodable):
                    log.info("undecodable request: %s", request.error, extra={"method": method})
                    raise InvalidArgument(
                        "UNDECODABLE_REQUEST",
                        "the request could not be decoded (malformed, or nested too deeply)",
                    )
                return await inner(request, context)
            except ServiceError as err:
                outcome, reason, forwarded = err.code.name, err.reason, err.forwarded
                _log_cause(err, method)
                await context.abort_with_status(_status(err))
            except grpc.aio.AbortError:
                # Servicers raise domain errors; what aborts is a relay (the gateway's
                # forwarder): log the upstream's real code and reason, not "aborted".
                outcome, reason, forwarded = _aborted_with(context)
                raise
            except Exception as exc:
                safe = {"correlation_id": correlation_id}
                if is_outage(exc):
                    # A database, Redis, broker or socket of ours failed: the caller may
                    # retry, and learns nothing of our internals (the detail is logged).
                    answer = outage_error(exc, context.time_remaining(), safe)
                    log.warning(
                        "dependency unavailable: %s",
                        describe(exc),
                        extra={"method": method, "error": type(exc).__qualname__},
                    )
                else:
                    answer = Internal("INTERNAL", "internal error; see server logs", metadata=safe)
                    log.exception("unhandled error", extra={"method": method})
                outcome, reason = answer.code.name, answer.reason
                await context.abort_with_status(_status(answer))
            finally:
                detach(unsampled)
                elapsed = time.perf_counter() - start
                metrics.RPC_SERVER_SECONDS.labels(method, outcome).observe(elapsed)
                # One access-log line per call (INFO), so every hop of a request shows up
                # under its correlation id; NOTIFY_LOG_LEVEL=WARNING silences it.
                log.info(
                    "rpc",
                    extra={
                        "method": method,
                        "code": outcome,
                        "reason": reason,
                        "forwarded": forwarded,
                        "ms": round(elapsed * 1000, 2),
                    },
                )

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


# A negative server pushback tells a gRPC client not to retry (gRFC A6).
_NO_RETRY = ("grpc-retry-pushback-ms", "-1")


def _status(err: ServiceError) -> grpc.Status:
    """The rich status for ``err``; an UNAVAILABLE of ours also asks for no retry.

    Our channels retry UNAVAILABLE at once (``notify_kit.rpc``), meant for a call that
    never reached a handler. One that did and answered UNAVAILABLE itself (its database
    is down) would only be asked again, multiplying the load on a service already in
    trouble: the caller learns of the outage on the first answer.
    """
    status = to_status(err)
    if err.code == grpc.StatusCode.UNAVAILABLE:
        status = status._replace(  # grpc_status builds a namedtuple
            trailing_metadata=(*status.trailing_metadata, _NO_RETRY)
        )
    return status


def _aborted_with(context: grpc.aio.ServicerContext) -> tuple[str, str, bool]:
    """The code and ErrorInfo reason a handler aborted with, for the access log."""
    code = context.code()
    if not isinstance(code, grpc.StatusCode):
        return "ABORTED_BY_HANDLER", "", False
    return code.name, error_info(context.trailing_metadata()).reason, True


def _log_cause(err: ServiceError, method: str) -> None:
    """Log what the caller will not see: transport detail, or the cause of a server fault."""
    if not err.public:
        detail = err.message
    elif err.code in _SERVER_SIDE and err.__cause__ is not None:
        detail = describe(err.__cause__)
    else:
        return
    log.warning(
        "%s %s: %s",
        err.code.name,
        err.reason,
        detail,
        extra={"method": method, "forwarded": err.forwarded},
    )


class ClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the correlation id, this service's service key (when it has one) and a
    default deadline to every outbound unary call."""

    def __init__(self, default_timeout: float, service_key: str = "") -> None:
        self._default_timeout = default_timeout
        self._service_key = service_key

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Fill in what the caller left out; never override what it set. The call's time
        and code go to ``notify_rpc_client_duration_seconds`` when it ends. Made inside
        a recorded span, the call gets a client span around it (the instrumentation's
        interceptor, which also puts the trace context into the metadata)."""
        traced = traced_call()
        if traced is not None:
            ours = functools.partial(self._call, continuation)
            return await traced.intercept_unary_unary(ours, client_call_details, request)
        return await self._call(continuation, client_call_details, request)

    async def _call(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()))
        if CORRELATION_HEADER not in metadata:
            metadata.add(CORRELATION_HEADER, get_correlation_id() or new_correlation_id())
        if self._service_key and SERVICE_KEY_HEADER not in metadata:
            metadata.add(SERVICE_KEY_HEADER, self._service_key)
        pass_on_unsampled(metadata)
        timeout = client_call_details.timeout
        details = grpc.aio.ClientCallDetails(
            method=client_call_details.method,
            timeout=self._default_timeout if timeout is None else timeout,
            metadata=metadata,
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
        )
        start = time.perf_counter()
        call = await continuation(details, request)
        code = "OK"
        try:
            await call  # the caller's own await then finds it finished
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            method = client_call_details.method
            metrics.RPC_CLIENT_SECONDS.labels(
                method.decode() if isinstance(method, bytes) else method, code
            ).observe(time.perf_counter() - start)
        return call
