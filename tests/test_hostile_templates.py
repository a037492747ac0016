"""Hostile templates: each is refused at save or stopped at render within its deadline,
while the template service keeps answering health checks and other renders.

Every entry of the corpus runs twice: as written (the save-time test render should catch
most of them) and hidden behind ``{% if n == 7 %}``, which the test render does not enter,
so that only render-time limits stand between it and the service. The service runs in
this process, so its memory is this process's memory: a bomb that ran in the service
(and not in a render process) would show as growth of our own RSS.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from notify.v1 import common_pb2, template_service_pb2, template_service_pb2_grpc

from notify_kit.errors import error_info
from notify_kit.rpc import secure_channel
from notify_kit.settings import CommonSettings, TlsSettings
from notify_kit.templating.renderer import RenderSettings
from scripts.system import poll
from template_svc.app import App
from template_svc.config import Config

if TYPE_CHECKING:
    from notify.v1.template_service_pb2_grpc import TemplateServiceAsyncStub as Stub

pb = template_service_pb2
TIMEOUT = 0.5  # the render budget of the service under test
MEMORY_MB = 160
SLACK = 1.0  # what a refusal may take beyond the budget: the RPC, a process restart
HEALTH_BUDGET = 0.1
RSS_GROWTH_MB = 50

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__bases__[0].__subclasses__() }}",
    "{{ (1).__class__.__base__.__subclasses__() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ range.__self__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ ''|attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "{{ [].pop.__self__ }}",
    "{{ n.__len__ }}",
    "{% set f = ''.format_map %}{{ f }}",
    "{{ 'a'.format_map }}",
    "{{ [].append }}",
    "{{ range }}",
    "{{ cycler }}",
    "{{ self }}",
    "{% for x in [1] %}{{ loop }}{% endfor %}",
    "{{ n ~ ''.upper }}",
    "{{ [''.upper] }}",
    "{{ ''.upper|string }}",
    "{{ ''.upper|upper }}",
    "{{ {'a': range}|tojson }}",
]
FORMAT_TRICKS = [
    "{{ '{0.__class__}'.format('') }}",
    "{{ '{a.__class__.__mro__}'.format_map({'a': 1}) }}",
    "{{ '{0:>99999999}'.format('x') }}",
    "{{ '{:{w}}'.format('x', w=99999999) }}",
    "{{ '%99999999s' % 'x' }}",
    "{{ '%*s' % (99999999, 'x') }}",
    "{{ '{0}'.format(range) }}",
    "{{ '{!r}'.format(cycler) }}",
    "{{ '%s' % ''.upper }}",
    "{{ '%r' % range }}",
    "{{ '%(a)s' % {'a': range} }}",
    "{{ '%s'|format(range) }}",
]
CPU_BOMBS = [
    "{% set a = 3 ** 2000 %}{% for i in range(14) %}{% set a = a * a %}{% endfor %}",
    "{{ 9 ** (9 ** 9) }}",
    "{{ (10 ** 1000) ** 10 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ ([[1]] * 70000)|sum(start=[])|length }}",
    "{{ ([[1] * 1000] * 1000)|sum(start=[])|length }}",
    "{% set a = range(100000)|list * 10 %}{% for i in range(1000) %}{{ (a|sort)[0] }}{% endfor %}",
    "{{ (range(100000)|list * 10)|groupby('real')|list|length }}",
    "{{ (range(100000)|list * 10)|max(attribute='real') }}",
    "{{ (range(100000)|list * 10)|unique(attribute='real')|list|length }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for i in range(100000) %}{{ i }}{% endfor %}",
    "{% set a = [1] * 1000000 %}{% for x in a %}{% for y in a %}{% endfor %}{% endfor %}",
]
MEMORY_BOMBS = [
    "{{ ['x' * 1048576] * 300 }}",
    "{{ (['x' * 1048576] * 300)|join }}",
    "{{ (['x' * 1048576] * 300)|tojson }}",
    "{{ (['x' * 1048576] * 300)|string }}",
    "{{ (['x' * 1048576] * 300)|pprint }}",
    "{% set s = 'x' * 1000000 %}{% set l = [] %}{% for i in range(700) %}"
    "{% set _ = l.append(s ~ i) %}{% endfor %}{{ l|length }}",
    "{% set l = [[1] * 1000000] %}{% for i in range(200) %}"
    "{% set _ = l.append(l[0] + []) %}{% endfor %}{{ l|length }}",
    "{% set l = [] %}{% for i in range(60) %}"
    "{% set _ = l.append(('x' * 1048576)|list) %}{% endfor %}{{ l|length }}",
    "{% set d = {} %}{% for i in range(1000000) %}"
    "{% set _ = d.update({i: 'x' * 1000 ~ i}) %}{% endfor %}{{ d|length }}",
    "{{ 'a' * 1048576 ~ 'b' * 1048576 }}",
    "{{ (('x' * 1000) * 1000)|replace('x', 'xx')|length }}",
    "{{ ('x ' * 500000).split() }}",
    "{{ 'x'|center(99999999) }}",
    "{{ lipsum(1000000) }}",
]
CORPUS = [*ESCAPES, *FORMAT_TRICKS, *CPU_BOMBS, *MEMORY_BOMBS]
# How a render may refuse: the template's fault, never worth a retry.
REFUSALS = {
    "RENDER_FAILED",
    "RENDER_TIMEOUT",
    "RENDER_OUT_OF_MEMORY",
    "OUTPUT_TOO_LARGE",
    "MISSING_VARIABLE",
}


def _hidden(source: str) -> str:
    return "{% if n == 7 %}" + source + "{% endif %}"


CASES = [
    *(pytest.param(source, id=f"plain-{i}") for i, source in enumerate(CORPUS)),
    *(pytest.param(_hidden(source), id=f"hidden-{i}") for i, source in enumerate(CORPUS)),
]


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 60
    assert len(set(CORPUS)) == len(CORPUS)


@pytest.fixture(scope="module")
async def app(
    database: Callable[[str], Awaitable[str]], common_for: Callable[[str], CommonSettings]
) -> AsyncIterator[App]:
    config = Config(
        common=common_for("template_svc"),
        dsn=await database("template_hostile"),
        render=RenderSettings(timeout=TIMEOUT, memory_mb=MEMORY_MB),
    )
    running = await App.start(config)
    yield running
    await running.stop()


class Peers:
    """Stubs as the two callers: the gateway saves templates, a worker renders them."""

    def __init__(self, port: int, tls_for: Callable[[str], TlsSettings]) -> None:
        self.channels = [
            secure_channel(f"127.0.0.1:{port}", tls_for(identity))
            for identity in ("gateway", "email_worker")
        ]
        self.admin, self.worker = (
            cast("Stub", template_service_pb2_grpc.TemplateServiceStub(channel))
            for channel in self.channels
        )
        self.health = health_pb2_grpc.HealthStub(self.channels[1])


@pytest.fixture
async def peers(app: App, tls_for: Callable[[str], TlsSettings]) -> AsyncIterator[Peers]:
    peers = Peers(app.port, tls_for)
    yield peers
    for channel in peers.channels:
        await channel.close()


@pytest.fixture
async def benign(peers: Peers) -> str:
    """A normal template, rendered while the bombs go off."""
    return await _create(peers.admin, "Hello {{ name }}")


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _create(stub: Stub, text: str) -> str:
    template = pb.Template(
        id=f"h-{uuid.uuid4().hex[:12]}",
        contents=[
            pb.TemplateContent(language="en", email=pb.EmailContent(subject="Hi", text_body=text))
        ],
    )
    response = await stub.CreateTemplate(pb.CreateTemplateRequest(template=template), timeout=10)
    created: str = response.template.id
    return created


async def _render(stub: Stub, template_id: str, **variables: Any) -> pb.RenderTemplateResponse:
    struct = struct_pb2.Struct()
    struct.update(variables)
    request = pb.RenderTemplateRequest(
        template_id=template_id, channel=common_pb2.CHANNEL_EMAIL, variables=struct
    )
    response: pb.RenderTemplateResponse = await stub.RenderTemplate(request, timeout=10)
    return response


async def _meanwhile(peers: Peers, benign: str, done: asyncio.Event) -> tuple[float, int]:
    """Health checks and benign renders until ``done``: (slowest health check, renders)."""
    slowest, renders = 0.0, 0
    while not done.is_set():
        started = time.monotonic()
        answer = await peers.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        slowest = max(slowest, time.monotonic() - started)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        rendered = await _render(peers.worker, benign, name="Ada")
        assert rendered.email.text_body == "Hello Ada"
        renders += 1
    return slowest, renders


async def _attack(peers: Peers, source: str) -> str:
    """Save, then render with n=7; how it was refused ("save" or the render's reason)."""
    started = time.monotonic()
    try:
        template_id = await _create(peers.admin, source)
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert error_info(err.trailing_metadata()).reason == "INVALID_TEMPLATE"
        assert time.monotonic() - started < TIMEOUT + SLACK
        return "save"
    started = time.monotonic()
    try:
        rendered = await _render(peers.worker, template_id, n=7)
    except grpc.aio.AioRpcError as err:
        reason: str = error_info(err.trailing_metadata()).reason
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        assert reason in REFUSALS, err
        assert time.monotonic() - started < TIMEOUT + SLACK
        return reason
    raise AssertionError(f"rendered: {rendered.email.text_body[:200]!r}")


@pytest.mark.parametrize("source", CASES)
async def test_hostile_template_is_refused_and_the_service_keeps_serving(
    app: App, peers: Peers, benign: str, source: str
) -> None:
    # The service shares this process with the whole test session: collect the session's
    # garbage first, so neither a collector pause nor its heap is charged to the service.
    gc.collect()
    rss_before = _rss_mb()
    done = asyncio.Event()
    watcher = asyncio.create_task(_meanwhile(peers, benign, done))
    try:
        await _attack(peers, source)
    finally:
        done.set()
        slowest, renders = await watcher
    assert slowest < HEALTH_BUDGET, f"a health check waited {slowest:.3f}s"
    assert renders >= 1
    assert _rss_mb() - rss_before < RSS_GROWTH_MB
    # A killed render process has been replaced: the pool is whole again.
    await poll(
        lambda: asyncio.sleep(0, len(app.render_pids)), lambda n: n == 2, timeout=10, what="pool"
    )


async def test_a_process_that_passes_its_deadline_is_killed_and_replaced(
    app: App, peers: Peers
) -> None:
    # One C call (quadratic list concatenation) that no check inside the process can stop.
    source = _hidden("{{ ([[1]] * 200000)|sum(start=[])|length }}")
    template_id = await _create(peers.admin, source)
    before = set(app.render_pids)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _render(peers.worker, template_id, n=7)
    assert error_info(caught.value.trailing_metadata()).reason == "RENDER_TIMEOUT"
    after = await poll(
        lambda: asyncio.sleep(0, set(app.render_pids)),
        lambda pids: len(pids) == 2,
        timeout=10,
        what="pool",
    )
    assert len(after - before) == 1  # the one that ran the template is gone


async def test_a_process_out_of_memory_is_replaced_and_the_reason_named(
    app: App, peers: Peers
) -> None:
    source = MEMORY_BOMBS[5]  # 700 appends of 1 MB
    template_id = await _create(peers.admin, _hidden(source))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _render(peers.worker, template_id, n=7)
    assert error_info(caught.value.trailing_metadata()).reason == "RENDER_OUT_OF_MEMORY"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _create(peers.admin, source)
    status = rpc_status.from_call(caught.value)
    assert status is not None
    violations = error_details_pb2.BadRequest()
    assert any(detail.Unpack(violations) for detail in status.details)
    [violation] = violations.field_violations
    assert "memory" in violation.description
