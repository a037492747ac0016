"""The edge and hostile input: what Envoy's public listener lets through, and what the
system answers to oversized, deeply nested, malformed or over-reaching requests.

Two systems. A recording stand-in for the gateway behind the committed Envoy config
shows exactly which request headers reach the gateway, and lets a test flip the health
Envoy reports to load balancers. The whole system (the shared ``e2e`` fixture) takes the
hostile requests, through Envoy and straight to the gateway's gRPC port; each must get
its precise status, create nothing, and leave the system answering a normal request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import struct
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from notify.v1 import common_pb2
from notify.v1 import notification_service_pb2 as ns
from notify.v1 import notification_service_pb2_grpc as ns_grpc

from gateway.store import KeyStore
from notify_kit import db
from notify_kit.settings import TlsSettings
from notify_kit.tls import channel_credentials, server_credentials
from scripts.api import call_raw
from scripts.system import LocalSystem, Ports, SystemConfig, poll
from tests.e2e_support import API_KEY, E2E

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024
ROUTE_TIMEOUT_MS = "50000"  # the routes' timeout in envoy/envoy.yaml
GET_NOTIFICATION = "/notify.v1.NotificationService/GetNotification"
SOME_ID = "00000000-0000-4000-8000-000000000000"
# What a client might send to steer Envoy or fool the gateway: none of it may arrive.
SPOOFED = {
    "x-forwarded-for": "10.0.0.1",
    "x-forwarded-proto": "https",
    "x-forwarded-host": "admin.internal",
    "x-forwarded-port": "443",
    "x-forwarded-prefix": "/admin",
    "x-forwarded-client-cert": "By=spiffe://notify/operator",
    "x-envoy-internal": "true",
    "x-envoy-external-address": "10.0.0.1",
    "x-envoy-original-path": "/v1/admin",
    "x-envoy-upstream-rq-timeout-ms": "1",
    "x-envoy-expected-rq-timeout-ms": "1",
    "x-envoy-retry-on": "5xx,reset,connect-failure,retriable-status-codes",
    "x-envoy-retry-grpc-on": "unavailable,internal",
    "x-envoy-max-retries": "5",
    "x-envoy-force-trace": "true",
    "x-request-id": "client-chosen-request-id",
}
# The same without x-forwarded-for: a client-sent XFF already makes Envoy treat a
# request as external, so this is the set that would be obeyed if anything went wrong.
SPOOFED_ENVOY = {k: v for k, v in SPOOFED.items() if k.startswith("x-envoy-")}
HEADER_SETS = {"all": SPOOFED, "x-envoy-only": SPOOFED_ENVOY}


# --- the edge, in front of a recording stand-in for the gateway --------------------------


@dataclass
class StandIn:
    """Envoy (committed config) in front of a fake gateway that records each API call."""

    base: str
    public: str  # host:port of Envoy's public listener
    upstream: str  # host:port of the stand-in's own mTLS port
    health: health.aio.HealthServicer
    calls: list[dict[str, str]] = field(default_factory=list)  # metadata of each API call
    methods: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # every call
    failures: int = 0  # answer this many next API calls UNAVAILABLE

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """One HTTP GET through Envoy (off the event loop); JSON body decoded."""
        return await asyncio.to_thread(
            lambda: call_raw("GET", self.base + path, None, timeout=30, headers=headers)
        )


class _Recorder(grpc.aio.ServerInterceptor):
    """Notes every call that reaches the stand-in (method and metadata)."""

    def __init__(self, stand_in: Callable[[], StandIn]) -> None:
        self._stand_in = stand_in

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = {k: str(v) for k, v in handler_call_details.invocation_metadata or ()}
        self._stand_in().methods.append((handler_call_details.method, metadata))
        return await continuation(handler_call_details)


@pytest.fixture(scope="module")
async def stand_in(
    tmp_path_factory: pytest.TempPathFactory,
    certs_dir: Path,
    tls_for: Callable[[str], TlsSettings],
) -> AsyncIterator[StandIn]:
    holder: list[StandIn] = []
    server = grpc.aio.server(interceptors=(_Recorder(lambda: holder[0]),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (ns.DESCRIPTOR.services_by_name["NotificationService"].full_name,)
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    async def get_notification(
        request: ns.GetNotificationRequest, context: grpc.aio.ServicerContext
    ) -> ns.GetNotificationResponse:
        me = holder[0]
        me.calls.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        if me.failures > 0:
            me.failures -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "stand-in failing on purpose")
        return ns.GetNotificationResponse()

    handler = grpc.unary_unary_rpc_method_handler(
        get_notification,
        request_deserializer=ns.GetNotificationRequest.FromString,
        response_serializer=ns.GetNotificationResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(names[0], {"GetNotification": handler}),)
    )
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls_for("gateway")))
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    ports = dataclasses.replace(Ports.free(), gateway=port)
    var = tmp_path_factory.mktemp("edge")
    system = LocalSystem(SystemConfig(var=var, certs=certs_dir, ports=ports))
    holder.append(
        StandIn(
            base=f"http://127.0.0.1:{ports.http}",
            public=f"127.0.0.1:{ports.http}",
            upstream=f"127.0.0.1:{port}",
            health=health_servicer,
        )
    )
    try:
        await system.start_envoy()
        yield holder[0]
    finally:
        await system.stop()
        await server.stop(None)


@contextlib.asynccontextmanager
async def _public_stub(stand_in: StandIn) -> AsyncIterator[ns_grpc.NotificationServiceStub]:
    """Native gRPC through Envoy's public (plaintext) listener."""
    async with grpc.aio.insecure_channel(stand_in.public) as channel:
        yield ns_grpc.NotificationServiceStub(channel)


