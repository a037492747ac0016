"""The whole system with its two third-party peers in the calling process.

Tests and the benchmark need to see what arrived at the providers, so the peers (a real
aiosmtpd server, and the FCM v1, SendGrid v3 and OneSignal stand-ins, each channel's
second provider) run in-process while the five services and Envoy run as the same
processes ``make run`` starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aio_pika

from notify_kit import db
from notify_kit.amqp import Topology
from scripts.fcm_fake import FcmFake
from scripts.mailcatcher import MailCatcher
from scripts.onesignal_fake import OneSignalFake
from scripts.sendgrid_fake import SendGridFake
from scripts.system import (
    DATABASES,
    LOCAL_ONESIGNAL_APP,
    LOCAL_ONESIGNAL_KEY,
    LOCAL_SENDGRID_KEY,
    LocalSystem,
    Ports,
    SystemConfig,
)


@dataclass
class Running:
    """Handles on a running system and its peers."""

    system: LocalSystem
    cfg: SystemConfig
    mail: MailCatcher
    fcm: FcmFake
    sendgrid: SendGridFake
    onesignal: OneSignalFake

    @property
    def base(self) -> str:
        """Public HTTP base URL (Envoy)."""
        return f"http://127.0.0.1:{self.cfg.ports.http}"


@contextlib.asynccontextmanager
async def running_system(
    var: Path,
    certs: Path,
    *,
    tag: str,
    api_key: str,
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/",
    redis_url: str = "redis://127.0.0.1:6379/0",
    pg_base: str = "postgresql://postgres@127.0.0.1:5432",
    log_level: str = "INFO",
    extra_env: Mapping[str, str] | None = None,
) -> AsyncIterator[Running]:
    """Start peers, services and Envoy on free ports; tear it all down with its databases.

    ``tag`` names this instance's databases (``notify_<tag>_*``) and RabbitMQ prefix, so
    several instances (and ``make run``) can share the backing servers. ``extra_env``
    is set for every service (breaker, retry and provider settings of a test).
    """
    ports = Ports.free()
    mail, fcm = MailCatcher(var / "mail"), FcmFake()
    sendgrid = SendGridFake(LOCAL_SENDGRID_KEY)
    onesignal = OneSignalFake(LOCAL_ONESIGNAL_APP, LOCAL_ONESIGNAL_KEY, accept_all=True)
    await mail.start("127.0.0.1", ports.smtp)
    await fcm.start("127.0.0.1", ports.fcm)
    await sendgrid.start("127.0.0.1", ports.sendgrid)
    await onesignal.start("127.0.0.1", ports.onesignal)
    credentials = fcm.write_service_account(var / "service-account.json", f"notify-{tag}")
    cfg = SystemConfig(
        var=var,
        certs=certs,
        ports=ports,
        db_prefix=f"notify_{tag}_",
        amqp_prefix=f"{tag}.",
        amqp_url=amqp_url,
        redis_url=redis_url,
        pg_base=pg_base,
        api_key=api_key,
        fcm_credentials=credentials,
        log_level=log_level,
        extra_env=dict(extra_env or {}),
    )
    system = LocalSystem(cfg)
    try:
        await system.start_services()
        await system.start_envoy()
        yield Running(system, cfg, mail, fcm, sendgrid, onesignal)
    finally:
        await system.stop()
        for peer in (mail, fcm, sendgrid, onesignal):
            await peer.stop()
        await delete_data(cfg)


async def delete_data(cfg: SystemConfig) -> None:
    """Drop a throwaway system's databases and delete its RabbitMQ topology."""
    for name in DATABASES:
        await db.drop_database(f"{cfg.pg_base}/{cfg.db_prefix}{name}")
    topology = Topology.from_env({**cfg.extra_env, "NOTIFY_AMQP_PREFIX": cfg.amqp_prefix})
    await delete_topology(cfg.amqp_url, topology)


async def delete_topology(amqp_url: str, topology: Topology) -> None:
    """Delete every queue and the exchange of a throwaway topology.

    Each quorum queue is a Raft group in the broker; thousands of forgotten test queues
    make a small RabbitMQ unresponsive, so whoever declares a topology deletes it.
    """
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for name in topology.all_queues():
            await channel.queue_delete(name)
        await channel.exchange_delete(topology.exchange)
