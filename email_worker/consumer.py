"""The e-mail job handler (render, build, send) and the status reports to UserService.

``notify_kit.worker.JobRunner`` owns the delivery guarantees; this module only says how
an ``EmailJob`` becomes a sent message and which upstream failures are worth a retry.
"""

from __future__ import annotations

import logging
from email.utils import parseaddr

from notify.v1 import (
    common_pb2,
    jobs_pb2,
    template_service_pb2,
    template_service_pb2_grpc,
)

from email_worker.mime import MessageError, build_message, check_address, format_address
from email_worker.sender import EmailSender
from notify_kit.amqp import EMAIL
from notify_kit.worker import (
    PermanentError,
    render,
)

log = logging.getLogger(__name__)


class EmailJobHandler:
    """Decodes ``EmailJob`` and delivers it: RenderTemplate, MIME bytes, ``EmailSender``."""

    kind = EMAIL
    channel = common_pb2.CHANNEL_EMAIL

    def __init__(
        self,
        templates: template_service_pb2_grpc.TemplateServiceStub,
        sender: EmailSender,
        *,
        mail_from: str,
        rpc_timeout: float = 5.0,
    ) -> None:
        name, address = parseaddr(mail_from)
        self._envelope_from = check_address(address)
        self._from_header = format_address(name, address)
        self._templates = templates
        self._sender = sender
        self._rpc_timeout = rpc_timeout

    def decode(self, body: bytes) -> jobs_pb2.EmailJob:
        """Parse the queue body (``DecodeError`` when it is not an ``EmailJob``)."""
        return jobs_pb2.EmailJob.FromString(body)

    async def send(self, job: jobs_pb2.EmailJob) -> str:
        """Render the template, assemble the message, hand it to the sender."""
        try:
            check_address(job.to_address)
        except MessageError as exc:
            raise PermanentError(str(exc)) from exc
        content = await self._render(job)
        try:
            message = build_message(
                from_header=self._from_header,
                to_address=job.to_address,
                to_name=job.to_name,
                subject=content.subject,
                text_body=content.text_body,
                html_body=content.html_body,
                notification_id=job.meta.notification_id,
            )
        except MessageError as exc:
            raise PermanentError(str(exc)) from exc
        return await self._sender.send(self._envelope_from, [job.to_address], message)

    async def _render(self, job: jobs_pb2.EmailJob) -> template_service_pb2.EmailContent:
        response = await render(
            self._templates,
            job.template_id,
            job.language,
            common_pb2.CHANNEL_EMAIL,
            job.variables,
            timeout=self._rpc_timeout,
        )
        content: template_service_pb2.EmailContent = response.email
        return content
