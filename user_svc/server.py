"""The UserService servicer: validate, call the store and the cache, answer.

Errors are raised as ``notify_kit.errors`` types; the shared server interceptor turns
them into statuses and has already checked the caller against the access matrix.
Every write that changes what a sender sees (user, preferences, devices) invalidates the
cached delivery profile after it is committed.

Every user belongs to a tenant, and every call acts for one (``notify_kit.tenancy``, the
gateway passes its key's): a user, its devices or its notifications seen from another
tenant answer NOT_FOUND, exactly as if they did not exist.
"""

from __future__ import annotations

import logging
import uuid

import grpc
from notify.v1 import user_service_pb2, user_service_pb2_grpc

from notify_kit.context import get_correlation_id
from notify_kit.errors import InvalidArgument, NotFound
from notify_kit.paging import decode_page_token, encode_page_token
from notify_kit.profiles import profile_tenant
from notify_kit.tenancy import tenant_of
from user_svc import validation
from user_svc.cache import ProfileCache
from user_svc.store import UserStore

log = logging.getLogger(__name__)

pb = user_service_pb2


class UserServicer(user_service_pb2_grpc.UserServiceServicer):
    """Users, preferences, devices and notification status records."""

    def __init__(self, store: UserStore, cache: ProfileCache) -> None:
        self._store = store
        self._cache = cache

    async def _in_tenant(
        self, user_id: uuid.UUID, raw_id: str, context: grpc.aio.ServicerContext
    ) -> None:
        """NOT_FOUND unless the user exists in the tenant the call acts for."""
        if await self._store.user_tenant(user_id) != tenant_of(context):
            raise _user_not_found(raw_id)

    async def CreateUser(  # noqa: N802 (gRPC method name)
        self, request: pb.CreateUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateUserResponse:
        """Create a user; the e-mail address is unique regardless of case."""
        user = await self._store.create_user(validation.new_user(request.user), tenant_of(context))
        return pb.CreateUserResponse(user=user)

    async def GetUser(  # noqa: N802
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserResponse:
        """The user with preferences and devices, read from the database."""
        user_id = validation.parse_id(request.id, "id")
        user = await self._store.get_user(user_id)
        if user is None or user.tenant != tenant_of(context):
            raise _user_not_found(request.id)
        return pb.GetUserResponse(user=user)

    async def UpdatePreferences(  # noqa: N802
        self, request: pb.UpdatePreferencesRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdatePreferencesResponse:
        """Replace the preferences (omitted means every channel enabled)."""
        user_id = validation.parse_id(request.user_id, "user_id")
        await self._in_tenant(user_id, request.user_id, context)
        stored = await self._store.update_preferences(user_id, request.preferences)
        if stored is None:
            raise _user_not_found(request.user_id)
        await self._cache.invalidate(str(user_id))
        return pb.UpdatePreferencesResponse(preferences=stored)

    async def RegisterDevice(  # noqa: N802
        self, request: pb.RegisterDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterDeviceResponse:
        """Register a device; a known token stays one device and follows its new user."""
        user_id = validation.parse_id(request.user_id, "user_id")
        device = validation.new_device(request.device)
        await self._in_tenant(user_id, request.user_id, context)
        registration = await self._store.register_device(user_id, device)
        if registration.previous_user_id is not None:
            log.info(
                "device %s moved from user %s to user %s",
                registration.device.id,
                registration.previous_user_id,
                user_id,
            )
            await self._cache.invalidate(str(user_id), str(registration.previous_user_id))
        else:
            await self._cache.invalidate(str(user_id))
        return pb.RegisterDeviceResponse(device=registration.device)

    async def DeleteDevice(  # noqa: N802
        self, request: pb.DeleteDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDeviceResponse:
        """Delete one of the user's devices."""
        user_id = validation.parse_id(request.user_id, "user_id")
        device_id = validation.parse_id(request.device_id, "device_id")
        await self._in_tenant(user_id, request.user_id, context)
        if not await self._store.delete_device(user_id, device_id):
            raise NotFound(
                "DEVICE_NOT_FOUND",
                "the user has no such device",
                metadata={"device_id": request.device_id},
            )
        await self._cache.invalidate(str(user_id))
        return pb.DeleteDeviceResponse()

    async def GetDeliveryProfile(  # noqa: N802
        self, request: pb.GetDeliveryProfileRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeliveryProfileResponse:
        """The profile from Redis, or from the database (filling Redis) on a miss."""
        user_id = validation.parse_id(request.user_id, "user_id")
        key, tenant = str(user_id), tenant_of(context)
        cached = await self._cache.lookup(key)
        if cached.profile is not None:
            if profile_tenant(cached.profile) != tenant:
                raise _user_not_found(request.user_id)
            return pb.GetDeliveryProfileResponse(profile=cached.profile)
        profile = await self._store.delivery_profile(user_id)
        if profile is None or profile.tenant != tenant:
            raise _user_not_found(request.user_id)
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
            raise _user_not_found(request.user_id)
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


def _user_not_found(user_id: str) -> NotFound:
    return NotFound("USER_NOT_FOUND", "no such user", metadata={"user_id": user_id})
