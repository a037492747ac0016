"""Configuration of the template service, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from notify_kit.settings import (
    CommonSettings,
    SettingsError,
    env_float,
    env_int,
    env_str,
    postgres_dsn,
)

SERVICE = "template_svc"
DEFAULT_PORT = 50053


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the template service needs; fails fast on a bad variable."""

    common: CommonSettings
    # NOTIFY_TEMPLATE_SVC_DSN: the service's own database (created at start if missing).
    dsn: str
    # NOTIFY_RENDER_TIMEOUT: seconds one rendering (or one field's test render) may take.
    render_timeout: float = 2.0
    # NOTIFY_RENDER_MAX_BYTES: cap on what one rendering produces, all fields together.
    render_max_bytes: int = 256 * 1024
    # NOTIFY_RENDER_PROCESSES: render processes, each rendering one template at a time.
    render_processes: int = 2
    # NOTIFY_RENDER_MEMORY_MB: address-space limit of each render process (an idle one
    # maps about 55 MB); a template that needs more fails with RENDER_OUT_OF_MEMORY.
    render_memory_mb: int = 192

    def __post_init__(self) -> None:
        if self.render_timeout <= 0:
            raise SettingsError("NOTIFY_RENDER_TIMEOUT must be positive")
        if self.render_max_bytes <= 0:
            raise SettingsError("NOTIFY_RENDER_MAX_BYTES must be positive")
        if self.render_processes <= 0:
            raise SettingsError("NOTIFY_RENDER_PROCESSES must be positive")
        if self.render_memory_mb < 96:
            raise SettingsError("NOTIFY_RENDER_MEMORY_MB must be at least 96")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read ``NOTIFY_TEMPLATE_SVC_*``, ``NOTIFY_RENDER_*`` and the shared settings."""
        return cls(
            common=CommonSettings.from_env(SERVICE, DEFAULT_PORT, env),
            dsn=env_str("NOTIFY_TEMPLATE_SVC_DSN", postgres_dsn("notify_template", env), env),
            render_timeout=env_float("NOTIFY_RENDER_TIMEOUT", 2.0, env),
            render_max_bytes=env_int("NOTIFY_RENDER_MAX_BYTES", 256 * 1024, env),
            render_processes=env_int("NOTIFY_RENDER_PROCESSES", 2, env),
            render_memory_mb=env_int("NOTIFY_RENDER_MEMORY_MB", 192, env),
        )
