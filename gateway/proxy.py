"""Forwarding of the external UserService/TemplateService methods to their owners.

External clients manage users and templates through the same front door as
notifications (one API key, one Envoy route), but the data belongs to user_svc and
template_svc. The gateway registers those methods as raw-bytes handlers and forwards
each call over its pooled mTLS channel: no decode/encode, the owner validates, and the
owner's status and error details reach the client unchanged (a transport failure, which
has no details of ours, reaches it as its code and a generic message). Exactly the public
methods (those whose proto declares a scope) of services the gateway does not serve
itself are forwarded, each to the process its service's ``served_by`` names; internal
ones stay unreachable from outside.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from gateway.auth import current_tenant
from notify_kit import acl
from notify_kit.errors import DETAILS_KEY, from_rpc_error
from notify_kit.rpc import clamp_timeout
from notify_kit.tenancy import tenant_metadata


class ForwardingHandler(grpc.GenericRpcHandler):
    """Serves the external methods of the owned services by forwarding raw bytes."""

    def __init__(self, channels: Mapping[str, grpc.aio.Channel], *, timeout: float) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in acl.public_methods():
            if acl.GATEWAY in method.servers:
                continue  # served here (NotificationService, DeadLetterService)
            (owner,) = method.servers  # one owner per forwarded service
            self._handlers[method.path] = self._forwarder(channels[owner], method.path, timeout)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        """The forwarder for an exposed method, else None (UNIMPLEMENTED)."""
        return self._handlers.get(handler_call_details.method)

    @staticmethod
    def _forwarder(channel: grpc.aio.Channel, method: str, timeout: float) -> grpc.RpcMethodHandler:
        call = channel.unary_unary(method)

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                response: bytes = await call(
                    request,
                    timeout=clamp_timeout(context.time_remaining(), timeout),
                    metadata=tenant_metadata(current_tenant()),  # the key's
                )
            except grpc.aio.AioRpcError as exc:
                details = tuple(
                    (k, v) for k, v in exc.trailing_metadata() or () if k == DETAILS_KEY
                )
                if not details:
                    # No status of ours: the transport failed, and its text names
                    # addresses. The caller gets the code and a generic message (the
                    # shared interceptor logs the text with the correlation id).
                    raise from_rpc_error(exc) from None
                await context.abort(exc.code(), exc.details() or "", trailing_metadata=details)
            return response

        return grpc.unary_unary_rpc_method_handler(forward)
