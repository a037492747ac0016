"""The DeliveryService servicer: user_svc's internal side, for the gateway and workers.

A recipient's delivery profile (from the Redis cache, filled from the database), the
notification records with their deliveries, the workers' status reports, dead push
tokens and the reconciler's claims. The access matrix (the contract) lets only the
gateway and the workers call it; reads that name a user or a notification act for the
tenant the gateway passes (``notify_kit.tenancy``), and another tenant's answer
NOT_FOUND. Reports and claims name notifications by id, which only the gateway handed
out, so they need no tenant.
"""

from __future__ import annotations

import grpc
from notify.v1 import delivery_service_pb2_grpc, user_service_pb2

from notify_kit.context import get_correlation_id
from notify_kit.errors import InvalidArgument, NotFound
from notify_kit.paging import decode_page_token, encode_page_token
from notify_kit.profiles import profile_tenant
from notify_kit.tenancy import tenant_of
from user_svc import validation
from user_svc.cache import ProfileCache
from user_svc.store import UserStore

pb = user_service_pb2


class DeliveryServicer(delivery_service_pb2_grpc.DeliveryServiceServicer):
    """Profiles, notification records and status reports."""

    def __init__(self, store: UserStore, cache: ProfileCache) -> None:
        self._store = store
        self._cache = cache

    async def GetDeliveryProfile(  # noqa: N802
        self, request: pb.GetDeliveryProfileRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeliveryProfileResponse:
        """The profile from Redis, or from the database (filling Redis) on a miss."""
        user_id = validation.parse_id(request.user_id, "user_id")
        key, tenant = str(user_id), tenant_of(context)
        cached = await self._cache.lookup(key)
        if cached.profile is not None:
            if profile_tenant(cached.profile) != tenant:
                raise user_not_found(request.user_id)
            return pb.GetDeliveryProfileResponse(profile=cached.profile)
        profile = await self._store.delivery_profile(user_id)
        if profile is None or profile.tenant != tenant:
            raise user_not_found(request.user_id)
        if cached.generation is not None:
            await self._cache.fill(key, profile, cached.generation)
        return pb.GetDeliveryProfileResponse(profile=profile)

    async def CreateNotificationRecord(  # noqa: N802
        self, request: pb.CreateNotificationRecordRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateNotificationRecordResponse:
        """Record the notification once per id and return what is stored."""
        record = validation.new_notification(
            request.notification, get_correlation_id(), request.outbox
        )
        stored = await self._store.create_notification(record)
        return pb.CreateNotificationRecordResponse(notification=stored)

    async def CreateNotificationRecords(  # noqa: N802
        self, request: pb.CreateNotificationRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateNotificationRecordsResponse:
        """Record a batch of the gateway's notifications in one statement."""
        correlation_id = get_correlation_id()
        records = [
            validation.new_notification(r.notification, correlation_id, r.outbox)
            for r in request.records
        ]
        stored = await self._store.create_notifications(records)
        return pb.CreateNotificationRecordsResponse(
            results=[
                pb.NotificationRecordResult(user_found=False)
                if isinstance(s, NotFound)
                else pb.NotificationRecordResult(notification=s, user_found=True)
                for s in stored
            ]
        )

    async def ClaimStaleDeliveries(  # noqa: N802
        self, request: pb.ClaimStaleDeliveriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClaimStaleDeliveriesResponse:
        """In-flight deliveries untouched for ``older_than``, claimed for the reconciler."""
        older_than = request.older_than.ToTimedelta().total_seconds()
        limit = request.limit or 100
        if older_than < 0 or not 0 < limit <= 500:
            raise InvalidArgument(
                "INVALID_REQUEST",
                "older_than must not be negative and limit must be 1..500",
                field_violations=[("limit", "1..500"), ("older_than", ">= 0")],
            )
        stale = await self._store.claim_stale(older_than, limit)
        return pb.ClaimStaleDeliveriesResponse(deliveries=stale)

    async def GetNotificationRecord(  # noqa: N802
        self, request: pb.GetNotificationRecordRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetNotificationRecordResponse:
        """One record with its deliveries and aggregate status."""
        notification_id = validation.parse_id(request.id, "id")
        stored = await self._store.get_notification(notification_id)
        if stored is None or stored[1] != tenant_of(context):
            raise NotFound(
                "NOTIFICATION_NOT_FOUND",
                "no such notification",
                metadata={"notification_id": request.id},
            )
        return pb.GetNotificationRecordResponse(notification=stored[0])

    async def ListNotificationRecords(  # noqa: N802
        self, request: pb.ListNotificationRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNotificationRecordsResponse:
        """A page of the user's records, newest first, with a keyset page token."""
        user_id = validation.parse_id(request.user_id, "user_id")
        size = validation.page_size(request.page_size)
        after = decode_page_token(request.page_token) if request.page_token else None
        tenant = tenant_of(context)
        records, following = await self._store.list_notifications(user_id, tenant, size, after)
        # An empty first page is the one place where "no such user" (here: none in this
        # tenant) and "no records yet" look alike; only then is the extra lookup worth it.
        if not records and after is None and await self._store.user_tenant(user_id) != tenant:
            raise user_not_found(request.user_id)
        return pb.ListNotificationRecordsResponse(
            notifications=records,
            next_page_token=encode_page_token(following) if following is not None else "",
        )

    async def UpdateDeliveryStatus(  # noqa: N802
        self, request: pb.UpdateDeliveryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateDeliveryStatusResponse:
        """Apply a worker's report unless the delivery already reached a terminal status."""
        stored = await self._store.update_delivery(validation.status_report(request))
        if stored is None:
            raise NotFound(
                "DELIVERY_NOT_FOUND",
                "no such delivery",
                metadata={
                    "notification_id": request.notification_id,
                    "channel": str(request.channel),
                },
            )
        return pb.UpdateDeliveryStatusResponse(delivery=stored)

    async def UpdateDeliveryStatuses(  # noqa: N802
        self, request: pb.UpdateDeliveryStatusesRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateDeliveryStatusesResponse:
        """Apply a worker's batch of reports in order, one connection for all of them."""
        reports = [validation.status_report(r) for r in request.reports]
        stored = await self._store.update_deliveries(reports)
        return pb.UpdateDeliveryStatusesResponse(
            results=[
                pb.DeliveryStatusResult(delivery=d, found=True)
                if d is not None
                else pb.DeliveryStatusResult(found=False)
                for d in stored
            ]
        )

    async def RemoveDeviceToken(  # noqa: N802
        self, request: pb.RemoveDeviceTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveDeviceTokenResponse:
        """Forget a token the push provider rejected; 0 when it was already gone."""
        user_id = validation.parse_id(request.user_id, "user_id")
        token = validation.device_token(request.token, "token")
        removed = await self._store.remove_device_token(user_id, token)
        if removed:
            await self._cache.invalidate(str(user_id))
        return pb.RemoveDeviceTokenResponse(removed=removed)


def user_not_found(user_id: str) -> NotFound:
    """The answer for a user that does not exist in the call's tenant."""
    return NotFound("USER_NOT_FOUND", "no such user", metadata={"user_id": user_id})
