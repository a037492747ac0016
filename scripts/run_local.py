"""``make run``: the whole system on this machine, a demo notification, Ctrl-C to stop.

Checks (and if needed starts) PostgreSQL, Redis and RabbitMQ; makes the dev
certificates; starts the mail catcher and the FCM stand-in, the five services and Envoy
on the documented ports; sends one demo notification through Envoy as JSON; prints
where to look; stops everything cleanly on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import uuid

from scripts import gen_certs
from scripts.api import DEMO_TEMPLATE, call
from scripts.backing import ensure_backing
from scripts.system import ROOT, LocalSystem, SystemConfig, poll

VAR = ROOT / "var"


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
    p = cfg.ports
    print(f"""
notify is running. Try:
  curl -s -H 'x-api-key: {cfg.api_key}' http://localhost:{p.http}/v1/templates/welcome
  grpcurl -plaintext localhost:{p.http} list
  e-mails received by the mail catcher:  {VAR / "mail"}/*.eml
  push messages received by the FCM stand-in:  http://127.0.0.1:{p.fcm}/messages
  service logs:  {VAR / "log"}/*.log     Envoy admin:  http://127.0.0.1:{p.envoy_admin}/
Ctrl-C stops everything.""")


async def amain() -> int:
    """Start, demo, wait for Ctrl-C, stop."""
    problems = ensure_backing()
    if problems:
        print("cannot start notify:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    certs = VAR / "certs"
    if not (certs / "ca.pem").exists():
        gen_certs.generate(certs)
    cfg = SystemConfig(var=VAR, certs=certs, fcm_credentials=VAR / "fcm" / "service-account.json")
    system = LocalSystem(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        py = sys.executable
        await system.spawn(
            "mailcatcher",
            py,
            "-m",
            "scripts.mailcatcher",
            "--host",
            "127.0.0.1",
            "--port",
            str(cfg.ports.smtp),
            "--dir",
            str(VAR / "mail"),
        )
        await system.spawn(
            "fcm_fake",
            py,
            "-m",
            "scripts.fcm_fake",
            "--port",
            str(cfg.ports.fcm),
            "--credentials-out",
            str(cfg.fcm_credentials),
        )
        await system.wait_port("mailcatcher", cfg.ports.smtp)
        await system.wait_port("fcm_fake", cfg.ports.fcm)
        print("starting services ...")
        await system.start_services()
        await system.start_envoy()
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
