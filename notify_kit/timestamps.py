"""Database times as protobuf ``Timestamp`` fields, written once for every store."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp


def to_timestamp(value: datetime | None) -> Timestamp | None:
    """``value`` as a ``Timestamp``; None (the field stays unset) for a NULL column."""
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
