"""Failure answers (issue 7): an outage of a dependency is a retryable UNAVAILABLE (503 at the
edge) with reason DEPENDENCY_UNAVAILABLE, only a bug is INTERNAL, and no answer carries
internal detail: that goes to the log, under the request's correlation id.

The first tests run tiny servers with the shared interceptor whose handlers raise each kind
of infrastructure exception; the last one stages a PostgreSQL outage for user_svc and
template_svc in a running system (each reaches its database through a TCP relay that the
test cuts and restores) and asks through Envoy.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq.exceptions
import asyncpg
import grpc
import pytest
import redis.exceptions
from notify.v1 import user_service_pb2, user_service_pb2_grpc

from gateway.proxy import ForwardingHandler
from notify_kit.context import CORRELATION_HEADER, new_correlation_id
from notify_kit.errors import DOMAIN, NotFound, Unavailable, error_info
from notify_kit.interceptors import ClientInterceptor
from notify_kit.logs import JsonFormatter
from notify_kit.outage import DEPENDENCY_UNAVAILABLE, is_outage, outage_error
from notify_kit.rpc import secure_channel, unary
from notify_kit.server import GrpcServer
from notify_kit.settings import CommonSettings, TlsSettings
from notify_kit.tls import channel_credentials
from scripts.system import poll
from tests.conftest import PG_BASE, RUN_ID
from tests.database_link import DatabaseLink, via
from tests.e2e_support import E2E, e2e_system

SOME_USER = "00000000-0000-4000-8000-00000000f001"
# An internal address and a marker: neither may ever reach a caller.
SECRET = "s3cr3t-10.9.8.7:5432"

ErrorFactory = Callable[[], BaseException]

# One of each kind the table must map; each carries the secret in its text.
INFRA_FAILURES: dict[str, ErrorFactory] = {
    "asyncpg-connection-lost": lambda: asyncpg.ConnectionDoesNotExistError(
        f"connection to {SECRET} was closed in the middle of operation"
    ),
    "asyncpg-admin-shutdown": lambda: asyncpg.AdminShutdownError(
        f"terminating connection due to administrator command ({SECRET})"
    ),
    "asyncpg-too-many-clients": lambda: asyncpg.TooManyConnectionsError(
        f"sorry, too many clients already ({SECRET})"
    ),
    "redis-connection": lambda: redis.exceptions.ConnectionError(
        f"Error 111 connecting to {SECRET}. Connection refused."
    ),
    "os-error": lambda: OSError(errno.EHOSTUNREACH, f"No route to host {SECRET}"),
    "connection-refused": lambda: ConnectionRefusedError(
        errno.ECONNREFUSED, f"Connect call failed ('{SECRET}')"
    ),
    "timeout": lambda: TimeoutError(f"pool.acquire from {SECRET} timed out"),
    "aiormq-connection": lambda: aiormq.exceptions.AMQPConnectionError(
        f"amqp://guest:guest@{SECRET}/ unreachable"
    ),
    "aio-pika-connection-closed": lambda: aio_pika.exceptions.ConnectionClosed(
        320, f"CONNECTION_FORCED - broker at {SECRET} shutting down"
    ),
    "aiormq-channel-closed-under-us": lambda: aiormq.exceptions.ChannelInvalidStateError(
        f"writer on {SECRET} is closed"
    ),
    "a-group-of-outages": lambda: ExceptionGroup(
        "lookups", [OSError(f"reset by {SECRET}"), TimeoutError(SECRET)]
    ),
}
BUGS: dict[str, ErrorFactory] = {
    "zero-division": lambda: ZeroDivisionError(f"division by zero near {SECRET}"),
    "key-error": lambda: KeyError(SECRET),
    "unhandled-constraint": lambda: asyncpg.UniqueViolationError(f"duplicate key {SECRET}"),
    "a-group-with-a-bug": lambda: ExceptionGroup("lookups", [OSError(SECRET), KeyError(SECRET)]),
}


class Scripted(user_service_pb2_grpc.UserServiceServicer):
    """GetUser raises whatever the test put in ``error``."""

    def __init__(self) -> None:
        self.error: ErrorFactory = lambda: NotFound(
            "USER_NOT_FOUND", "no such user", metadata={"user_id": SOME_USER}
        )

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> user_service_pb2.GetUserResponse:
        raise self.error()


class Relay(user_service_pb2_grpc.UserServiceServicer):
    """GetUser asks an upstream through the shared client code and relays its answer."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = user_service_pb2_grpc.UserServiceStub(channel)

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> user_service_pb2.GetUserResponse:
        return await unary(self._stub.GetUser, request, timeout=2)


