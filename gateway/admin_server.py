"""AdminService: API keys made, listed, rotated and revoked through the API, not SQL.

A key's secret exists outside a call only in the answer that creates or rotates it; the
store keeps its digest (``gateway.store``). What a revocation or a rotation changes is
refused by every gateway within its key cache's lifetime (``gateway.auth``, 2 s). Scopes
travel as the contract's ``Scope`` enum and are stored under their declared names, so
a key's row reads the same as the errors and docs/SECURITY.md.

Tenant settings (recipient limits) reach the gateways with the keys that read them, so
a change applies within the same key cache lifetime.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2
from notify.v1 import access_pb2, admin_service_pb2, admin_service_pb2_grpc

from gateway.auth import current_api_key
from gateway.limits import Rate, Window, in_force
from gateway.server import CHANNEL_OF_KIND, KIND_OF_CHANNEL
from gateway.store import KeyStore, TenantSettings, TenantStore
from notify_kit import acl
from notify_kit.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from notify_kit.paging import Cursor, decode_page_token, encode_page_token
from notify_kit.tenancy import DEFAULT_TENANT
from notify_kit.timestamps import to_timestamp

pb = admin_service_pb2
DEFAULT_PAGE = 50
DEFAULT_GRACE = timedelta(hours=24)


def to_message(row: Mapping[str, Any]) -> admin_service_pb2.ApiKey:
    """A key's row as the API shows it (a scope name no longer declared is left out)."""
    numbers = {name: access_pb2.Scope.ValueType(n) for n, name in acl.scope_names().items()}
    return pb.ApiKey(
        id=str(row["id"]),
        name=row["name"],
        scopes=[numbers[s] for s in row["scopes"] if s in numbers],
        create_time=to_timestamp(row["created_at"]),
        expire_time=to_timestamp(row["expires_at"]),
        last_used_time=to_timestamp(row["last_used_at"]),
        revoke_time=to_timestamp(row["revoked_at"]),
        previous_secret_expire_time=to_timestamp(row["previous_expires_at"]),
        tenant=row["tenant"],
        rate_limit=(
            pb.RateLimit(requests_per_second=row["rate_per_second"], burst=row["rate_burst"])
            if row["rate_per_second"] is not None
            else None
        ),
    )


def _key_id(value: str) -> uuid.UUID:
    """The id as a UUID: its format is the contract's rule, checked before the handler."""
    return uuid.UUID(value)


def _not_found() -> NotFound:
    return NotFound("API_KEY_NOT_FOUND", "no such API key")


def _acting_for(tenant: str, doing: str) -> str:
    """``tenant`` (empty: the caller's own) if the caller's key may act for it: its own
    tenant, or any for the default tenant's (the operators') admin keys."""
    caller = current_api_key().tenant
    tenant = tenant or caller
    if caller not in (tenant, DEFAULT_TENANT):
        raise PermissionDenied(
            "TENANT_NOT_YOURS",
            f"only an admin key of the default tenant {doing} for other tenants",
            metadata={"tenant": tenant},
        )
    return tenant


def _limit_messages(limits: Mapping[str, Window]) -> list[admin_service_pb2.RecipientLimit]:
    messages = []
    for kind, window in sorted(limits.items()):
        span = duration_pb2.Duration()
        span.FromTimedelta(timedelta(seconds=window.seconds))
        messages.append(
            pb.RecipientLimit(
                channel=CHANNEL_OF_KIND[kind], max_notifications=window.limit, window=span
            )
        )
    return messages


