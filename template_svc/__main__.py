"""``python -m template_svc``: TemplateService (templates, versions, rendering).

Configured by ``NOTIFY_*`` environment variables (see its ``config.py``).
"""

from notify_kit import runtime
from template_svc.app import App
from template_svc.config import Config

if __name__ == "__main__":
    runtime.main(Config.from_env, App.start)
