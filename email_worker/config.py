"""Configuration of the e-mail worker, read once from the environment at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from notify_kit.amqp import Topology
from notify_kit.settings import (
    CommonSettings,
    SettingsError,
    env_float,
    env_int,
    env_str,
    postgres_dsn,
)
from notify_kit.worker import worker_fields_from_env

SERVICE = "email_worker"
DEFAULT_PORT = 50054


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where and how to hand mail to the SMTP relay."""

    host: str = "127.0.0.1"
    port: int = 1025
    username: str | None = None
    password: str | None = None
    starttls: bool = False
    timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SmtpConfig:
        """``NOTIFY_SMTP_*``; username and password are optional but go together."""
        source = os.environ if env is None else env
        username = source.get("NOTIFY_SMTP_USERNAME") or None
        password = source.get("NOTIFY_SMTP_PASSWORD") or None
        if (username is None) != (password is None):
            raise SettingsError("NOTIFY_SMTP_USERNAME and NOTIFY_SMTP_PASSWORD go together")
        starttls = env_int("NOTIFY_SMTP_STARTTLS", 0, env)
        if starttls not in (0, 1):
            raise SettingsError(f"NOTIFY_SMTP_STARTTLS must be 0 or 1, got {starttls}")
        return cls(
            host=env_str("NOTIFY_SMTP_HOST", "127.0.0.1", env),
            port=env_int("NOTIFY_SMTP_PORT", 1025, env),
            username=username,
            password=password,
            starttls=bool(starttls),
            timeout=env_float("NOTIFY_SMTP_TIMEOUT", 10.0, env),
        )


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the e-mail worker needs; tests build it directly."""

    common: CommonSettings
    dsn: str
    amqp_url: str
    topology: Topology
    user_svc_addr: str
    template_svc_addr: str
    smtp: SmtpConfig
    mail_from: str = "notify <no-reply@notify.localhost>"
    prefetch: int = 32
    rpc_timeout: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read every ``NOTIFY_*`` variable the worker uses, failing fast on bad ones."""
        return cls(
            common=CommonSettings.from_env(SERVICE, DEFAULT_PORT, env),
            dsn=env_str("NOTIFY_EMAIL_WORKER_DSN", postgres_dsn("notify_email", env), env),
            smtp=SmtpConfig.from_env(env),
            mail_from=env_str("NOTIFY_EMAIL_FROM", "notify <no-reply@notify.localhost>", env),
            **worker_fields_from_env(env),
        )
