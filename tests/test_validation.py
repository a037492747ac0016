"""The contracts' field rules: compiled for every request, and judged as protovalidate does.

protovalidate-python is the reference evaluator of buf.validate rules; ours compiles the
same rules to plain checks (see notify_kit.validation for why). For every rule on every
request type, each value of a small corpus is judged by both, and the fields they find
at fault must be the same.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import protovalidate
import pytest
from google.protobuf import descriptor, duration_pb2, message_factory
from google.protobuf.message import Message
from notify.v1 import (
    common_pb2,
    notification_service_pb2,
    user_service_pb2,
)

from notify_kit import acl
from notify_kit.errors import InvalidArgument
from notify_kit.validation import Validator

FD = descriptor.FieldDescriptor
MODULES = acl.SERVICE_MODULES
REQUESTS = [
    method.input_type
    for module in MODULES
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
STRINGS = [
    "",
    "a",
    "welcome",
    "welcome\n",
    "Welcome",
    "6f1c1c9e-4d0b-4f43-9a57-8f3e1f9d2a10",
    "6F1C1C9E-4D0B-4F43-9A57-8F3E1F9D2A10",
    "{6f1c1c9e-4d0b-4f43-9a57-8f3e1f9d2a10}",
    "6f1c1c9e4d0b4f439a578f3e1f9d2a10",
    "en",
    "fr-CA",
    "zh-Hant-TW",
    "e",
    "en_US",
    "x y",
    "a\tb",
    "é",
    "\x7f",
    "a" * 63,
    "a" * 64,
    "a" * 65,
    "a" * 129,
    "a" * 201,
    "a" * 255,
    "x" * 4097,
    "_x1",
    "1x",
]
INTS = [-1, 0, 1, 2, 3, 99, 100, 101]
SECONDS = [0, 59, 60, 3600, 604800, 604801]


def _reference() -> Any:
    """protovalidate's evaluator (its constructor is untyped)."""
    return protovalidate.Validator()  # type: ignore[no-untyped-call]


def _pv_path(violation: Any) -> str:
    parts = []
    for element in violation.proto.field.elements:
        part = element.field_name
        if element.HasField("index"):
            part += f"[{element.index}]"
        parts.append(part)
    return ".".join(parts)


def _paths(violations: list[tuple[str, str]]) -> set[str]:
    return {path for path, _ in violations}


def _values(fd: descriptor.FieldDescriptor) -> Iterator[Any]:
    if fd.type == FD.TYPE_STRING:
        yield from STRINGS
    elif fd.type == FD.TYPE_BYTES:
        yield from (b"", b"x", b"x" * (1 << 20), b"x" * ((1 << 20) + 1))
    elif fd.type in (FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_ENUM, FD.TYPE_UINT32):
        yield from (v for v in INTS if fd.type != FD.TYPE_UINT32 or v >= 0)
    elif fd.type == FD.TYPE_DOUBLE:
        yield from (-1.0, 0.0, 0.001, 1.0, 100000.0, 100000.5)
    elif fd.type == FD.TYPE_BOOL:
        yield from (False, True)


def _cases(message_type: descriptor.Descriptor, depth: int = 0) -> Iterator[Message]:
    """Messages with one field (or one element of a repeated field) set to each value."""
    cls = message_factory.GetMessageClass(message_type)
    for fd in message_type.fields:
        kind = fd.message_type.full_name if fd.message_type is not None else ""
        if kind == "google.protobuf.Timestamp":
            for offset in (-3600, 3600):  # in the past, in the future
                msg = cls()
                getattr(msg, fd.name).FromSeconds(int(time.time()) + offset)
                yield msg
        elif (
            fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Duration"
        ):
            for seconds in SECONDS:
                msg = cls()
                getattr(msg, fd.name).CopyFrom(duration_pb2.Duration(seconds=seconds))
                yield msg
        elif fd.message_type is not None:
            if depth >= 2 or fd.message_type.full_name.startswith("google."):
                continue
            for inner in _cases(fd.message_type, depth + 1):
                msg = cls()
                if fd.is_repeated:
                    getattr(msg, fd.name).add().CopyFrom(inner)
                    getattr(msg, fd.name).add().CopyFrom(inner)
                else:
                    getattr(msg, fd.name).CopyFrom(inner)
                yield msg
        elif fd.is_repeated:
            values = list(_values(fd))[:5]
            for combo in itertools.chain(
                ([v] for v in values),
                ([a, b] for a in values[:3] for b in values[:3]),
                ([1, 2, 1],),
            ):
                msg = cls()
                try:
                    getattr(msg, fd.name).extend(combo)
                except (TypeError, ValueError):
                    continue
                yield msg
        else:
            for value in _values(fd):
                msg = cls()
                try:
                    setattr(msg, fd.name, value)
                except (TypeError, ValueError):
                    continue
                yield msg


