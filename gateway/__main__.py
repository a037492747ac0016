"""``python -m gateway``: the public NotificationService behind Envoy.

Configured by ``NOTIFY_*`` environment variables (see its ``config.py``).
"""

from gateway.app import App
from gateway.config import Config
from notify_kit import runtime

if __name__ == "__main__":
    runtime.main(Config.from_env, App.start)