async def _call_through_envoy(stand_in: StandIn, how: str, headers: dict[str, str]) -> int:
    """GetNotification through Envoy, as JSON or native gRPC; the HTTP-ish outcome."""
    if how == "json":
        status, _ = await stand_in.get(f"/v1/notifications/{SOME_ID}", headers)
        return status
    async with _public_stub(stand_in) as stub:
        try:
            await stub.GetNotification(
                ns.GetNotificationRequest(id=SOME_ID), metadata=tuple(headers.items()), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            return {grpc.StatusCode.UNAVAILABLE: 503}.get(err.code(), 500)
        return 200


@pytest.mark.parametrize("sent", list(HEADER_SETS))
@pytest.mark.parametrize("how", ["json", "grpc"])
async def test_client_sent_forwarding_and_envoy_headers_never_reach_the_gateway(
    stand_in: StandIn, how: str, sent: str
) -> None:
    stand_in.calls.clear()
    assert await _call_through_envoy(stand_in, how, HEADER_SETS[sent]) == 200
    (seen,) = stand_in.calls
    for name, value in HEADER_SETS[sent].items():
        assert seen.get(name) != value, f"{name}: the client's value reached the gateway"
    # Envoy's own view of the request, not the client's:
    forwarded_for = seen["x-forwarded-for"]
    assert "," not in forwarded_for and ipaddress.ip_address(forwarded_for), seen
    assert seen["x-forwarded-proto"] == "http"
    assert uuid.UUID(seen["x-request-id"])  # a fresh one
    assert "x-envoy-internal" not in seen, "an internal request would obey x-envoy-*"
    # The timeout Envoy applied is the route's, not the client's 1 ms.
    assert seen["x-envoy-expected-rq-timeout-ms"] == ROUTE_TIMEOUT_MS
    assert not {"x-forwarded-host", "x-forwarded-port", "x-forwarded-prefix"} & seen.keys()
    assert "x-forwarded-client-cert" not in seen
    if how == "json":
        assert seen["x-envoy-original-path"] == f"/v1/notifications/{SOME_ID}"
    else:
        assert "x-envoy-original-path" not in seen


@pytest.mark.parametrize("how", ["json", "grpc"])
async def test_client_sent_retry_headers_have_no_effect(stand_in: StandIn, how: str) -> None:
    """The gateway fails once; a client asking Envoy to retry would see a second call."""
    stand_in.calls.clear()
    stand_in.failures = 1
    assert await _call_through_envoy(stand_in, how, SPOOFED_ENVOY) == 503
    assert len(stand_in.calls) == 1
    stand_in.failures = 0


async def test_reflection_and_grpc_health_are_not_on_the_public_listener(
    stand_in: StandIn, tls_for: Callable[[str], TlsSettings]
) -> None:
    """They are the operator's, on the services' own mTLS ports; Envoy forwards none."""
    marker = {"x-edge-probe": uuid.uuid4().hex}
    metadata = tuple(marker.items())
    async with grpc.aio.insecure_channel(stand_in.public) as channel:
        reflecting = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            metadata=metadata, timeout=10
        )
        # Envoy answers at once, before any request is read: writing one would race
        # with that answer, so the stream only waits for it.
        assert await reflecting.code() == grpc.StatusCode.UNIMPLEMENTED
        health_stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "notify.v1.NotificationService", "notify.v1.UserService"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_stub.Check(
                    health_pb2.HealthCheckRequest(service=service), metadata=metadata, timeout=10
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, service
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in health_stub.Watch(
                health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10
            ):
                pass
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    # Neither as JSON, nor as gRPC under a content type the gRPC routes do not match.
    status, _ = await stand_in.get("/grpc.health.v1.Health/Check", marker)
    assert status == 404
    body = health_pb2.HealthCheckRequest().SerializeToString()
    frame = b"\0" + struct.pack(">I", len(body)) + body
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        for content_type in ("APPLICATION/GRPC", "application/json"):
            reply = await client.post(
                f"{stand_in.base}/grpc.health.v1.Health/Check",
                content=frame,
                headers={**marker, "content-type": content_type, "te": "trailers"},
            )
            assert reply.status_code == 404, content_type
    probes = [m for m, md in stand_in.methods if md.get("x-edge-probe") == marker["x-edge-probe"]]
    assert probes == []

    # The stand-in serves both: the refusal is the edge's, and operators still have them.
    creds = channel_credentials(tls_for("operator"))
    async with grpc.aio.secure_channel(stand_in.upstream, creds) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        listed = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = [s.name async for r in listed for s in r.list_services_response.service]
        assert "notify.v1.NotificationService" in names


async def test_public_health_says_serving_or_not_and_nothing_else(stand_in: StandIn) -> None:
    """What a load balancer needs: 200 SERVING while the gateway is, 503 NOT_SERVING."""

    def only_status(reply: tuple[int, Any], status: int, word: str) -> bool:
        return reply == (status, {"status": word})

    assert only_status(await stand_in.get("/healthz"), 200, "SERVING")
    await stand_in.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        await poll(
            lambda: stand_in.get("/healthz"),
            lambda r: only_status(r, 503, "NOT_SERVING"),
            timeout=30,
            what="/healthz reporting the gateway down",
        )
    finally:
        await stand_in.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await poll(
            lambda: stand_in.get("/healthz"),
            lambda r: only_status(r, 200, "SERVING"),
            timeout=30,
            what="/healthz reporting the gateway back",
        )
    reply = await asyncio.to_thread(urllib.request.urlopen, f"{stand_in.base}/healthz", None, 10)
    with reply:
        for name, value in reply.headers.items():
            assert "gateway" not in value.lower() and "notify" not in value.lower(), name


# --- hostile input through the whole system ------------------------------------------------


def _reason(body: Any) -> str:
    for detail in body.get("details", []) if isinstance(body, dict) else []:
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
            return str(detail["reason"])
    return ""


def _post_bytes(url: str, data: bytes, api_key: str = API_KEY) -> tuple[int, Any]:
    return call_raw("POST", url, data, api_key=api_key, timeout=30)


def _send_body(user_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "userId": user_id,
        "templateId": "welcome",
        "channels": ["CHANNEL_EMAIL"],
        "variables": {"name": "Edge"},
        **extra,
    }


async def _still_serving(e2e: E2E, user_id: str) -> None:
    """A normal send is accepted, and the hostile request before it left nothing behind."""
    status, listed = await e2e.api("GET", f"/v1/users/{user_id}/notifications")
    assert status == 200 and listed["notifications"] == [], listed
    status, sent = await e2e.api("POST", "/v1/notifications", _send_body(user_id))
    assert status == 200, sent
    assert sent["notification"]["status"] == "NOTIFICATION_STATUS_QUEUED"


def _body_chunks(size: int) -> Iterator[bytes]:
    """A syntactically plausible JSON body of exactly ``size`` bytes, 64 KiB at a time."""
    head, tail = b'{"templateId": "welcome", "variables": {"name": "', b'"}}'
    yield head
    left = size - len(head) - len(tail)
    while left > 0:
        piece = min(left, 64 * 1024)
        yield b"x" * piece
        left -= piece
    yield tail


async def _post_streamed(port: int, path: str, size: int, *, chunked: bool) -> tuple[int, Any]:
    """POST ``size`` bytes over HTTP/1.1, reading the answer while still sending (Envoy
    answers 413 and closes long before the body ends)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {size}"
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nhost: notify\r\ncontent-type: application/json\r\n"
            f"x-api-key: {API_KEY}\r\n{framing}\r\n\r\n"
        ).encode()
    )

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for chunk in _body_chunks(size):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(30):
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = json.loads(await reader.readexactly(length)) if length else None
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return status, body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_10mb_json_body_is_413_and_the_gateway_keeps_serving(e2e: E2E, chunked: bool) -> None:
    user_id = await e2e.new_user(devices=0)
    status, body = await _post_streamed(
        e2e.cfg.ports.http, "/v1/notifications", 10 * MiB, chunked=chunked
    )
    assert status == 413, body
    assert body == {"code": 3, "message": "Payload Too Large", "details": []}
    await _still_serving(e2e, user_id)


def _operator_channel(e2e: E2E) -> grpc.aio.Channel:
    certs = e2e.cfg.certs
    tls = TlsSettings(certs / "ca.pem", certs / "operator.pem", certs / "operator-key.pem")
    return grpc.aio.secure_channel(f"127.0.0.1:{e2e.cfg.ports.gateway}", channel_credentials(tls))


def _channel(e2e: E2E, how: str) -> grpc.aio.Channel:
    """The gateway's own port with the operator certificate, or Envoy's public port."""
    if how == "direct":
        return _operator_channel(e2e)
    return grpc.aio.insecure_channel(f"127.0.0.1:{e2e.cfg.ports.http}")


async def _grpc_send(
    channel: grpc.aio.Channel, request: ns.SendNotificationRequest
) -> ns.SendNotificationResponse:
    stub = ns_grpc.NotificationServiceStub(channel)
    reply: ns.SendNotificationResponse = await stub.SendNotification(
        request, metadata=(("x-api-key", API_KEY),), timeout=20
    )
    return reply


def _grpc_request(user_id: str, variables: dict[str, Any]) -> ns.SendNotificationRequest:
    request = ns.SendNotificationRequest(
        user_id=user_id, template_id="welcome", channels=[common_pb2.CHANNEL_EMAIL]
    )
    request.variables.update(variables)
    return request


@pytest.mark.parametrize("how", ["direct", "envoy"])
async def test_5mb_grpc_message_is_resource_exhausted(e2e: E2E, how: str) -> None:
    """The gateway's 4 MiB receive limit (notify_kit.server), before any handler runs."""
    user_id = await e2e.new_user(devices=0)
    async with _channel(e2e, how) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _grpc_send(channel, _grpc_request(user_id, {"name": "x" * (5 * MiB)}))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reply = await _grpc_send(channel, _grpc_request(user_id, {"name": "after"}))
        assert reply.notification.user_id == user_id
    status, listed = await e2e.api("GET", f"/v1/users/{user_id}/notifications")
    assert status == 200 and len(listed["notifications"]) == 1, listed


def _nested(depth: int, kind: str) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"a": value} if kind == "object" else [value]
    return value


