"""Configuration of the template service, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from notify_kit.settings import CommonSettings, env_str, postgres_dsn
from notify_kit.templating.renderer import RenderSettings

SERVICE = "template_svc"
DEFAULT_PORT = 50053


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the template service needs; fails fast on a bad variable."""

    common: CommonSettings
    # NOTIFY_TEMPLATE_SVC_DSN: the service's own database (created at start if missing).
    dsn: str
    # NOTIFY_RENDER_*: the limits of rendering (notify_kit.templating.renderer).
    render: RenderSettings = field(default_factory=RenderSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read ``NOTIFY_TEMPLATE_SVC_*``, ``NOTIFY_RENDER_*`` and the shared settings."""
        return cls(
            common=CommonSettings.from_env(SERVICE, DEFAULT_PORT, env),
            dsn=env_str("NOTIFY_TEMPLATE_SVC_DSN", postgres_dsn("notify_template", env), env),
            render=RenderSettings.from_env(env),
        )
