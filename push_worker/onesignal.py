"""Push through OneSignal's REST API ("create message", push channel).

Addressing: a device registered as a OneSignal subscription (``TargetKind.ONESIGNAL``) is
sent to by ``include_subscription_ids``. A push with no such device addresses the user
instead, by alias: ``include_aliases: {"external_id": [user_id]}`` with
``target_channel: "push"`` (our apps log users in to OneSignal with our user id), and is
reported as one target ``external_id:<user_id>``. That is why this provider reaches every
kind of target (``kinds``): when FCM is down, the user is still reachable through the
OneSignal SDK in the same app.

Idempotency: every request carries ``idempotency_key`` = the notification id, and
OneSignal answers a repeat of a key within 30 days with the first answer and sends
nothing. A retry after an unknown outcome (a timeout after the request left) therefore
cannot push twice, so for OneSignal such a timeout is an ordinary transient failure, not
``OutcomeUnknown``.

Classification, per target (see ``OneSignalProvider.send``):

========================================  ==================================================
OneSignal's answer                        outcome
========================================  ==================================================
200 with an id                            DELIVERED (``onesignal <id>``)
id listed in ``invalid_player_ids``       UNREGISTERED: the handler removes that device
subscription ids, nobody subscribed       UNREGISTERED (``All included players are not...``)
alias not subscribed                      INVALID: the user has no push subscription, but
                                          ``external_id:...`` is no device to remove
429, 5xx, 404/408, no answer, timeout     TRANSIENT, ``retry_after`` from ``Retry-After``
401/403                                   TRANSIENT: our key or app id is refused, which is
                                          a provider-level failure (breaker, failover), not
                                          this recipient's
other 4xx (400: malformed request)        INVALID, with OneSignal's error text
========================================  ==================================================
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import httpx

from notify_kit.jobs.providers import retry_after_seconds
from push_worker.outgoing import Outcome, OutgoingPush, PushResult, TargetKind, TargetResult

log = logging.getLogger(__name__)

MAX_SUBSCRIPTION_IDS = 20_000  # include_subscription_ids entries per request
NOT_SUBSCRIBED = "All included players are not subscribed"
# Derives the idempotency keys of the second and later batches of one notification.
_BATCH_NAMESPACE = uuid.UUID("0b6f3f55-7d55-4c4e-9a0e-4c3b0f1d7a21")
_CREDENTIAL_STATUSES = frozenset({401, 403})
_TRANSIENT_STATUSES = frozenset({404, 408, 429})  # 404: our base URL is wrong


class OneSignalProvider:
    """OneSignal's create-message API over one lazily created ``httpx`` client.

    httpx, not aiohttp as in the e-mail worker: firebase-admin loads httpx into this
    process anyway, and a second HTTP client would cost it 7 MB more.

    ``send`` never raises for what happened to a target, not even when every target
    failed: it returns a ``TargetResult`` per addressed target, so the handler alone
    judges the job (delivered when any device took it) and ``push_worker.consumer.attempt``
    alone turns "every target transient" into the provider failure the breaker counts.
    Raising here would lose the per-target outcomes the device clean-up depends on.
    """

    name = "onesignal"
    # The alias fallback reaches the user whatever devices they registered.
    kinds = frozenset(TargetKind)

    def __init__(
        self,
        *,
        app_id: str,
        api_key: str,
        base_url: str = "https://api.onesignal.com",
        timeout: float = 10.0,
    ) -> None:
        self._app_id = app_id
        self._api_key = api_key
        self._url = f"{base_url.rstrip('/')}/notifications"
        self._timeout = timeout
        self._session: httpx.AsyncClient | None = None

    async def send(self, push: OutgoingPush) -> PushResult:
        """Send ``push`` and return one result per addressed target, in target order.

        OneSignal targets go by subscription id (in requests of at most 20,000); without
        any, the user goes by alias and gets the single result ``external_id:<user_id>``.
        Targets of other kinds beside OneSignal ones are not addressed and not reported.
        """
        mine = [t for t in push.targets if t.kind is TargetKind.ONESIGNAL]
        if not mine:
            address = f"external_id:{push.user_id}"
            targeting = {
                "include_aliases": {"external_id": [push.user_id]},
                "target_channel": "push",
            }
            body = self._body(push, _idempotency_key(push.notification_id, 0), targeting)
            return PushResult(await self._post(body, [address], by_alias=True))
        results: list[TargetResult] = []
        for batch, start in enumerate(range(0, len(mine), MAX_SUBSCRIPTION_IDS)):
            chunk = mine[start : start + MAX_SUBSCRIPTION_IDS]
            addresses = [t.address for t in chunk]
            targeting = {"include_subscription_ids": addresses}
            body = self._body(push, _idempotency_key(push.notification_id, batch), targeting)
            results += await self._post(body, addresses, by_alias=False)
        return PushResult(results)

    async def close(self) -> None:
        """Close the HTTP session (a later ``send`` opens a new one)."""
        if self._session is not None:
            await self._session.aclose()
            self._session = None

    def _body(self, push: OutgoingPush, key: str, targeting: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "app_id": self._app_id,
            "idempotency_key": key,
            **targeting,
            "contents": {"en": push.body},
            "data": {**push.data, "notification_id": push.notification_id},
        }
        if push.title:
            body["headings"] = {"en": push.title}
        return body

    def _client(self) -> httpx.AsyncClient:
        if self._session is None or self._session.is_closed:
            self._session = httpx.AsyncClient(
                timeout=self._timeout,  # per phase; the whole request is bounded in _post
                headers={
                    "Authorization": f"Key {self._api_key}",
                    "Accept": "application/json",
                },
                trust_env=False,  # only the configured URL, never a proxy from the env
            )
        return self._session

    async def _post(
        self, body: dict[str, Any], addresses: Sequence[str], *, by_alias: bool
    ) -> list[TargetResult]:
        """One create request, classified per address; never raises for its outcome."""
        try:
            async with asyncio.timeout(self._timeout):
                resp = await self._client().post(self._url, params={"c": "push"}, json=body)
            status, raw = resp.status_code, resp.content
            retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        except (TimeoutError, httpx.TimeoutException):
            detail = f"OneSignal timed out after {self._timeout}s (retry is idempotent)"
            log.warning("%s", detail)
            return _all(addresses, Outcome.TRANSIENT, detail)
        except httpx.HTTPError as exc:
            log.warning("OneSignal unreachable: %r", exc)
            return _all(addresses, Outcome.TRANSIENT, f"OneSignal unreachable: {exc!r}")
        text = raw.decode("utf-8", "replace")
        answer = _json(text)
        message = _error_text(answer, text)
        if 200 <= status < 300 and isinstance(answer, dict):
            return _classify(answer, addresses, by_alias=by_alias)
        if status in _CREDENTIAL_STATUSES:
            log.error("OneSignal refused our API key or app id (%s): %s", status, message)
            detail = f"OneSignal {status} (our credentials): {message}"
            return _all(addresses, Outcome.TRANSIENT, detail)
        if status >= 500 or status in _TRANSIENT_STATUSES or status < 400:
            log.warning("OneSignal answered %s: %s", status, message)
            return _all(addresses, Outcome.TRANSIENT, f"OneSignal {status}: {message}", retry_after)
        log.warning("OneSignal refused the request (%s): %s", status, message)
        return _all(addresses, Outcome.INVALID, f"OneSignal {status}: {message}")


def _classify(
    answer: dict[str, Any], addresses: Sequence[str], *, by_alias: bool
) -> list[TargetResult]:
    """Per-address outcomes of a 200 answer (sent, partly invalid, or nobody subscribed)."""
    errors = answer.get("errors")
    refused: set[str] = set()
    if isinstance(errors, dict):
        aliases = errors.get("invalid_aliases")
        if by_alias and isinstance(aliases, dict):
            refused = {f"{label}:{v}" for label, vs in aliases.items() for v in _list(vs)}
        elif not by_alias:
            refused = set(_list(errors.get("invalid_player_ids")))
    # A subscription id OneSignal will not push to is a dead device; an alias is no device.
    dead = Outcome.INVALID if by_alias else Outcome.UNREGISTERED
    reason = _error_text(answer, "")
    notification_id = answer.get("id")
    if not notification_id:
        # Nothing was created. "Not subscribed" covers every target; else only those listed.
        everyone = NOT_SUBSCRIBED in reason
        return [
            TargetResult(
                a, dead if everyone or a in refused else Outcome.INVALID, f"OneSignal: {reason}"
            )
            for a in addresses
        ]
    delivered = f"onesignal {notification_id}"
    return [
        TargetResult(a, dead, f"OneSignal {notification_id}: not subscribed")
        if a in refused
        else TargetResult(a, Outcome.DELIVERED, delivered)
        for a in addresses
    ]


def _all(
    addresses: Sequence[str], outcome: Outcome, detail: str, retry_after: float | None = None
) -> list[TargetResult]:
    return [TargetResult(a, outcome, detail, retry_after) for a in addresses]


def _idempotency_key(notification_id: str, batch: int) -> str:
    """The notification id for the first request; a stable UUID derived from it after.

    Derived keys keep every batch of one notification idempotent on its own. An id that
    is not a UUID (never the case in our system) would be refused by OneSignal, so it is
    mapped to a stable UUID instead.
    """
    try:
        base = uuid.UUID(notification_id)
        usable = str(base) == notification_id.lower()
    except ValueError:
        base, usable = uuid.uuid5(_BATCH_NAMESPACE, notification_id), False
    if batch:
        return str(uuid.uuid5(base, str(batch)))
    return notification_id if usable else str(base)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _list(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _error_text(answer: object, fallback: str) -> str:
    """OneSignal's ``errors`` as one line (a list of strings, or an object), else ``fallback``."""
    errors = answer.get("errors") if isinstance(answer, dict) else answer
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)[:500]
    if isinstance(errors, dict) and errors:
        return json.dumps(errors, sort_keys=True)[:500]
    return fallback.strip()[:500] or "no details"
