"""What a template is made of, as every renderer sees it: fields, contents, languages.

Shared by TemplateService (which stores and test-renders templates) and the workers
(which render the versions they fetched). A content's parts are kept as a mapping from
the field's path inside a ``TemplateContent`` message ("email.subject", "push.body",
...) to its source, so validation, the store, the sandbox and error messages all name a
field the same way a caller sees it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2
from notify.v1 import common_pb2, template_service_pb2

from notify_kit import formats

EMAIL_SUBJECT = "email.subject"
EMAIL_TEXT = "email.text_body"
EMAIL_HTML = "email.html_body"
PUSH_TITLE = "push.title"
PUSH_BODY = "push.body"

# Every field a channel can have, in render order; the first one is required, so its
# presence says whether the content has the channel at all.
CHANNEL_FIELDS: Mapping[common_pb2.Channel.ValueType, tuple[str, ...]] = {
    common_pb2.CHANNEL_EMAIL: (EMAIL_SUBJECT, EMAIL_TEXT, EMAIL_HTML),
    common_pb2.CHANNEL_PUSH: (PUSH_TITLE, PUSH_BODY),
}
# Rendered with HTML autoescape.
HTML_FIELDS = frozenset({EMAIL_HTML})
# Become mail headers / notification titles: stripped, and a line break is an injection.
SINGLE_LINE_FIELDS = frozenset({EMAIL_SUBJECT, PUSH_TITLE})
_MAX_SAFE_INTEGER = 2**53


@dataclass(frozen=True, slots=True)
class Content:
    """One language of one template version."""

    language: str
    fields: Mapping[str, str]
    # Variables the fields read (jinja2.meta), filled in when the content is analysed.
    variables: frozenset[str] = field(default=frozenset())
    # Those of them that a one-line field reads: a line break in their value could only
    # end as an unsafe header, so a send carrying one is refused at accept.
    line_variables: frozenset[str] = field(default=frozenset())

    def has_channel(self, channel: common_pb2.Channel.ValueType) -> bool:
        """Whether this content can be sent through ``channel``."""
        return CHANNEL_FIELDS[channel][0] in self.fields


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


def canonical_language(tag: str) -> str | None:
    """``tag`` in canonical case ("FR-ca" -> "fr-CA"), or None when it is not a tag.

    Tags are compared after canonicalisation, so "fr-ca" and "fr-CA" are the same language
    both when saving (uniqueness) and when rendering (fallback).
    """
    if not formats.is_language_tag(tag):
        return None
    first, *rest = tag.split("-")
    parts = [first.lower()]
    for sub in rest:
        if len(sub) == 2 and sub.isalpha():
            parts.append(sub.upper())  # region
        elif len(sub) == 4 and sub.isalpha():
            parts.append(sub.title())  # script
        else:
            parts.append(sub.lower())
    return "-".join(parts)


def pick_language(requested: str, available: Collection[str], default: str) -> str:
    """Lookup fallback: "zh-Hant-TW" -> "zh-Hant" -> "zh" -> ``default``.

    Requests are lenient: users' locales arrive as "fr_CA" or "fr_CA.UTF-8", and an
    unusable one falls back to the default rather than failing the notification.
    """
    tag = canonical_language(requested.replace("_", "-").split(".")[0].split("@")[0])
    if tag is not None:
        parts = tag.split("-")
        for end in range(len(parts), 0, -1):
            candidate = "-".join(parts[:end])
            if candidate in available:
                return candidate
    return default


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
