"""``python -m email_worker``: read the config, set up logs and tracing, run until SIGTERM."""

from email_worker.app import App
from email_worker.config import SERVICE, Config
from notify_kit import runtime
from notify_kit.logs import setup_logging
from notify_kit.telemetry import setup_tracing


def main() -> None:
    """Read config, set up logs and tracing, serve until SIGTERM."""
    config = Config.from_env()
    setup_logging(SERVICE, config.common.log_level)
    setup_tracing(SERVICE)
    runtime.run(lambda: runtime.serve_until_signal(App.start(config)))


if __name__ == "__main__":
    main()
