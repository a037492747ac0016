"""Refused at accept what could never be delivered: variables checked against the template.

Through Envoy, against the whole system: a refused send answers 400 with the variable
named, and leaves no notification behind.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.e2e_support import E2E

pytestmark = pytest.mark.timeout(300)


def _error_info(body: Any) -> dict[str, Any]:
    for detail in body.get("details", []):
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
            info: dict[str, Any] = detail
            return info
    raise AssertionError(f"no ErrorInfo in {body}")


def _violations(body: Any) -> dict[str, str]:
    for detail in body.get("details", []):
        if detail.get("@type", "").endswith("google.rpc.BadRequest"):
            return {v["field"]: v["description"] for v in detail["fieldViolations"]}
    return {}


async def _template(e2e: E2E, schema: list[dict[str, Any]] | None = None, **email: str) -> str:
    template_id = f"t-{uuid.uuid4().hex[:10]}"
    body: dict[str, Any] = {
        "id": template_id,
        "contents": [
            {
                "language": "en",
                "email": {
                    "subject": email.get("subject", "Hello {{ name }}"),
                    "textBody": email.get("text", "{{ note }}"),
                },
            }
        ],
    }
    if schema is not None:
        body["schema"] = schema
    status, got = await e2e.api("POST", "/v1/templates", body)
    assert status == 200, got
    return template_id


async def _refused(e2e: E2E, template_id: str, variables: dict[str, Any]) -> dict[str, str]:
    """Send; expect 400 INVALID_VARIABLE and nothing recorded; the violations by path."""
    user_id = await e2e.new_user(devices=0)
    status, got = await e2e.api(
        "POST",
        "/v1/notifications",
        {"userId": user_id, "templateId": template_id, "variables": variables},
    )
    assert status == 400, got
    assert got["code"] == 3, got
    info = _error_info(got)
    assert info["reason"] == "INVALID_VARIABLE", got
    violations = _violations(got)
    assert info["metadata"]["variable"] == next(iter(violations)).removeprefix("variables.")
    status, listed = await e2e.api("GET", f"/v1/users/{user_id}/notifications")
    assert status == 200 and listed["notifications"] == [], listed
    return violations


async def _accepted(e2e: E2E, template_id: str, variables: dict[str, Any]) -> None:
    user_id = await e2e.new_user(devices=0)
    status, got = await e2e.api(
        "POST",
        "/v1/notifications",
        {"userId": user_id, "templateId": template_id, "variables": variables},
    )
    assert status == 200, got


@pytest.mark.parametrize(
    "name",
    [
        "Ada\r\nBcc: victim@example.com",
        "Ada\nX-Injected: 1",
        "Ada\r",
        ["Ada", "\nBcc: x@example.com"],
        {"first": "Ada", "last": "L\novelace"},
        {"Ada\r\n": "key with a line break"},
    ],
)
async def test_a_line_break_in_a_variable_reaching_the_subject_is_refused(
    e2e: E2E, name: Any
) -> None:
    template_id = await _template(e2e)
    violations = await _refused(e2e, template_id, {"name": name, "note": "fine"})
    assert list(violations) == ["variables.name"]


async def test_a_line_break_in_a_body_variable_is_fine(e2e: E2E) -> None:
    template_id = await _template(e2e)
    await _accepted(e2e, template_id, {"name": "Ada", "note": "line one\r\nline two"})


async def test_the_schema_is_enforced_at_accept(e2e: E2E) -> None:
    template_id = await _template(
        e2e,
        [
            {"name": "name", "type": "VARIABLE_TYPE_STRING", "required": True},
            {"name": "note", "type": "VARIABLE_TYPE_STRING"},
            {"name": "count", "type": "VARIABLE_TYPE_NUMBER"},
            {"name": "flags", "type": "VARIABLE_TYPE_LIST"},
        ],
        text="{{ note }} {{ count }} {{ flags }}",
    )
    status, got = await e2e.api("GET", f"/v1/templates/{template_id}")
    assert status == 200, got
    schema = {v["name"]: v for v in got["template"]["schema"]}
    assert schema["name"] == {
        "name": "name",
        "type": "VARIABLE_TYPE_STRING",
        "required": True,
        "singleLine": True,
        "declared": True,
    }
    assert not schema["note"].get("singleLine")

    assert list(await _refused(e2e, template_id, {"note": "x"})) == ["variables.name"]
    assert list(await _refused(e2e, template_id, {"name": None})) == ["variables.name"]
    assert list(await _refused(e2e, template_id, {"name": 5})) == ["variables.name"]
    assert list(await _refused(e2e, template_id, {"name": "a", "count": "3"})) == [
        "variables.count"
    ]
    assert list(await _refused(e2e, template_id, {"name": "a", "flags": {"a": 1}})) == [
        "variables.flags"
    ]
    violations = await _refused(e2e, template_id, {"name": "a", "nmae": "typo"})
    assert list(violations) == ["variables.nmae"]
    # Every problem at once, the first one named in the ErrorInfo.
    violations = await _refused(e2e, template_id, {"count": True, "extra": 1})
    assert set(violations) == {"variables.name", "variables.count", "variables.extra"}

    await _accepted(e2e, template_id, {"name": "Ada", "count": 3, "flags": ["a"]})


async def test_without_a_schema_any_variable_may_be_sent(e2e: E2E) -> None:
    template_id = await _template(e2e)
    await _accepted(e2e, template_id, {"name": "Ada", "note": "n", "unused": {"a": [1]}})


@pytest.mark.parametrize(
    ("schema", "field", "reason"),
    [
        # note is read but not declared
        ([{"name": "name"}], "template.contents[0]", "INVALID_TEMPLATE"),
        (
            [{"name": "name"}, {"name": "note"}, {"name": "name"}],
            "template.schema[2].name",
            "INVALID_TEMPLATE",
        ),
        # The name's format is the contract's rule.
        (
            [{"name": "note"}, {"name": "name"}, {"name": "1st"}],
            "template.schema[2].name",
            "INVALID_REQUEST",
        ),
        (
            [{"name": "note"}, {"name": "name"}, {"name": "a-b"}],
            "template.schema[2].name",
            "INVALID_REQUEST",
        ),
    ],
)
async def test_a_schema_that_does_not_fit_the_contents_is_refused_at_save(
    e2e: E2E, schema: list[dict[str, Any]], field: str, reason: str
) -> None:
    body = {
        "id": f"t-{uuid.uuid4().hex[:10]}",
        "schema": schema,
        "contents": [
            {"language": "en", "email": {"subject": "Hi {{ name }}", "textBody": "{{ note }}"}}
        ],
    }
    status, got = await e2e.api("POST", "/v1/templates", body)
    assert status == 400, got
    assert _error_info(got)["reason"] == reason, got
    assert list(_violations(got)) == [field], got


async def test_a_new_version_keeps_the_previous_schema_unless_it_declares_one(e2e: E2E) -> None:
    template_id = await _template(
        e2e,
        [{"name": "name", "required": True}, {"name": "note"}],
    )
    status, got = await e2e.api(
        "POST",
        f"/v1/templates/{template_id}/versions",
        {"contents": [{"language": "en", "email": {"subject": "Yo {{ name }}", "textBody": "."}}]},
    )
    assert status == 200, got
    assert {v["name"]: v.get("required", False) for v in got["template"]["schema"]} == {
        "name": True,
        "note": False,
    }
