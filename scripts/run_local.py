"""``make run``: the whole system on this machine, a demo notification, Ctrl-C to stop.

Installs (on a Debian/Ubuntu machine, as root) and starts PostgreSQL, Redis and
RabbitMQ, and gives PostgreSQL a password role of our own (``scripts/backing.py``);
makes the dev certificates; starts the five services and Envoy on the documented ports;
sends one demo notification through Envoy as JSON; prints where to look; stops
everything cleanly on Ctrl-C.

Every ``NOTIFY_*`` variable in the caller's environment reaches the services as it
would if they were started by hand. The local stand-ins are the default and a real
provider is one variable away: ``NOTIFY_SMTP_HOST`` (with ``NOTIFY_SMTP_PORT`` and the
STARTTLS/AUTH settings) sends through that relay and starts no mail catcher;
``NOTIFY_FCM_CREDENTIALS`` sends through Firebase (``NOTIFY_FCM_URL`` defaults to
Google's) and starts no FCM stand-in. With the local stand-ins, SendGrid and OneSignal
stand-ins run too, as each channel's second provider (failover); with a real primary,
a second provider is real or absent (``NOTIFY_SENDGRID_API_KEY``,
``NOTIFY_ONESIGNAL_APP_ID``/``_API_KEY``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

from scripts import gen_certs
from scripts.api import DEMO_TEMPLATE, call
from scripts.backing import ensure_backing, ensure_role
from scripts.system import (
    DATABASES,
    LOCAL_ONESIGNAL_APP,
    LOCAL_ONESIGNAL_KEY,
    LOCAL_SENDGRID_KEY,
    ROOT,
    LocalSystem,
    Ports,
    SystemConfig,
    poll,
    user_settings,
)

VAR = ROOT / "var"
DB_PREFIX = "notify_"


async def demo(cfg: SystemConfig) -> None:
    """Create a template, a user with a device, send, and follow the notification."""
    base = f"http://127.0.0.1:{cfg.ports.http}"
    key = cfg.api_key
    status, body = call("POST", f"{base}/v1/templates", DEMO_TEMPLATE, api_key=key)
    if status not in (200, 409):
        raise RuntimeError(f"creating the demo template failed: {status} {body}")
    email = f"ada+{uuid.uuid4().hex[:6]}@example.com"
    status, user = call(
        "POST",
        f"{base}/v1/users",
        {"email": email, "displayName": "Ada", "locale": "en"},
        api_key=key,
    )
    if status != 200:
        raise RuntimeError(f"creating the demo user failed: {status} {user}")
    user_id = user["user"]["id"]
    call(
        "POST",
        f"{base}/v1/users/{user_id}/devices",
        {"platform": "DEVICE_PLATFORM_ANDROID", "token": f"demo-{uuid.uuid4().hex}"},
        api_key=key,
    )
    status, sent = call(
        "POST",
        f"{base}/v1/notifications",
        {
            "userId": user_id,
            "templateId": "welcome",
            "variables": {"name": "Ada"},
            "idempotencyKey": uuid.uuid4().hex,
        },
        api_key=key,
    )
    if status != 200:
        raise RuntimeError(f"sending the demo notification failed: {status} {sent}")
    nid = sent["notification"]["id"]
    print(f"\nsent notification {nid} to {email}; waiting for delivery ...")
    in_flight = {
        "NOTIFICATION_STATUS_QUEUED",
        "NOTIFICATION_STATUS_SENDING",
        "NOTIFICATION_STATUS_ACCEPTED",
        "NOTIFICATION_STATUS_RETRYING",
    }
    _, got = await poll(  # the public status API, as a client would
        lambda: asyncio.to_thread(call, "GET", f"{base}/v1/notifications/{nid}", api_key=key),
        lambda r: r[1]["notification"]["status"] not in in_flight,
        timeout=30,
        what="the demo notification",
    )
    note = got["notification"]
    for d in note.get("deliveries", []):
        print(f"  {d['channel']:<14} {d['status']:<32} {d.get('detail', '')}")


def banner(cfg: SystemConfig) -> None:
    """Where to look."""
    p, env = cfg.ports, cfg.extra_env
    mail = (
        f"e-mails received by the mail catcher:  {cfg.var / 'mail'}/*.eml"
        if cfg.local_smtp
        else f"e-mails go to the SMTP relay {env['NOTIFY_SMTP_HOST']}"
    )
    push = (
        f"push messages received by the FCM stand-in:  http://127.0.0.1:{p.fcm}/messages"
        if cfg.local_fcm
        else "pushes go to Firebase Cloud Messaging"
    )
    if cfg.local_sendgrid:
        mail += f"\n  failover e-mail (SendGrid stand-in):  http://127.0.0.1:{p.sendgrid}/messages"
    if cfg.local_onesignal:
        push += f"\n  failover push (OneSignal stand-in):  http://127.0.0.1:{p.onesignal}/messages"
    print(f"""
