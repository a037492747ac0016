"""The field rules the contracts declare (``buf.validate``, ``google.api.field_behavior``),
checked in one step for every request a server receives.

Rules live on the fields in ``proto/``, as protovalidate's standard rules, so every
service and every client reads the same ones (a template id is 63 characters for the
gateway and for user_svc alike). This module compiles the rules of a message type once
into plain Python checks. It implements the subset of standard rules the contracts use;
a rule outside it fails when the message type is first compiled (a test compiles every
request type), so nothing declared is silently ignored. The reference evaluator,
protovalidate-python, evaluates CEL and costs about 3.5 ms per request on these
machines (more than the gateway's whole hot path); tests hold this one to its verdicts.

``field_behavior``: a REQUIRED field must be set (non-zero); an OUTPUT_ONLY field set by
a caller is cleared before the handler sees it (AIP-203), so e.g. a client-sent status
or id provably has no effect.

What needs code (time zones, language canonicalisation, e-mail addresses, header
injection) stays in Python, in the service that owns it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import re2  # type: ignore[import-untyped]
from buf.validate import validate_pb2
from google.api import field_behavior_pb2
from google.protobuf import descriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from notify_kit.errors import InvalidArgument
from notify_kit.interceptors import wrap_unary

log = logging.getLogger(__name__)

REASON = "INVALID_REQUEST"
FD = descriptor.FieldDescriptor
# One check: the value -> a description of what is wrong, or None.
Check = Callable[[Any], str | None]
Violations = list[tuple[str, str]]


class UnsupportedRule(Exception):
    """A contract declares a rule this evaluator does not implement."""


@dataclass(slots=True)
class _Field:
    descriptor: descriptor.FieldDescriptor
    required: bool = False
    ignore_empty: bool = False
    output_only: bool = False
    checks: list[Check] = field(default_factory=list)  # on the whole value
    item_checks: list[Check] = field(default_factory=list)  # on each element (repeated)
    nested: _Rules | None = None  # the message type's own rules (messages, elements)


@dataclass(slots=True)
class _Rules:
    """The compiled rules of one message type."""

    fields: list[_Field] = field(default_factory=list)

    def check(self, message: Message, path: str, out: Violations) -> None:
        for rule in self.fields:
            fd = rule.descriptor
            at = f"{path}{fd.name}"
            value = getattr(message, fd.name)
            repeated = fd.is_repeated
            present = _present(message, fd, value)
            if not present:
                if rule.required:
                    out.append((at, "is required"))
                    continue
                if rule.ignore_empty or (fd.type == FD.TYPE_MESSAGE and not repeated):
                    continue
                if fd.has_presence:
                    continue
            _run(rule.checks, value, at, out)
            if repeated:
                for index, item in enumerate(value):
                    _run(rule.item_checks, item, f"{at}[{index}]", out)
                    if rule.nested is not None:
                        rule.nested.check(item, f"{at}[{index}].", out)
            elif rule.nested is not None and present:
                rule.nested.check(value, f"{at}.", out)

    def clear_output_only(self, message: Message) -> None:
        for rule in self.fields:
            name = rule.descriptor.name
            if rule.output_only:
                message.ClearField(name)
            elif rule.nested is not None:
                if rule.descriptor.is_repeated:
                    for item in getattr(message, name):
                        rule.nested.clear_output_only(item)
                elif message.HasField(name):
                    rule.nested.clear_output_only(getattr(message, name))


def _present(message: Message, fd: descriptor.FieldDescriptor, value: Any) -> bool:
    """Set, by protobuf's rules: a non-empty list, a set message, a non-zero scalar."""
    if fd.is_repeated:
        return len(value) > 0
    if fd.has_presence:
        return message.HasField(fd.name)
    return bool(value != fd.default_value)


def _run(checks: list[Check], value: Any, at: str, out: Violations) -> None:
    for check in checks:
        problem = check(value)
        if problem is not None:
            out.append((at, problem))