@contextlib.asynccontextmanager
async def _serving(
    settings: CommonSettings, servicer: user_service_pb2_grpc.UserServiceServicer
) -> AsyncIterator[int]:
    server = GrpcServer(
        settings,
        [lambda s: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, s)],
        ["notify.v1.UserService"],
    )
    port = await server.start()
    try:
        yield port
    finally:
        await server.stop()


def _raw_channel(port: int, tls: TlsSettings) -> grpc.aio.Channel:
    """A channel without retries: every answer is seen exactly as the server gave it
    (its only interceptor adds what every mesh call carries: the service key)."""
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        channel_credentials(tls),
        options=[("grpc.enable_retries", 0)],
        interceptors=[ClientInterceptor(10.0, tls.service_key)],
    )


@pytest.fixture(scope="module")
async def scripted(
    common_for: Callable[[str], CommonSettings],
) -> AsyncIterator[tuple[Scripted, int]]:
    """The tiny upstream: a UserService whose GetUser raises what a test scripts."""
    servicer = Scripted()  # type: ignore[abstract]
    async with _serving(common_for("user_svc"), servicer) as port:
        yield servicer, port


@pytest.fixture
def json_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    """The captured log as the services write it: JSON lines with the correlation id."""
    caplog.set_level(logging.INFO, logger="notify_kit.interceptors")
    caplog.handler.setFormatter(JsonFormatter("test"))

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in caplog.text.splitlines() if line.startswith("{")]

    return lines


async def _get_user(channel: grpc.aio.Channel, correlation_id: str) -> grpc.aio.AioRpcError:
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetUser(
            user_service_pb2.GetUserRequest(id=SOME_USER),
            timeout=10,
            metadata=((CORRELATION_HEADER, correlation_id),),
        )
    return caught.value


def _everything_sent(err: grpc.aio.AioRpcError) -> str:
    """Every text the caller received: details and all trailing metadata."""
    parts = [err.details() or ""]
    for key, value in err.trailing_metadata() or ():
        parts.append(
            f"{key}={value.decode(errors='replace') if isinstance(value, bytes) else value}"
        )
    return "\n".join(parts)


def _logged_with(lines: list[dict[str, Any]], correlation_id: str, needle: str) -> bool:
    return any(
        line.get("correlation_id") == correlation_id and needle in json.dumps(line)
        for line in lines
    )


@pytest.mark.parametrize("kind", sorted(INFRA_FAILURES))
async def test_an_infrastructure_failure_answers_unavailable_without_its_text(
    kind: str,
    scripted: tuple[Scripted, int],
    tls_for: Callable[[str], TlsSettings],
    json_log: Callable[[], list[dict[str, Any]]],
) -> None:
    servicer, port = scripted
    servicer.error = INFRA_FAILURES[kind]
    correlation_id = new_correlation_id()
    async with _raw_channel(port, tls_for("gateway")) as channel:
        err = await _get_user(channel, correlation_id)

    assert err.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(err.trailing_metadata())
    assert (info.reason, info.domain) == (DEPENDENCY_UNAVAILABLE, DOMAIN)
    assert dict(info.metadata) == {"correlation_id": correlation_id}
    sent = _everything_sent(err)
    assert "s3cr3t" not in sent and "10.9.8.7" not in sent
    assert str(INFRA_FAILURES[kind]()) not in sent
    assert _logged_with(json_log(), correlation_id, SECRET)


