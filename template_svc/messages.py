"""Protobuf messages in and out: validation of what callers send, building what they get.

Validation collects every problem before answering, each with the field path the caller
used ("template.contents[1].push.title"), so a template author fixes everything in one go.
"""

from __future__ import annotations

from collections.abc import Sequence

from notify.v1 import template_service_pb2

from notify_kit.errors import InvalidArgument
from notify_kit.templating.content import (
    EMAIL_HTML,
    EMAIL_SUBJECT,
    EMAIL_TEXT,
    PUSH_BODY,
    PUSH_TITLE,
    Content,
    canonical_language,
)
from notify_kit.templating.messages import email_message, push_message
from template_svc.model import Template, Variable, Version

MAX_FIELD_BYTES = 64 * 1024
MAX_CONTENTS = 100

Violations = list[tuple[str, str]]


def invalid(violations: Violations, reason: str = "INVALID_TEMPLATE") -> InvalidArgument:
    """The error for a request with ``violations``."""
    return InvalidArgument(reason, "the request is invalid", field_violations=violations)


def new_template(
    message: template_service_pb2.Template,
) -> tuple[str, list[Content], tuple[Variable, ...]]:
    """Validate a template to create; return its default language, contents and
    declared variables."""
    violations = _check_text(message.description, "template.description")
    contents, found = parse_contents(message.contents, "template.contents")
    violations += found
    declared, found = parse_schema(message.schema, "template.schema")
    violations += found
    default, found = _default_language(
        message.default_language, contents, None, "template.default_language"
    )
    if violations or found:
        raise invalid(violations + found)
    return default, contents, declared


def new_version(
    request: template_service_pb2.CreateTemplateVersionRequest, previous: Version
) -> tuple[str, list[Content], tuple[Variable, ...]]:
    """Validate a new version; return its default language, contents and declared
    variables (the previous version's when the request declares none)."""
    contents, violations = parse_contents(request.contents, "contents")
    declared, found = parse_schema(request.schema, "schema")
    violations += found
    default, found = _default_language(
        request.default_language, contents, previous.default_language, "default_language"
    )
    if violations or found:
        raise invalid(violations + found)
    return default, contents, declared or previous.declared


def parse_schema(
    messages: Sequence[template_service_pb2.TemplateVariable], path: str
) -> tuple[tuple[Variable, ...], Violations]:
    """The declared variables, and every problem with them (``single_line`` is output
    only and ignored)."""
    violations: Violations = []
    seen: set[str] = set()
    declared = []
    for index, message in enumerate(messages):
        # The name's format and the type are the contract's rules; uniqueness is ours.
        if message.name in seen:
            violations.append(
                (f"{path}[{index}].name", f"{message.name} is declared more than once")
            )
        seen.add(message.name)
        declared.append(Variable(message.name, message.type, message.required))
    return tuple(declared), violations


def check_declared(
    declared: Sequence[Variable], contents: Sequence[Content], path: str
) -> Violations:
    """Once variables are declared, every variable a content reads must be among them:
    the schema is what sends are checked against, so it must be complete."""
    if not declared:
        return []
    names = {v.name for v in declared}
    violations: Violations = []
    for index, content in enumerate(contents):
        for name in sorted(content.variables - names):
            violations.append(
                (f"{path}[{index}]", f"reads {name}, which the schema does not declare")
            )
    return violations


