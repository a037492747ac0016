"""Rate limits: the Lua scripts against the real Redis, and the whole system behind Envoy
with tight limits (its own instance, so the shared one's tests are not throttled):
429 with RetryInfo and Retry-After, exactly one of a burst admitted at the edge of a
limit, failed key lookups limited per address, and the Redis-down policy (checks pass)."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.limits import LeasedBuckets, Rate, RateLimiter, Window, recipient_log
from notify_kit.kv import redis_client
from scripts.system import free_port, poll
from tests.conftest import RUN_ID
from tests.e2e_support import API_KEY, E2E, e2e_system

LIMIT = 30
ENV = {
    "NOTIFY_RECIPIENT_LIMITS": f"email={LIMIT}/3600,push=2/3600",
    "NOTIFY_AUTH_FAILURE_RATE": "1",
    "NOTIFY_AUTH_FAILURE_BURST": "5",
    # Keys stay trusted for the whole module, so a key already seen is seen as such
    # however slow the machine (the lockout below must not depend on a 2 s cache).
    "NOTIFY_AUTH_CACHE_TTL": "300",
}


# --- the scripts, against the real Redis -----------------------------------------------


@pytest.fixture
async def limiter(redis_url: str) -> AsyncIterator[tuple[RateLimiter, aioredis.Redis]]:
    client = redis_client(redis_url)
    yield RateLimiter(client), client
    await client.aclose()


async def test_a_bucket_admits_its_burst_then_says_how_long_to_wait(
    limiter: tuple[RateLimiter, aioredis.Redis],
) -> None:
    rl, client = limiter
    bucket = f"test:rl:{uuid.uuid4().hex}"
    rate = Rate(per_second=2.0, burst=3)  # one every 500 ms
    assert [await rl.take(bucket, rate) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await rl.would_take(bucket, rate) > 0  # asking spends nothing...
    wait = await rl.take(bucket, rate)
    assert 0.4 < wait <= 0.5  # ...and a refusal says when one more fits
    ttl = await client.pttl(bucket)
    assert 0 < ttl <= 1500  # the bucket expires once it would be full again


async def test_a_window_is_all_or_nothing_and_counts_a_notification_once(
    limiter: tuple[RateLimiter, aioredis.Redis],
) -> None:
    rl, client = limiter
    user = uuid.uuid4().hex
    email, push = recipient_log(user, "email"), recipient_log(user, "push")
    both = {email: Window(5, 60), push: Window(1, 60)}
    assert await rl.admit("n1", both) == 0.0
    assert await rl.admit("n1", both) == 0.0  # the same notification again: counted once
    wait = await rl.admit("n2", both)  # push is full: neither channel records n2
    assert 59 < wait <= 60
    assert await client.zcard(email) == 1 and await client.zcard(push) == 1
    assert await rl.admit("n2", {email: both[email]}) == 0.0
    assert 0 < await client.pttl(email) <= 60_000 and 0 < await client.pttl(push) <= 60_000


async def test_without_redis_every_check_passes_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The written policy (docs/SECURITY.md): limits are not enforced while Redis is down,
    rather than every notification failing with it."""
    client = redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    rl = RateLimiter(client)
    with caplog.at_level(logging.WARNING, logger="gateway.limits"):
        assert await rl.take("k", Rate(1.0, 1)) == 0.0
        assert await rl.admit("n", {"w": Window(1, 60)}) == 0.0
    assert "rate limits not enforced" in caplog.text
    assert caplog.text.count("rate limits not enforced") == 1  # at most once every 10 s
    await client.aclose()


# --- the system -------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def limited(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path) -> AsyncIterator[E2E]:
    async with e2e_system(
        tmp_path_factory.mktemp("var"), certs_dir, f"t{RUN_ID}rl", extra_env=ENV
    ) as handle:
        yield handle


