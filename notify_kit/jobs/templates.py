"""A job's pinned template version, rendered in the worker's own render processes.

Versions never change, so a worker fetches each one from TemplateService once
(``GetTemplateVersion``) and keeps it: a send costs no RPC, and rendering goes on
through a TemplateService outage for every version the worker has seen. Rendering runs
in the worker's render processes under the limits TemplateService uses
(``notify_kit.templating``), so a hostile template costs a worker what it costs
TemplateService: one render process, for at most the render budget.

The job pins the version chosen when the send was accepted, so a retry renders what was
accepted even after a new version, and names the tenant it was accepted for: versions
are fetched for that tenant and kept per tenant, since two tenants may each have a
template of one id. A job from before versions were pinned (version 0)
is rendered by TemplateService, as before.
"""

from __future__ import annotations

import logging
from typing import Literal

from google.protobuf import struct_pb2
from notify.v1 import common_pb2, template_service_pb2, template_service_pb2_grpc

from notify_kit import rpc
from notify_kit.cache import LruCache
from notify_kit.errors import ServiceError
from notify_kit.jobs.errors import Blocked, PermanentError
from notify_kit.jobs.upstream import PERMANENT_UPSTREAM
from notify_kit.jobs.upstream import render as render_remotely
from notify_kit.templating.content import Content, pick_language
from notify_kit.templating.messages import (
    content_fields,
    email_message,
    has_channel,
    push_message,
    variables_from_struct,
)
from notify_kit.templating.renderer import Renderer
from notify_kit.tenancy import DEFAULT_TENANT, tenant_metadata

log = logging.getLogger(__name__)

T = template_service_pb2
# Versions a worker keeps (each a few kilobytes of sources; the render processes keep
# the compiled templates the same way).
MAX_VERSIONS = 512


class Templates:
    """Renders ``(tenant, template, version)`` for a channel, fetching each version once."""

    def __init__(
        self,
        stub: template_service_pb2_grpc.TemplateServiceStub,
        renderer: Renderer,
        *,
        rpc_timeout: float,
    ) -> None:
        self._stub = stub
        self._renderer = renderer
        self._rpc_timeout = rpc_timeout
        self._versions: LruCache[tuple[str, str, int], T.Template] = LruCache(
            max_entries=MAX_VERSIONS
        )

    async def render(
        self,
        tenant: str,
        template_id: str,
        version: int,
        language: str,
        channel: common_pb2.Channel.ValueType,
        variables: struct_pb2.Struct,
    ) -> T.RenderTemplateResponse:
        """The rendered channel, or PermanentError (the template's fault) / Blocked (ours).

        ``tenant`` is the job's (empty in jobs from before tenants: the default tenant).
        """
        tenant = tenant or DEFAULT_TENANT
        if version == 0:
            return await render_remotely(
                self._stub,
                template_id,
                language,
                channel,
                variables,
                timeout=self._rpc_timeout,
                metadata=tenant_metadata(tenant),
            )
        template = await self._version(tenant, template_id, version)
        content = _content_for(template, language)
        field: Literal["email", "push"] = "email" if channel == common_pb2.CHANNEL_EMAIL else "push"
        if not has_channel(content, channel):
            raise PermanentError(f"template {template_id!r} v{version} has no {field} content")
        try:
            rendered = await self._renderer.render(
                tenant,
                template_id,
                version,
                content,
                channel,
                variables_from_struct(variables),
                timeout=self._renderer.timeout,
            )
        except PERMANENT_UPSTREAM as exc:
            raise PermanentError(f"template {template_id!r}: {exc.reason}") from exc
        except ServiceError as exc:  # the render processes are busy or restarting
            raise Blocked(f"renderer: {exc.reason}") from exc
        response = T.RenderTemplateResponse(version=version, language=content.language)
        if field == "email":
            response.email.CopyFrom(email_message(rendered))
        else:
            response.push.CopyFrom(push_message(rendered))
        return response

    async def _version(self, tenant: str, template_id: str, version: int) -> T.Template:
        key = (tenant, template_id, version)
        cached = self._versions.get(key)
        if cached is not None:
            return cached
        request = T.GetTemplateVersionRequest(template_id=template_id, version=version)
        try:
            response: T.GetTemplateVersionResponse = await rpc.unary(
                self._stub.GetTemplateVersion,
                request,
                timeout=self._rpc_timeout,
                metadata=tenant_metadata(tenant),
            )
        except PERMANENT_UPSTREAM as exc:
            raise PermanentError(f"template {template_id!r} v{version}: {exc.reason}") from exc
        except ServiceError as exc:
            raise Blocked(f"template service: {exc.reason}") from exc
        self._versions.put(key, response.template)
        return response.template


def _content_for(template: T.Template, requested: str) -> Content:
    """The content for ``requested`` by the language fallback TemplateService uses."""
    by_language = {content.language: content for content in template.contents}
    chosen = by_language[pick_language(requested, by_language, template.default_language)]
    return Content(language=chosen.language, fields=content_fields(chosen))