# JSON objects nested 33 to ~99 deep pass Envoy's transcoder (it stops at 100) but not
# the gateway's protobuf decoder: each level is three messages (Struct, its map entry,
# Value) and upb stops at 100. grpcio would answer that as UNKNOWN (a 500) before any
# interceptor ran; the shared interceptor's tolerant deserializer makes it a 400
# UNDECODABLE_REQUEST.


@pytest.mark.parametrize(
    ("depth", "kind"),
    [
        pytest.param(200, "object", id="object-200"),
        pytest.param(200, "list", id="list-200"),
        pytest.param(40, "object", id="object-40"),
        pytest.param(60, "list", id="list-60"),
    ],
)
async def test_deeply_nested_json_variables_are_400(e2e: E2E, depth: int, kind: str) -> None:
    user_id = await e2e.new_user(devices=0)
    body = _send_body(user_id, variables={"name": "x", "deep": _nested(depth, kind)})
    status, got = await asyncio.to_thread(
        _post_bytes, f"{e2e.base}/v1/notifications", json.dumps(body).encode()
    )
    assert status == 400, got
    assert got["code"] == 3, got
    await _still_serving(e2e, user_id)


@pytest.mark.parametrize("how", ["direct", "envoy"])
async def test_deeply_nested_struct_over_grpc_is_invalid_argument(e2e: E2E, how: str) -> None:
    user_id = await e2e.new_user(devices=0)
    async with _channel(e2e, how) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _grpc_send(channel, _grpc_request(user_id, {"deep": _nested(40, "object")}))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    await _still_serving(e2e, user_id)


