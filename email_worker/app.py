"""Wiring of the e-mail worker: its providers in failover order, on the shared worker app."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from email_worker.config import Config
from email_worker.consumer import EmailJobHandler
from email_worker.outgoing import OutgoingEmail
from email_worker.sender import SmtpProvider
from email_worker.sendgrid import SendGridProvider
from notify_kit.jobs.app import Upstreams, WorkerApp
from notify_kit.jobs.providers import Provider, ProviderChain

EmailProvider = Provider[OutgoingEmail, str]


def build_providers(config: Config) -> list[EmailProvider]:
    """The configured providers, in ``config.providers`` order."""
    providers: list[EmailProvider] = []
    for name in config.providers:
        if name == "smtp":
            providers.append(SmtpProvider(config.smtp))
        elif name == "sendgrid" and config.sendgrid is not None:
            sg = config.sendgrid
            providers.append(
                SendGridProvider(api_key=sg.api_key, base_url=sg.url, timeout=sg.timeout)
            )
    return providers


async def start(config: Config, *, providers: Sequence[EmailProvider] | None = None) -> WorkerApp:
    """Start consuming ``email.queue``; ``providers`` replace the configured ones (tests)."""

    async def build(upstreams: Upstreams, stack: contextlib.AsyncExitStack) -> EmailJobHandler:
        chain = ProviderChain("email", list(providers or build_providers(config)), config.breaker)
        stack.push_async_callback(chain.close)
        return EmailJobHandler(
            upstreams.templates,
            chain,
            mail_from=config.mail_from,
        )

    return await WorkerApp.start(config.common, config.dsn, config.worker, build)
