"""Configuration of the push worker, read once from the environment at start-up.

Providers are tried in the order of ``NOTIFY_PUSH_PROVIDERS`` (default
``fcm,onesignal``); a provider without its settings is simply not configured (FCM needs
``NOTIFY_FCM_CREDENTIALS``, OneSignal ``NOTIFY_ONESIGNAL_APP_ID`` and ``_API_KEY``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from notify_kit.breaker import BreakerSettings
from notify_kit.jobs.settings import WorkerSettings, breaker_from_env, provider_order
from notify_kit.settings import (
    CommonSettings,
    SettingsError,
    env_float,
    env_str,
    postgres_dsn,
)

SERVICE = "push_worker"
DEFAULT_PORT = 50055
DEFAULT_FCM_URL = "https://fcm.googleapis.com/v1/projects/{0}/messages:send"
DEFAULT_ONESIGNAL_URL = "https://api.onesignal.com"
PROVIDERS = ("fcm", "onesignal")


@dataclass(frozen=True, slots=True)
class FcmConfig:
    """Which Firebase project to send through, and how (the URL is for local peers)."""

    credentials: Path
    url: str = DEFAULT_FCM_URL
    timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FcmConfig | None:
        """``NOTIFY_FCM_CREDENTIALS`` (a service-account JSON; None when unset), URL, timeout."""
        source = os.environ if env is None else env
        if not source.get("NOTIFY_FCM_CREDENTIALS"):
            return None
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
class OneSignalConfig:
    """OneSignal's REST API: the app, its REST API key, the base URL (for local peers)."""

    app_id: str
    api_key: str
    url: str = DEFAULT_ONESIGNAL_URL
    timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OneSignalConfig | None:
        """``NOTIFY_ONESIGNAL_APP_ID`` and ``_API_KEY`` (None when unset), ``_URL``."""
        source = os.environ if env is None else env
        app_id = source.get("NOTIFY_ONESIGNAL_APP_ID") or None
        key = source.get("NOTIFY_ONESIGNAL_API_KEY") or None
        if app_id is None and key is None:
            return None
        if app_id is None or key is None:
            raise SettingsError("NOTIFY_ONESIGNAL_APP_ID and NOTIFY_ONESIGNAL_API_KEY go together")
        return cls(
            app_id=app_id,
            api_key=key,
            url=env_str("NOTIFY_ONESIGNAL_URL", DEFAULT_ONESIGNAL_URL, env),
            timeout=env_float("NOTIFY_ONESIGNAL_TIMEOUT", 10.0, env),
        )


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the push worker needs; tests build it directly."""

    common: CommonSettings
    dsn: str
    worker: WorkerSettings
    fcm: FcmConfig | None = None
    onesignal: OneSignalConfig | None = None
    providers: tuple[str, ...] = ("fcm",)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read every ``NOTIFY_*`` variable the worker uses, failing fast on bad ones."""
        fcm, onesignal = FcmConfig.from_env(env), OneSignalConfig.from_env(env)
        configured = {n for n, c in (("fcm", fcm), ("onesignal", onesignal)) if c is not None}
        return cls(
            common=CommonSettings.from_env(SERVICE, DEFAULT_PORT, env),
            dsn=env_str("NOTIFY_PUSH_WORKER_DSN", postgres_dsn("notify_push", env), env),
            worker=WorkerSettings.from_env(env),
            fcm=fcm,
            onesignal=onesignal,
            providers=provider_order("NOTIFY_PUSH_PROVIDERS", PROVIDERS, configured, env),
            breaker=breaker_from_env(env),
        )
