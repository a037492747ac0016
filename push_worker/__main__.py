"""``python -m push_worker``: consumes push.queue and sends through FCM (or OneSignal).

Configured by ``NOTIFY_*`` environment variables (see its ``config.py``).
"""

from notify_kit import runtime
from push_worker.app import start
from push_worker.config import Config

if __name__ == "__main__":
    runtime.main(Config.from_env, start)