def parse_contents(
    messages: Sequence[template_service_pb2.TemplateContent], path: str
) -> tuple[list[Content], Violations]:
    """Contents with canonical language tags, and every problem found in them."""
    violations: Violations = []
    if not messages:
        violations.append((path, "at least one content is required"))
    if len(messages) > MAX_CONTENTS:
        violations.append((path, f"at most {MAX_CONTENTS} contents"))
    seen: set[str] = set()
    contents = []
    for index, message in enumerate(messages):
        at = f"{path}[{index}]"
        language = canonical_language(message.language)
        if not message.language:
            violations.append((f"{at}.language", "required"))
        elif language is None:
            violations.append((f"{at}.language", "must be a language tag such as en or fr-CA"))
        elif language in seen:
            violations.append((f"{at}.language", f"{language} appears more than once"))
        else:
            seen.add(language)
        fields: dict[str, str] = {}
        if message.HasField("email"):
            email = message.email
            _take(fields, violations, at, EMAIL_SUBJECT, email.subject, required=True)
            _take(fields, violations, at, EMAIL_TEXT, email.text_body, required=True)
            _take(fields, violations, at, EMAIL_HTML, email.html_body, required=False)
        if message.HasField("push"):
            push = message.push
            _take(fields, violations, at, PUSH_TITLE, push.title, required=True)
            _take(fields, violations, at, PUSH_BODY, push.body, required=True)
        if not message.HasField("email") and not message.HasField("push"):
            violations.append((at, "needs email and/or push content"))
        contents.append(Content(language=language or message.language, fields=fields))
    return contents, violations


def _take(
    fields: dict[str, str],
    violations: Violations,
    at: str,
    name: str,
    value: str,
    *,
    required: bool,
) -> None:
    if not value.strip():
        if required:
            violations.append((f"{at}.{name}", "required"))
        return
    violations += _check_text(value, f"{at}.{name}")
    fields[name] = value


def _check_text(value: str, path: str) -> Violations:
    """Problems with a stored text: its size, and NUL, which PostgreSQL text cannot hold."""
    violations: Violations = []
    if len(value.encode()) > MAX_FIELD_BYTES:
        violations.append((path, f"at most {MAX_FIELD_BYTES} bytes"))
    if "\x00" in value:
        violations.append((path, "must not contain NUL characters"))
    return violations


def _default_language(
    requested: str, contents: Sequence[Content], previous: str | None, path: str
) -> tuple[str, Violations]:
    """The requested default, else the previous one, else the first content's language.

    Whichever it is must have a content in this version, or the last step of the
    language fallback would have nothing to render.
    """
    languages = [c.language for c in contents]
    if requested:
        default = canonical_language(requested) or requested
    elif previous is not None:
        default = previous
    else:
        default = languages[0] if languages else ""
    if languages and default not in languages:
        return default, [(path, f"{default} must be one of the contents' languages")]
    return default, []


def template_message(template: Template) -> template_service_pb2.Template:
    """The API view of a template and its current version."""
    message = version_message(template.current)
    message.description = template.description
    message.create_time.FromDatetime(template.created_at)
    message.update_time.FromDatetime(template.updated_at)
    message.tenant = template.tenant
    return message


def version_message(version: Version) -> template_service_pb2.Template:
    """A template as of ``version`` (no description, no times)."""
    return template_service_pb2.Template(
        id=version.template_id,
        version=version.number,
        contents=[_content_message(c) for c in version.contents],
        variables=version.variables,
        default_language=version.default_language,
        schema=schema_message(version),
    )


def schema_message(version: Version) -> list[template_service_pb2.TemplateVariable]:
    """Every variable of ``version``: the declared ones in their order, then the
    undeclared ones it reads (optional, any type), each with ``single_line``."""
    lines = version.line_variables
    declared = {v.name for v in version.declared}
    variables = [
        *version.declared,
        *(Variable(name) for name in version.variables if name not in declared),
    ]
    return [
        template_service_pb2.TemplateVariable(
            name=v.name,
            type=v.type,
            required=v.required,
            single_line=v.name in lines,
            declared=v.name in declared,
        )
        for v in variables
    ]


def _content_message(content: Content) -> template_service_pb2.TemplateContent:
    fields = content.fields
    message = template_service_pb2.TemplateContent(language=content.language)
    if EMAIL_SUBJECT in fields:
        message.email.CopyFrom(email_message(fields))
    if PUSH_TITLE in fields:
        message.push.CopyFrom(push_message(fields))
    return message
