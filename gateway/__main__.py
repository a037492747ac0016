"""``python -m gateway``: the public NotificationService behind Envoy."""

from gateway.app import App
from gateway.config import Config
from notify_kit.logs import setup_logging
from notify_kit.runtime import run, serve_until_signal
from notify_kit.telemetry import setup_tracing


def main() -> None:
    """Read config, set up logs and tracing, serve until SIGTERM."""
    config = Config.from_env()
    setup_logging(config.common.service, config.common.log_level)
    setup_tracing(config.common.service)
    run(lambda: serve_until_signal(App.start(config)))


if __name__ == "__main__":
    main()
