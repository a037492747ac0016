"""PostgreSQL access for templates (asyncpg only; SQL as constants).

Every statement names the tenant with the id: a template is its tenant's, and another
tenant's id is one that does not exist (its key would match no row).

A new version is written in one transaction that locks the template row, so two
concurrent writers get consecutive numbers instead of colliding, and the pointer to the
current version moves together with the rows it points to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from notify_kit.templating.content import (
    EMAIL_HTML,
    EMAIL_SUBJECT,
    EMAIL_TEXT,
    PUSH_BODY,
    PUSH_TITLE,
    Content,
)
from template_svc.model import Template, Variable, Version

# Field path -> column.
_COLUMNS = {
    EMAIL_SUBJECT: "email_subject",
    EMAIL_TEXT: "email_text",
    EMAIL_HTML: "email_html",
    PUSH_TITLE: "push_title",
    PUSH_BODY: "push_body",
}

_INSERT_TEMPLATE = """
INSERT INTO templates (tenant, id, description, default_language, current_version)
VALUES ($1, $2, $3, $4, 1)
ON CONFLICT (tenant, id) DO NOTHING
RETURNING created_at, updated_at
"""
_INSERT_VERSION = """
INSERT INTO template_versions (tenant, template_id, version, default_language, variables)
VALUES ($1, $2, $3, $4, $5)
"""
_INSERT_CONTENT = """
INSERT INTO template_contents (
    tenant, template_id, version, language, position,
    email_subject, email_text, email_html, push_title, push_body, variables, line_variables
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
"""
_LOCK_TEMPLATE = "SELECT current_version FROM templates WHERE tenant = $1 AND id = $2 FOR UPDATE"
_ADVANCE_TEMPLATE = """
UPDATE templates SET current_version = $3, default_language = $4, updated_at = now()
WHERE tenant = $1 AND id = $2
RETURNING description, created_at, updated_at
"""
_SELECT_TEMPLATE = """
SELECT description, default_language, current_version, created_at, updated_at
FROM templates WHERE tenant = $1 AND id = $2
"""
_SELECT_CURRENT = """
SELECT current_version, default_language FROM templates WHERE tenant = $1 AND id = $2
"""
_SELECT_VERSION = """
SELECT default_language, variables FROM template_versions
WHERE tenant = $1 AND template_id = $2 AND version = $3
"""
_SELECT_CONTENTS = """
SELECT language, email_subject, email_text, email_html, push_title, push_body, variables,
       line_variables
FROM template_contents WHERE tenant = $1 AND template_id = $2 AND version = $3
ORDER BY position
"""


class TemplateStore:
    """Templates and their versions in PostgreSQL, each in its tenant."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 5.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def create(
        self,
        tenant: str,
        template_id: str,
        description: str,
        default_language: str,
        contents: Sequence[Content],
        declared: Sequence[Variable] = (),
    ) -> Template | None:
        """Insert a template with version 1; None when the tenant has the id already."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            row = await conn.fetchrow(
                _INSERT_TEMPLATE,
                tenant,
                template_id,
                description,
                default_language,
                timeout=self._timeout,
            )
            if row is None:
                return None
            version = await self._insert_version(
                conn,
                tenant,
                Version(template_id, 1, default_language, tuple(contents), tuple(declared)),
            )
        return Template(
            template_id, description, row["created_at"], row["updated_at"], version, tenant
        )

    async def add_version(
        self,
        tenant: str,
        template_id: str,
        default_language: str,
        contents: Sequence[Content],
        declared: Sequence[Variable] = (),
    ) -> Template | None:
        """Insert the next version and make it current; None when the template is unknown."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            current = await conn.fetchval(
                _LOCK_TEMPLATE, tenant, template_id, timeout=self._timeout
            )
            if current is None:
                return None
            number = int(current) + 1
            version = await self._insert_version(
                conn,
                tenant,
                Version(template_id, number, default_language, tuple(contents), tuple(declared)),
            )
            row = await conn.fetchrow(
                _ADVANCE_TEMPLATE,
                tenant,
                template_id,
                number,
                default_language,
                timeout=self._timeout,
            )
        return Template(
            template_id, row["description"], row["created_at"], row["updated_at"], version, tenant
        )

    async def get(self, tenant: str, template_id: str) -> Template | None:
        """The template with its current version, or None."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            row = await conn.fetchrow(_SELECT_TEMPLATE, tenant, template_id, timeout=self._timeout)
            if row is None:
                return None
            version = await self._version(conn, tenant, template_id, int(row["current_version"]))
        if version is None:  # the current version always exists (same transaction)
            return None
        return Template(
            template_id, row["description"], row["created_at"], row["updated_at"], version, tenant
        )

    async def current(self, tenant: str, template_id: str) -> tuple[int, str] | None:
        """(current version, default language) by primary key, or None when unknown.

        Never cached: this is how every replica sees a new version at once.
        """
        async with self._pool.acquire(timeout=self._timeout) as conn:
            row = await conn.fetchrow(_SELECT_CURRENT, tenant, template_id, timeout=self._timeout)
        if row is None:
            return None
        return int(row["current_version"]), str(row["default_language"])

    async def version(self, tenant: str, template_id: str, number: int) -> Version | None:
        """One version, or None when the template or that version does not exist."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return await self._version(conn, tenant, template_id, number)

    async def _version(
        self, conn: asyncpg.Connection, tenant: str, template_id: str, number: int
    ) -> Version | None:
        row = await conn.fetchrow(
            _SELECT_VERSION, tenant, template_id, number, timeout=self._timeout
        )
        if row is None:
            return None
        rows = await conn.fetch(
            _SELECT_CONTENTS, tenant, template_id, number, timeout=self._timeout
        )
        declared = tuple(
            Variable(v["name"], v["type"], v["required"]) for v in json.loads(row["variables"])
        )
        contents = tuple(_content(content) for content in rows)
        return Version(template_id, number, str(row["default_language"]), contents, declared)

    async def _insert_version(
        self, conn: asyncpg.Connection, tenant: str, version: Version
    ) -> Version:
        declared = [
            {"name": v.name, "type": int(v.type), "required": v.required} for v in version.declared
        ]
        await conn.execute(
            _INSERT_VERSION,
            tenant,
            version.template_id,
            version.number,
            version.default_language,
            json.dumps(declared),
            timeout=self._timeout,
        )
        await conn.executemany(
            _INSERT_CONTENT,
            [
                (
                    tenant,
                    version.template_id,
                    version.number,
                    content.language,
                    position,
                    *(content.fields.get(name) for name in _COLUMNS),
                    sorted(content.variables),
                    sorted(content.line_variables),
                )
                for position, content in enumerate(version.contents)
            ],
            timeout=self._timeout,
        )
        return version


def _content(row: Any) -> Content:
    fields = {name: row[column] for name, column in _COLUMNS.items() if row[column] is not None}
    return Content(
        str(row["language"]), fields, frozenset(row["variables"]), frozenset(row["line_variables"])
    )
