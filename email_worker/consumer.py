"""The e-mail job handler: render, check, and hand the e-mail to the provider chain.

``notify_kit.jobs.runner.JobRunner`` owns the delivery guarantees and
``notify_kit.jobs.providers.ProviderChain`` the failover between SMTP and SendGrid;
this module only says how an ``EmailJob`` becomes an ``OutgoingEmail``.
"""

from __future__ import annotations

import logging
from email.utils import parseaddr

from notify.v1 import common_pb2, jobs_pb2

from email_worker.mime import MessageError, check_address, check_header_value, format_address
from email_worker.outgoing import OutgoingEmail
from notify_kit.amqp import EMAIL
from notify_kit.jobs.errors import PermanentError
from notify_kit.jobs.providers import ProviderChain, Sent
from notify_kit.jobs.templates import Templates

log = logging.getLogger(__name__)


class EmailJobHandler:
    """Decodes ``EmailJob`` and delivers it: RenderTemplate, checks, the provider chain."""

    kind = EMAIL
    channel = common_pb2.CHANNEL_EMAIL

    def __init__(
        self,
        templates: Templates,
        chain: ProviderChain[OutgoingEmail, str],
        *,
        mail_from: str,
    ) -> None:
        name, address = parseaddr(mail_from)
        format_address(name, address)  # refuses a bad sender at start-up
        self._from_name, self._from_address = name, address
        self._templates = templates
        self.chain = chain

    def decode(self, body: bytes) -> jobs_pb2.EmailJob:
        """Parse the queue body (``DecodeError`` when it is not an ``EmailJob``)."""
        return jobs_pb2.EmailJob.FromString(body)

    async def send(self, job: jobs_pb2.EmailJob) -> Sent[str]:
        """Render the template, check what reaches a header, send through the chain.

        Checked here, once for every provider: a bad address or a line break in the
        recipient's name or the subject is permanent (header injection).
        """
        try:
            check_address(job.to_address)
            check_header_value("display name", job.to_name)
        except MessageError as exc:
            raise PermanentError(str(exc)) from exc
        response = await self._templates.render(
            job.meta.tenant,
            job.template_id,
            job.template_version,
            job.language,
            common_pb2.CHANNEL_EMAIL,
            job.variables,
        )
        content = response.email
        try:
            check_header_value("subject", content.subject)
        except MessageError as exc:
            raise PermanentError(str(exc)) from exc
        email = OutgoingEmail(
            notification_id=job.meta.notification_id,
            from_name=self._from_name,
            from_address=self._from_address,
            to_name=job.to_name,
            to_address=job.to_address,
            subject=content.subject,
            text_body=content.text_body,
            html_body=content.html_body,
        )
        try:
            return await self.chain.send(email)
        except MessageError as exc:  # the MIME builder refused it (e.g. the id)
            raise PermanentError(str(exc)) from exc
