"""The gateway's own data: API keys (hashed), in PostgreSQL."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import asyncpg

from notify_kit.errors import Unavailable

_FIND_KEY = """
SELECT id, name, scopes FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL
"""
# A revoked key stays revoked: re-running with the same bootstrap key does not revive it.
_INSERT_KEY = """
INSERT INTO api_keys (id, name, key_hash, scopes) VALUES ($1, $2, $3, $4)
ON CONFLICT (key_hash) DO NOTHING
"""


def hash_key(raw: str) -> bytes:
    """SHA-256 of the raw key: what is stored and looked up."""
    return hashlib.sha256(raw.encode()).digest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An authenticated caller."""

    id: str
    name: str
    scopes: frozenset[str]


class KeyStore:
    """API keys in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 2.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def find(self, raw: str) -> ApiKey | None:
        """The active key whose hash matches ``raw``; ``Unavailable`` if the DB is not."""
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                row = await conn.fetchrow(_FIND_KEY, hash_key(raw), timeout=self._timeout)
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            raise Unavailable("AUTH_STORE_UNAVAILABLE", "cannot check API keys now") from exc
        if row is None:
            return None
        return ApiKey(id=str(row["id"]), name=row["name"], scopes=frozenset(row["scopes"]))

    async def ensure(self, raw: str, name: str, scopes: frozenset[str]) -> None:
        """Create a key with ``scopes`` unless it exists (revoked or not)."""
        await self._pool.execute(
            _INSERT_KEY, uuid.uuid4(), name, hash_key(raw), sorted(scopes), timeout=self._timeout
        )