@pytest.mark.parametrize("message_type", REQUESTS, ids=lambda d: d.name)
def test_every_request_type_compiles(message_type: descriptor.Descriptor) -> None:
    Validator().rules(message_type)


@pytest.mark.parametrize("message_type", REQUESTS, ids=lambda d: d.name)
def test_our_verdicts_are_protovalidates(message_type: descriptor.Descriptor) -> None:
    ours = Validator(field_behavior=False)
    reference = _reference()
    judged = 0
    for msg in _cases(message_type):
        if _undefined_enum_items(msg):
            continue  # a gap of the reference, see below
        expected = {_pv_path(v) for v in reference.collect_violations(msg)}
        assert _paths(ours.violations(msg)) == expected, msg
        judged += 1
    assert judged > 0 or not message_type.fields


def _undefined_enum_items(msg: Message) -> bool:
    """Whether a repeated enum field of ``msg`` (at any depth) holds an undefined value."""
    for fd, value in msg.ListFields():
        if fd.type == FD.TYPE_ENUM and fd.is_repeated:
            assert fd.enum_type is not None
            defined = {v.number for v in fd.enum_type.values}
            if any(item not in defined for item in value):
                return True
        elif fd.type == FD.TYPE_MESSAGE:
            items = value if fd.is_repeated else [value]
            if any(_undefined_enum_items(item) for item in items):
                return True
    return False


def test_undefined_values_in_a_repeated_enum_are_refused() -> None:
    """``repeated.items.enum.defined_only``: protovalidate-python 1.2.0 does not apply it
    to repeated enum items (channels=[5] passes there, checked while writing this), the
    rule says it must; we apply it."""
    request = notification_service_pb2.SendNotificationRequest(
        user_id="6f1c1c9e-4d0b-4f43-9a57-8f3e1f9d2a10",
        template_id="w",
        channels=[common_pb2.CHANNEL_EMAIL, 5],  # type: ignore[list-item]
    )
    assert Validator().violations(request) == [("channels[1]", "must be a defined value")]
    assert _reference().collect_violations(request) == []  # the gap, still there


def test_required_fields_and_output_only_fields() -> None:
    validator = Validator()
    request = user_service_pb2.CreateUserRequest()
    with pytest.raises(InvalidArgument) as caught:
        validator.check(request)
    assert caught.value.reason == "INVALID_REQUEST"
    assert [path for path, _ in caught.value.field_violations] == ["user"]

    request.user.email = "a@example.com"
    request.user.id = "6f1c1c9e-4d0b-4f43-9a57-8f3e1f9d2a10"  # output only: ignored
    request.user.devices.add(token="t")
    validator.check(request)
    assert request.user.id == "" and not request.user.devices
    assert request.user.email == "a@example.com"


def test_the_reference_agrees_on_the_gateways_hot_request() -> None:
    """The one request every send makes, valid and invalid, field by field."""
    good = notification_service_pb2.SendNotificationRequest(
        user_id="6f1c1c9e-4d0b-4f43-9a57-8f3e1f9d2a10",
        template_id="welcome",
        channels=[common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_PUSH],
        language="fr-CA",
        idempotency_key="k-1",
    )
    good.ttl.seconds = 3600
    assert Validator().violations(good) == []
    assert _reference().collect_violations(good) == []
    bad = notification_service_pb2.SendNotificationRequest(
        user_id="nope",
        template_id="a" * 64,
        channels=[common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_EMAIL],
        language="e",
        idempotency_key="\n",
    )
    bad.ttl.seconds = 30
    expected = {"user_id", "template_id", "channels", "language", "idempotency_key", "ttl"}
    assert _paths(Validator().violations(bad)) == expected
    assert {_pv_path(v) for v in _reference().collect_violations(bad)} == expected
