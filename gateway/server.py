"""NotificationService: validate, dedupe, route to channels, record, queue, answer.

``SendNotification`` answers OK only after every routed channel's job is confirmed by
the broker. With an idempotency key the notification id is derived from the key
(UUIDv5), so even a retry that outlives the idempotency lease converges on the same
record and the same job id, which the workers dedupe.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Mapping
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, timestamp_pb2
from notify.v1 import (
    common_pb2,
    delivery_service_pb2_grpc,
    jobs_pb2,
    notification_service_pb2,
    notification_service_pb2_grpc,
    template_service_pb2,
    template_service_pb2_grpc,
    user_service_pb2,
)

from gateway import variables
from gateway.auth import current_api_key
from gateway.cache import IdempotencyCache
from gateway.limits import RateLimiter, Window, in_force, recipient_log
from gateway.records import RecordWriter
from notify_kit import metrics
from notify_kit.amqp import EMAIL, PUSH, JobKind, Publisher
from notify_kit.cache import LruCache
from notify_kit.context import get_correlation_id
from notify_kit.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from notify_kit.interceptors import metadata_value
from notify_kit.profiles import cached_profile, profile_tenant
from notify_kit.rpc import clamp_timeout, unary
from notify_kit.telemetry import inject_trace_context
from notify_kit.tenancy import tenant_metadata

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "idempotency-key"
REPLAYED_HEADER = "idempotent-replayed"
_NAMESPACE = uuid.UUID("6f1c1c9e-4d0b-4f43-9a57-8f3e1f9d2a10")
_DEFAULT_TTL = 24 * 3600  # the contract bounds a given ttl to 1 minute .. 7 days
_MAX_VARIABLES_BYTES = 32 * 1024

S = common_pb2
CHANNEL_KINDS: dict[int, JobKind] = {S.CHANNEL_EMAIL: EMAIL, S.CHANNEL_PUSH: PUSH}
# The same both ways by the kind's key (how the dead letters and limits store channels).
CHANNEL_OF_KIND = {
    kind.key: S.Channel.ValueType(channel) for channel, kind in CHANNEL_KINDS.items()
}
KIND_OF_CHANNEL = {channel: kind.key for channel, kind in CHANNEL_KINDS.items()}
_STATUS_LABELS = {
    S.NOTIFICATION_STATUS_QUEUED: "queued",
    S.NOTIFICATION_STATUS_SUPPRESSED: "suppressed",
}


def _idempotency_key(req: notification_service_pb2.SendNotificationRequest, header: str) -> str:
    """The request's idempotency key, from the body or the header: one means the same as
    the other, and two different ones are a contradiction the client must resolve."""
    body = req.idempotency_key
    if body and header and body != header:
        raise InvalidArgument(
            "IDEMPOTENCY_KEY_CONFLICT",
            f"the body's idempotency_key and the {IDEMPOTENCY_HEADER} header differ",
            field_violations=[("idempotency_key", f"must match the {IDEMPOTENCY_HEADER} header")],
        )
    return body or header


def _fingerprint(req: notification_service_pb2.SendNotificationRequest) -> bytes:
    """What makes two requests the same: every field but where the key was carried."""
    body = notification_service_pb2.SendNotificationRequest()
    body.CopyFrom(req)
    body.ClearField("idempotency_key")
    return hashlib.sha256(body.SerializeToString(deterministic=True)).digest()


def _validate(req: notification_service_pb2.SendNotificationRequest, key: str) -> None:
    """What the contract cannot say: the size of the variables and the header's key.

    Every field format (ids, channels, language, ttl, the body's key) is a rule in
    notification_service.proto, checked before this runs.
    """
    problems: list[tuple[str, str]] = []
    if req.variables.ByteSize() > _MAX_VARIABLES_BYTES:
        problems.append(("variables", f"at most {_MAX_VARIABLES_BYTES} bytes"))
    if key and not (len(key) <= 128 and key.isascii() and key.isprintable()):
        problems.append(("idempotency_key", "1-128 printable ASCII characters"))
    if problems:
        raise InvalidArgument(
            "INVALID_REQUEST", "the request has invalid fields", field_violations=problems
        )


def _template_channels(
    template: template_service_pb2.Template,
) -> set[common_pb2.Channel.ValueType]:
    channels: set[common_pb2.Channel.ValueType] = set()
    for content in template.contents:
        if content.HasField("email"):
            channels.add(S.CHANNEL_EMAIL)
        if content.HasField("push"):
            channels.add(S.CHANNEL_PUSH)
    return channels


def _suppression(channel: int, profile: user_service_pb2.DeliveryProfile) -> str:
    """Why ``channel`` must not be used for this user ('' when it may)."""
    if channel == S.CHANNEL_EMAIL and profile.preferences.email_opt_out:
        return "user opted out of e-mail"
    if channel == S.CHANNEL_PUSH and profile.preferences.push_opt_out:
        return "user opted out of push"
    if channel == S.CHANNEL_PUSH and not profile.devices:
        return "user has no push devices"
    return ""


class NotificationServicer(notification_service_pb2_grpc.NotificationServiceServicer):
    """The public front door for notifications."""

    def __init__(
        self,
        users: delivery_service_pb2_grpc.DeliveryServiceStub,
        records: RecordWriter,
        templates: template_service_pb2_grpc.TemplateServiceStub,
        publisher: Publisher,
        idempotency: IdempotencyCache,
        *,
        upstream_timeout: float,
        template_cache_ttl: float,
        profiles: aioredis.Redis | None = None,
        limiter: RateLimiter | None = None,
        recipient_limits: Mapping[str, Window] | None = None,
    ) -> None:
        self._users = users
        self._limiter = limiter
        self._recipient_limits = dict(recipient_limits or {})
        self._records = records
        self._accepting: set[asyncio.Future[Any]] = set()  # held until they finish
        self._profiles = profiles  # user_svc's profile cache (notify_kit.profiles)
        self._templates = templates
        self._publisher = publisher
        self._idempotency = idempotency
        self._timeout = upstream_timeout
        # Keyed by (tenant, id): two tenants may each have a template of one id.
        self._template_cache: LruCache[tuple[str, str], template_service_pb2.Template] = LruCache(
            ttl=template_cache_ttl
        )

    async def SendNotification(  # noqa: N802 (gRPC method name)
        self,
        request: notification_service_pb2.SendNotificationRequest,
        context: grpc.aio.ServicerContext,
    ) -> notification_service_pb2.SendNotificationResponse:
        """Accept, route and durably queue one notification (see module docstring).

        A send whose caller goes away (its deadline, a closed connection) still runs to
        its end: once its record may be stored, publishing the job now beats leaving it
        to the reconciler's sweep, and a retry with the same key converges on it.
        """
        key = _idempotency_key(request, metadata_value(context, IDEMPOTENCY_HEADER) or "")
        _validate(request, key)
        timeout = clamp_timeout(context.time_remaining(), self._timeout)
        work = asyncio.ensure_future(self._accept(request, key, timeout))
        self._accepting.add(work)
        work.add_done_callback(self._settled)
        response = await asyncio.shield(work)
        if response.idempotent_replayed:
            await context.send_initial_metadata(((REPLAYED_HEADER, "true"),))
        return response

    def _settled(self, work: asyncio.Future[Any]) -> None:
        self._accepting.discard(work)
        if not work.cancelled():
            work.exception()  # retrieved: a send whose caller left fails unseen

    async def _accept(
        self,
        request: notification_service_pb2.SendNotificationRequest,
        key: str,
        timeout: float,
    ) -> notification_service_pb2.SendNotificationResponse:
        if not key:
            return await self._send(request, str(uuid.uuid4()), "", timeout)
        api_key = current_api_key()
        fingerprint = _fingerprint(request)
        claim = await self._idempotency.claim(api_key.id, key, fingerprint)
        if claim.response is not None:
            replay = notification_service_pb2.SendNotificationResponse.FromString(claim.response)
            replay.idempotent_replayed = True
            metrics.IDEMPOTENT_REPLAYS.inc()
            return replay
        # The body's fingerprint is part of the name: reusing a key for another request
        # once the idempotency record is gone (24 h, or a Redis loss) makes a new
        # notification instead of silently answering with the old one.
        notification_id = str(uuid.uuid5(_NAMESPACE, f"{api_key.id}:{key}:{fingerprint.hex()}"))
        try:
            response = await self._send(request, notification_id, key, timeout)
        except BaseException:
            await self._idempotency.release(claim)
            raise
        await self._idempotency.complete(claim, fingerprint, response.SerializeToString())
        return response

    async def _send(
        self,
        request: notification_service_pb2.SendNotificationRequest,
        notification_id: str,
        idempotency_key: str,
        timeout: float,
    ) -> notification_service_pb2.SendNotificationResponse:
        tenant = current_api_key().tenant
        profile, template = await asyncio.gather(
            self._profile(request.user_id, tenant, timeout),
            self._template(tenant, request.template_id, timeout),
        )
        variables.check(template, request.variables)
        available = _template_channels(template)
        wanted = list(request.channels) or sorted(available)
        missing = [c for c in wanted if c not in available]
        if missing:
            raise FailedPrecondition(
                "CHANNEL_NOT_IN_TEMPLATE",
                f"template {template.id!r} has no content for "
                + ", ".join(S.Channel.Name(c) for c in missing),
                metadata={"template_id": template.id},
            )
        deliveries = []
        for channel in wanted:
            why = _suppression(channel, profile)
            status = S.NOTIFICATION_STATUS_SUPPRESSED if why else S.NOTIFICATION_STATUS_QUEUED
            deliveries.append(S.Delivery(channel=channel, status=status, detail=why))
        await self._within_recipient_limits(request.user_id, deliveries, notification_id)
        record = S.Notification(
            id=notification_id,
            user_id=request.user_id,
            template_id=request.template_id,
            deliveries=deliveries,
            correlation_id=get_correlation_id(),
        )
        # Recorded as QUEUED before publishing, with each job in the record's outbox, so
        # a worker's first report always finds the record and no second round trip is
        # needed after the confirm. If the confirm never comes the client gets
        # UNAVAILABLE and the record stays QUEUED: the job may be in the broker (a lost
        # confirm) or not; a retry with the same idempotency key converges on this
        # record and republishes, and if nobody retries, the reconciler republishes the
        # outbox copy (gateway/reconciler.py).
        meta = self._meta(request, notification_id, idempotency_key, tenant)
        language = request.language or profile.locale or "en"
        jobs = {
            d.channel: _job(d.channel, meta, request, profile, language, template.version)
            for d in deliveries
            if d.status == S.NOTIFICATION_STATUS_QUEUED
        }
        stored = await self._records.create(
            user_service_pb2.CreateNotificationRecordRequest(
                notification=record,
                outbox=[
                    user_service_pb2.OutboxJob(
                        channel=c, job=job.SerializeToString(), expire_time=meta.expire_time
                    )
                    for c, job in jobs.items()
                ],
            )
        )
        to_queue = [
            d.channel
            for d in stored.deliveries
            if d.status == S.NOTIFICATION_STATUS_QUEUED and d.channel in jobs
        ]
        await asyncio.gather(*(self._publish(c, jobs[c]) for c in to_queue))
        for delivery in stored.deliveries:
            metrics.NOTIFICATIONS_ACCEPTED.labels(
                CHANNEL_KINDS[delivery.channel].key, _STATUS_LABELS.get(delivery.status, "other")
            ).inc()
        return notification_service_pb2.SendNotificationResponse(notification=stored)

    async def _within_recipient_limits(
        self, user_id: str, deliveries: list[S.Delivery], notification_id: str
    ) -> None:
        """Count this notification against the user's limit on each queued channel, or
        refuse it (RESOURCE_EXHAUSTED) if one is full; suppressed channels count nothing.

        The limits are the key's tenant's (read with the key, ``gateway.store``), else
        the gateway's defaults."""
        if self._limiter is None:
            return
        queued = {
            CHANNEL_KINDS[d.channel].key
            for d in deliveries
            if d.status == S.NOTIFICATION_STATUS_QUEUED
        }
        limits = in_force(self._recipient_limits, current_api_key().recipient_limits)
        limited = {kind: w for kind, w in limits.items() if kind in queued}
        windows = {recipient_log(user_id, kind): w for kind, w in limited.items()}
        wait = await self._limiter.admit(notification_id, windows)
        if wait:
            described = ", ".join(
                f"{w.limit} {kind} per {w.seconds:g}s" for kind, w in limited.items()
            )
            metrics.RATE_LIMITED.labels("recipient").inc()
            raise ResourceExhausted(
                "RECIPIENT_RATE_LIMITED",
                f"this user has had the most notifications allowed ({described}); retry later",
                metadata={"user_id": user_id},
                retry_after=wait,
            )

    def _meta(
        self,
        request: notification_service_pb2.SendNotificationRequest,
        notification_id: str,
        idempotency_key: str,
        tenant: str,
    ) -> jobs_pb2.JobMeta:
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        ttl = (
            request.ttl if request.HasField("ttl") else duration_pb2.Duration(seconds=_DEFAULT_TTL)
        )
        expire = timestamp_pb2.Timestamp(seconds=now.seconds + ttl.seconds, nanos=now.nanos)
        return jobs_pb2.JobMeta(
            notification_id=notification_id,
            attempt=1,
            correlation_id=get_correlation_id(),
            trace_context=inject_trace_context(),
            idempotency_key=idempotency_key,
            expire_time=expire,
            enqueue_time=now,
            user_id=request.user_id,
            tenant=tenant,
        )

    async def _publish(self, channel: int, job: jobs_pb2.EmailJob | jobs_pb2.PushJob) -> None:
        kind = CHANNEL_KINDS[channel]
        await self._publisher.publish(
            kind.key,
            job.SerializeToString(),
            message_type=kind.message_type,
            message_id=job.meta.notification_id,
            correlation_id=job.meta.correlation_id,
        )

    async def _profile(
        self, user_id: str, tenant: str, timeout: float
    ) -> user_service_pb2.DeliveryProfile:
        """The recipient's profile: user_svc's cache entry (one Redis GET), else user_svc;
        NOT_FOUND for a user of another tenant than the key's."""
        if self._profiles is not None:
            cached = await cached_profile(self._profiles, user_id)
            if cached is not None:
                if profile_tenant(cached) != tenant:
                    raise NotFound(
                        "USER_NOT_FOUND", f"user {user_id} not found", metadata={"user_id": user_id}
                    )  # another tenant's user: as if there were none, as user_svc says it
                return cached
        response: user_service_pb2.GetDeliveryProfileResponse = await unary(
            self._users.GetDeliveryProfile,
            user_service_pb2.GetDeliveryProfileRequest(user_id=user_id),
            timeout=timeout,
            metadata=tenant_metadata(tenant),
        )
        return response.profile

    async def _template(
        self, tenant: str, template_id: str, timeout: float
    ) -> template_service_pb2.Template:
        """The tenant's template (cached briefly); while TemplateService is down, the last
        known one.

        Sends keep being accepted through a TemplateService outage for templates seen
        before it; the workers hold their jobs until it is back (no attempt is spent).
        """
        key = (tenant, template_id)
        hit = self._template_cache.lookup(key)
        if hit is not None:
            return hit[0]
        try:
            response = await unary(
                self._templates.GetTemplate,
                template_service_pb2.GetTemplateRequest(id=template_id),
                timeout=timeout,
                metadata=tenant_metadata(tenant),
            )
        except (Unavailable, DeadlineExceeded):
            last = self._template_cache.stale(key)
            if last is None:
                raise
            log.warning("template service down; accepting with the last known template")
            return last[0]
        template: template_service_pb2.Template = response.template
        self._template_cache.put(key, template)
        return template

    async def GetNotification(  # noqa: N802
        self,
        request: notification_service_pb2.GetNotificationRequest,
        context: grpc.aio.ServicerContext,
    ) -> notification_service_pb2.GetNotificationResponse:
        """The notification with every channel's status, from UserService."""
        response = await unary(
            self._users.GetNotificationRecord,
            user_service_pb2.GetNotificationRecordRequest(id=request.id),
            timeout=clamp_timeout(context.time_remaining(), self._timeout),
            metadata=tenant_metadata(current_api_key().tenant),
        )
        return notification_service_pb2.GetNotificationResponse(notification=response.notification)

    async def ListNotifications(  # noqa: N802
        self,
        request: notification_service_pb2.ListNotificationsRequest,
        context: grpc.aio.ServicerContext,
    ) -> notification_service_pb2.ListNotificationsResponse:
        """A user's notifications, newest first, from UserService."""
        response = await unary(
            self._users.ListNotificationRecords,
            user_service_pb2.ListNotificationRecordsRequest(
                user_id=request.user_id,
                page_size=request.page_size,
                page_token=request.page_token,
            ),
            timeout=clamp_timeout(context.time_remaining(), self._timeout),
            metadata=tenant_metadata(current_api_key().tenant),
        )
        return notification_service_pb2.ListNotificationsResponse(
            notifications=response.notifications, next_page_token=response.next_page_token
        )


def _job(
    channel: int,
    meta: jobs_pb2.JobMeta,
    request: notification_service_pb2.SendNotificationRequest,
    profile: user_service_pb2.DeliveryProfile,
    language: str,
    template_version: int,
) -> jobs_pb2.EmailJob | jobs_pb2.PushJob:
    """The queue job of one channel, pinned to the template version accepted for."""
    if CHANNEL_KINDS[channel] is EMAIL:
        return jobs_pb2.EmailJob(
            meta=meta,
            to_address=profile.email,
            to_name=profile.display_name,
            template_id=request.template_id,
            language=language,
            variables=request.variables,
            template_version=template_version,
        )
    return jobs_pb2.PushJob(
        meta=meta,
        targets=[
            jobs_pb2.PushTarget(
                device_id=d.id, token=d.token, platform=d.platform, token_type=d.token_type
            )
            for d in profile.devices
        ],
        template_id=request.template_id,
        language=language,
        variables=request.variables,
        template_version=template_version,
    )