class Validator:
    """Compiled rules by message type; thread-safe once warmed (compiling is idempotent)."""

    def __init__(self, *, field_behavior: bool = True) -> None:
        # field_behavior=False leaves REQUIRED/OUTPUT_ONLY out: buf.validate rules only,
        # which is what the reference evaluator knows (tests compare the two).
        self._field_behavior = field_behavior
        self._compiled: dict[str, _Rules] = {}

    def violations(self, message: Message) -> Violations:
        """Every rule ``message`` breaks, as (field path, what is wrong)."""
        out: Violations = []
        self.rules(message.DESCRIPTOR).check(message, "", out)
        return out

    def check(self, message: Message) -> None:
        """Clear output-only fields, then raise INVALID_ARGUMENT naming every violation."""
        rules = self.rules(message.DESCRIPTOR)
        rules.clear_output_only(message)
        out: Violations = []
        rules.check(message, "", out)
        if out:
            raise InvalidArgument(REASON, "the request has invalid fields", field_violations=out)

    def rules(self, message_type: Any) -> _Rules:
        """The compiled rules of ``message_type`` (compiled on first use)."""
        compiled = self._compiled.get(message_type.full_name)
        if compiled is None:
            compiled = _Rules()
            # Registered before its fields are compiled: recursive types end here.
            self._compiled[message_type.full_name] = compiled
            compiled.fields = [
                rule for fd in message_type.fields if (rule := self._field(fd)) is not None
            ]
        return compiled

    def _field(self, fd: descriptor.FieldDescriptor) -> _Field | None:
        options = fd.GetOptions()
        behaviors = set(options.Extensions[field_behavior_pb2.field_behavior])
        if not self._field_behavior:
            behaviors = set()
        rules = options.Extensions[validate_pb2.field]
        nested = None
        if fd.message_type is not None and _ours(fd.message_type):
            nested = self.rules(fd.message_type)
            if not nested.fields:
                nested = None
        rule = _Field(
            fd,
            required=rules.required or field_behavior_pb2.REQUIRED in behaviors,
            ignore_empty=rules.ignore == validate_pb2.IGNORE_IF_ZERO_VALUE,
            output_only=field_behavior_pb2.OUTPUT_ONLY in behaviors,
            nested=nested,
        )
        if rules.ignore not in (validate_pb2.IGNORE_UNSPECIFIED, validate_pb2.IGNORE_IF_ZERO_VALUE):
            raise UnsupportedRule(f"{fd.full_name}: ignore={rules.ignore}")
        if rules.cel or rules.cel_expression:
            raise UnsupportedRule(f"{fd.full_name}: CEL rules")
        kind = rules.WhichOneof("type")
        if kind == "map":
            raise UnsupportedRule(f"{fd.full_name}: map rules")
        if kind == "repeated":
            rule.checks = list(_repeated_checks(rules.repeated, fd))
            if rules.repeated.HasField("items"):
                items = rules.repeated.items
                if items.required or items.cel or items.HasField("ignore"):
                    raise UnsupportedRule(f"{fd.full_name}: items.required/cel/ignore")
                kind_of_items = items.WhichOneof("type")
                if kind_of_items is not None:
                    rule.item_checks = list(_scalar_checks(kind_of_items, items, fd))
        elif kind is not None:
            rule.checks = list(_scalar_checks(kind, rules, fd))
        if not (rule.required or rule.output_only or rule.checks or rule.item_checks or nested):
            return None
        return rule


def _ours(message_type: descriptor.Descriptor) -> bool:
    """Only our packages carry rules; google.protobuf's recursive types (Struct) do not."""
    return not message_type.full_name.startswith("google.")


def _scalar_checks(kind: str, rules: Message, fd: descriptor.FieldDescriptor) -> Iterator[Check]:
    typed = getattr(rules, kind)
    builders = _enum_builders(fd) if kind == "enum" else _BUILDERS.get(kind)
    if builders is None:
        raise UnsupportedRule(f"{fd.full_name}: {kind} rules")
    for rule_fd, value in typed.ListFields():
        build = builders.get(rule_fd.name)
        if build is None:
            raise UnsupportedRule(f"{fd.full_name}: {kind}.{rule_fd.name}")
        yield build(value)


def _repeated_checks(rules: validate_pb2.RepeatedRules, fd: FD) -> Iterator[Check]:
    for rule_fd, value in rules.ListFields():
        name = rule_fd.name
        if name == "items":
            continue
        if name == "min_items":
            yield _at_least(value, len, f"at least {value} items")
        elif name == "max_items":
            yield _at_most(value, len, f"at most {value} items")
        elif name == "unique" and value:
            yield lambda v: None if len(set(v)) == len(v) else "items must be unique"
        else:
            raise UnsupportedRule(f"{fd.full_name}: repeated.{name}")


def _at_least(limit: int, measure: Callable[[Any], int], text: str) -> Check:
    return lambda v: None if measure(v) >= limit else f"must have {text}"


def _at_most(limit: int, measure: Callable[[Any], int], text: str) -> Check:
    return lambda v: None if measure(v) <= limit else f"must have {text}"


def _pattern(pattern: str) -> Check:
    compiled = re2.compile(pattern)
    return lambda v: None if compiled.search(v) else f"must match {pattern}"


