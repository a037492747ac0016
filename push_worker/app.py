"""Wiring of the push worker: its providers in failover order, on the shared worker app."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from notify_kit.jobs.app import Upstreams, WorkerApp
from notify_kit.jobs.providers import ProviderChain
from push_worker.config import Config
from push_worker.consumer import PushJobHandler, PushProvider, attempt
from push_worker.onesignal import OneSignalProvider
from push_worker.sender import FcmProvider


def build_providers(config: Config) -> list[PushProvider]:
    """The configured providers, in ``config.providers`` order."""
    providers: list[PushProvider] = []
    for name in config.providers:
        if name == "fcm" and config.fcm is not None:
            fcm = config.fcm
            providers.append(FcmProvider(fcm.credentials, url=fcm.url, timeout=fcm.timeout))
        elif name == "onesignal" and config.onesignal is not None:
            os_ = config.onesignal
            providers.append(
                OneSignalProvider(
                    app_id=os_.app_id, api_key=os_.api_key, base_url=os_.url, timeout=os_.timeout
                )
            )
    return providers


async def start(config: Config, *, providers: Sequence[PushProvider] | None = None) -> WorkerApp:
    """Start consuming ``push.queue``; ``providers`` replace the configured ones (tests)."""

    async def build(upstreams: Upstreams, stack: contextlib.AsyncExitStack) -> PushJobHandler:
        chain = ProviderChain(
            "push", list(providers or build_providers(config)), config.breaker, attempt=attempt
        )
        stack.push_async_callback(chain.close)
        return PushJobHandler(
            upstreams.templates, upstreams.users, chain, rpc_timeout=config.worker.rpc_timeout
        )

    return await WorkerApp.start(config.common, config.dsn, config.worker, build)
