"""The idempotency store against the real Redis: a claim belongs to the request that
made it, so a request whose lease ran out can neither release nor overwrite the claim
another request holds now; and the answers a client needs to tell states apart."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.cache import IdempotencyCache, idempotency_key
from notify_kit.errors import Aborted, FailedPrecondition
from notify_kit.kv import redis_client


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[tuple[IdempotencyCache, aioredis.Redis]]:
    client = redis_client(redis_url)
    yield IdempotencyCache(client, ttl=60), client
    await client.aclose()


def _fingerprint(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


async def test_a_late_request_cannot_release_or_overwrite_anothers_claim(
    store: tuple[IdempotencyCache, aioredis.Redis],
) -> None:
    cache, client = store
    api_key, key, body = str(uuid.uuid4()), uuid.uuid4().hex, _fingerprint("body")
    late = await cache.claim(api_key, key, body)
    await client.delete(idempotency_key(api_key, key))  # its lease ran out
    current = await cache.claim(api_key, key, body)  # a retry took the key over
    await cache.release(late)
    with pytest.raises(Aborted) as in_progress:
        await cache.claim(api_key, key, body)  # still the retry's
    assert in_progress.value.reason == "REQUEST_IN_PROGRESS"
    assert in_progress.value.retry_after
    await cache.complete(late, body, b"late answer")  # not ours any more: no effect
    await cache.complete(current, body, b"the answer")
    assert (await cache.claim(api_key, key, body)).response == b"the answer"
    await cache.release(current)  # a completed claim is no longer a pending one to drop
    assert (await cache.claim(api_key, key, body)).response == b"the answer"


async def test_another_body_is_a_client_bug_not_a_wait(
    store: tuple[IdempotencyCache, aioredis.Redis],
) -> None:
    cache, _ = store
    api_key, key = str(uuid.uuid4()), uuid.uuid4().hex
    claim = await cache.claim(api_key, key, _fingerprint("one"))
    for state in ("pending", "done"):
        with pytest.raises(FailedPrecondition) as reused:
            await cache.claim(api_key, key, _fingerprint("two"))
        assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED", state
        await cache.complete(claim, _fingerprint("one"), b"answer")