def _uuid(enabled: bool) -> Check:
    # protovalidate's string.uuid: RFC 4122 text form, either case.
    compiled = re2.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
    return lambda v: None if not enabled or compiled.search(v) else "must be a UUID"


def _one_of(values: Any) -> Check:
    allowed = frozenset(values)
    return lambda v: None if v in allowed else f"must be one of {sorted(allowed)}"


def _none_of(values: Any) -> Check:
    refused = frozenset(values)
    return lambda v: None if v not in refused else f"must not be one of {sorted(refused)}"


def _defined(fd: FD) -> Check:
    assert fd.enum_type is not None  # enum rules are only on enum fields
    numbers = frozenset(value.number for value in fd.enum_type.values)
    return lambda v: None if v in numbers else "must be a defined value"


def _number_checks() -> dict[str, Callable[[Any], Check]]:
    return {
        "const": lambda c: lambda v: None if v == c else f"must be {c}",
        "lt": lambda c: lambda v: None if v < c else f"must be less than {c}",
        "lte": lambda c: lambda v: None if v <= c else f"must be at most {c}",
        "gt": lambda c: lambda v: None if v > c else f"must be greater than {c}",
        "gte": lambda c: lambda v: None if v >= c else f"must be at least {c}",
        "in": _one_of,
        "not_in": _none_of,
    }


def _seconds(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def _duration_checks() -> dict[str, Callable[[Any], Check]]:
    def compare(op: Callable[[float, float], bool], text: str) -> Callable[[Any], Check]:
        def build(limit: Duration) -> Check:
            bound = _seconds(limit)
            return lambda v: None if op(_seconds(v), bound) else f"must be {text} {bound:g}s"

        return build

    return {
        "lt": compare(lambda a, b: a < b, "less than"),
        "lte": compare(lambda a, b: a <= b, "at most"),
        "gt": compare(lambda a, b: a > b, "more than"),
        "gte": compare(lambda a, b: a >= b, "at least"),
    }


def _timestamp_checks() -> dict[str, Callable[[Any], Check]]:
    def future(on: bool) -> Check:
        def check(value: Timestamp) -> str | None:
            return None if value.ToDatetime(UTC) > datetime.now(UTC) else "must be in the future"

        return check if on else (lambda v: None)

    return {"gt_now": future}


_STRING: dict[str, Callable[[Any], Check]] = {
    "const": lambda c: lambda v: None if v == c else f"must be {c!r}",
    "min_len": lambda n: _at_least(n, len, f"at least {n} characters"),
    "max_len": lambda n: _at_most(n, len, f"at most {n} characters"),
    "min_bytes": lambda n: _at_least(n, lambda v: len(v.encode()), f"at least {n} bytes"),
    "max_bytes": lambda n: _at_most(n, lambda v: len(v.encode()), f"at most {n} bytes"),
    "pattern": _pattern,
    "prefix": lambda p: lambda v: None if v.startswith(p) else f"must start with {p!r}",
    "in": _one_of,
    "not_in": _none_of,
    "uuid": _uuid,
}
_BYTES: dict[str, Callable[[Any], Check]] = {
    "min_len": lambda n: _at_least(n, len, f"at least {n} bytes"),
    "max_len": lambda n: _at_most(n, len, f"at most {n} bytes"),
}
_BUILDERS: dict[str, dict[str, Callable[[Any], Check]]] = {
    "string": _STRING,
    "bytes": _BYTES,
    "int32": _number_checks(),
    "int64": _number_checks(),
    "uint32": _number_checks(),
    "double": _number_checks(),
    "duration": _duration_checks(),
    "timestamp": _timestamp_checks(),
}


def _enum_builders(fd: FD) -> dict[str, Callable[[Any], Check]]:
    return {
        "const": lambda c: lambda v: None if v == c else f"must be {c}",
        "defined_only": lambda on: _defined(fd) if on else (lambda v: None),
        "in": _one_of,
        "not_in": _none_of,
    }


class ValidationInterceptor(grpc.aio.ServerInterceptor):
    """Checks every unary request against its contract's rules before the handler runs.

    Sits inside the shared ServerInterceptor, so the access check comes first and the
    InvalidArgument raised here becomes a rich status like any handler's.
    """

    def __init__(self, validator: Validator | None = None) -> None:
        self._validator = validator or Validator()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap unary-unary handlers; streaming ones (health, reflection) pass as they are."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        check = self._validator.check

        async def validated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Message):  # raw bytes: a proxy; the service it calls checks
                check(request)
            return await inner(request, context)

        return wrap_unary(handler, validated)
