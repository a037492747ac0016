"""The access-control matrix of the mesh: which caller may call which method of which server.

Identities come from the client certificate's common name (mTLS is mandatory on every
hop), so a caller cannot claim to be someone else without the CA's key. The matrix is
the seed's, extended where the design needs it (the gateway also manages templates for
external admin clients; the workers remove dead push tokens). Health and reflection are
open to every certificate the mesh CA signed, so operators and probes can use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from notify_kit.errors import PermissionDenied, Unauthenticated

OPEN_TO_MESH = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_WORKER_CALLS = (
    "/notify.v1.TemplateService/GetTemplateVersion",
    "/notify.v1.TemplateService/RenderTemplate",
    "/notify.v1.UserService/UpdateDeliveryStatus",
    "/notify.v1.UserService/UpdateDeliveryStatuses",
    "/notify.v1.UserService/GetDeliveryProfile",
)

# server -> caller -> method prefixes the caller may use.
MATRIX: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "gateway": {
        "envoy": ("/notify.v1.",),
        "operator": ("/notify.v1.",),
    },
    "user_svc": {
        "gateway": ("/notify.v1.UserService/",),
        "email_worker": _WORKER_CALLS,
        "push_worker": (*_WORKER_CALLS, "/notify.v1.UserService/RemoveDeviceToken"),
    },
    "template_svc": {
        "gateway": (
            "/notify.v1.TemplateService/CreateTemplate",
            "/notify.v1.TemplateService/GetTemplate",
            "/notify.v1.TemplateService/CreateTemplateVersion",
        ),
        "email_worker": _WORKER_CALLS,
        "push_worker": _WORKER_CALLS,
    },
    # Workers serve only their admin service, to operators.
    "email_worker": {"operator": ("/notify.v1.WorkerAdminService/",)},
    "push_worker": {"operator": ("/notify.v1.WorkerAdminService/",)},
}


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The slice of the matrix that applies to one server."""

    server: str
    rules: Mapping[str, tuple[str, ...]]

    @classmethod
    def for_server(cls, server: str) -> AccessPolicy:
        """The policy of ``server``; an unknown server name is a programming error."""
        return cls(server=server, rules=MATRIX[server])

    def check(self, caller: str | None, method: str) -> None:
        """Raise unless ``caller`` may call ``method`` on this server."""
        if not caller:
            raise Unauthenticated("NO_PEER_IDENTITY", "a client certificate is required")
        if method.startswith(OPEN_TO_MESH):
            return
        allowed = self.rules.get(caller, ())
        if not method.startswith(allowed) or not allowed:
            raise PermissionDenied(
                "ACCESS_DENIED",
                f"{caller} may not call {method} on {self.server}",
                metadata={"caller": caller, "method": method, "server": self.server},
            )
