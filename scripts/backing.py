"""PostgreSQL, Redis and RabbitMQ for ``make run``: installed, started, and a role of our own.

On a fresh Debian/Ubuntu machine where ``make run`` runs as root, what is missing is
installed with ``apt-get`` (each command printed before it runs); ``NOTIFY_INSTALL_DEPS=0``
opts out, and then the commands are printed for the user to run instead. A server that is
installed but stopped is started. Nothing is assumed about PostgreSQL's authentication:
``ensure_role`` creates a login role with a generated password (kept in ``var/``), which
works with the ``scram-sha-256`` rule a fresh ``apt-get install postgresql`` writes for
TCP, instead of relying on ``trust``.

A server whose address the user set (``NOTIFY_AMQP_URL``, ``NOTIFY_REDIS_URL``,
``NOTIFY_PG_DSN_BASE``) is theirs: it is neither installed nor started here.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLE = "notify"
INSTALL_OPT_OUT = "NOTIFY_INSTALL_DEPS"

Run = Callable[..., "subprocess.CompletedProcess[Any]"]


@dataclass(frozen=True, slots=True)
class Backing:
    """One server the system needs."""

    name: str
    port: int
    binary: str
    start: tuple[str, ...]
    package: str
    setting: str  # the variable that points the system at a server of the user's instead


def _pg_start() -> tuple[str, ...]:
    versions = sorted(glob.glob("/etc/postgresql/*"))
    version = versions[-1].rsplit("/", 1)[-1] if versions else "15"
    return ("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start")


def backings() -> list[Backing]:
    """PostgreSQL, Redis, RabbitMQ with their Debian packages and start commands."""
    return [
        Backing(
            "PostgreSQL",
            5432,
            "pg_ctlcluster",
            _pg_start(),
            "postgresql",
            "NOTIFY_PG_DSN_BASE",
        ),
        Backing(
            "Redis",
            6379,
            "redis-server",
            ("redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379"),
            "redis-server",
            "NOTIFY_REDIS_URL",
        ),
        Backing(
            "RabbitMQ",
            5672,
            "rabbitmq-server",
            ("rabbitmq-server", "-detached"),
            "rabbitmq-server",
            "NOTIFY_AMQP_URL",
        ),
    ]


def reachable(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def install_commands(packages: Sequence[str]) -> list[list[str]]:
    """The apt-get commands that install ``packages`` (what we run or print)."""
    return [
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
    ]


def install_blocker(env: Mapping[str, str]) -> str | None:
    """Why ``make run`` may not install packages itself here, or None when it may."""
    if env.get(INSTALL_OPT_OUT, "1") == "0":
        return f"{INSTALL_OPT_OUT}=0"
    if shutil.which("apt-get") is None:
        return "this machine has no apt-get"
    if os.geteuid() != 0:
        return "installing needs root"
    return None


def ensure_backing(
    timeout: float = 60.0,
    *,
    env: Mapping[str, str] | None = None,
    run: Run = subprocess.run,
) -> list[str]:
    """Install what is missing, start what is down; return a message per server still missing.

    ``env`` is the user's environment (default ``os.environ``); ``run`` runs commands
    (tests record them instead).
    """
    source = os.environ if env is None else env
    needed = [b for b in backings() if b.setting not in source]
    missing = [b for b in needed if not reachable(b.port) and shutil.which(b.binary) is None]
    if missing:
        commands = install_commands([b.package for b in missing])
        blocker = install_blocker(source)
        if blocker is not None:
            names = ", ".join(b.name for b in missing)
            return [
                f"{names} not installed, and not installed for you ({blocker}); run:",
                *("  " + " ".join(c) for c in commands),
            ]
        print(f"installing {', '.join(b.name for b in missing)} (opt out: {INSTALL_OPT_OUT}=0):")
        apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in commands:
            print("  " + " ".join(command))
            run(command, check=True, env=apt_env, timeout=1800)
        needed = [b for b in backings() if b.setting not in source]  # new clusters now exist
    problems = []
    for b in needed:
        if reachable(b.port):
            continue
        print(f"starting {b.name} ...")
        run(b.start, check=False, capture_output=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not reachable(b.port) and time.monotonic() < deadline:
            time.sleep(0.2)  # poll interval of a TCP readiness probe
        if not reachable(b.port):
            problems.append(
                f"{b.name} did not come up on port {b.port} after `{' '.join(b.start)}`"
            )
    return problems


def _password(path: Path) -> str:
    """The role's password, generated once and kept readable by its owner only."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)  # [A-Za-z0-9_-]: safe inside an SQL literal
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def _role_sql(password: str) -> str:
    """Create the role, or reset its password and rights when it exists.

    Services create their own databases, hence CREATEDB.
    """
    if not password.replace("-", "").replace("_", "").isalnum():
        raise ValueError("the generated password must be URL-safe")
    return f"""
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
    ALTER ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}';
  ELSE
    CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}';
  END IF;
END $$;
"""


# A database of ours that another role created (an older ``trust`` set-up) is handed to
# the role with what is in it, so its migrations can run. Run inside that database
# (``:"db"`` is its name, a psql variable); the role is ROLE.
_ADOPT = r"""
ALTER DATABASE :"db" OWNER TO notify;
SELECT format('ALTER TABLE %I OWNER TO notify', tablename) FROM pg_tables
WHERE schemaname = 'public' AND tableowner <> 'notify' \gexec
SELECT format('ALTER FUNCTION %s OWNER TO notify', p.oid::regprocedure) FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> 'notify' \gexec
"""


def _superuser_psql(port: int) -> list[str]:
    """How to run psql as a superuser: as the ``postgres`` OS user over the socket (peer)."""
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", str(port)]
    if os.geteuid() == 0 and shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *psql]
    return [*psql, "-h", "127.0.0.1", "-U", "postgres"]  # works where TCP is trusted


def can_login(dsn: str, run: Run = subprocess.run) -> bool:
    """True when ``dsn`` (with its password) logs in."""
    out = run(
        ["psql", "-X", "-Atq", dsn, "-c", "SELECT 1"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return out.returncode == 0


def ensure_role(
    password_file: Path,
    databases: Sequence[str],
    *,
    port: int = 5432,
    run: Run = subprocess.run,
) -> str:
    """A DSN base (``postgresql://notify:…@127.0.0.1:PORT``) for a password role of our own.

    Runs the set-up as the ``postgres`` superuser every time (it is idempotent and
    cheap), so a password changed by hand or one of ``databases`` left by an older
    set-up is repaired; raises ``RuntimeError`` with psql's message when that fails.
    """
    password = _password(password_file)
    base = f"postgresql://{ROLE}:{password}@127.0.0.1:{port}"
    superuser = _superuser_psql(port)

    def psql(database: str, script: str, *variables: str) -> str:
        out = run(
            [*superuser, "-d", database, *variables],
            input=script,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"setting up the PostgreSQL role {ROLE!r}: {out.stderr.strip()}")
        return str(out.stdout)

    psql("postgres", _role_sql(password))
    listed = psql("postgres", "SELECT datname FROM pg_database;", "-At")
    for database in set(listed.split()) & set(databases):
        psql(database, _ADOPT, "-v", f"db={database}")
    if not can_login(f"{base}/postgres", run):
        raise RuntimeError(f"the PostgreSQL role {ROLE!r} was set up but cannot log in over TCP")
    return base
