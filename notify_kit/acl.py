"""The access-control matrix of the mesh, read from the contracts.

Every RPC declares who may call it (``notify.v1.access`` in ``proto/notify/v1/access.proto``)
and every service which processes serve it (``notify.v1.served_by``); this module turns
those declarations into each server's policy, so the proto is the only place the matrix
is written. The rules it applies:

* a **public** method (one with a scope) is served by the gateway to the edge (Envoy and
  operators), with an API key checked by the gateway; the process that owns its service,
  when that is not the gateway, takes it from the gateway only (the gateway forwards it);
* an **internal** method (one with callers) is served by the processes that serve its
  service, to exactly the identities it names;
* health and reflection are open to every certificate the mesh CA signed, so operators
  and probes can use them.

Identities come from the client certificate's common name (mTLS is mandatory on every
hop), so a caller cannot claim to be someone else without the CA's key. The internal
callers the contract marks ``presents_service_key`` (the gateway and the workers) must
also present their service key with every call: a stolen certificate alone opens
nothing, and a key alone reaches nothing without its certificate. Anything not declared
is refused.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from google.protobuf.descriptor import EnumDescriptor, MethodDescriptor, ServiceDescriptor
from notify.v1 import (
    access_pb2,
    admin_service_pb2,
    dead_letter_service_pb2,
    delivery_service_pb2,
    notification_service_pb2,
    template_service_pb2,
    user_service_pb2,
    worker_admin_pb2,
)

from notify_kit.errors import PermissionDenied, Unauthenticated

if TYPE_CHECKING:
    from google.protobuf.descriptor_pb2 import EnumValueOptions
    from google.protobuf.internal.extension_dict import _ExtensionFieldDescriptor

HEALTH_METHODS = "/grpc.health.v1.Health/"  # the prefix of the health service's methods
OPEN_TO_MESH = (HEALTH_METHODS, "/grpc.reflection.")
SERVICE_KEY_HEADER = "x-service-key"
# Every generated module that defines a service of ours.
SERVICE_MODULES: tuple[ModuleType, ...] = (
    admin_service_pb2,
    notification_service_pb2,
    user_service_pb2,
    delivery_service_pb2,
    template_service_pb2,
    dead_letter_service_pb2,
    worker_admin_pb2,
)
GATEWAY = "gateway"
# Who reaches the gateway's public methods: external clients through Envoy, operators.
EDGE = frozenset({"envoy", "operator"})
ADMIN_SCOPE = "admin"


@dataclass(frozen=True, slots=True)
class MethodAccess:
    """One RPC's declaration."""

    path: str  # "/notify.v1.Service/Method", as gRPC names it on the wire
    servers: frozenset[str]  # the processes that serve its service
    scope: str | None  # set for a public method
    callers: frozenset[str]  # set for an internal method

    def allowed_on(self, server: str) -> frozenset[str]:
        """The identities that may call this method on ``server``."""
        if self.scope is not None:
            if server == GATEWAY:
                return EDGE
            return frozenset({GATEWAY}) if server in self.servers else frozenset()
        return self.callers if server in self.servers else frozenset()


def _option_names(
    enum: EnumDescriptor, option: _ExtensionFieldDescriptor[EnumValueOptions, str]
) -> dict[int, str]:
    return {value.number: value.GetOptions().Extensions[option] for value in enum.values}


def _services() -> Iterator[ServiceDescriptor]:
    for module in SERVICE_MODULES:
        yield from module.DESCRIPTOR.services_by_name.values()


def _declaration(
    service: ServiceDescriptor,
    method: MethodDescriptor,
    scopes: Mapping[int, str],
    identities: Mapping[int, str],
) -> MethodAccess:
    path = f"/{service.full_name}/{method.name}"
    servers = frozenset(
        identities[s] for s in service.GetOptions().Extensions[access_pb2.served_by].servers
    )
    declared = method.GetOptions().Extensions[access_pb2.access]
    callers = frozenset(identities[c] for c in declared.callers)
    if not servers or (declared.scope == access_pb2.SCOPE_UNSPECIFIED) == (not callers):
        # A contract without its declaration is a build error, caught by the tests and
        # at start-up; it never becomes an open (or silently closed) method.
        raise ValueError(f"{path}: declare exactly one of scope and callers, and served_by")
    scope = scopes[declared.scope] if declared.scope else None
    return MethodAccess(path=path, servers=servers, scope=scope, callers=callers)


