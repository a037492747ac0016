"""The render processes' wire format: one frame per message, both ways.

A frame is four bytes of big-endian length, then UTF-8 JSON. JSON rather than pickle,
because the answers come from a process that runs untrusted code: whatever a child
writes, the parent only ever decodes data from it. Standard library only, since the
render process imports it (see ``content`` on why that process stays small).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, BinaryIO

Message = dict[str, Any]

HEADER = 4


def encode(message: Mapping[str, Any]) -> bytes:
    """One frame."""
    data = json.dumps(message, separators=(",", ":")).encode()
    return len(data).to_bytes(HEADER, "big") + data


def read_frame(stream: BinaryIO) -> Message | None:
    """The next frame from a blocking stream (the child's stdin); None at end of input."""
    header = stream.read(HEADER)
    if len(header) < HEADER:
        return None
    data = stream.read(int.from_bytes(header, "big"))
    message: Message = json.loads(data)
    return message
