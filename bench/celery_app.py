"""The baseline a team would otherwise write: a Celery 5 task that renders and sends.

Bench-only (``pip install '.[bench]'``). One task per e-mail: render the demo template's
e-mail parts with Jinja2's sandbox (compiled once), build the message, send it over a
kept SMTP connection (one per worker thread). ``acks_late`` so a crash redelivers, like
ours; no tracking, no dedupe, no retries policy, no status: what "render + send" costs
with nothing around it.

Configured from the environment so the benchmark can point it at its sink and queue:
``BENCH_AMQP_URL``, ``BENCH_QUEUE``, ``BENCH_SMTP_PORT``; ``python -m bench.celery_app``
runs the worker.
"""

from __future__ import annotations

import os
import smtplib
import threading
from email.message import EmailMessage
from typing import Any

from celery import Celery
from jinja2.sandbox import SandboxedEnvironment

from scripts.api import DEMO_TEMPLATE


def create_app() -> Celery:
    """The Celery app, its task and its settings (called by ``celery -A``)."""
    app = Celery("bench", broker=os.environ.get("BENCH_AMQP_URL", "amqp://guest@127.0.0.1//"))
    queue = os.environ.get("BENCH_QUEUE", "bench.celery")
    app.conf.update(
        task_acks_late=True,
        task_default_queue=queue,
        worker_prefetch_multiplier=4,
        task_serializer="json",
        broker_connection_retry_on_startup=True,
    )
    email = DEMO_TEMPLATE["contents"][0]["email"]
    env = SandboxedEnvironment(autoescape=False)
    html_env = SandboxedEnvironment(autoescape=True)
    subject, text = env.from_string(email["subject"]), env.from_string(email["textBody"])
    html = html_env.from_string(email["htmlBody"])
    port = int(os.environ.get("BENCH_SMTP_PORT", "25"))
    local = threading.local()

    def connection() -> smtplib.SMTP:
        smtp: smtplib.SMTP | None = getattr(local, "smtp", None)
        if smtp is None:
            smtp = local.smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
        return smtp

    @app.task(name="deliver")  # type: ignore[untyped-decorator,unused-ignore]
    def deliver(to: str, variables: dict[str, Any]) -> None:
        message = EmailMessage()
        message["From"] = "notify <noreply@example.com>"
        message["To"] = to
        message["Subject"] = subject.render(variables)
        message.set_content(text.render(variables))
        message.add_alternative(html.render(variables), subtype="html")
        connection().send_message(message)

    return app


def main() -> None:
    """``python -m bench.celery_app``: a threads-pool worker (16 threads) on the queue."""
    create_app().worker_main(
        [
            *("worker", "-P", "threads", "-c", "16", "-l", "WARNING"),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        ]
    )


if __name__ == "__main__":
    main()
