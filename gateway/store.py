"""The gateway's own data: API keys (hashed) and tenant settings, in PostgreSQL.

A key's secret is never stored: the row keeps its SHA-256, and a call's key is found by
the digest of what it presents (a unique index), so no secret is ever compared byte by
byte and the database never holds one. After a rotation the row also keeps the previous
secret's digest until its grace period ends. A key works while it is neither revoked nor
past its expiry. A key's lookup brings its tenant's settings along, so what a send
is checked against is cached with the key and costs no query of its own.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from gateway.limits import Rate, Window
from notify_kit.errors import Unavailable
from notify_kit.paging import Cursor
from notify_kit.tenancy import DEFAULT_TENANT

# The secret's shape: a prefix that secret scanners and people recognise, then 256
# random bits.
SECRET_PREFIX = "nfy_"  # noqa: S105 (a public prefix, not a secret)

# A key authenticates with its current secret, or with the previous one during its grace.
_FIND_KEY = """
SELECT k.id, k.name, k.scopes, k.expires_at, k.rate_per_second, k.rate_burst, k.tenant,
       CASE WHEN k.key_hash = $1 THEN NULL ELSE k.previous_expires_at END AS secret_expires_at,
       s.recipient_limits
FROM api_keys k LEFT JOIN tenant_settings s ON s.tenant = k.tenant
WHERE (k.key_hash = $1 OR (k.previous_hash = $1 AND k.previous_expires_at > now()))
  AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
"""
# A revoked key stays revoked: re-running with the same bootstrap key does not revive it.
_INSERT_KEY = """
INSERT INTO api_keys (id, name, key_hash, scopes) VALUES ($1, $2, $3, $4)
ON CONFLICT (key_hash) DO NOTHING
"""
_CREATE = """
INSERT INTO api_keys (id, name, key_hash, scopes, expires_at, rate_per_second, rate_burst,
    tenant)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING id, name, scopes, created_at, expires_at, last_used_at, revoked_at, previous_expires_at,
          rate_per_second, rate_burst, tenant
"""
_GET = """
SELECT id, name, scopes, created_at, expires_at, last_used_at, revoked_at, previous_expires_at,
       rate_per_second, rate_burst, tenant
FROM api_keys WHERE id = $1 AND tenant = $2
"""
_LIST = """
SELECT id, name, scopes, created_at, expires_at, last_used_at, revoked_at, previous_expires_at,
       rate_per_second, rate_burst, tenant
FROM api_keys
WHERE tenant = $5 AND ($1 OR revoked_at IS NULL)
  AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
ORDER BY created_at DESC, id DESC
LIMIT $4
"""
# The current secret becomes the previous one; an older previous secret ends at once.
_ROTATE = """
UPDATE api_keys
SET previous_hash = key_hash, previous_expires_at = now() + $3::interval, key_hash = $2
WHERE id = $1 AND tenant = $4 AND revoked_at IS NULL
RETURNING id, name, scopes, created_at, expires_at, last_used_at, revoked_at, previous_expires_at,
          rate_per_second, rate_burst, tenant
"""
_REVOKE = """
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 AND tenant = $2
RETURNING id, name, scopes, created_at, expires_at, last_used_at, revoked_at, previous_expires_at,
          rate_per_second, rate_burst, tenant
