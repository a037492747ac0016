"""A local stand-in for OneSignal's REST API that speaks its "create message" (push) wire format.

The push worker's ``OneSignalProvider`` is pointed at this server (``url`` is its
``base_url``). It answers ``POST /notifications`` (also ``/notifications?c=push``, the
form OneSignal's current reference documents) the way api.onesignal.com does, and is
deliberately stricter than OneSignal about what it accepts, so that a wrong field fails
here instead of being silently ignored in production:

* Auth: ``Authorization: Key <App API key>`` (the rich-key scheme; OneSignal deprecated the
  legacy ``Basic`` app keys, so ``Basic`` is refused like a wrong key): 403
  ``{"errors": ["Access denied. ..."]}``. An App API key belongs to one app, so a body
  naming another ``app_id`` is refused the same way.
* Body: a JSON object with only the fields in ``FIELDS`` (an unknown or deprecated field
  is a 400 here, not ignored); ``app_id``; exactly one targeting method among
  ``include_subscription_ids`` (up to 20,000 ids), ``include_aliases`` (label -> ids, up to
  20,000 in all; needs ``target_channel: "push"``) and ``included_segments``;
  ``contents`` (and ``headings``/``subtitle`` when given) as language maps with a
  non-empty ``"en"``; optional ``data`` (object), ``idempotency_key`` (an RFC 9562 UUID;
  ``external_id`` is its legacy name), ``name``, ``priority`` (0-10), ``ttl`` (seconds, at
  most 28 days). Malformed requests get 400 ``{"errors": ["..."]}``.
* Answers, as documented: 200 ``{"id": "<uuid>", "external_id": null}`` when sent; with
  some targets not subscribed the same plus ``"errors": {"invalid_player_ids": [...]}``
  (subscription ids) or ``{"invalid_aliases": {"external_id": [...]}}``; with nobody
  subscribed 200 ``{"id": "", "external_id": null, "errors": ["All included players are
  not subscribed"]}`` and nothing is created.
* Idempotency: a request whose ``idempotency_key`` created a notification in the last 30
  days gets that request's answer again (same id) and sends nothing new.

Who is subscribed is the fake's registry: ``subscribe(subscription_id)`` and
``subscribe_alias(external_id)`` (or ``accept_all``: everyone is). Segments reach every
registered subscription. ``fail_next`` answers the next well-formed sends with 429 or 5xx
(nothing is created, the idempotency key is not used up); ``set_down`` answers every
request with a status, before reading it, until ``set_down(None)``. ``attempts`` counts
every create request; ``received`` (and ``GET /messages``) holds every notification made.

CLI: ``python -m scripts.onesignal_fake --port 8091 --app-id ID --api-key KEY [--accept-all]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from notify_kit.server import wait_for_shutdown_signal
from scripts.http_peer import Received, serve, shut

log = logging.getLogger(__name__)

MAX_TARGETS = 20_000
IDEMPOTENCY_WINDOW = 30 * 24 * 3600.0  # seconds a key stays idempotent
MAX_TTL = 28 * 24 * 3600  # the longest push TTL the platforms honour
NOT_SUBSCRIBED = "All included players are not subscribed"
ACCESS_DENIED = (
    "Access denied.  Please include an 'Authorization: ...' header with a valid API key "
    "(https://documentation.onesignal.com/docs/keys-and-ids)."
)
RATE_LIMITED = "API rate limit exceeded."
TARGETING = ("include_subscription_ids", "include_aliases", "included_segments")
FIELDS = frozenset(
    {
        "app_id",
        *TARGETING,
        "excluded_segments",
        "target_channel",
        "contents",
        "headings",
        "subtitle",
        "data",
        "idempotency_key",
        "external_id",
        "name",
        "priority",
        "ttl",
    }
)
# Real OneSignal fields this fake refuses, with the reason (deprecated, or not modelled).
_REFUSED = {
    "include_player_ids": "include_player_ids is deprecated: use include_subscription_ids",
    "include_external_user_ids": (
        "include_external_user_ids is deprecated: use include_aliases with external_id"
    ),
    "filters": "filters targeting is not supported by this fake",
    "template_id": "template_id is not supported by this fake: send contents",
}
_FAILURE_STATUSES = frozenset({429, 500, 502, 503, 504})
_FAILURE_TEXT = {
    429: RATE_LIMITED,
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}


@dataclass(frozen=True, slots=True)
class _Failure:
    status: int
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class _Answer:
    """A create request's answer, kept per idempotency key for repeats."""

    at: float
    body: dict[str, Any]