notify is running. The admin API key (NOTIFY_BOOTSTRAP_API_KEY): {cfg.api_key}
Try:
  curl -s -H 'x-api-key: {cfg.api_key}' http://localhost:{p.http}/v1/templates/welcome
  curl -s -H 'x-api-key: {cfg.api_key}' -H 'content-type: application/json' \
    -d '{{"name": "my-app", "scopes": ["SCOPE_NOTIFICATIONS_SEND"]}}' \
    http://localhost:{p.http}/v1/api-keys   # a key that may only send
  grpcurl -plaintext -protoset gen/descriptor.binpb -H 'x-api-key: {cfg.api_key}' \
    -d '{{"id": "welcome"}}' localhost:{p.http} notify.v1.TemplateService/GetTemplate
  {mail}
  {push}
  service logs:  {cfg.var / "log"}/*.log     Envoy admin:  http://127.0.0.1:{p.envoy_admin}/
Ctrl-C stops everything.""")


def system_config(environ: Mapping[str, str], var: Path, pg_base: str) -> SystemConfig:
    """What ``make run`` starts, with every setting of the user's environment honoured."""
    settings = user_settings(environ)
    defaults = SystemConfig(var=var, certs=var / "certs")
    return SystemConfig(
        var=var,
        certs=Path(settings.get("NOTIFY_TLS_DIR", str(var / "certs"))),
        ports=Ports.from_env(settings),
        db_prefix=DB_PREFIX,
        amqp_prefix=settings.get("NOTIFY_AMQP_PREFIX", ""),
        amqp_url=settings.get("NOTIFY_AMQP_URL", defaults.amqp_url),
        redis_url=settings.get("NOTIFY_REDIS_URL", defaults.redis_url),
        pg_base=settings.get("NOTIFY_PG_DSN_BASE", pg_base),
        api_key=settings.get("NOTIFY_BOOTSTRAP_API_KEY", defaults.api_key),
        fcm_credentials=var / "fcm" / "service-account.json",
        log_level=settings.get("NOTIFY_LOG_LEVEL", defaults.log_level),
        extra_env=settings,
    )


async def start(system: LocalSystem) -> None:
    """The local provider stand-ins the configuration needs, the services, Envoy."""
    cfg, py = system.cfg, sys.executable
    if cfg.local_smtp:
        mail_dir = str(cfg.var / "mail")
        smtp = ("--host", "127.0.0.1", "--port", str(cfg.ports.smtp), "--dir", mail_dir)
        await system.spawn("mailcatcher", py, "-m", "scripts.mailcatcher", *smtp)
        await system.wait_port("mailcatcher", cfg.ports.smtp)
    if cfg.local_fcm:
        assert cfg.fcm_credentials is not None
        fcm = ("--port", str(cfg.ports.fcm), "--credentials-out", str(cfg.fcm_credentials))
        await system.spawn("fcm_fake", py, "-m", "scripts.fcm_fake", *fcm)
        await system.wait_port("fcm_fake", cfg.ports.fcm)
    if cfg.local_sendgrid:
        sendgrid = ("--port", str(cfg.ports.sendgrid), "--api-key", LOCAL_SENDGRID_KEY)
        await system.spawn("sendgrid_fake", py, "-m", "scripts.sendgrid_fake", *sendgrid)
        await system.wait_port("sendgrid_fake", cfg.ports.sendgrid)
    if cfg.local_onesignal:
        onesignal = (
            *("--port", str(cfg.ports.onesignal), "--app-id", LOCAL_ONESIGNAL_APP),
            *("--api-key", LOCAL_ONESIGNAL_KEY, "--accept-all"),
        )
        await system.spawn("onesignal_fake", py, "-m", "scripts.onesignal_fake", *onesignal)
        await system.wait_port("onesignal_fake", cfg.ports.onesignal)
    print("starting services ...")
    await system.start_services()
    await system.start_envoy()


async def amain() -> int:
    """Install and start the backing servers, start, demo, wait for Ctrl-C, stop."""
    problems = ensure_backing()
    if problems:
        print("cannot start notify:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    pg_base = ""
    if "NOTIFY_PG_DSN_BASE" not in os.environ:
        pg_base = ensure_role(VAR / "pg-password", [DB_PREFIX + d for d in DATABASES])
    cfg = system_config(os.environ, VAR, pg_base)
    if not (cfg.certs / "ca.pem").exists():
        gen_certs.generate(cfg.certs)
    gen_certs.ensure_service_keys(cfg.certs)  # certificates from before service keys
    system = LocalSystem(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await start(system)
        await demo(cfg)
        banner(cfg)
        await stop.wait()
        return 0
    finally:
        print("\nstopping ...")
        await system.stop()


def main() -> None:
    """Entry point of ``python -m scripts.run_local``."""
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(amain()))


if __name__ == "__main__":
    main()
