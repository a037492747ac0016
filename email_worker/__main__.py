"""``python -m email_worker``: consumes email.queue and sends over SMTP (or SendGrid).

Configured by ``NOTIFY_*`` environment variables (see its ``config.py``).
"""

from email_worker.app import start
from email_worker.config import Config
from notify_kit import runtime

if __name__ == "__main__":
    runtime.main(Config.from_env, start)
