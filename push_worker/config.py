"""Configuration of the push worker, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from notify_kit.amqp import Topology
from notify_kit.settings import (
    CommonSettings,
    SettingsError,
    env_float,
    env_str,
    postgres_dsn,
)
from notify_kit.worker import worker_fields_from_env

SERVICE = "push_worker"
DEFAULT_PORT = 50055
DEFAULT_FCM_URL = "https://fcm.googleapis.com/v1/projects/{0}/messages:send"


@dataclass(frozen=True, slots=True)
class FcmConfig:
    """Which Firebase project to send through, and how (the URL is for local peers)."""

    credentials: Path
    url: str = DEFAULT_FCM_URL
    timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FcmConfig:
        """``NOTIFY_FCM_CREDENTIALS`` (a service-account JSON; required), URL, timeout."""
        credentials = Path(env_str("NOTIFY_FCM_CREDENTIALS", None, env))
        if not credentials.is_file():
            raise SettingsError(f"NOTIFY_FCM_CREDENTIALS: {credentials} is not a file")
        url = env_str("NOTIFY_FCM_URL", DEFAULT_FCM_URL, env)
        if "{0}" not in url:
            raise SettingsError("NOTIFY_FCM_URL must contain {0} where the project id goes")
        return cls(
            credentials=credentials,
            url=url,
            timeout=env_float("NOTIFY_FCM_TIMEOUT", 10.0, env),
        )


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the push worker needs; tests build it directly."""

    common: CommonSettings
    dsn: str
    amqp_url: str
    topology: Topology
    user_svc_addr: str
    template_svc_addr: str
    fcm: FcmConfig
    prefetch: int = 32
    rpc_timeout: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read every ``NOTIFY_*`` variable the worker uses, failing fast on bad ones."""
        return cls(
            common=CommonSettings.from_env(SERVICE, DEFAULT_PORT, env),
            dsn=env_str("NOTIFY_PUSH_WORKER_DSN", postgres_dsn("notify_push", env), env),
            fcm=FcmConfig.from_env(env),
            **worker_fields_from_env(env),
        )
