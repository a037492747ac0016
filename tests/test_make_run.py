"""``make run`` honours the user's environment, installs what is missing, owns its DB role.

The system test starts exactly what ``make run`` starts (``scripts.run_local.start``),
configured from an environment that names an SMTP relay the test runs, and follows the
demo notification into that relay.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts import backing, run_local
from scripts.harness import delete_data
from scripts.mailcatcher import MailCatcher
from scripts.system import LocalSystem, Ports, free_port, service_env
from tests.conftest import AMQP_URL, PG_BASE, REDIS_URL, RUN_ID


def test_user_settings_win_over_the_local_defaults(tmp_path: Path) -> None:
    environ = {
        "NOTIFY_SMTP_HOST": "relay.example.com",
        "NOTIFY_SMTP_PORT": "587",
        "NOTIFY_SMTP_STARTTLS": "1",
        "NOTIFY_FCM_CREDENTIALS": "/etc/notify/firebase.json",
        "NOTIFY_GATEWAY_LISTEN": "127.0.0.1:6001",
        "NOTIFY_BOOTSTRAP_API_KEY": "mine",
        "HOME": "/root",
    }
    cfg = run_local.system_config(environ, tmp_path, "postgresql://notify:pw@127.0.0.1:5432")
    assert not cfg.local_smtp and not cfg.local_fcm
    assert not cfg.local_sendgrid and not cfg.local_onesignal
    assert cfg.ports.gateway == 6001 and cfg.api_key == "mine"
    env = service_env(cfg, "email_worker")
    assert env["NOTIFY_SMTP_HOST"] == "relay.example.com"
    assert env["NOTIFY_SMTP_PORT"] == "587" and env["NOTIFY_SMTP_STARTTLS"] == "1"
    assert env["NOTIFY_FCM_CREDENTIALS"] == "/etc/notify/firebase.json"
    assert "NOTIFY_FCM_URL" not in env  # the worker's default: Google's endpoint
    assert env["NOTIFY_PG_DSN_BASE"] == "postgresql://notify:pw@127.0.0.1:5432"


def test_local_stand_ins_are_the_default(tmp_path: Path) -> None:
    cfg = run_local.system_config({}, tmp_path, "postgresql://notify:pw@127.0.0.1:5432")
    assert cfg.local_smtp and cfg.local_fcm and cfg.local_sendgrid and cfg.local_onesignal
    env = service_env(cfg, "push_worker")
    assert env["NOTIFY_ONESIGNAL_URL"] == f"http://127.0.0.1:{cfg.ports.onesignal}"
    assert service_env(cfg, "email_worker")["NOTIFY_SENDGRID_URL"].endswith(
        f":{cfg.ports.sendgrid}"
    )
    assert env["NOTIFY_SMTP_PORT"] == str(cfg.ports.smtp)
    assert env["NOTIFY_FCM_URL"].startswith(f"http://127.0.0.1:{cfg.ports.fcm}/")


def test_ambient_notify_variables_do_not_leak_into_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SMTP_HOST", "relay.example.com")
    cfg = run_local.system_config({}, tmp_path, "")
    assert service_env(cfg, "email_worker")["NOTIFY_SMTP_HOST"] == "127.0.0.1"


async def test_make_run_sends_through_the_smtp_relay_it_is_given(
    tmp_path: Path, certs_dir: Path
) -> None:
    relay = MailCatcher()
    port = await relay.start("127.0.0.1", 0)
    environ = {
        "NOTIFY_SMTP_HOST": "127.0.0.1",
        "NOTIFY_SMTP_PORT": str(port),
        "NOTIFY_TLS_DIR": str(certs_dir),
        "NOTIFY_REDIS_URL": REDIS_URL,
        "NOTIFY_AMQP_URL": AMQP_URL,
        "NOTIFY_LOG_LEVEL": "WARNING",
    }
    cfg = dataclasses.replace(
        run_local.system_config(environ, tmp_path, PG_BASE),
        ports=Ports.free(),
        db_prefix=f"notify_t{RUN_ID}mr_",
        amqp_prefix=f"t{RUN_ID}mr.",
    )
    system = LocalSystem(cfg)
    try:
        await run_local.start(system)
        assert "mailcatcher" not in system.procs and "fcm_fake" in system.procs
        # No stand-in behind a real relay: failed-over mail must not vanish into one.
        assert "sendgrid_fake" not in system.procs and "onesignal_fake" in system.procs
        await run_local.demo(cfg)
        await relay.wait_for(1, timeout=10)
    finally:
        await system.stop()
        await relay.stop()
        await delete_data(cfg)
    assert relay.messages[0]["Subject"] == "Welcome, Ada!"
    assert not (tmp_path / "mail").exists()  # no local mail catcher wrote anything


def _recorder(calls: list[list[str]]) -> Any:
    def run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, "", "")

    return run


@pytest.fixture
def nothing_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backing, "reachable", lambda port, host="127.0.0.1": False)
    real_which = shutil.which
    monkeypatch.setattr(
        "scripts.backing.shutil.which",
        lambda name: (
            None
            if name in {"pg_ctlcluster", "redis-server", "rabbitmq-server"}
            else real_which(name)
        ),
    )


@pytest.mark.usefixtures("nothing_installed")
def test_opting_out_of_installs_prints_the_commands() -> None:
    calls: list[list[str]] = []
    problems = backing.ensure_backing(0.1, env={"NOTIFY_INSTALL_DEPS": "0"}, run=_recorder(calls))
    assert calls == []
    text = "\n".join(problems)
    assert "PostgreSQL, Redis, RabbitMQ not installed" in text
    assert "apt-get install -y --no-install-recommends postgresql redis-server rabbitmq-server" in (
        text
    )


@pytest.mark.usefixtures("nothing_installed")
def test_missing_servers_are_installed_then_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("scripts.backing.os.geteuid", lambda: 0)
    calls: list[list[str]] = []
    backing.ensure_backing(0.1, env={"NOTIFY_AMQP_URL": "amqp://elsewhere/"}, run=_recorder(calls))
    assert calls[0] == ["apt-get", "update"]
    assert calls[1][-2:] == ["postgresql", "redis-server"]  # RabbitMQ is the user's own
    assert [c[0] for c in calls[2:]] == ["pg_ctlcluster", "redis-server"]


@pytest.fixture
def apt_style_cluster() -> Iterator[int]:
    """A PostgreSQL cluster made the way ``apt-get install postgresql`` makes one.

    ``pg_createcluster`` writes Debian's default authentication: ``peer`` on the socket,
    ``scram-sha-256`` for TCP, so nothing logs in over TCP without a password.
    """
    if os.geteuid() != 0 or shutil.which("pg_createcluster") is None:
        pytest.skip("needs root and Debian's postgresql-common")
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    name, port = f"notify{RUN_ID}", free_port()
    subprocess.run(
        ["pg_createcluster", version, name, "-p", str(port), "--start"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield port
    finally:
        subprocess.run(
            ["pg_dropcluster", "--stop", version, name], check=False, capture_output=True
        )


def test_role_setup_on_an_apt_created_cluster(apt_style_cluster: int, tmp_path: Path) -> None:
    port = apt_style_cluster
    assert not backing.can_login(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    base = backing.ensure_role(tmp_path / "pw", ["notify_gateway"], port=port)
    assert base.startswith("postgresql://notify:") and base.endswith(f"@127.0.0.1:{port}")
    assert backing.can_login(f"{base}/postgres")
    assert not backing.can_login(f"postgresql://notify:wrong@127.0.0.1:{port}/postgres")
    assert oct((tmp_path / "pw").stat().st_mode & 0o777) == "0o600"
    # Idempotent, and a database an older set-up created as postgres is adopted.
    psql = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-p", str(port)]
    subprocess.run([*psql, "-c", "CREATE DATABASE notify_gateway"], check=True)
    subprocess.run([*psql, "-d", "notify_gateway", "-c", "CREATE TABLE t (x int)"], check=True)
    assert backing.ensure_role(tmp_path / "pw", ["notify_gateway"], port=port) == base
    out = subprocess.run(
        [
            "psql",
            "-X",
            "-Atq",
            f"{base}/notify_gateway",
            "-c",
            "ALTER TABLE t ADD COLUMN y int; CREATE TABLE u (x int); SELECT 'ok'",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.stdout.strip() == "ok", out.stderr
