"""Run the template service: ``python -m template_svc``."""

from __future__ import annotations

from notify_kit import runtime
from notify_kit.logs import setup_logging
from notify_kit.telemetry import setup_tracing
from template_svc.app import App
from template_svc.config import SERVICE, Config


def main() -> None:
    """Read the config, set up logs and traces, serve until SIGTERM."""
    config = Config.from_env()
    setup_logging(SERVICE, config.common.log_level)
    setup_tracing(SERVICE)
    runtime.run(lambda: runtime.serve_until_signal(App.start(config)))


if __name__ == "__main__":
    main()
