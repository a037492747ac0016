"""Configuration of the e-mail worker, read once from the environment at start-up.

Providers are tried in the order of ``NOTIFY_EMAIL_PROVIDERS`` (default
``smtp,sendgrid``); a provider without its settings is simply not configured (SendGrid
needs ``NOTIFY_SENDGRID_API_KEY``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from email_worker.sender import SmtpSettings
from notify_kit.breaker import BreakerSettings
from notify_kit.jobs.settings import WorkerSettings, breaker_from_env, provider_order
from notify_kit.settings import (
    CommonSettings,
    SettingsError,
    env_float,
    env_int,
    env_str,
    postgres_dsn,
)

SERVICE = "email_worker"
DEFAULT_PORT = 50054
PROVIDERS = ("smtp", "sendgrid")
DEFAULT_SENDGRID_URL = "https://api.sendgrid.com"


def smtp_from_env(env: Mapping[str, str] | None = None) -> SmtpSettings:
    """``NOTIFY_SMTP_*``; username and password are optional but go together."""
    source = os.environ if env is None else env
    username = source.get("NOTIFY_SMTP_USERNAME") or None
    password = source.get("NOTIFY_SMTP_PASSWORD") or None
    if (username is None) != (password is None):
        raise SettingsError("NOTIFY_SMTP_USERNAME and NOTIFY_SMTP_PASSWORD go together")
    starttls = env_int("NOTIFY_SMTP_STARTTLS", 0, env)
    if starttls not in (0, 1):
        raise SettingsError(f"NOTIFY_SMTP_STARTTLS must be 0 or 1, got {starttls}")
    return SmtpSettings(
        host=env_str("NOTIFY_SMTP_HOST", "127.0.0.1", env),
        port=env_int("NOTIFY_SMTP_PORT", 1025, env),
        username=username,
        password=password,
        starttls=bool(starttls),
        timeout=env_float("NOTIFY_SMTP_TIMEOUT", 10.0, env),
        pool_size=env_int("NOTIFY_SMTP_POOL_SIZE", 4, env),
    )


@dataclass(frozen=True, slots=True)
class SendGridSettings:
    """SendGrid's v3 Mail Send API: the key, and the base URL (for local peers)."""

    api_key: str
    url: str = DEFAULT_SENDGRID_URL
    timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SendGridSettings | None:
        """``NOTIFY_SENDGRID_API_KEY`` (None when unset), ``_URL``, ``_TIMEOUT``."""
        source = os.environ if env is None else env
        key = source.get("NOTIFY_SENDGRID_API_KEY") or None
        if key is None:
            return None
        return cls(
            api_key=key,
            url=env_str("NOTIFY_SENDGRID_URL", DEFAULT_SENDGRID_URL, env),
            timeout=env_float("NOTIFY_SENDGRID_TIMEOUT", 10.0, env),
        )


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the e-mail worker needs; tests build it directly."""

    common: CommonSettings
    dsn: str
    worker: WorkerSettings
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    sendgrid: SendGridSettings | None = None
    providers: tuple[str, ...] = ("smtp",)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    mail_from: str = "notify <no-reply@notify.localhost>"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read every ``NOTIFY_*`` variable the worker uses, failing fast on bad ones."""
        sendgrid = SendGridSettings.from_env(env)
        configured = {"smtp"} | ({"sendgrid"} if sendgrid else set())
        return cls(
            common=CommonSettings.from_env(SERVICE, DEFAULT_PORT, env),
            dsn=env_str("NOTIFY_EMAIL_WORKER_DSN", postgres_dsn("notify_email", env), env),
            worker=WorkerSettings.from_env(env),
            smtp=smtp_from_env(env),
            sendgrid=sendgrid,
            providers=provider_order("NOTIFY_EMAIL_PROVIDERS", PROVIDERS, configured, env),
            breaker=breaker_from_env(env),
            mail_from=env_str("NOTIFY_EMAIL_FROM", "notify <no-reply@notify.localhost>", env),
        )