# Where the bytes go: a variable's value or key, the template id; what they are.
_SEND = b'{"userId": "%s", "templateId": "welcome", "variables": {"name": "VALUE"}}'
INVALID_UTF8 = {
    "value": _SEND.replace(b"VALUE", b"\xff\xfe"),
    "key": _SEND.replace(b'"name": "VALUE"', b'"\xc3\x28": "a"'),
    "overlong-in-template-id": b'{"userId": "%s", "templateId": "wel\xc0\xafcome"}',
    "encoded-surrogate": _SEND.replace(b"VALUE", b"\xed\xa0\x80"),
    "escaped-lone-surrogate": _SEND.replace(b"VALUE", b"\\ud800"),
}


@pytest.mark.parametrize("raw", list(INVALID_UTF8.values()), ids=list(INVALID_UTF8))
async def test_invalid_utf8_is_400(e2e: E2E, raw: bytes) -> None:
    user_id = await e2e.new_user(devices=0)
    status, got = await asyncio.to_thread(
        _post_bytes, f"{e2e.base}/v1/notifications", raw.replace(b"%s", user_id.encode())
    )
    assert status == 400, got
    assert got["code"] == 3, got
    await _still_serving(e2e, user_id)


async def test_nul_in_a_one_line_variable_is_refused_at_accept(e2e: E2E) -> None:
    user_id = await e2e.new_user(devices=0)
    body = _send_body(user_id, variables={"name": "a\u0000b"})
    status, got = await e2e.api("POST", "/v1/notifications", body)
    assert status == 400, got
    assert _reason(got) == "INVALID_VARIABLE", got
    await _still_serving(e2e, user_id)


