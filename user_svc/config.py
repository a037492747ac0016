"""Configuration of user_svc, read once from the environment by ``__main__``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from notify_kit.settings import CommonSettings, SettingsError, env_int, env_str, postgres_dsn

SERVICE = "user_svc"
DEFAULT_PORT = 50052


@dataclass(frozen=True, slots=True)
class Config:
    """Everything user_svc needs to start; tests build it directly.

    ``profile_cache_ttl`` bounds how long a delivery profile may be served from Redis;
    changes invalidate it at once, so the TTL only limits staleness after a Redis
    outage swallowed an invalidation.
    """

    common: CommonSettings
    dsn: str
    redis_url: str
    profile_cache_ttl: int = 300

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read ``NOTIFY_USER_SVC_*``, ``NOTIFY_REDIS_URL`` and ``NOTIFY_PROFILE_CACHE_TTL``."""
        ttl = env_int("NOTIFY_PROFILE_CACHE_TTL", 300, env)
        if ttl <= 0:
            raise SettingsError("environment variable NOTIFY_PROFILE_CACHE_TTL must be positive")
        return cls(
            common=CommonSettings.from_env(SERVICE, DEFAULT_PORT, env),
            dsn=env_str("NOTIFY_USER_SVC_DSN", postgres_dsn("notify_user", env), env),
            redis_url=env_str("NOTIFY_REDIS_URL", "redis://127.0.0.1:6379/0", env),
            profile_cache_ttl=ttl,
        )
