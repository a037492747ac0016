"""AdminService: API keys made, listed, rotated and revoked through the API, not SQL.

A key's secret exists outside a call only in the answer that creates or rotates it; the
store keeps its digest (``gateway.store``). What a revocation or a rotation changes is
refused by every gateway within its key cache's lifetime (``gateway.auth``, 2 s). Scopes
travel as the contract's ``Scope`` enum and are stored under their declared names, so
a key's row reads the same as the errors and docs/SECURITY.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, timedelta
from typing import Any

import grpc
from notify.v1 import access_pb2, admin_service_pb2, admin_service_pb2_grpc

from gateway.auth import current_api_key
from gateway.limits import Rate
from gateway.store import KeyStore
from notify_kit import acl
from notify_kit.errors import FailedPrecondition, NotFound, PermissionDenied
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


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """Create, list, get, rotate and revoke API keys (scope ``admin``)."""

    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys

    async def CreateApiKey(  # noqa: N802 (gRPC method name)
        self, request: admin_service_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_service_pb2.CreateApiKeyResponse:
        """A new key; its secret is in this answer and nowhere else."""
        names = acl.scope_names()  # the contract checked that every scope is declared
        caller = current_api_key().tenant
        tenant = request.tenant or caller
        if caller not in (tenant, DEFAULT_TENANT):
            raise PermissionDenied(
                "TENANT_NOT_YOURS",
                "only an admin key of the default tenant makes keys for other tenants",
                metadata={"tenant": tenant},
            )
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
