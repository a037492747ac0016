"""Gateway configuration, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from notify_kit.amqp import Topology
from notify_kit.settings import (
    CommonSettings,
    env_float,
    env_int,
    env_optional,
    env_str,
    postgres_dsn,
)


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the gateway needs; see docs/ARCHITECTURE.md for the variables."""

    common: CommonSettings
    dsn: str
    redis_url: str
    amqp_url: str
    topology: Topology
    user_svc_addr: str
    template_svc_addr: str
    # A key created (or kept) at start-up with every scope: how a fresh install gets its
    # first admin key. Empty: none.
    bootstrap_api_key: str = ""
    idempotency_ttl: int = 24 * 3600
    upstream_timeout: float = 5.0
    publish_timeout: float = 5.0
    auth_cache_ttl: float = 30.0
    template_cache_ttl: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read ``NOTIFY_*`` variables; fail fast on malformed ones."""
        return cls(
            common=CommonSettings.from_env("gateway", 50051, env),
            dsn=env_str("NOTIFY_GATEWAY_DSN", postgres_dsn("notify_gateway", env), env),
            redis_url=env_str("NOTIFY_REDIS_URL", "redis://127.0.0.1:6379/0", env),
            amqp_url=env_str("NOTIFY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/", env),
            topology=Topology.from_env(env),
            user_svc_addr=env_str("NOTIFY_USER_SVC_ADDR", "127.0.0.1:50052", env),
            template_svc_addr=env_str("NOTIFY_TEMPLATE_SVC_ADDR", "127.0.0.1:50053", env),
            bootstrap_api_key=env_optional("NOTIFY_BOOTSTRAP_API_KEY", env),
            idempotency_ttl=env_int("NOTIFY_IDEMPOTENCY_TTL", 24 * 3600, env),
            upstream_timeout=env_float("NOTIFY_UPSTREAM_TIMEOUT", 5.0, env),
            publish_timeout=env_float("NOTIFY_PUBLISH_TIMEOUT", 5.0, env),
        )