class _Refused(Exception):
    """The request is refused with ``status`` and OneSignal's ``{"errors": [...]}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def errors(status: int, message: str, retry_after: float | None = None) -> web.Response:
    """OneSignal's error body, ``{"errors": [message]}``, with ``Retry-After`` if given."""
    headers = {} if retry_after is None else {"Retry-After": _seconds(retry_after)}
    return web.json_response({"errors": [message]}, status=status, headers=headers)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class OneSignalFake:
    """The fake OneSignal server: ``POST /notifications`` plus ``GET /messages``."""

    def __init__(
        self,
        app_id: str,
        api_key: str,
        *,
        accept_all: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app_id = app_id
        self.api_key = api_key
        self.accept_all = accept_all
        self.log = Received()
        self.attempts = 0
        self.host = "127.0.0.1"
        self.port = 0
        self._clock = clock
        self._subscriptions: set[str] = set()
        self._aliases: set[str] = set()
        self._answers: dict[str, _Answer] = {}
        self._failures: list[_Failure] = []
        self._down: _Failure | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The REST API base URL (``https://api.onesignal.com`` in production)."""
        return f"http://{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port); return the bound port."""
        app = web.Application()
        app.router.add_post("/notifications", self._create)
        app.router.add_get("/messages", self.log.listing)
        self._runner, self.port = await serve(app, host, port, "OneSignal fake")
        self.host = host
        return self.port

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        await shut(self._runner)
        self._runner = None

    # --- the registry and the script ---------------------------------------------------

    def subscribe(self, subscription_id: str) -> None:
        """Make ``subscription_id`` a subscribed push subscription of the app."""
        self._subscriptions.add(subscription_id)

    def unsubscribe(self, subscription_id: str) -> None:
        """Forget ``subscription_id``: it comes back in ``invalid_player_ids`` from now on."""
        self._subscriptions.discard(subscription_id)

    def subscribe_alias(self, external_id: str) -> None:
        """Give the user with this ``external_id`` a subscribed push subscription."""
        self._aliases.add(external_id)

    def fail_next(
        self, count: int = 1, status: int = 503, retry_after: float | None = None
    ) -> None:
        """Answer the next ``count`` well-formed sends with ``status`` (429 or 5xx).

        Nothing is created and the idempotency key stays unused, like a send OneSignal
        refused. A 429 always carries ``Retry-After`` (1 second unless given).
        """
        if status not in _FAILURE_STATUSES:
            raise ValueError(f"unsupported failure status {status}")
        if status == 429 and retry_after is None:
            retry_after = 1
        self._failures.extend([_Failure(status, retry_after)] * count)

    def set_down(self, status: int | None, retry_after: float | None = None) -> None:
        """Answer every create request with ``status`` before reading it; None ends it."""
        if status is not None and status not in _FAILURE_STATUSES:
            raise ValueError(f"unsupported outage status {status}")
        self._down = None if status is None else _Failure(status, retry_after)

    @property
    def received(self) -> list[dict[str, Any]]:
        """Everything accepted so far, in order."""
        return self.log.items

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` notifications were made; return them all."""
        return await self.log.wait_for(count, timeout)

    # --- HTTP ------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self._down is not None:
            down = self._down
            return errors(down.status, _FAILURE_TEXT[down.status], down.retry_after)
        try:
            body = await self._read(request)
        except _Refused as exc:
            log.info("create refused (%s): %s", exc.status, exc)
            return errors(exc.status, str(exc))
        if self._failures:
            failure = self._failures.pop(0)
            return errors(failure.status, _FAILURE_TEXT[failure.status], failure.retry_after)
        # No await from here on: the idempotency check and the record are one step.
        key = body.get("idempotency_key") or body.get("external_id")
        now = self._clock()
        self._answers = {k: a for k, a in self._answers.items() if now - a.at < IDEMPOTENCY_WINDOW}
        if key is not None and key in self._answers:
            log.info("repeat of idempotency key %s: nothing sent", key)
            return web.json_response(self._answers[key].body)
        answer, recipients = self._send(body)
        if answer["id"]:
            if key is not None:
                self._answers[key] = _Answer(now, answer)
            await self._record({"id": answer["id"], "request": body, "recipients": recipients})
        return web.json_response(answer)

    async def _read(self, request: web.Request) -> dict[str, Any]:
        """The checked body of a create request; raises ``_Refused`` with what is wrong."""
        channel = request.query.get("c")
        if channel is not None and channel != "push":
            raise _Refused(400, f"c={channel}: this fake only sends push")
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "key" or key.strip() != self.api_key:
            raise _Refused(403, ACCESS_DENIED)
        try:
            body = await request.json()
        except ValueError as exc:
            raise _Refused(400, "The request body must be valid JSON.") from exc
        if not isinstance(body, dict):
            raise _Refused(400, "The request body must be a JSON object.")
        app_id = body.get("app_id")
        if not isinstance(app_id, str) or not app_id:
            raise _Refused(400, "app_id not found. You may be missing a Content-Type header.")
        if app_id != self.app_id:
            raise _Refused(403, ACCESS_DENIED)
        problem = validate(body)
        if problem is not None:
            raise _Refused(400, problem)
        return body

    def _send(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """OneSignal's answer for a valid body, and who it reached."""
        answer: dict[str, Any] = {"id": "", "external_id": None}
        invalid: dict[str, Any] = {}
        if "include_subscription_ids" in body:
            ids = list(dict.fromkeys(body["include_subscription_ids"]))
            reached = [s for s in ids if self.accept_all or s in self._subscriptions]
            if len(reached) < len(ids):
                subscribed = set(reached)
                invalid["invalid_player_ids"] = [s for s in ids if s not in subscribed]
        elif "include_aliases" in body:
            reached = []
            missing: dict[str, list[str]] = {}
            for label, values in body["include_aliases"].items():
                for value in dict.fromkeys(values):
                    known = label == "external_id" and (self.accept_all or value in self._aliases)
                    if known:
                        reached.append(f"{label}:{value}")
                    else:
                        missing.setdefault(label, []).append(value)
            if missing:
                invalid["invalid_aliases"] = missing
        else:  # included_segments: everyone registered
            reached = sorted(self._subscriptions) + [
                f"external_id:{a}" for a in sorted(self._aliases)
            ]
        if not reached:
            answer["errors"] = [NOT_SUBSCRIBED]
            return answer, []
        answer["id"] = str(uuid.uuid4())
        if invalid:
            answer["errors"] = invalid
        return answer, reached

    async def _record(self, notification: dict[str, Any]) -> None:
        await self.log.add(notification)
        log.info("notification %s to %s", notification["id"], ", ".join(notification["recipients"]))


def validate(body: dict[str, Any]) -> str | None:
    """The first thing wrong with a create body (``app_id`` aside), as OneSignal's message."""
    for field in body:
        if field in _REFUSED:
            return _REFUSED[field]
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        return f"Unknown field(s): {', '.join(unknown)}"
    targeting = [f for f in TARGETING if f in body]
    if not targeting:
        return (
            "You must include which players, segments, or tags you wish to send this "
            "notification to."
        )
    if len(targeting) > 1:
        return f"Only one targeting method may be used per request, got {', '.join(targeting)}"
    problem = _targeting_problem(targeting[0], body)
    if problem is not None:
        return problem
    if "contents" not in body:
        return "Message Notifications must have English language content"
    for field in ("contents", "headings", "subtitle"):
        if field in body:
            problem = _language_map_problem(field, body[field])
            if problem is not None:
                return problem
    return _options_problem(body)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _targeting_problem(method: str, body: dict[str, Any]) -> str | None:
    channel = body.get("target_channel")
    if channel is not None and channel != "push":
        return f"target_channel {channel!r}: this fake only sends push"
    if "excluded_segments" in body and method != "included_segments":
        return "excluded_segments can only be used with included_segments"
    value = body[method]
    if method == "include_aliases":
        if not isinstance(value, dict) or not value:
            return "include_aliases must be an object of alias labels to lists of ids"
        if not all(isinstance(k, str) and _strings(v) and v for k, v in value.items()):
            return "include_aliases must map each alias label to a list of id strings"
        if sum(len(v) for v in value.values()) > MAX_TARGETS:
            return f"include_aliases is limited to {MAX_TARGETS} entries per request"
        if channel is None:
            return "target_channel is required when using include_aliases"
        return None
    if not _strings(value) or not value:
        return f"{method} must be a non-empty list of strings"
    if len(value) > MAX_TARGETS:
        return f"{method} is limited to {MAX_TARGETS} entries per request"
    if "excluded_segments" in body and not _strings(body["excluded_segments"]):
        return "excluded_segments must be a list of strings"
    return None


def _language_map_problem(field: str, value: object) -> str | None:
    if not isinstance(value, dict):
        return f"{field} must be an object of language codes to strings"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return f"Notification {field} for each language must be a string"
    if not value.get("en"):
        return f'{field} must have English language content (an "en" entry)'
    return None


def _options_problem(body: dict[str, Any]) -> str | None:
    if "data" in body and not isinstance(body["data"], dict):
        return "data must be a JSON object"
    keys = [body[k] for k in ("idempotency_key", "external_id") if k in body]
    for key in keys:
        if not isinstance(key, str) or not _is_uuid(key):
            return "idempotency_key must be a UUID (RFC 9562)"
    if len(set(keys)) > 1:
        return "idempotency_key and external_id disagree"
    if "name" in body and not isinstance(body["name"], str):
        return "name must be a string"
    priority = body.get("priority", 10)
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 10:
        return "priority must be an integer from 0 to 10"
    ttl = body.get("ttl", 0)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TTL:
        return f"ttl must be an integer number of seconds from 0 to {MAX_TTL}"
    return None


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


async def _serve(host: str, port: int, app_id: str, api_key: str, accept_all: bool) -> None:
    fake = OneSignalFake(app_id, api_key, accept_all=accept_all)
    await fake.start(host, port)
    log.info("NOTIFY_ONESIGNAL_URL=%s", fake.url)
    try:
        await wait_for_shutdown_signal()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the fake until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--app-id", required=True, help="the only app_id accepted")
    parser.add_argument("--api-key", required=True, help="the App API key (Authorization: Key …)")
    parser.add_argument(
        "--accept-all",
        action="store_true",
        help="every subscription id and alias counts as subscribed (for the dev system)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args.host, args.port, args.app_id, args.api_key, args.accept_all))


if __name__ == "__main__":
    main()
