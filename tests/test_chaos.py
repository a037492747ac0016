"""Kill processes mid-stream: a notification that got OK is never lost.

Each test runs its own system (the shared e2e one must not lose processes). A killed
worker redelivers at most its unacked window (prefetch), and every duplicate is counted.
The long soak with repeated kills runs nightly (``make nightly``).
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scripts.api import DEMO_TEMPLATE
from tests.conftest import RUN_ID
from tests.e2e_support import API_KEY, E2E, e2e_system

pytestmark = pytest.mark.timeout(600)
PREFETCH = 32  # the workers' default NOTIFY_PREFETCH


@pytest.fixture
async def chaos(tmp_path: Path, certs_dir: Path) -> AsyncIterator[E2E]:
    """A private system that tests may damage."""
    async with e2e_system(tmp_path, certs_dir, f"t{RUN_ID}c{uuid.uuid4().hex[:4]}") as handle:
        yield handle


async def _send_many(
    sys: E2E, user_ids: list[str], count: int, template_id: str = "welcome"
) -> tuple[list[str], int]:
    """Post ``count`` e-mail notifications with 16 clients; (ids answered OK, errors)."""
    ok: list[str] = []
    errors = 0
    todo = iter(range(count))
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            nonlocal errors
            for i in todo:
                body: dict[str, Any] = {
                    "userId": user_ids[i % len(user_ids)],
                    "templateId": template_id,
                    "channels": ["CHANNEL_EMAIL"],
                    "variables": {"name": f"c{i}"},
                }
                try:
                    async with session.post(
                        f"{sys.base}/v1/notifications",
                        json=body,
                        headers={"x-api-key": API_KEY},
                        timeout=aiohttp.ClientTimeout(total=20),
                    ) as resp:
                        got = await resp.json(content_type=None)
                        if resp.status == 200:
                            ok.append(got["notification"]["id"])
                        else:
                            errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

        await asyncio.gather(*(client() for _ in range(16)))
    return ok, errors


async def _wait_mail_count(sys: E2E, count: int) -> None:
    await sys.mail.wait_for(count, timeout=120)


async def _assert_all_delivered_once_or_within_window(sys: E2E, ids: list[str], kills: int) -> int:
    """Every id arrives; duplicates stay within the killed workers' windows."""
    wanted = set(ids)
    counted: Counter[str] = Counter()
    seen = 0

    def arrived() -> Counter[str]:
        # Incremental: the SMTP server runs on this loop, and re-reading every message
        # on each arrival (quadratic) would starve it and slow the system under test.
        nonlocal seen
        for m in sys.mail.messages[seen:]:
            nid = m["X-Notify-Notification-Id"]
            if nid in wanted:
                counted[nid] += 1
        seen = len(sys.mail.messages)
        return counted

    deadline = asyncio.get_running_loop().time() + 180
    while len(arrived()) != len(wanted):
        assert asyncio.get_running_loop().time() < deadline, (
            f"lost: {len(wanted - set(arrived()))} of {len(wanted)}"
        )
        await sys.mail.wait_for(len(sys.mail.messages) + 1, timeout=60)
    duplicates = sum(arrived().values()) - len(wanted)
    assert duplicates <= PREFETCH * kills, duplicates
    for nid in ids[:: max(1, len(ids) // 20)]:  # statuses, sampled
        final = await sys.settle(nid, timeout=60)
        assert final["notification"]["status"] == "NOTIFICATION_STATUS_DELIVERED", final
    return duplicates


async def test_killed_email_worker_loses_nothing(chaos: E2E) -> None:
    users = [await chaos.new_user(devices=0) for _ in range(5)]
    ids, errors = await _send_many(chaos, users, 300)
    assert errors == 0 and len(ids) == 300
    await _wait_mail_count(chaos, 30)  # the worker is mid-stream
    await chaos.system.kill("email_worker", signal.SIGKILL)
    await chaos.system.start_service("email_worker")
    duplicates = await _assert_all_delivered_once_or_within_window(chaos, ids, kills=1)
    print(f"email worker SIGKILLed mid-stream: 300 delivered, {duplicates} duplicates")


async def test_killed_gateway_loses_no_accepted_notification(chaos: E2E) -> None:
    users = [await chaos.new_user(devices=0) for _ in range(5)]
    sending = asyncio.ensure_future(_send_many(chaos, users, 300))
    await _wait_mail_count(chaos, 20)
    await chaos.system.kill("gateway", signal.SIGKILL)
    await chaos.system.start_service("gateway")
    ids, errors = await sending
    assert len(ids) + errors == 300
    await _assert_all_delivered_once_or_within_window(chaos, ids, kills=0)
    print(f"gateway SIGKILLed mid-burst: {len(ids)} accepted and delivered, {errors} refused")


@pytest.mark.nightly
async def test_soak_with_repeated_worker_kills(chaos: E2E) -> None:
    users = [await chaos.new_user(devices=0) for _ in range(20)]
    ids, errors = await _send_many(chaos, users, 3000)
    assert errors == 0
    for round_ in range(1, 6):
        await _wait_mail_count(chaos, round_ * 300)
        await chaos.system.kill("email_worker", signal.SIGKILL)
        await chaos.system.start_service("email_worker")
    duplicates = await _assert_all_delivered_once_or_within_window(chaos, ids, kills=5)
    print(f"soak: 3000 delivered through 5 worker kills, {duplicates} duplicates")


@pytest.mark.parametrize(
    ("count", "outage"),
    [
        (40, 0.0),
        pytest.param(200, 300.0, marks=pytest.mark.nightly, id="200-for-5-minutes"),
    ],
)
async def test_template_service_outage_is_delivered_through_and_spends_no_attempt(
    chaos: E2E, count: int, outage: float
) -> None:
    """The gateway accepts on the template it last saw, the workers render the versions
    they keep; a version no worker has seen waits for TemplateService, spending nothing."""
    users = [await chaos.new_user(devices=0) for _ in range(3)]
    warm, _ = await _send_many(chaos, users, 1)  # the gateway and the worker now know it
    await chaos.settle(warm[0])
    # A second template the gateway has seen (for a user who opted out of e-mail: no
    # job) but no worker has fetched.
    unseen = {**DEMO_TEMPLATE, "id": f"unseen-{uuid.uuid4().hex[:8]}"}
    status, body = await chaos.api("POST", "/v1/templates", unseen)
    assert status == 200, body
    opted_out = await chaos.new_user(devices=0, preferences={"emailOptOut": True})
    suppressed, _ = await _send_many(chaos, [opted_out], 1, unseen["id"])
    assert len(suppressed) == 1

    await chaos.system.kill("template_svc", signal.SIGKILL)
    ids, errors = await _send_many(chaos, users, count)
    assert errors == 0 and len(ids) == count  # accepted on the last known template
    held, errors = await _send_many(chaos, users[:1], 1, unseen["id"])
    assert errors == 0 and len(held) == 1
    for nid in ids:  # delivered during the outage
        final = await chaos.settle(nid, timeout=90)
        delivery = final["notification"]["deliveries"][0]
        assert delivery["status"] == "NOTIFICATION_STATUS_DELIVERED", delivery
        assert delivery["attempts"] == 1
    status, body = await chaos.api("GET", f"/v1/notifications/{held[0]}")
    assert status == 200, body
    assert body["notification"]["deliveries"][0]["status"] != "NOTIFICATION_STATUS_FAILED"
    await asyncio.sleep(outage)  # how long the outage lasts: the scenario, not a wait
    await chaos.system.start_service("template_svc")
    final = await chaos.settle(held[0], timeout=90)
    delivery = final["notification"]["deliveries"][0]
    assert delivery["status"] == "NOTIFICATION_STATUS_DELIVERED", delivery
    assert delivery["attempts"] == 1  # the outage was ours: no attempt spent on it
