"""Make sure PostgreSQL, Redis and RabbitMQ answer; start them when installed but stopped.

On a machine where one is missing entirely, say exactly what to install instead of
failing later with a connection error deep inside a service.
"""

from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backing:
    """One server the system needs."""

    name: str
    port: int
    binary: str
    start: tuple[str, ...]
    install: str


def _pg_start() -> tuple[str, ...]:
    versions = sorted(glob.glob("/etc/postgresql/*"))
    version = versions[-1].rsplit("/", 1)[-1] if versions else "15"
    return ("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start")


def backings() -> list[Backing]:
    """PostgreSQL, Redis, RabbitMQ with their Debian start commands."""
    return [
        Backing(
            "PostgreSQL",
            5432,
            "pg_ctlcluster",
            _pg_start(),
            "apt-get install -y postgresql  (trust auth for 127.0.0.1, user postgres)",
        ),
        Backing(
            "Redis",
            6379,
            "redis-server",
            ("redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379"),
            "apt-get install -y redis-server",
        ),
        Backing(
            "RabbitMQ",
            5672,
            "rabbitmq-server",
            ("rabbitmq-server", "-detached"),
            "apt-get install -y rabbitmq-server",
        ),
    ]


def reachable(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def ensure_backing(timeout: float = 60.0) -> list[str]:
    """Start what is installed but down; return a message per server still missing."""
    problems = []
    for b in backings():
        if reachable(b.port):
            continue
        if shutil.which(b.binary) is None:
            problems.append(
                f"{b.name} is not running on port {b.port} and not installed: {b.install}"
            )
            continue
        print(f"starting {b.name} ...")
        subprocess.run(b.start, check=False, capture_output=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not reachable(b.port) and time.monotonic() < deadline:
            time.sleep(0.2)  # poll interval of a TCP readiness probe
        if not reachable(b.port):
            problems.append(
                f"{b.name} did not come up on port {b.port} after `{' '.join(b.start)}`"
            )
    return problems
