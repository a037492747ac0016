"""Opaque page tokens for keyset paging: a (created_at, id) position, for every list RPC.

A keyset instead of an offset keeps pages stable while new notifications arrive and
costs one index seek per page however deep the caller goes. The token is URL-safe
base64 so it survives query strings; it is opaque to callers and only checked for
being well formed, since any position is harmless to start from.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from notify_kit.errors import InvalidArgument

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MAX_TOKEN_LENGTH = 128


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last record of a page; the next page starts strictly after it."""

    created_at: datetime
    id: uuid.UUID


def encode_page_token(cursor: Cursor) -> str:
    """The token for the page after ``cursor`` (whole microseconds, as PostgreSQL stores)."""
    micros = (cursor.created_at - _EPOCH) // _MICROSECOND
    raw = f"{micros}:{cursor.id}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_page_token(token: str) -> Cursor:
    """Parse a token made by ``encode_page_token``; anything else is INVALID_PAGE_TOKEN."""
    try:
        if len(token) > _MAX_TOKEN_LENGTH:
            raise ValueError("too long")
        padded = token + "=" * (-len(token) % 4)
        raw = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
        micros, _, ident = raw.decode("ascii").partition(":")
        cursor = Cursor(created_at=_EPOCH + int(micros) * _MICROSECOND, id=uuid.UUID(ident))
        # Only the canonical spelling is accepted, so one position has one token.
        if encode_page_token(cursor) != token:
            raise ValueError("not canonical")
    except (ValueError, binascii.Error, OverflowError) as exc:
        raise InvalidArgument(
            "INVALID_PAGE_TOKEN",
            "page_token is not a token from a previous response",
            field_violations=[("page_token", "must come from next_page_token")],
        ) from exc
    return cursor
