"""Run user_svc: ``python -m user_svc`` (configuration from ``NOTIFY_*`` variables)."""

from __future__ import annotations

from notify_kit import runtime
from notify_kit.logs import setup_logging
from notify_kit.telemetry import setup_tracing
from user_svc.app import App
from user_svc.config import Config


def main() -> None:
    """Read the configuration once, set up logs and traces, serve until SIGTERM."""
    config = Config.from_env()
    setup_logging(config.common.service, config.common.log_level)
    setup_tracing(config.common.service)
    runtime.run(lambda: runtime.serve_until_signal(App.start(config)))


if __name__ == "__main__":
    main()
