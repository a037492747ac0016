"""Plain records of templates, shared by every module of the service.

The parts every renderer shares (fields, contents, language rules) live in
``notify_kit.templating.content``; what only TemplateService keeps is here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from notify.v1 import template_service_pb2

from notify_kit.templating.content import Content, pick_language

VariableType = template_service_pb2.VariableType.ValueType


@dataclass(frozen=True, slots=True)
class Variable:
    """A variable the template's author declared (``TemplateVariable`` without the output)."""

    name: str
    type: template_service_pb2.VariableType.ValueType = (
        template_service_pb2.VARIABLE_TYPE_UNSPECIFIED
    )
    required: bool = False


@dataclass(frozen=True, slots=True)
class Version:
    """An immutable numbered version of a template: its contents, fallback language and
    declared variables (empty: none declared, any variable accepted)."""

    template_id: str
    number: int
    default_language: str
    contents: tuple[Content, ...]
    declared: tuple[Variable, ...] = ()

    def content_for(self, requested: str) -> Content:
        """The content for ``requested``: exact tag, then shorter prefixes, then the default."""
        by_language = {c.language: c for c in self.contents}
        return by_language[pick_language(requested, by_language, self.default_language)]

    @property
    def variables(self) -> list[str]:
        """Sorted union of the variables every content uses."""
        return sorted(set().union(*(c.variables for c in self.contents)))

    @property
    def line_variables(self) -> frozenset[str]:
        """Variables that reach a one-line field in any language."""
        return frozenset().union(*(c.line_variables for c in self.contents))


@dataclass(frozen=True, slots=True)
class Template:
    """A template with its current version, in the tenant it belongs to."""

    id: str
    description: str
    created_at: datetime
    updated_at: datetime
    current: Version
    tenant: str
