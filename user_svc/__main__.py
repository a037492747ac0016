"""``python -m user_svc``: UserService (users, preferences, devices, notification records).

Configured by ``NOTIFY_*`` environment variables (see its ``config.py``).
"""

from notify_kit import runtime
from user_svc.app import App
from user_svc.config import Config

if __name__ == "__main__":
    runtime.main(Config.from_env, App.start)
