"""The gateway's own data: API keys (hashed), in PostgreSQL."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import asyncpg

_FIND_KEY = """
SELECT id, name, scopes FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL
"""
_UPSERT_KEY = """
INSERT INTO api_keys (id, name, key_hash, scopes) VALUES ($1, $2, $3, $4)
ON CONFLICT (key_hash) DO UPDATE SET scopes = EXCLUDED.scopes, revoked_at = NULL
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
        """The active key whose hash matches ``raw``."""
        row = await self._pool.fetchrow(_FIND_KEY, hash_key(raw), timeout=self._timeout)
        if row is None:
            return None
        return ApiKey(id=str(row["id"]), name=row["name"], scopes=frozenset(row["scopes"]))

    async def ensure(self, raw: str, name: str, scopes: frozenset[str]) -> None:
        """Create (or re-activate) a key with exactly ``scopes``."""
        await self._pool.execute(
            _UPSERT_KEY, uuid.uuid4(), name, hash_key(raw), sorted(scopes), timeout=self._timeout
        )