def _request(
    base: str, method: str, path: str, body: Any, key: str
) -> tuple[int, Any, dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("x-api-key", key)
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            status, raw, headers = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        status, raw, headers = err.code, err.read(), dict(err.headers)
    return status, json.loads(raw) if raw else None, {k.lower(): v for k, v in headers.items()}


async def _call(
    e2e: E2E, method: str, path: str, body: Any = None, key: str = API_KEY
) -> tuple[int, Any, dict[str, str]]:
    return await asyncio.to_thread(_request, e2e.base, method, path, body, key)


def _detail(body: Any, kind: str) -> dict[str, Any]:
    for detail in body.get("details", []):
        if detail.get("@type", "").endswith(kind):
            return dict(detail)
    return {}


def _refused_with(answer: tuple[int, Any, dict[str, str]], reason: str) -> None:
    status, body, headers = answer
    assert status == 429, answer
    assert _detail(body, "ErrorInfo")["reason"] == reason, body
    assert _detail(body, "RetryInfo")["retryDelay"].endswith("s"), body
    assert int(headers["retry-after"]) >= 1, headers


async def _exactly_one_of_the_burst(
    e2e: E2E, method: str, path: str, body: Any, key: str, reason: str
) -> None:
    for _ in range(LIMIT - 1):
        status, got, _ = await _call(e2e, method, path, body, key)
        assert status == 200, got
    answers = await asyncio.gather(*(_call(e2e, method, path, body, key) for _ in range(LIMIT - 1)))
    admitted = [a for a in answers if a[0] == 200]
    assert len(admitted) == 1, [a[0] for a in answers]
    for answer in answers:
        if answer[0] != 200:
            _refused_with(answer, reason)


async def test_a_recipient_limit_of_30_admits_exactly_one_of_a_late_burst(limited: E2E) -> None:
    user_id = await limited.new_user(devices=0)
    send = {"userId": user_id, "templateId": "welcome", "channels": ["CHANNEL_EMAIL"]}
    await _exactly_one_of_the_burst(
        limited, "POST", "/v1/notifications", send, API_KEY, "RECIPIENT_RATE_LIMITED"
    )
    # Another user is not affected, nor a channel this user had nothing on.
    other = await limited.new_user(devices=1)
    status, got, _ = await _call(limited, "POST", "/v1/notifications", {**send, "userId": other})
    assert status == 200, got
    status, got, _ = await _call(
        limited, "POST", "/v1/notifications", {**send, "channels": ["CHANNEL_PUSH"]}
    )
    assert status == 200 and got["notification"]["deliveries"][0]["status"] == (
        "NOTIFICATION_STATUS_SUPPRESSED"  # no device: suppressed, and counted nowhere
    ), got


async def test_a_tenant_sets_its_own_recipient_limits(limited: E2E) -> None:
    """A tenant's limits replace the gateway's defaults for the channels it names (0: no
    limit there), for its sends only; only its own admins or the operators set them."""
    suffix = uuid.uuid4().hex[:8]
    acme, globex = f"acme-{suffix}", f"globex-{suffix}"
    keys = {}
    for tenant in (acme, globex):
        status, made, _ = await _call(
            limited, "POST", "/v1/api-keys",
            {"name": "admin", "scopes": ["SCOPE_ADMIN"], "tenant": tenant},
        )  # fmt: skip
        assert status == 200, made
        keys[tenant] = made["secret"]
    path = f"/v1/tenants/{acme}/settings"
    status, got, _ = await _call(limited, "GET", path)
    assert status == 200, got
    assert got["settings"].get("recipientLimits", []) == [] and "updateTime" not in got["settings"]
    assert got["settings"]["effectiveRecipientLimits"] == [
        {"channel": "CHANNEL_EMAIL", "maxNotifications": LIMIT, "window": "3600s"},
        {"channel": "CHANNEL_PUSH", "maxNotifications": 2, "window": "3600s"},
    ], got
    own = [
        {"channel": "CHANNEL_EMAIL", "maxNotifications": 2, "window": "60s"},
        {"channel": "CHANNEL_PUSH", "maxNotifications": 0, "window": "1s"},
    ]
    twice = {"tenant": acme, "recipientLimits": [own[0], own[0]]}
    status, got, _ = await _call(limited, "PUT", path, twice)
    assert status == 400 and _detail(got, "BadRequest"), got
    for bad in ({**own[0], "window": "0s"}, {**own[0], "maxNotifications": -1}):
        status, got, _ = await _call(limited, "PUT", path, {"recipientLimits": [bad]})
        assert status == 400, (bad, got)
    status, got, _ = await _call(limited, "PUT", path, {"recipientLimits": own}, keys[globex])
    assert status == 403 and _detail(got, "ErrorInfo")["reason"] == "TENANT_NOT_YOURS", got
    status, got, _ = await _call(limited, "PUT", path, {"recipientLimits": own}, keys[acme])
    assert status == 200 and got["settings"]["updateTime"], got
    assert got["settings"]["recipientLimits"] == own, got
    assert got["settings"]["effectiveRecipientLimits"] == [own[0]], got  # push: none

    # A key's lookup brings its tenant's limits, cached with it (here for the module's
    # 300 s; 2 s by default): a key first used from now on has the new ones.
    status, made, _ = await _call(
        limited, "POST", "/v1/api-keys", {"name": "app", "scopes": ["SCOPE_ADMIN"]}, keys[acme]
    )
    assert status == 200 and made["apiKey"]["tenant"] == acme, made
    key = made["secret"]
    template = {
        "id": "welcome",
        "contents": [
            {
                "language": "en",
                "email": {"subject": "Hi", "textBody": "Hi."},
                "push": {"title": "Hi", "body": "Hi."},
            }
        ],
    }
    status, got, _ = await _call(limited, "POST", "/v1/templates", template, key)
    assert status == 200, got
    status, got, _ = await _call(
        limited, "POST", "/v1/users", {"email": f"a-{suffix}@example.com"}, key
    )
    assert status == 200, got
    user_id = got["user"]["id"]
    status, got, _ = await _call(
        limited, "POST", f"/v1/users/{user_id}/devices",
        {"platform": "DEVICE_PLATFORM_ANDROID", "token": f"tok-{suffix}"}, key,
    )  # fmt: skip
    assert status == 200, got
    for channel, admitted in (("CHANNEL_PUSH", 3), ("CHANNEL_EMAIL", 2)):  # default push: 2
        send = {"userId": user_id, "templateId": "welcome", "channels": [channel]}
        for _ in range(admitted):
            status, got, _ = await _call(limited, "POST", "/v1/notifications", send, key)
            assert status == 200, (channel, got)
    _refused_with(
        await _call(limited, "POST", "/v1/notifications", send, key), "RECIPIENT_RATE_LIMITED"
    )


async def test_a_key_limit_of_30_admits_exactly_one_of_a_late_burst(limited: E2E) -> None:
    status, created, _ = await _call(
        limited,
        "POST",
        "/v1/api-keys",
        {
            "name": "limited",
            "scopes": ["SCOPE_USERS_READ"],
            "rateLimit": {"requestsPerSecond": 0.001, "burst": LIMIT},
        },
    )
    assert status == 200 and created["apiKey"]["rateLimit"]["burst"] == LIMIT, created
    user_id = await limited.new_user(devices=0)
    await _exactly_one_of_the_burst(
        limited, "GET", f"/v1/users/{user_id}", None, created["secret"], "API_KEY_RATE_LIMITED"
    )
    status, got, _ = await _call(limited, "GET", f"/v1/users/{user_id}")  # another key
    assert status == 200, got


async def test_failed_key_lookups_are_limited_per_address(limited: E2E) -> None:
    """Runs last in this module: it locks 127.0.0.1 out of new keys for a few seconds."""
    status, created, _ = await _call(
        limited, "POST", "/v1/api-keys", {"name": "fresh", "scopes": ["SCOPE_USERS_READ"]}
    )
    assert status == 200, created
    user_id = await limited.new_user(devices=0)
    path = f"/v1/users/{user_id}"
    for _ in range(5):
        status, got, _ = await _call(limited, "GET", path, key=f"nfy_guess{uuid.uuid4().hex}")
        assert status == 401, got
    _refused_with(
        await _call(limited, "GET", path, key=f"nfy_guess{uuid.uuid4().hex}"),
        "TOO_MANY_FAILED_KEYS",
    )
    # A key this gateway has not seen yet waits too (the database is not asked)...
    _refused_with(await _call(limited, "GET", path, key=created["secret"]), "TOO_MANY_FAILED_KEYS")
    # ...while a key it already trusts goes on working.
    status, got, _ = await _call(limited, "GET", path)
    assert status == 200, got
    # The bucket refills (1 a second): the fresh key gets in.
    await poll(
        lambda: _call(limited, "GET", path, key=created["secret"]),
        lambda answer: answer[0] == 200,
        timeout=10.0,
        what="the address to be let in again",
    )


async def test_leased_buckets_never_admit_more_than_the_limit(
    limiter: tuple[RateLimiter, aioredis.Redis],
) -> None:
    """Two gateways sharing a key, each leasing chunks: together at most the burst (no
    refill to speak of at 0.01/s), and a key whose chunk is one stays exact."""
    rl, _ = limiter
    bucket = f"test:rl:{uuid.uuid4().hex}"
    # Chunks of 20 (what 1,000 s of 0.02/s allow) with no refill to speak of, so the
    # bucket's burst is all there is to share.
    leased = Rate(per_second=0.02, burst=50)
    one, two = LeasedBuckets(rl, chunk_seconds=1000.0), LeasedBuckets(rl, chunk_seconds=1000.0)
    answers = [await gateway.take(bucket, leased) for _ in range(40) for gateway in (one, two)]
    admitted = sum(1 for wait in answers if wait == 0.0)
    assert admitted <= 50  # never more than the limit between them
    assert admitted >= 40  # leases are not wasted while being spent
    slow_bucket = f"test:rl:{uuid.uuid4().hex}"
    slow = Rate(per_second=0.01, burst=3)
    waits = [await one.take(slow_bucket, slow) for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0] and waits[3] > 0
    assert await two.take(slow_bucket, slow) > 0  # nothing was leased away unseen


async def test_concurrent_calls_of_one_key_share_its_leases(
    limiter: tuple[RateLimiter, aioredis.Redis],
) -> None:
    """Callers arriving together while the lease is spent wait for one refill and share
    its chunk: a burst of 100 admits all 100 concurrent calls and the 101st is refused
    (with a refill each, the first 20 callers' chunks of 5 spent the burst and 80 of the
    100 were refused)."""
    rl, _ = limiter
    bucket = f"test:rl:{uuid.uuid4().hex}"
    rate = Rate(per_second=0.01, burst=100)  # no refill to speak of; chunks of 1...
    gateway = LeasedBuckets(rl, chunk_seconds=500.0)  # ...made 5 (500 s of 0.01/s)
    waits = await asyncio.gather(*(gateway.take(bucket, rate) for _ in range(100)))
    assert sum(1 for wait in waits if wait == 0.0) == 100
    assert await gateway.take(bucket, rate) > 0
