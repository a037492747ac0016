"""Tenants across the mesh: which tenant (project) a call acts for.

The gateway learns the tenant from the API key and passes it on to the services that
own tenant-scoped data in the ``x-notify-tenant`` header. Only the gateway may call the
methods that read it (the access matrix), so a service can trust it; a call that
carries none acts for the default tenant (the operators', and every key's before
tenants existed).
"""

from __future__ import annotations

import grpc

from notify_kit.interceptors import metadata_value

TENANT_HEADER = "x-notify-tenant"
DEFAULT_TENANT = "default"


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The tenant the current call acts for."""
    return metadata_value(context, TENANT_HEADER) or DEFAULT_TENANT


def tenant_metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that makes an upstream act for ``tenant``."""
    return ((TENANT_HEADER, tenant),)