def _limit_windows(limits: Sequence[admin_service_pb2.RecipientLimit]) -> dict[str, Window]:
    """The limits by channel kind; a channel named twice is refused (the field's bounds
    are the contract's, checked before the handler)."""
    windows: dict[str, Window] = {}
    for i, limit in enumerate(limits):
        kind = KIND_OF_CHANNEL[limit.channel]
        if kind in windows:
            raise InvalidArgument(
                "INVALID_REQUEST",
                "one recipient limit per channel",
                field_violations=[(f"settings.recipient_limits[{i}].channel", "named twice")],
            )
        windows[kind] = Window(limit.max_notifications, limit.window.ToTimedelta().total_seconds())
    return windows


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """Create, list, get, rotate and revoke API keys, and set tenants' recipient limits
    (scope ``admin``)."""

    def __init__(
        self,
        keys: KeyStore,
        tenants: TenantStore,
        recipient_defaults: Mapping[str, Window] | None = None,
    ) -> None:
        self._keys = keys
        self._tenants = tenants
        self._recipient_defaults = dict(recipient_defaults or {})

    async def CreateApiKey(  # noqa: N802 (gRPC method name)
        self, request: admin_service_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_service_pb2.CreateApiKeyResponse:
        """A new key; its secret is in this answer and nowhere else."""
        names = acl.scope_names()  # the contract checked that every scope is declared
        tenant = _acting_for(request.tenant, "makes keys")
        expires = request.expire_time.ToDatetime(UTC) if request.HasField("expire_time") else None
        limit = request.rate_limit
        rate = (
            Rate(limit.requests_per_second, limit.burst) if request.HasField("rate_limit") else None
        )
        row, secret = await self._keys.create(
            request.name, frozenset(names[s] for s in request.scopes), expires, rate, tenant
        )
        return pb.CreateApiKeyResponse(api_key=to_message(row), secret=secret)

    async def ListApiKeys(  # noqa: N802 (gRPC method name)
        self, request: admin_service_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_service_pb2.ListApiKeysResponse:
        """A page, newest first, with a keyset page token."""
        size = request.page_size or DEFAULT_PAGE  # 0..500 by the contract
        after = decode_page_token(request.page_token) if request.page_token else None
        rows = await self._keys.page(
            current_api_key().tenant, request.show_revoked, after, size + 1
        )
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(Cursor(page[-1]["created_at"], page[-1]["id"])) if more else ""
        return pb.ListApiKeysResponse(api_keys=[to_message(r) for r in page], next_page_token=token)

    async def GetApiKey(  # noqa: N802 (gRPC method name)
        self, request: admin_service_pb2.GetApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_service_pb2.GetApiKeyResponse:
        """One key, revoked or not."""
        row = await self._keys.get(_key_id(request.id), current_api_key().tenant)
        if row is None:
            raise _not_found()
        return pb.GetApiKeyResponse(api_key=to_message(row))

    async def RotateApiKey(  # noqa: N802 (gRPC method name)
        self, request: admin_service_pb2.RotateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_service_pb2.RotateApiKeyResponse:
        """A new secret; the previous one works until the grace period ends."""
        grace = (
            request.grace_period.ToTimedelta()
            if request.HasField("grace_period")
            else DEFAULT_GRACE
        )
        ident, tenant = _key_id(request.id), current_api_key().tenant
        rotated = await self._keys.rotate(ident, tenant, grace)
        if rotated is None:
            if await self._keys.get(ident, tenant) is None:
                raise _not_found()
            raise FailedPrecondition(
                "API_KEY_REVOKED", "a revoked key cannot be rotated; create a new one"
            )
        row, secret = rotated
        return pb.RotateApiKeyResponse(api_key=to_message(row), secret=secret)

    async def RevokeApiKey(  # noqa: N802 (gRPC method name)
        self, request: admin_service_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_service_pb2.RevokeApiKeyResponse:
        """Revoked for good (again is a no-op that answers the first revocation)."""
        row = await self._keys.revoke(_key_id(request.id), current_api_key().tenant)
        if row is None:
            raise _not_found()
        return pb.RevokeApiKeyResponse(api_key=to_message(row))

    async def GetTenantSettings(  # noqa: N802 (gRPC method name)
        self,
        request: admin_service_pb2.GetTenantSettingsRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_service_pb2.GetTenantSettingsResponse:
        """The tenant's own limits and the ones in force."""
        tenant = _acting_for(request.tenant, "reads settings")
        stored = await self._tenants.get(tenant)
        return pb.GetTenantSettingsResponse(settings=self._settings_message(tenant, stored))

    async def UpdateTenantSettings(  # noqa: N802 (gRPC method name)
        self,
        request: admin_service_pb2.UpdateTenantSettingsRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_service_pb2.UpdateTenantSettingsResponse:
        """Replace the tenant's settings; every gateway applies them within its key
        cache's lifetime."""
        tenant = _acting_for(request.settings.tenant, "changes settings")
        stored = await self._tenants.put(tenant, _limit_windows(request.settings.recipient_limits))
        return pb.UpdateTenantSettingsResponse(settings=self._settings_message(tenant, stored))

    def _settings_message(
        self, tenant: str, stored: TenantSettings
    ) -> admin_service_pb2.TenantSettings:
        return pb.TenantSettings(
            tenant=tenant,
            recipient_limits=_limit_messages(stored.recipient_limits),
            effective_recipient_limits=_limit_messages(
                in_force(self._recipient_defaults, stored.recipient_limits)
            ),
            update_time=to_timestamp(stored.updated_at),
        )