# Unknown JSON fields are dropped by the transcoder (it has no option to refuse them), and
# output-only fields are the server's: neither may change what is created.
OVERREACH = {
    "status": "NOTIFICATION_STATUS_DELIVERED",
    "owner": "mallory",
    "scopes": ["admin", "notifications:send", "notifications:read"],
    "role": "admin",
    "apiKey": "x",
    "createTime": "2000-01-01T00:00:00Z",
}


def _recent(timestamp: str) -> bool:
    then = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return abs(dt.datetime.now(dt.UTC) - then) < dt.timedelta(minutes=5)


async def test_unknown_fields_cannot_set_a_notifications_status_or_owner(e2e: E2E) -> None:
    user_id = await e2e.new_user(devices=0)
    chosen = str(uuid.uuid4())
    body = _send_body(
        user_id,
        id=chosen,
        deliveries=[{"channel": "CHANNEL_PUSH", "status": "NOTIFICATION_STATUS_DELIVERED"}],
        **OVERREACH,
    )
    status, sent = await e2e.api("POST", "/v1/notifications", body)
    assert status == 200, sent
    note = sent["notification"]
    assert note["id"] != chosen and note["userId"] == user_id
    assert note["status"] == "NOTIFICATION_STATUS_QUEUED"
    assert [(d["channel"], d["status"]) for d in note["deliveries"]] == [
        ("CHANNEL_EMAIL", "NOTIFICATION_STATUS_QUEUED")
    ]
    assert _recent(note["createTime"])
    final = await e2e.settle(note["id"])
    assert [(d["channel"], d["status"]) for d in final["notification"]["deliveries"]] == [
        ("CHANNEL_EMAIL", "NOTIFICATION_STATUS_DELIVERED")
    ]
    assert any(m["X-Notify-Notification-Id"] == note["id"] for m in e2e.mail.messages)
    status, listed = await e2e.api("GET", f"/v1/users/{user_id}/notifications")
    assert [n["id"] for n in listed["notifications"]] == [note["id"]]