@functools.cache
def declarations() -> Mapping[str, MethodAccess]:
    """Every RPC of ours by its path, as the contracts declare it (read once)."""
    scopes = scope_names()
    identities = _option_names(access_pb2.Identity.DESCRIPTOR, access_pb2.common_name)
    return {
        access.path: access
        for service in _services()
        for access in (_declaration(service, m, scopes, identities) for m in service.methods)
    }


@functools.cache
def scope_names() -> Mapping[int, str]:
    """``Scope`` values by number, as keys and errors spell them ("notifications:send")."""
    names = _option_names(access_pb2.Scope.DESCRIPTOR, access_pb2.scope_name)
    del names[access_pb2.SCOPE_UNSPECIFIED]
    return names


@functools.cache
def service_key_holders() -> frozenset[str]:
    """The identities whose calls must carry their service key (``presents_service_key``)."""
    return frozenset(
        value.GetOptions().Extensions[access_pb2.common_name]
        for value in access_pb2.Identity.DESCRIPTOR.values
        if value.GetOptions().Extensions[access_pb2.presents_service_key]
    )


def all_scopes() -> frozenset[str]:
    """Every scope an API key can hold."""
    return frozenset(scope_names().values())


def scope_of(method: str) -> str | None:
    """The scope a public method needs; None for an internal or unknown one."""
    access = declarations().get(method)
    return access.scope if access is not None else None


def public_methods() -> tuple[MethodAccess, ...]:
    """Every method external clients may call (through the gateway)."""
    return tuple(a for a in declarations().values() if a.scope is not None)


def grants(held: frozenset[str], needed: str) -> bool:
    """Whether a key holding ``held`` may use a method that needs ``needed``."""
    return needed in held or ADMIN_SCOPE in held


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The slice of the matrix that applies to one server: method → allowed callers."""

    server: str
    rules: Mapping[str, frozenset[str]]
    # SHA-256 of the service key of each identity that must present one.
    service_keys: Mapping[str, bytes]

    @classmethod
    def for_server(cls, server: str, service_key_digests: Mapping[str, str]) -> AccessPolicy:
        """The policy of ``server``, from the contracts' declarations, checking service
        keys against ``service_key_digests`` (identity -> hex SHA-256, from gen_certs)."""
        rules = {path: a.allowed_on(server) for path, a in declarations().items()}
        holders = service_key_holders()
        return cls(
            server=server,
            rules={path: who for path, who in rules.items() if who},
            service_keys={
                who: bytes.fromhex(digest)
                for who, digest in service_key_digests.items()
                if who in holders
            },
        )

    def check(self, caller: str | None, method: str, service_key: str | None = None) -> None:
        """Raise unless ``caller``, presenting ``service_key``, may call ``method`` here."""
        if not caller:
            raise Unauthenticated("NO_PEER_IDENTITY", "a client certificate is required")
        if method.startswith(OPEN_TO_MESH):
            return
        if caller not in self.rules.get(method, ()):
            raise PermissionDenied(
                "ACCESS_DENIED",
                f"{caller} may not call {method} on {self.server}",
                metadata={"caller": caller, "method": method, "server": self.server},
            )
        if caller in service_key_holders():
            expected = self.service_keys.get(caller)
            presented = hashlib.sha256((service_key or "").encode()).digest()
            if expected is None or not hmac.compare_digest(presented, expected):
                raise Unauthenticated(
                    "SERVICE_KEY_INVALID",
                    f"{caller}'s calls must carry its service key ({SERVICE_KEY_HEADER})",
                    metadata={"caller": caller},
                )
