"""Callers reach a restarted upstream within seconds; Envoy outwaits the gateway.

The first half runs real ``GrpcServer``s with the dev certificates and calls them through
``notify_kit.rpc`` channels: a restart on the same port, an upstream that is down, one
that accepts connections and never answers, and one that answers UNAVAILABLE itself.
Nothing here sleeps: waits are on connection attempts seen by a stand-in listener, or on
the calls themselves, and every wait has a timeout.

The second half recomputes the gateway's worst-case accept path from the code's own
defaults and checks that Envoy's route timeout (envoy/envoy.yaml) is strictly longer, so
the two cannot drift apart silently.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import inspect
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from notify.v1 import user_service_pb2, user_service_pb2_grpc

from gateway.config import Config
from gateway.store import KeyStore
from notify_kit import kv, rpc
from notify_kit.errors import DeadlineExceeded, Unavailable
from notify_kit.rpc import secure_channel, unary
from notify_kit.server import GrpcServer
from notify_kit.settings import CommonSettings, TlsSettings

ROOT = Path(__file__).resolve().parent.parent
ENVOY = ROOT / "envoy" / "envoy.yaml"
GATEWAY_APP = ROOT / "gateway" / "app.py"

# gRPC's reconnect jitter is 20 %: with the 1 s cap an attempt is at most 1.2 s after the
# previous one. The rest is scheduling slack on a busy two-core machine.
MAX_ATTEMPT_GAP = 2.0
RECONNECTED_WITHIN = 2.0
SLACK = 0.5


# User ids are UUIDs by the contract.
U1, U2, STORE_DOWN = (str(uuid.UUID(int=n)) for n in (1, 2, 3))


class _Users(user_service_pb2_grpc.UserServiceServicer):
    """GetUser echoes the id; the id ``STORE_DOWN`` answers UNAVAILABLE itself."""

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> user_service_pb2.GetUserResponse:
        if request.id == STORE_DOWN:
            raise Unavailable("STORE_DOWN", "the user store is down")
        return user_service_pb2.GetUserResponse(user=user_service_pb2.User(id=request.id))


def _server(settings: CommonSettings) -> GrpcServer:
    servicer = _Users()  # type: ignore[abstract]  # only GetUser is needed
    return GrpcServer(
        settings,
        [lambda s: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, s)],
        ["notify.v1.UserService"],
    )


async def _get_user(channel: grpc.aio.Channel, user_id: str, timeout: float | None) -> str:
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    response = await unary(
        stub.GetUser, user_service_pb2.GetUserRequest(id=user_id), timeout=timeout
    )
    found: str = response.user.id
    return found


class _Impostor:
    """A TCP listener on an upstream's port that is no gRPC server.

    It records every connection attempt the channel makes (so a test can wait for the
    reconnect backoff to reach its cap instead of sleeping), then hangs up, like a
    restarting peer, or keeps the connection and never speaks, like a stuck one.
    """

    def __init__(self, *, hang_up: bool) -> None:
        self.attempts: list[float] = []
        self._hang_up = hang_up
        self._held: list[asyncio.StreamWriter] = []
        self._seen = asyncio.Condition()

    async def accept(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._seen:
            self.attempts.append(time.monotonic())
            self._seen.notify_all()
        if self._hang_up:
            writer.close()
        else:
            self._held.append(writer)

    async def wait_for_attempts(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout), self._seen:
            await self._seen.wait_for(lambda: len(self.attempts) >= count)

    def release(self) -> None:
        for writer in self._held:
            writer.close()


@asynccontextmanager
async def _impostor(port: int, *, hang_up: bool) -> AsyncIterator[_Impostor]:
    impostor = _Impostor(hang_up=hang_up)
    listener = await asyncio.start_server(impostor.accept, "127.0.0.1", port, reuse_address=True)
    try:
        yield impostor
    finally:
        listener.close()
        impostor.release()
        await listener.wait_closed()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but never listening: every connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_first_call_after_a_restart_on_the_same_port_succeeds(
    common_for: Callable[[str], CommonSettings], tls_for: Callable[[str], TlsSettings]
) -> None:
    """The regression: the first call after an upstream's restart failed fast.

    With gRPC's default backoff the channel's attempts drifted apart while the upstream
    was down (1 s, 1.6 s, 2.6 s, ...), so when it came back the channel was still in
    TRANSIENT_FAILURE and calls failed with "failed to connect to all addresses" for
    seconds. Now the attempts stay at most ~1.2 s apart, and a call that finds no
    connection waits for the next one.
    """
    first = _server(common_for("user_svc"))
    port = await first.start()
    settings = dataclasses.replace(common_for("user_svc"), listen=f"127.0.0.1:{port}")
    channel = secure_channel(f"127.0.0.1:{port}", tls_for("gateway"))
    restarted: GrpcServer | None = None
    try:
        assert await _get_user(channel, U1, timeout=5) == U1
        await first.stop()

        started = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await _get_user(channel, U1, timeout=1.0)
        assert time.monotonic() - started < 1.0 + SLACK  # down: failed within its deadline

        # Restarting: the port accepts and hangs up. Long enough for the old backoff to
        # have grown past several seconds; the new one stays at its cap.
        async with _impostor(port, hang_up=True) as peer:
            await peer.wait_for_attempts(5, timeout=15)
        gaps = [b - a for a, b in zip(peer.attempts, peer.attempts[1:], strict=False)]
        assert max(gaps) < MAX_ATTEMPT_GAP, gaps

        restarted = _server(settings)
        assert await restarted.start() == port
        back = time.monotonic()
        # No connection yet: without waiting for one, this call would fail at once.
        assert channel.get_state() != grpc.ChannelConnectivity.READY
        assert await _get_user(channel, U2, timeout=5) == U2
        assert time.monotonic() - back < RECONNECTED_WITHIN
    finally:
        await channel.close()
        await first.stop()
        if restarted is not None:
            await restarted.stop()


async def test_a_down_upstream_fails_a_call_within_its_deadline(
    tls_for: Callable[[str], TlsSettings], refused_port: int
) -> None:
    """Waiting for a reconnect never outlasts the call's deadline or ``reconnect_wait``."""
    target = f"127.0.0.1:{refused_port}"
    cases: list[tuple[grpc.aio.Channel, float | None, float]] = [
        # (channel, the call's own timeout, when it must have failed by)
        (secure_channel(target, tls_for("gateway")), 1.0, 1.0),
        # No timeout of its own: the channel's default deadline still bounds the wait.
        (secure_channel(target, tls_for("gateway"), default_timeout=0.5), None, 0.5),
        # A long deadline: the wait gives up first, with UNAVAILABLE and its cause.
        (secure_channel(target, tls_for("gateway"), reconnect_wait=0.5), 5.0, 0.5),
    ]
    try:
        for channel, timeout, bound in cases:
            started = time.monotonic()
            with pytest.raises((Unavailable, DeadlineExceeded)) as caught:
                await _get_user(channel, U1, timeout)
            elapsed = time.monotonic() - started
            assert elapsed < bound + SLACK, (timeout, bound, elapsed)
        assert isinstance(caught.value, Unavailable)
        assert "failed to connect" in caught.value.message.lower()
    finally:
        for channel, _, _ in cases:
            await channel.close()