async def test_output_only_and_unknown_fields_cannot_shape_a_user_or_device(e2e: E2E) -> None:
    chosen = str(uuid.uuid4())
    email = f"edge{uuid.uuid4().hex[:10]}@example.com"
    body = {
        "email": email,
        "id": chosen,
        "devices": [{"platform": "DEVICE_PLATFORM_ANDROID", "token": "planted"}],
        **OVERREACH,
    }
    status, got = await e2e.api("POST", "/v1/users", body)
    assert status == 200, got
    user = got["user"]
    assert user["id"] != chosen and user["email"] == email
    assert user["devices"] == [] and _recent(user["createTime"])
    status, again = await e2e.api("GET", f"/v1/users/{user['id']}")
    assert status == 200 and again["user"] == user
    status, missing = await e2e.api("GET", f"/v1/users/{chosen}")
    assert status == 404 and _reason(missing) == "USER_NOT_FOUND", missing

    device_id = str(uuid.uuid4())
    status, got = await e2e.api(
        "POST",
        f"/v1/users/{user['id']}/devices",
        {"platform": "DEVICE_PLATFORM_ANDROID", "token": "tok-edge", "id": device_id, **OVERREACH},
    )
    assert status == 200, got
    assert got["device"]["id"] != device_id and _recent(got["device"]["createTime"])


async def test_output_only_and_unknown_fields_cannot_shape_a_template(e2e: E2E) -> None:
    template_id = f"edge-{uuid.uuid4().hex[:8]}"
    body = {
        "id": template_id,
        "version": 99,
        "variables": ["planted"],
        "updateTime": "2000-01-01T00:00:00Z",
        "contents": [{"language": "en", "email": {"subject": "Hi", "textBody": "Hello"}}],
        **OVERREACH,
    }
    status, got = await e2e.api("POST", "/v1/templates", body)
    assert status == 200, got
    template = got["template"]
    assert template["version"] == 1 and template["variables"] == []
    assert _recent(template["createTime"]) and _recent(template["updateTime"])


async def test_a_key_cannot_grant_itself_scopes(e2e: E2E) -> None:
    pool = await db.create_pool(f"{e2e.cfg.pg_base}/{e2e.cfg.db_prefix}gateway", application="test")
    try:
        await KeyStore(pool).ensure(
            "edge-read-only-key", "edge-reader", frozenset({"notifications:read"})
        )
    finally:
        await db.close_pool(pool)
    user_id = await e2e.new_user(devices=0)
    for body in (
        _send_body(user_id, **OVERREACH),
        _send_body(user_id, key={"scopes": ["notifications:send"]}),
    ):
        status, got = await e2e.api("POST", "/v1/notifications", body, api_key="edge-read-only-key")
        assert status == 403 and _reason(got) == "SCOPE_MISSING", got
    await _still_serving(e2e, user_id)


async def test_client_timeout_header_has_no_effect_on_a_real_send(e2e: E2E) -> None:
    """A 1 ms upstream timeout obeyed would answer 504 to a send that takes longer."""
    user_id = await e2e.new_user(devices=0)
    status, sent = await e2e.api(
        "POST",
        "/v1/notifications",
        _send_body(user_id),
        headers={"x-envoy-upstream-rq-timeout-ms": "1", "x-envoy-retry-on": "5xx"},
    )
    assert status == 200, sent
