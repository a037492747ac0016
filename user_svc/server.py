"""The UserService servicer (the public methods): validate, call the store and the cache,
answer.

Errors are raised as ``notify_kit.errors`` types; the shared server interceptor turns
them into statuses and has already checked the caller against the access matrix.
Every write that changes what a sender sees (user, preferences, devices) invalidates the
cached delivery profile after it is committed.

Every user belongs to a tenant, and every call acts for one (``notify_kit.tenancy``, the
gateway passes its key's): a user, its devices or its notifications seen from another
tenant answer NOT_FOUND, exactly as if they did not exist.

The internal methods are DeliveryService's (``user_svc.delivery``); UserService's
deprecated copies of them are the same code (inherited), so a caller from before the
split gets what a new one gets.
"""

from __future__ import annotations

import logging
import uuid

import grpc
from notify.v1 import user_service_pb2, user_service_pb2_grpc

from notify_kit.errors import NotFound
from notify_kit.tenancy import tenant_of
from user_svc import validation
from user_svc.delivery import DeliveryServicer, user_not_found

log = logging.getLogger(__name__)

pb = user_service_pb2


class UserServicer(DeliveryServicer, user_service_pb2_grpc.UserServiceServicer):
    """Users, preferences and devices. UserService's deprecated internal methods are the
    DeliveryServicer's own (first in the MRO, before the generated UNIMPLEMENTED ones)."""

    async def _in_tenant(
        self, user_id: uuid.UUID, raw_id: str, context: grpc.aio.ServicerContext
    ) -> None:
        """NOT_FOUND unless the user exists in the tenant the call acts for."""
        if await self._store.user_tenant(user_id) != tenant_of(context):
            raise user_not_found(raw_id)

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
            raise user_not_found(request.id)
        return pb.GetUserResponse(user=user)

    async def UpdatePreferences(  # noqa: N802
        self, request: pb.UpdatePreferencesRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdatePreferencesResponse:
        """Replace the preferences (omitted means every channel enabled)."""
        user_id = validation.parse_id(request.user_id, "user_id")
        await self._in_tenant(user_id, request.user_id, context)
        stored = await self._store.update_preferences(user_id, request.preferences)
        if stored is None:
            raise user_not_found(request.user_id)
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
