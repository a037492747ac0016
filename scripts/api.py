"""A minimal JSON-over-HTTP client for the public API (demo, tests, docs examples)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

DEMO_TEMPLATE: dict[str, Any] = {
    "id": "welcome",
    "description": "Greets a new user",
    "contents": [
        {
            "language": "en",
            "email": {
                "subject": "Welcome, {{ name }}!",
                "textBody": "Hi {{ name }},\n\nYour notify account is ready.\n",
                "htmlBody": "<p>Hi <b>{{ name }}</b>,</p><p>Your notify account is ready.</p>",
            },
            "push": {"title": "Welcome, {{ name }}!", "body": "Your account is ready."},
        },
        {
            "language": "fr",
            "email": {
                "subject": "Bienvenue, {{ name }} !",
                "textBody": "Bonjour {{ name }},\n\nVotre compte notify est prêt.\n",
            },
            "push": {"title": "Bienvenue, {{ name }} !", "body": "Votre compte est prêt."},
        },
    ],
}


def call(
    method: str,
    url: str,
    body: Any = None,
    *,
    api_key: str,
    timeout: float = 10.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """Send one JSON request; return (HTTP status, decoded JSON body or raw text)."""
    data = None if body is None else json.dumps(body).encode()
    return call_raw(method, url, data, api_key=api_key, timeout=timeout, headers=headers)


def call_raw(
    method: str,
    url: str,
    data: bytes | None,
    *,
    api_key: str | None = None,
    timeout: float = 10.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """Send ``data`` as it is (malformed JSON, invalid UTF-8: what tests of bad input need),
    as JSON; return (HTTP status, decoded JSON body or raw text)."""
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (http only)
    if api_key is not None:
        request.add_header("x-api-key", api_key)
    if data is not None:
        request.add_header("content-type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")
