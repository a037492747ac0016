"""The whole system for end-to-end tests: real processes behind real Envoy.

The five services run as ``python -m`` processes configured through the environment,
Envoy runs the committed config, and the two third-party peers run in the test process
so tests can look at what arrived: a real SMTP server (aiosmtpd) and an HTTP server
speaking FCM v1 (OAuth token exchange included).
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scripts.api import DEMO_TEMPLATE, call
from scripts.harness import Running, running_system
from scripts.system import poll
from tests.conftest import AMQP_URL, PG_BASE, REDIS_URL, RUN_ID

API_KEY = "e2e-admin-key"
IN_FLIGHT = {
    "NOTIFICATION_STATUS_ACCEPTED",
    "NOTIFICATION_STATUS_QUEUED",
    "NOTIFICATION_STATUS_SENDING",
    "NOTIFICATION_STATUS_RETRYING",
}


@dataclass(frozen=True)
class Samples:
    """One scrape of a process's /metrics."""

    samples: tuple[tuple[str, Mapping[str, str], float], ...]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels``."""
        return sum(
            v for n, have, v in self.samples
            if n == name and all(have.get(k) == want for k, want in labels.items())
        )  # fmt: skip

    def names(self) -> set[str]:
        """Every sample name in the scrape."""
        return {n for n, _, _ in self.samples}


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return Samples(
        tuple(
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        )
    )


class E2E(Running):
    """The running system plus the client helpers the tests share."""

    async def metrics(self, service: str) -> Samples:
        """A scrape of ``service``'s Prometheus endpoint."""
        url = f"http://127.0.0.1:{self.cfg.ports.metrics(service)}/metrics"
        return await asyncio.to_thread(_scrape, url)

    async def envoy_metrics(self) -> Samples:
        """A scrape of Envoy's own stats (its admin port)."""
        url = f"http://127.0.0.1:{self.cfg.ports.envoy_admin}/stats/prometheus"
        return await asyncio.to_thread(_scrape, url)

    async def api(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        """One JSON request through Envoy (off the event loop)."""
        kw.setdefault("api_key", API_KEY)
        return await asyncio.to_thread(call, method, self.base + path, body, **kw)

    async def new_user(self, *, devices: int = 1, **fields: Any) -> str:
        """A fresh user (unique e-mail) with ``devices`` push tokens; returns its id."""
        body = {"email": f"u{uuid.uuid4().hex[:10]}@example.com", "displayName": "Ada", **fields}
        status, got = await self.api("POST", "/v1/users", body)
        assert status == 200, got
        user_id: str = got["user"]["id"]
        for _ in range(devices):
            status, got = await self.api(
                "POST",
                f"/v1/users/{user_id}/devices",
                {"platform": "DEVICE_PLATFORM_ANDROID", "token": f"tok-{uuid.uuid4().hex}"},
            )
            assert status == 200, got
        return user_id

    async def settle(
        self, nid: str, timeout: float = 30.0, *, api_key: str = API_KEY
    ) -> dict[str, Any]:
        """Poll the public status API (as ``api_key``'s tenant) until every delivery left
        the in-flight states."""
        _, settled = await poll(
            lambda: self.api("GET", f"/v1/notifications/{nid}", api_key=api_key),
            lambda r: (
                r[0] == 200
                and all(d["status"] not in IN_FLIGHT for d in r[1]["notification"]["deliveries"])
            ),
            timeout=timeout,
            what=f"notification {nid}",
        )
        result: dict[str, Any] = settled
        return result


@contextlib.asynccontextmanager
async def e2e_system(
    var: Path, certs: Path, tag: str, extra_env: Mapping[str, str] | None = None
) -> AsyncIterator[E2E]:
    """A system on this machine's backing servers, with the demo template created."""
    async with running_system(
        var,
        certs,
        tag=tag,
        api_key=API_KEY,
        amqp_url=AMQP_URL,
        redis_url=REDIS_URL,
        pg_base=PG_BASE,
        extra_env=extra_env,
    ) as running:
        handle = E2E(
            running.system,
            running.cfg,
            running.mail,
            running.fcm,
            running.sendgrid,
            running.onesignal,
        )
        status, body = await handle.api("POST", "/v1/templates", DEMO_TEMPLATE)
        assert status == 200, body
        yield handle


@pytest.fixture(scope="session")
async def e2e(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path) -> AsyncIterator[E2E]:
    """The whole system, started once for the e2e tests and torn down with its data."""
    async with e2e_system(tmp_path_factory.mktemp("var"), certs_dir, f"t{RUN_ID}e2e") as handle:
        yield handle
