"""What a template is made of, as every renderer sees it: fields, contents, languages.

Shared by TemplateService (which stores and test-renders templates) and the workers
(which render the versions they fetched), and read by the render processes, so it
imports nothing but the standard library and ``formats``: a render process stays small
(the protobuf side is ``messages``). A content's parts are kept as a mapping from
the field's path inside a ``TemplateContent`` message ("email.subject", "push.body",
...) to its source, so validation, the store, the sandbox and error messages all name a
field the same way a caller sees it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from notify_kit import formats

EMAIL_SUBJECT = "email.subject"
EMAIL_TEXT = "email.text_body"
EMAIL_HTML = "email.html_body"
PUSH_TITLE = "push.title"
PUSH_BODY = "push.body"

# Every field a channel has, in render order; the first one is required, so its
# presence says whether the content has the channel at all.
EMAIL_FIELDS = (EMAIL_SUBJECT, EMAIL_TEXT, EMAIL_HTML)
PUSH_FIELDS = (PUSH_TITLE, PUSH_BODY)
# Rendered with HTML autoescape.
HTML_FIELDS = frozenset({EMAIL_HTML})
# Become mail headers / notification titles: stripped, and a line break is an injection.
SINGLE_LINE_FIELDS = frozenset({EMAIL_SUBJECT, PUSH_TITLE})


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