"""
_GET_SETTINGS = "SELECT recipient_limits, updated_at FROM tenant_settings WHERE tenant = $1"
_PUT_SETTINGS = """
INSERT INTO tenant_settings (tenant, recipient_limits) VALUES ($1, $2)
ON CONFLICT (tenant) DO UPDATE SET recipient_limits = $2, updated_at = now()
RETURNING recipient_limits, updated_at
"""
_TOUCH = """
UPDATE api_keys SET last_used_at = now()
WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
"""


def hash_key(raw: str) -> bytes:
    """SHA-256 of the raw key: what is stored and looked up."""
    return hashlib.sha256(raw.encode()).digest()


def new_secret() -> str:
    """A fresh secret: the prefix and 43 URL-safe characters (256 bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An authenticated caller."""

    id: str
    name: str
    scopes: frozenset[str]
    # The secret it presented stops working then (key expiry, or a rotated secret's grace).
    valid_until: datetime | None = None
    # Its own rate limit; None: the gateway's default for keys.
    rate: Rate | None = None
    # The tenant it acts for.
    tenant: str = DEFAULT_TENANT
    # The tenant's own recipient limits by channel kind (limit 0: none on that channel);
    # the channels it does not name have the gateway's defaults.
    recipient_limits: Mapping[str, Window] = field(default_factory=dict)


class KeyStore:
    """API keys in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 2.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def find(self, raw: str) -> ApiKey | None:
        """The working key whose secret is ``raw``; ``Unavailable`` if the DB is not."""
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                row = await conn.fetchrow(_FIND_KEY, hash_key(raw), timeout=self._timeout)
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            raise Unavailable("AUTH_STORE_UNAVAILABLE", "cannot check API keys now") from exc
        if row is None:
            return None
        ends = [t for t in (row["expires_at"], row["secret_expires_at"]) if t is not None]
        own = row["rate_per_second"]
        return ApiKey(
            id=str(row["id"]),
            name=row["name"],
            scopes=frozenset(row["scopes"]),
            valid_until=min(ends) if ends else None,
            rate=Rate(own, row["rate_burst"]) if own is not None else None,
            tenant=row["tenant"],
            recipient_limits=windows(row["recipient_limits"]),
        )

    async def ensure(self, raw: str, name: str, scopes: frozenset[str]) -> None:
        """Create a key with ``scopes`` unless it exists (revoked or not)."""
        await self._pool.execute(
            _INSERT_KEY, uuid.uuid4(), name, hash_key(raw), sorted(scopes), timeout=self._timeout
        )

    async def create(
        self,
        name: str,
        scopes: frozenset[str],
        expires_at: datetime | None,
        rate: Rate | None,
        tenant: str,
    ) -> tuple[Any, str]:
        """A new key's row and its secret (the only time the secret exists outside a call)."""
        secret = new_secret()
        row = await self._pool.fetchrow(
            _CREATE,
            uuid.uuid4(),
            name,
            hash_key(secret),
            sorted(scopes),
            expires_at,
            rate.per_second if rate else None,
            rate.burst if rate else None,
            tenant,
            timeout=self._timeout,
        )
        return row, secret

    async def get(self, ident: uuid.UUID, tenant: str) -> Any | None:
        """One of ``tenant``'s keys, revoked or not."""
        return await self._pool.fetchrow(_GET, ident, tenant, timeout=self._timeout)

    async def page(
        self, tenant: str, show_revoked: bool, after: Cursor | None, limit: int
    ) -> list[Any]:
        """``tenant``'s keys newest first, strictly after ``after``."""
        return list(
            await self._pool.fetch(
                _LIST,
                show_revoked,
                after.created_at if after else None,
                after.id if after else None,
                limit,
                tenant,
                timeout=self._timeout,
            )
        )

    async def rotate(
        self, ident: uuid.UUID, tenant: str, grace: timedelta
    ) -> tuple[Any, str] | None:
        """The key's row with a new secret, and the secret; None if no working key of
        ``tenant`` has the id."""
        secret = new_secret()
        row = await self._pool.fetchrow(
            _ROTATE, ident, hash_key(secret), grace, tenant, timeout=self._timeout
        )
        return (row, secret) if row is not None else None

    async def revoke(self, ident: uuid.UUID, tenant: str) -> Any | None:
        """The key's row, revoked (now, or when it first was); None if ``tenant`` has no
        such key."""
        return await self._pool.fetchrow(_REVOKE, ident, tenant, timeout=self._timeout)

    async def touch(self, ident: str) -> None:
        """Record that the key authenticated a call (one write a minute at most)."""
        await self._pool.execute(_TOUCH, uuid.UUID(ident), timeout=self._timeout)


@dataclass(frozen=True, slots=True)
class TenantSettings:
    """A tenant's stored settings."""

    recipient_limits: Mapping[str, Window]
    updated_at: datetime | None = None  # None: never set, the defaults apply


def windows(stored: str | None) -> dict[str, Window]:
    """Recipient limits as the ``recipient_limits`` column holds them (JSON text)."""
    if stored is None:
        return {}
    return {
        kind: Window(int(w["limit"]), float(w["seconds"])) for kind, w in json.loads(stored).items()
    }


class TenantStore:
    """Tenant settings in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 2.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def get(self, tenant: str) -> TenantSettings:
        """The tenant's settings (none stored: no limits of its own)."""
        row = await self._pool.fetchrow(_GET_SETTINGS, tenant, timeout=self._timeout)
        if row is None:
            return TenantSettings({})
        return TenantSettings(windows(row["recipient_limits"]), row["updated_at"])

    async def put(self, tenant: str, recipient_limits: Mapping[str, Window]) -> TenantSettings:
        """Replace the tenant's settings."""
        stored = json.dumps(
            {k: {"limit": w.limit, "seconds": w.seconds} for k, w in recipient_limits.items()}
        )
        row = await self._pool.fetchrow(_PUT_SETTINGS, tenant, stored, timeout=self._timeout)
        return TenantSettings(windows(row["recipient_limits"]), row["updated_at"])
