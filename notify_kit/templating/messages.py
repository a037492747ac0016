"""Templates as protobuf messages: contents in and out of ``TemplateContent``, variables
out of a ``Struct``, the fields of a ``Channel``.

Kept apart from ``content`` so that the render processes, which need only the content
model, never load protobuf (a render process is one per busy render, and its memory is
counted against its service).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2
from notify.v1 import common_pb2, template_service_pb2

from notify_kit.templating.content import (
    EMAIL_FIELDS,
    EMAIL_HTML,
    EMAIL_SUBJECT,
    EMAIL_TEXT,
    PUSH_BODY,
    PUSH_FIELDS,
    PUSH_TITLE,
    Content,
)

CHANNEL_FIELDS: Mapping[common_pb2.Channel.ValueType, tuple[str, ...]] = {
    common_pb2.CHANNEL_EMAIL: EMAIL_FIELDS,
    common_pb2.CHANNEL_PUSH: PUSH_FIELDS,
}
_MAX_SAFE_INTEGER = 2**53


def has_channel(content: Content, channel: common_pb2.Channel.ValueType) -> bool:
    """Whether ``content`` can be sent through ``channel``."""
    return CHANNEL_FIELDS[channel][0] in content.fields


def content_fields(message: template_service_pb2.TemplateContent) -> dict[str, str]:
    """A ``TemplateContent`` message's sources by field path (absent parts left out)."""
    fields: dict[str, str] = {}
    if message.HasField("email"):
        email = message.email
        fields[EMAIL_SUBJECT] = email.subject
        fields[EMAIL_TEXT] = email.text_body
        if email.html_body:
            fields[EMAIL_HTML] = email.html_body
    if message.HasField("push"):
        fields[PUSH_TITLE] = message.push.title
        fields[PUSH_BODY] = message.push.body
    return fields


def email_message(fields: Mapping[str, str]) -> template_service_pb2.EmailContent:
    """Email parts (sources or renderings) keyed by field path, as a message."""
    return template_service_pb2.EmailContent(
        subject=fields[EMAIL_SUBJECT],
        text_body=fields[EMAIL_TEXT],
        html_body=fields.get(EMAIL_HTML, ""),
    )


def push_message(fields: Mapping[str, str]) -> template_service_pb2.PushContent:
    """Push parts (sources or renderings) keyed by field path, as a message."""
    return template_service_pb2.PushContent(title=fields[PUSH_TITLE], body=fields[PUSH_BODY])


def variables_from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """Template variables as plain Python values.

    A Struct has only doubles, so whole numbers come back as ints: "3 items", not "3.0 items".
    """
    values: dict[str, Any] = json_format.MessageToDict(struct)
    return {key: _whole_numbers(value) for key, value in values.items()}


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_SAFE_INTEGER:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value
