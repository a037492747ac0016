"""The one place where domain errors become gRPC statuses, and gRPC errors become ours.

Servicers raise a ``ServiceError`` subclass with a machine-readable ``reason``; the
server interceptor turns it into a ``google.rpc.Status`` carrying an ``ErrorInfo``
(AIP-193), plus a ``BadRequest`` when fields are at fault. Clients call
``from_rpc_error`` so the raw ``grpc.aio.AioRpcError`` never leaks past a client module.

An error that says when to come back (a rate limit, a claim in progress) carries a
``RetryInfo`` and a ``retry-after`` header in whole seconds, which Envoy passes on as the
HTTP ``Retry-After`` of the 429 or 409.

A relayed error keeps the upstream's code and reason. Its message reaches our own
callers only when an upstream of ours wrote it for them (it came with an ErrorInfo);
a message made by the gRPC transport (peer addresses, TLS and socket errors) stays in
``message`` for logs and is replaced by a generic text in the status (``public``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "notify.dev"
DETAILS_KEY = "grpc-status-details-bin"
RETRY_AFTER_KEY = "retry-after"


class ServiceError(Exception):
    """An error with a gRPC code, an ErrorInfo reason and optional field violations."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        public: bool = True,
        forwarded: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds after which the same request may succeed (RetryInfo, Retry-After)."""
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.public = public
        """Whether ``message`` may reach our callers as it is (else a generic text does)."""
        self.forwarded = forwarded
        """Relayed from an upstream call by ``from_rpc_error``: the code is the upstream's."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.message!r})"


class InvalidArgument(ServiceError):
    """The request is malformed; retrying it unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """A named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    """A resource with that identity exists (or an idempotency key was reused)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The system is not in a state that allows the request."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ServiceError):
    """No or bad credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    """A rate limit or quota was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Aborted(ServiceError):
    """A concurrent request holds the same resource; retry later."""

    code = grpc.StatusCode.ABORTED


class Unavailable(ServiceError):
    """A dependency is down; the caller may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The work did not finish in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServiceError):
    """A bug or an unexpected state; details are in the server log, not the response."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Aborted,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


_GENERIC_MESSAGES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: "an upstream service is unavailable; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "an upstream service did not answer in time",
}


def public_message(err: ServiceError) -> str:
    """The message our callers may see: ``err.message`` unless it is internal detail."""
    if err.public:
        return err.message
    return _GENERIC_MESSAGES.get(err.code, f"an upstream call failed ({err.code.name})")


def to_status(err: ServiceError) -> grpc.Status:
    """Build the rich status for ``err``: ErrorInfo always, BadRequest for field errors.

    The message is ``public_message(err)``: internal detail never goes out.
    """
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata))
    details = [info]
    if err.field_violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in err.field_violations
                ]
            )
        )
        details.append(bad)
    if err.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(math.ceil(err.retry_after * 1000))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    code = err.code.value[0]
    status = rpc_status.to_status(
        status_pb2.Status(code=code, message=public_message(err), details=details)
    )
    if err.retry_after is None:
        return status
    seconds = str(max(1, math.ceil(err.retry_after)))
    return status._replace(  # grpc_status builds a namedtuple
        trailing_metadata=(*status.trailing_metadata, (RETRY_AFTER_KEY, seconds))
    )


def _details(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[any_pb2.Any]:
    for key, value in metadata or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            return list(status_pb2.Status.FromString(value).details)
    return []


def error_info(metadata: Iterable[tuple[str, str | bytes]] | None) -> error_details_pb2.ErrorInfo:
    """Extract the ErrorInfo from trailing metadata (an empty one when absent)."""
    for detail in _details(metadata):
        found = error_details_pb2.ErrorInfo()
        if detail.Unpack(found):
            return found
    return error_details_pb2.ErrorInfo()


def field_violations(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[tuple[str, str]]:
    """The BadRequest field violations in trailing metadata, if any."""
    for detail in _details(metadata):
        found = error_details_pb2.BadRequest()
        if detail.Unpack(found):
            return [(v.field, v.description) for v in found.field_violations]
    return []


def from_rpc_error(exc: grpc.aio.AioRpcError) -> ServiceError:
    """Map a failed outbound RPC to our error type, keeping the upstream code and reason.

    Our servers attach an ErrorInfo to every error and write its message for callers;
    without one, the message is the transport's (addresses, TLS errors): kept in
    ``message`` for logs and the caller's own decisions, never relayed (``public``).
    """
    code = exc.code()
    cls = _BY_CODE.get(code, Internal)
    if code == grpc.StatusCode.CANCELLED:
        cls = Unavailable
    trailing = exc.trailing_metadata()
    info = error_info(trailing)
    return cls(
        info.reason or f"UPSTREAM_{code.name}",
        exc.details() or code.name,
        metadata=dict(info.metadata),
        field_violations=field_violations(trailing),
        public=bool(info.reason),
        forwarded=True,
    )


def status_code_number(code: grpc.StatusCode) -> int:
    """The numeric code (``google.rpc.Code``) of a ``grpc.StatusCode``."""
    number: int = code.value[0]
    return number
