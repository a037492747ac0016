"""A send's variables checked against the template it is accepted for.

What can never be delivered is refused before anything is queued: once the client has
been told "accepted", the notification must be sendable. The template's schema
(``Template.schema``, kept by TemplateService) says which variables are required, of
which type, and which reach a one-line field; a line break in such a value could only
end in an unsafe mail header or push title, which the worker would refuse after the
client had been told all was well.
"""

from __future__ import annotations

from google.protobuf import struct_pb2
from notify.v1 import template_service_pb2

from notify_kit import formats
from notify_kit.errors import InvalidArgument

T = template_service_pb2
# Each declared type: the JSON kind it wants (Value's oneof name), and its name in errors.
_TYPES = {
    T.VARIABLE_TYPE_STRING: ("string_value", "a string"),
    T.VARIABLE_TYPE_NUMBER: ("number_value", "a number"),
    T.VARIABLE_TYPE_BOOL: ("bool_value", "true or false"),
    T.VARIABLE_TYPE_LIST: ("list_value", "a list"),
    T.VARIABLE_TYPE_OBJECT: ("struct_value", "an object"),
}


def check(template: template_service_pb2.Template, variables: struct_pb2.Struct) -> None:
    """Raise INVALID_ARGUMENT ``INVALID_VARIABLE`` naming every variable that breaks the
    template's schema: a required one missing, a value of the wrong type, one the schema
    does not declare (when it declares any), a line break in one that reaches a one-line
    field."""
    given = variables.fields
    declares = any(v.declared for v in template.schema)
    known = {v.name for v in template.schema}
    problems: list[tuple[str, str]] = []
    for variable in template.schema:
        value = given.get(variable.name)
        path = f"variables.{variable.name}"
        if value is None or value.WhichOneof("kind") in (None, "null_value"):
            if variable.required:
                problems.append((path, f"required by template {template.id}"))
            continue
        wanted = _TYPES.get(variable.type)
        if wanted is not None and value.WhichOneof("kind") != wanted[0]:
            problems.append((path, f"must be {wanted[1]}"))
        elif variable.single_line and _has_line_break(value):
            problems.append((path, "reaches a one-line field (subject, title): no line breaks"))
    if declares:
        problems += [
            (f"variables.{name}", f"template {template.id} declares no such variable")
            for name in sorted(given.keys() - known)
        ]
    if problems:
        raise InvalidArgument(
            "INVALID_VARIABLE",
            f"the variables do not fit template {template.id}: "
            + ", ".join(path.removeprefix("variables.") for path, _ in problems),
            field_violations=problems,
            metadata={"template_id": template.id, "variable": problems[0][0][10:]},
        )


def _has_line_break(value: struct_pb2.Value) -> bool:
    """A CR, LF or NUL in any string inside ``value`` (an object's keys included)."""
    pending = [value]
    while pending:
        item = pending.pop()
        kind = item.WhichOneof("kind")
        if kind == "string_value":
            if formats.breaks_header(item.string_value):
                return True
        elif kind == "list_value":
            pending.extend(item.list_value.values)
        elif kind == "struct_value":
            for key, nested in item.struct_value.fields.items():
                if formats.breaks_header(key):
                    return True
                pending.append(nested)
    return False
