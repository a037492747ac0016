"""Push through FCM HTTP v1 with firebase-admin (OneSignal is `push_worker.onesignal`).

A push goes to every device of the user; a provider reports what happened per device
and the handler decides what that means for the job (delivered when any device took
it). FCM errors are classified here, at the boundary: ``UNREGISTERED`` means the token
is dead, throttling, outages and timeouts are transient, anything else is a bad target.
A device is addressed by what it registered: a registration token as ``token``, a
Firebase installation ID as ``fid``; FCM cannot reach a OneSignal subscription.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
import warnings
from pathlib import Path
from typing import Any

import firebase_admin
import google.auth.exceptions
import google.auth.transport.requests
import requests
from firebase_admin import credentials, exceptions, messaging

from notify_kit.jobs.errors import TransientError
from push_worker.outgoing import Outcome, OutgoingPush, PushResult, Target, TargetKind, TargetResult

log = logging.getLogger(__name__)

FCM_BATCH_LIMIT = 500  # send_each_async refuses more messages than this

_TRANSIENT_FCM = (
    exceptions.UnavailableError,
    exceptions.InternalError,
    exceptions.ResourceExhaustedError,  # includes QuotaExceededError (429)
    exceptions.DeadlineExceededError,
    exceptions.AbortedError,
    exceptions.CancelledError,
    exceptions.UnauthenticatedError,  # our access token was refused: refresh and retry
    exceptions.UnknownError,  # network errors without an HTTP answer
)


class FcmProvider:
    """FCM HTTP v1 through firebase-admin's async client, one Firebase app per sender.

    firebase-admin refreshes its OAuth2 token with a blocking HTTP call from inside its
    async auth flow, which would stall the whole event loop; the token is therefore
    refreshed here first, in a thread and under a lock, so the library always finds a
    valid one. It also retries 500/503 on its own (up to 4 times with backoff); the
    whole batch is bounded by ``3 * timeout``.
    """

    name = "fcm"
    kinds = frozenset({TargetKind.FCM_TOKEN, TargetKind.FCM_FID})

    def __init__(self, credentials_path: Path, *, url: str, timeout: float) -> None:
        # firebase-admin has no emulator setting: the URL is a class attribute read when
        # an app's messaging service is created, so set it and create the service now.
        messaging._MessagingService.FCM_URL = url
        self._app = firebase_admin.initialize_app(
            credentials.Certificate(str(credentials_path)),
            name=f"push_worker-{uuid.uuid4().hex}",
            options={"httpTimeout": timeout},
        )
        self._service: Any = messaging._get_messaging_service(self._app)
        self._credential: Any = self._app.credential.get_credential()
        self._timeout = timeout
        self._session = requests.Session()
        self._refresh_lock = asyncio.Lock()

    async def send(self, push: OutgoingPush) -> PushResult:
        """Send to every FCM target (in batches of 500) and classify each answer."""
        await self._ensure_access_token()
        data = {**push.data, "notification_id": push.notification_id}
        results: list[TargetResult] = []
        targets = [t for t in push.targets if t.kind in self.kinds]
        for start in range(0, len(targets), FCM_BATCH_LIMIT):
            batch = targets[start : start + FCM_BATCH_LIMIT]
            messages = [
                _message(t, messaging.Notification(title=push.title, body=push.body), data)
                for t in batch
            ]
            try:
                async with asyncio.timeout(3 * self._timeout):
                    response = await messaging.send_each_async(messages, app=self._app)
            except (TimeoutError, exceptions.FirebaseError) as exc:
                results += [TargetResult(t.address, Outcome.TRANSIENT, repr(exc)) for t in batch]
                continue
            except ValueError as exc:  # firebase-admin refused to encode the messages
                results += [TargetResult(t.address, Outcome.INVALID, str(exc)) for t in batch]
                continue
            results += [
                _classify(t.address, r) for t, r in zip(batch, response.responses, strict=True)
            ]
        return PushResult(results)

    async def close(self) -> None:
        """Close the HTTP clients and delete the Firebase app."""
        # delete_app() closes the async client with asyncio.run(), which cannot run on
        # our loop: close it here first, then let delete_app finish in a thread.
        await self._service._async_client.aclose()
        await asyncio.to_thread(firebase_admin.delete_app, self._app)
        self._session.close()

    async def _ensure_access_token(self) -> None:
        if self._credential.valid:
            return
        async with self._refresh_lock:
            if self._credential.valid:
                return
            request = functools.partial(
                google.auth.transport.requests.Request(self._session), timeout=self._timeout
            )
            try:
                async with asyncio.timeout(self._timeout + 1):
                    await asyncio.to_thread(self._credential.refresh, request)
            except (TimeoutError, google.auth.exceptions.GoogleAuthError) as exc:
                raise TransientError(f"FCM credentials: {exc!r}") from exc
            log.info("FCM access token refreshed")


def _message(
    target: Target, notification: messaging.Notification, data: dict[str, str]
) -> messaging.Message:
    """The FCM message for one device, addressed in the field its kind belongs in."""
    if target.kind is TargetKind.FCM_FID:
        return messaging.Message(fid=target.address, notification=notification, data=data)
    # firebase-admin 7.5+ marks ``token`` deprecated in favour of ``fid``, but they are
    # different identifiers: a registration token is still sent as ``token``.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Message.token is deprecated", DeprecationWarning)
        return messaging.Message(token=target.address, notification=notification, data=data)


def _classify(token: str, response: Any) -> TargetResult:
    if response.success:
        return TargetResult(token, Outcome.DELIVERED, str(response.message_id))
    error = response.exception
    if isinstance(error, messaging.UnregisteredError):
        return TargetResult(token, Outcome.UNREGISTERED, str(error))
    if isinstance(error, _TRANSIENT_FCM):
        return TargetResult(token, Outcome.TRANSIENT, f"{type(error).__name__}: {error}")
    return TargetResult(token, Outcome.INVALID, f"{type(error).__name__}: {error}")