async def test_a_peer_that_never_answers_cannot_hold_a_call_past_its_deadline(
    tls_for: Callable[[str], TlsSettings],
) -> None:
    """A peer that takes the TCP connection and never speaks TLS (a hung process)."""
    with socket.socket() as reserve:
        reserve.bind(("127.0.0.1", 0))
        port = reserve.getsockname()[1]
    async with _impostor(port, hang_up=False) as peer:
        channel = secure_channel(f"127.0.0.1:{port}", tls_for("gateway"))
        try:
            started = time.monotonic()
            with pytest.raises((Unavailable, DeadlineExceeded)):
                await _get_user(channel, U1, timeout=1.0)
            assert time.monotonic() - started < 1.0 + SLACK
            assert peer.attempts  # it did connect, and was left hanging
        finally:
            await channel.close()


async def test_an_upstreams_own_unavailable_is_answered_at_once(
    common_for: Callable[[str], CommonSettings], tls_for: Callable[[str], TlsSettings]
) -> None:
    """Only connection failures are waited on; an upstream's UNAVAILABLE keeps its reason."""
    server = _server(common_for("user_svc"))
    port = await server.start()
    channel = secure_channel(f"127.0.0.1:{port}", tls_for("gateway"))
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await _get_user(channel, STORE_DOWN, timeout=5)
        assert caught.value.reason == "STORE_DOWN"
        assert time.monotonic() - started < rpc.DEFAULT_RECONNECT_WAIT / 2
    finally:
        await channel.close()
        await server.stop()


# --- Envoy's route timeout against the gateway's accept path -------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)s")
# Envoy's default for the connection manager's stream_idle_timeout.
_ENVOY_STREAM_IDLE_DEFAULT = 300.0