@pytest.mark.parametrize("kind", sorted(BUGS))
async def test_a_bug_answers_internal_and_only_the_log_has_its_detail(
    kind: str,
    scripted: tuple[Scripted, int],
    tls_for: Callable[[str], TlsSettings],
    json_log: Callable[[], list[dict[str, Any]]],
) -> None:
    servicer, port = scripted
    servicer.error = BUGS[kind]
    correlation_id = new_correlation_id()
    async with _raw_channel(port, tls_for("gateway")) as channel:
        err = await _get_user(channel, correlation_id)

    assert err.code() == grpc.StatusCode.INTERNAL
    info = error_info(err.trailing_metadata())
    assert (info.reason, dict(info.metadata)) == ("INTERNAL", {"correlation_id": correlation_id})
    assert err.details() == "internal error; see server logs"
    assert "s3cr3t" not in _everything_sent(err)
    logged = json_log()
    assert _logged_with(logged, correlation_id, SECRET)
    assert any(
        line.get("correlation_id") == correlation_id and SECRET in line.get("exc", "")
        for line in logged
    )  # with its traceback


async def test_an_unavailable_of_ours_is_not_retried_by_our_channels(
    scripted: tuple[Scripted, int], tls_for: Callable[[str], TlsSettings]
) -> None:
    """Our channels retry UNAVAILABLE (a call that never reached a handler); one the
    handler answered itself must reach the caller on the first try, not be resent."""
    servicer, port = scripted
    calls = 0

    def failing() -> BaseException:
        nonlocal calls
        calls += 1
        return OSError(SECRET)

    servicer.error = failing
    channel = secure_channel(f"127.0.0.1:{port}", tls_for("gateway"))
    try:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        with pytest.raises(Unavailable):
            await unary(stub.GetUser, user_service_pb2.GetUserRequest(id=SOME_USER), timeout=5)
    finally:
        await channel.close()
    assert calls == 1


