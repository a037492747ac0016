"""The TemplateService servicer: validate, call the store and the renderer, build messages."""

from __future__ import annotations

import grpc
from notify.v1 import common_pb2, template_service_pb2, template_service_pb2_grpc

from notify_kit.cache import LruCache
from notify_kit.errors import AlreadyExists, FailedPrecondition, NotFound
from notify_kit.rpc import clamp_timeout
from notify_kit.templating.messages import (
    email_message,
    has_channel,
    push_message,
    variables_from_struct,
)
from notify_kit.templating.renderer import Renderer
from notify_kit.tenancy import tenant_of
from template_svc import messages
from template_svc.model import Version
from template_svc.store import TemplateStore

pb = template_service_pb2


class TemplateServicer(template_service_pb2_grpc.TemplateServiceServicer):
    """Templates with immutable versions, rendered in a sandbox.

    Every call acts for the tenant its caller names (``notify_kit.tenancy``: the
    gateway, for the key's tenant; a worker, for the job's): a template of another
    tenant answers TEMPLATE_NOT_FOUND, exactly as one that does not exist, and the
    caches are keyed by tenant so one tenant's version never answers for another's.
    """

    def __init__(
        self,
        store: TemplateStore,
        renderer: Renderer,
        versions: LruCache[tuple[str, str, int], Version],
        *,
        render_timeout: float,
    ) -> None:
        self._store = store
        self._renderer = renderer
        self._versions = versions
        self._render_timeout = render_timeout

    async def CreateTemplate(  # noqa: N802 (the proto's method name)
        self, request: pb.CreateTemplateRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTemplateResponse:
        """Validate, test-render every field, then insert version 1."""
        template = request.template
        default, contents, declared = messages.new_template(template)
        contents = await self._renderer.prepare(contents, "template.contents")
        violations = messages.check_declared(declared, contents, "template.contents")
        if violations:
            raise messages.invalid(violations)
        created = await self._store.create(
            tenant_of(context), template.id, template.description, default, contents, declared
        )
        if created is None:
            raise AlreadyExists(
                "TEMPLATE_EXISTS",
                f"template {template.id} already exists",
                metadata={"template_id": template.id},
            )
        return pb.CreateTemplateResponse(template=messages.template_message(created))

    async def GetTemplate(  # noqa: N802 (the proto's method name)
        self, request: pb.GetTemplateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTemplateResponse:
        """The template with its current version's contents."""
        template = await self._store.get(tenant_of(context), request.id)
        if template is None:
            raise _not_found(request.id)
        return pb.GetTemplateResponse(template=messages.template_message(template))

    async def CreateTemplateVersion(  # noqa: N802 (the proto's method name)
        self, request: pb.CreateTemplateVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTemplateVersionResponse:
        """Validate and test-render the contents, then append them as the next version."""
        tenant = tenant_of(context)
        previous = await self._version(tenant, request.template_id, 0)
        default, contents, declared = messages.new_version(request, previous)
        contents = await self._renderer.prepare(contents, "contents")
        violations = messages.check_declared(declared, contents, "contents")
        if violations:
            raise messages.invalid(violations)
        template = await self._store.add_version(
            tenant, request.template_id, default, contents, declared
        )
        if template is None:
            raise _not_found(request.template_id)
        return pb.CreateTemplateVersionResponse(template=messages.template_message(template))

    async def RenderTemplate(  # noqa: N802 (the proto's method name)
        self, request: pb.RenderTemplateRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenderTemplateResponse:
        """Render one channel of one version in the best available language.

        The id's format, the channel (email or push) and the version (0: current) are
        the contract's rules, checked before this runs.
        """
        tenant = tenant_of(context)
        version = await self._version(tenant, request.template_id, request.version)
        content = version.content_for(request.language)
        channel = request.channel
        if not has_channel(content, channel):
            raise FailedPrecondition(
                "CHANNEL_NOT_IN_TEMPLATE",
                f"template {version.template_id} v{version.number} ({content.language}) "
                f"has no {common_pb2.Channel.Name(channel)} content",
                metadata={
                    "template_id": version.template_id,
                    "version": str(version.number),
                    "language": content.language,
                    "channel": common_pb2.Channel.Name(channel),
                },
            )
        rendered = await self._renderer.render(
            tenant,
            version.template_id,
            version.number,
            content,
            channel,
            variables_from_struct(request.variables),
            timeout=clamp_timeout(context.time_remaining(), self._render_timeout),
        )
        response = pb.RenderTemplateResponse(version=version.number, language=content.language)
        if channel == common_pb2.CHANNEL_EMAIL:
            response.email.CopyFrom(email_message(rendered))
        else:
            response.push.CopyFrom(push_message(rendered))
        return response

    async def GetTemplateVersion(  # noqa: N802 (the proto's method name)
        self, request: pb.GetTemplateVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTemplateVersionResponse:
        """One version, for a worker to render itself (it never changes: cache it)."""
        version = await self._version(tenant_of(context), request.template_id, request.version)
        return pb.GetTemplateVersionResponse(template=messages.version_message(version))

    async def _version(self, tenant: str, template_id: str, number: int) -> Version:
        """Version ``number`` (0: the current one, looked up every time), cached once loaded."""
        if number == 0:
            current = await self._store.current(tenant, template_id)
            if current is None:
                raise _not_found(template_id)
            number = current[0]
        version = self._versions.get((tenant, template_id, number))
        if version is None:
            version = await self._store.version(tenant, template_id, number)
            if version is None:
                if await self._store.current(tenant, template_id) is None:
                    raise _not_found(template_id)
                raise NotFound(
                    "VERSION_NOT_FOUND",
                    f"template {template_id} has no version {number}",
                    metadata={"template_id": template_id, "version": str(number)},
                )
            self._versions.put((tenant, template_id, number), version)
        return version


def _not_found(template_id: str) -> NotFound:
    return NotFound(
        "TEMPLATE_NOT_FOUND",
        f"template {template_id} does not exist",
        metadata={"template_id": template_id},
    )