def _seconds(value: str) -> float:
    match = _DURATION.fullmatch(value)
    assert match, f"not a duration in seconds: {value!r}"
    return float(match.group(1))


def _default(function: Callable[..., Any], parameter: str) -> float:
    value = inspect.signature(function).parameters[parameter].default
    assert isinstance(value, int | float), (function, parameter, value)
    return float(value)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _app_call_keywords(callee: str) -> list[dict[str, str]]:
    """The keyword arguments (as source) of every call to ``callee`` in gateway/app.py."""
    calls = []
    for node in ast.walk(ast.parse(GATEWAY_APP.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == callee:
                calls.append({k.arg or "**": ast.unparse(k.value) for k in node.keywords})
    assert calls, f"gateway/app.py no longer calls {callee}: redo the accept-path budget"
    return calls


def _gateway_accept_worst_case(certs: Path) -> float:
    """SendNotification's longest possible run, from the timeouts the gateway really uses.

    See the comment on ``gateway.config.Config.upstream_timeout``. The wiring is checked
    too: if app.py passes its own timeout to one of these, the sum below is stale.
    """
    config = Config.from_env({"NOTIFY_TLS_DIR": str(certs)})  # defaults otherwise
    for call in _app_call_keywords("KeyStore") + _app_call_keywords("redis_client"):
        assert "timeout" not in call, "gateway/app.py overrides a default: redo the budget"
    assert {c.get("timeout") for c in _app_call_keywords("Publisher")} == {"config.publish_timeout"}
    assert {c.get("default_timeout") for c in _app_call_keywords("secure_channel")} == {
        "config.upstream_timeout"
    }
    assert {c.get("upstream_timeout") for c in _app_call_keywords("NotificationServicer")} == {
        "config.upstream_timeout"
    }
    assert {c.get("timeout") for c in _app_call_keywords("RecordWriter")} == {
        "config.upstream_timeout"
    }
    api_key = 2 * _default(KeyStore.__init__, "timeout")  # pool acquire + the query
    # Pool wait, connect, two handshake replies (CLIENT SETINFO), the command's reply.
    redis_command = 5 * _default(kv.redis_client, "timeout")
    claim = 3 * redis_command  # SET NX, GET, and SET NX again if the lease expired between
    lookups = config.upstream_timeout  # profile and template, concurrently
    record = 2 * config.upstream_timeout  # the batch out, then its own batch
    confirms = config.publish_timeout  # one publish per channel, concurrently
    completion = redis_command  # the idempotency record, after the confirm
    return api_key + claim + lookups + record + confirms + completion


def test_envoy_route_timeout_outlasts_the_gateway_accept_path(certs_dir: Path) -> None:
    """A 504 from Envoy must mean the gateway gave up too, never "accepted after all"."""
    doc = yaml.safe_load(ENVOY.read_text())
    (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "gateway"]
    budget = _seconds(cluster["connect_timeout"]) + _gateway_accept_worst_case(certs_dir)
    assert budget == pytest.approx(46.0)  # the arithmetic documented in envoy.yaml

    managers = [
        node["typed_config"]
        for node in _walk(doc)
        if node.get("name") == "envoy.filters.network.http_connection_manager"
    ]
    assert managers
    for manager in managers:
        routes = [
            node["route"]
            for node in _walk(manager["route_config"])
            if isinstance(node.get("route"), dict) and node["route"].get("cluster") == "gateway"
        ]
        assert routes
        timeouts = {_seconds(route["timeout"]) for route in routes}
        assert min(timeouts) > budget, (timeouts, budget)
        # Nothing moves on the stream while the gateway works: an idle timeout shorter
        # than the route timeout would end the call first.
        idle = _seconds(manager.get("stream_idle_timeout", f"{_ENVOY_STREAM_IDLE_DEFAULT}s"))
        assert idle > max(timeouts)
        for route in routes:
            assert _seconds(route.get("idle_timeout", f"{idle}s")) > max(timeouts)
        # Envoy-side retries would multiply the budget; a timeout taken from the client's
        # grpc-timeout header would let Envoy end a call the gateway goes on to accept.
        for node in _walk(manager):
            for key in (
                "retry_policy",
                "per_try_timeout",
                "max_stream_duration",
                "grpc_timeout_header_max",
                "max_grpc_timeout",
            ):
                assert key not in node, f"{key} is set ({node[key]!r}): redo the budget"