@pytest.mark.parametrize(
    ("exc", "time_remaining", "code"),
    [
        # The caller's own deadline ran out: say so (a retry needs a longer deadline).
        (TimeoutError(), 0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
        (asyncpg.QueryCanceledError("statement timeout"), 0.01, grpc.StatusCode.DEADLINE_EXCEEDED),
        (redis.exceptions.TimeoutError(), 0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
        # Our own outbound timeout fired with time to spare, or no deadline was set.
        (TimeoutError(), 3.0, grpc.StatusCode.UNAVAILABLE),
        (TimeoutError(), None, grpc.StatusCode.UNAVAILABLE),
        # Not a timeout: a dependency is down, whatever the deadline.
        (ConnectionRefusedError(), 0.0, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_a_timeout_is_deadline_exceeded_only_when_the_callers_deadline_ran_out(
    exc: BaseException, time_remaining: float | None, code: grpc.StatusCode
) -> None:
    answer = outage_error(exc, time_remaining)
    assert (answer.code, answer.reason) == (code, DEPENDENCY_UNAVAILABLE)


def test_the_table_knows_the_broker_and_database_failures_and_not_bugs() -> None:
    assert all(is_outage(make()) for make in INFRA_FAILURES.values())
    assert is_outage(aio_pika.exceptions.AMQPConnectionError("x"))
    assert is_outage(asyncpg.CannotConnectNowError("the database system is starting up"))
    assert not any(is_outage(make()) for make in BUGS.values())


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but never listening: every connection to it is refused."""
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_a_relayed_error_keeps_its_code_and_reason_and_loses_transport_detail(
    scripted: tuple[Scripted, int],
    common_for: Callable[[str], CommonSettings],
    tls_for: Callable[[str], TlsSettings],
    refused_port: int,
    json_log: Callable[[], list[dict[str, Any]]],
) -> None:
    servicer, upstream_port = scripted
    servicer.error = lambda: NotFound(
        "USER_NOT_FOUND", "no such user", metadata={"user_id": SOME_USER}
    )
    live = secure_channel(f"127.0.0.1:{upstream_port}", tls_for("gateway"))
    dead = secure_channel(f"127.0.0.1:{refused_port}", tls_for("gateway"), reconnect_wait=0.2)
    relay_live, relay_dead = Relay(live), Relay(dead)  # type: ignore[abstract]
    try:
        async with (
            _serving(common_for("user_svc"), relay_live) as live_port,
            _serving(common_for("user_svc"), relay_dead) as dead_port,
            _raw_channel(live_port, tls_for("gateway")) as to_live,
            _raw_channel(dead_port, tls_for("gateway")) as to_dead,
        ):
            found_id, down_id = new_correlation_id(), new_correlation_id()
            not_found = await _get_user(to_live, found_id)
            down = await _get_user(to_dead, down_id)
    finally:
        await live.close()
        await dead.close()

    # An upstream's own answer passes as it is: code, reason, metadata, message.
    assert not_found.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(not_found.trailing_metadata())
    assert (info.reason, dict(info.metadata)) == ("USER_NOT_FOUND", {"user_id": SOME_USER})
    assert not_found.details() == "no such user"
    # A transport failure keeps its code; its text (the peer's address) stays in the log.
    assert down.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(down.trailing_metadata()).reason == "UPSTREAM_UNAVAILABLE"
    assert str(refused_port) not in _everything_sent(down)
    assert "127.0.0.1" not in _everything_sent(down)
    logged = json_log()
    assert _logged_with(logged, down_id, str(refused_port))
    # The relay's access-log line shows the upstream's real code, marked as relayed.
    assert any(
        line.get("msg") == "rpc"
        and line.get("correlation_id") == found_id
        and line.get("code") == "NOT_FOUND"
        and line.get("forwarded") is True
        for line in logged
    )


async def test_the_gateway_forwarder_logs_the_upstreams_real_code(
    scripted: tuple[Scripted, int],
    common_for: Callable[[str], CommonSettings],
    tls_for: Callable[[str], TlsSettings],
    json_log: Callable[[], list[dict[str, Any]]],
) -> None:
    servicer, upstream_port = scripted
    servicer.error = lambda: NotFound("USER_NOT_FOUND", "no such user")
    upstream = secure_channel(f"127.0.0.1:{upstream_port}", tls_for("gateway"))
    forwarding = ForwardingHandler({"user_svc": upstream, "template_svc": upstream}, timeout=2)
    gateway = GrpcServer(
        common_for("gateway"),
        [lambda s: s.add_generic_rpc_handlers((forwarding,))],
        ["notify.v1.UserService"],
    )
    port = await gateway.start()
    try:
        correlation_id = new_correlation_id()
        async with _raw_channel(port, tls_for("envoy")) as channel:
            err = await _get_user(channel, correlation_id)
    finally:
        await gateway.stop()
        await upstream.close()

    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err.trailing_metadata()).reason == "USER_NOT_FOUND"
    gateway_lines = [
        line
        for line in json_log()
        if line.get("msg") == "rpc"
        and line.get("correlation_id") == correlation_id
        and line.get("forwarded") is True
    ]
    assert [(line["code"], line["reason"]) for line in gateway_lines] == [
        ("NOT_FOUND", "USER_NOT_FOUND")
    ]


async def test_the_gateway_forwarder_hides_a_dead_upstreams_address(
    common_for: Callable[[str], CommonSettings],
    tls_for: Callable[[str], TlsSettings],
    refused_port: int,
) -> None:
    upstream = secure_channel(f"127.0.0.1:{refused_port}", tls_for("gateway"), reconnect_wait=0.2)
    forwarding = ForwardingHandler({"user_svc": upstream, "template_svc": upstream}, timeout=2)
    gateway = GrpcServer(
        common_for("gateway"),
        [lambda s: s.add_generic_rpc_handlers((forwarding,))],
        ["notify.v1.UserService"],
    )
    port = await gateway.start()
    try:
        async with _raw_channel(port, tls_for("envoy")) as channel:
            err = await _get_user(channel, new_correlation_id())
    finally:
        await gateway.stop()
        await upstream.close()

    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert str(refused_port) not in _everything_sent(err)


# --- end to end: a database outage through Envoy ---------------------------------------


@pytest.fixture
async def outage_system(
    tmp_path: Path, certs_dir: Path
) -> AsyncIterator[tuple[E2E, dict[str, DatabaseLink]]]:
    """A private system whose user_svc and template_svc reach PostgreSQL through links."""
    base = urlsplit(PG_BASE)
    links = {
        service: DatabaseLink(base.hostname or "127.0.0.1", base.port or 5432)
        for service in ("user_svc", "template_svc")
    }
    for link in links.values():
        await link.restore()
    tag = f"t{RUN_ID}f{uuid.uuid4().hex[:4]}"
    env = {
        "NOTIFY_USER_SVC_DSN": via(links["user_svc"], f"notify_{tag}_user"),
        "NOTIFY_TEMPLATE_SVC_DSN": via(links["template_svc"], f"notify_{tag}_template"),
    }
    try:
        async with e2e_system(tmp_path, certs_dir, tag, extra_env=env) as system:
            yield system, links
    finally:
        for link in links.values():
            await link.cut()


def _assert_retryable_and_clean(status: int, body: Any, what: str) -> None:
    assert status == 503, (what, status, body)
    assert isinstance(body, dict), (what, body)
    reasons = [d.get("reason") for d in body.get("details", [])]
    assert DEPENDENCY_UNAVAILABLE in reasons, (what, body)
    text = json.dumps(body)
    for internal in ("5432", "127.0.0.1", "asyncpg", "postgres", "Connect call", "Traceback"):
        assert internal not in text, (what, internal, body)


@pytest.mark.timeout(300)
async def test_a_database_outage_answers_503_through_envoy_and_recovers(
    outage_system: tuple[E2E, dict[str, DatabaseLink]],
) -> None:
    system, links = outage_system
    user_id = await system.new_user(devices=0)
    template = {
        "id": f"t{uuid.uuid4().hex[:8]}",
        "description": "outage probe",
        "contents": [{"language": "en", "email": {"subject": "Hi", "textBody": "Hi"}}],
    }
    # Reads and writes that must reach each service's database (unknown ids miss caches).
    probes: dict[str, list[tuple[str, str, Any]]] = {
        "user_svc": [
            ("GET", f"/v1/users/{uuid.uuid4()}", None),
            ("POST", "/v1/users", {"email": f"o{uuid.uuid4().hex[:8]}@example.com"}),
        ],
        "template_svc": [
            ("GET", f"/v1/templates/t{uuid.uuid4().hex[:8]}", None),
            ("POST", "/v1/templates", template),
        ],
    }
    for service, requests in probes.items():
        await links[service].cut()
        for method, path, body in requests:
            status, answer = await system.api(method, path, body)
            _assert_retryable_and_clean(status, answer, f"{service}: {method} {path}")
        await links[service].restore()
        # Back: the next calls find the database again (the pool reconnects on its own).
        missing_path = requests[0][1]

        async def read_again(path: str = missing_path) -> tuple[int, Any]:
            return await system.api("GET", path)

        await poll(
            read_again,
            lambda r: r[0] == 404,
            timeout=30,
            what=f"{service} answering after the outage",
        )
        method, path, body = requests[1]
        status, answer = await system.api(method, path, body)
        assert status == 200, (service, status, answer)
    status, answer = await system.api("GET", f"/v1/users/{user_id}")
    assert status == 200, answer
