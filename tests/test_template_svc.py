"""TemplateService against a real PostgreSQL, through real mTLS channels and the access matrix."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from notify.v1 import common_pb2, template_service_pb2, template_service_pb2_grpc

from notify_kit.cache import LruCache
from notify_kit.errors import error_info
from notify_kit.rpc import secure_channel
from notify_kit.settings import CommonSettings, SettingsError, TlsSettings
from notify_kit.templating import sandbox
from notify_kit.templating.content import pick_language
from notify_kit.templating.renderer import RenderSettings
from template_svc.app import App
from template_svc.config import Config

if TYPE_CHECKING:
    from notify.v1.template_service_pb2_grpc import TemplateServiceAsyncStub as Stub

pb = template_service_pb2
EMAIL = common_pb2.CHANNEL_EMAIL
PUSH = common_pb2.CHANNEL_PUSH
StubFor = Callable[[str], "Stub"]
TIGHT_PROCESSES = 2


async def _start(
    database: Callable[[str], Awaitable[str]],
    common_for: Callable[[str], CommonSettings],
    name: str,
    **limits: Any,
) -> App:
    config = Config(common=common_for("template_svc"), dsn=await database(name), **limits)
    return await App.start(config)


@pytest.fixture(scope="module")
async def app(
    database: Callable[[str], Awaitable[str]], common_for: Callable[[str], CommonSettings]
) -> AsyncIterator[App]:
    running = await _start(database, common_for, "template")
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def tight_app(
    database: Callable[[str], Awaitable[str]], common_for: Callable[[str], CommonSettings]
) -> AsyncIterator[App]:
    """A second instance with a short render timeout and a small output cap."""
    running = await _start(
        database,
        common_for,
        "template_tight",
        render=RenderSettings(timeout=0.3, max_bytes=200, processes=TIGHT_PROCESSES),
    )
    yield running
    await running.stop()


def _stub_factory(
    port: int, tls_for: Callable[[str], TlsSettings], channels: list[grpc.aio.Channel]
) -> StubFor:
    def stub(identity: str) -> Stub:
        channel = secure_channel(f"127.0.0.1:{port}", tls_for(identity))
        channels.append(channel)
        return cast("Stub", template_service_pb2_grpc.TemplateServiceStub(channel))

    return stub


@pytest.fixture
async def stub_for(app: App, tls_for: Callable[[str], TlsSettings]) -> AsyncIterator[StubFor]:
    """Stubs on the main instance, one mTLS channel per call, as a given identity."""
    channels: list[grpc.aio.Channel] = []
    yield _stub_factory(app.port, tls_for, channels)
    for channel in channels:
        await channel.close()


@pytest.fixture
async def tight_stub_for(
    tight_app: App, tls_for: Callable[[str], TlsSettings]
) -> AsyncIterator[StubFor]:
    """Stubs on the tight instance."""
    channels: list[grpc.aio.Channel] = []
    yield _stub_factory(tight_app.port, tls_for, channels)
    for channel in channels:
        await channel.close()


@pytest.fixture
def admin(stub_for: StubFor) -> Stub:
    """The gateway manages templates."""
    return stub_for("gateway")


@pytest.fixture
def worker(stub_for: StubFor) -> Stub:
    """Workers render."""
    return stub_for("email_worker")


def _id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _content(
    language: str,
    *,
    subject: str = "Hello {{ name }}",
    text: str = "Hi {{ name }}",
    html: str = "",
    push: tuple[str, str] | None = None,
    email: bool = True,
) -> pb.TemplateContent:
    content = pb.TemplateContent(language=language)
    if email:
        content.email.CopyFrom(pb.EmailContent(subject=subject, text_body=text, html_body=html))
    if push is not None:
        content.push.CopyFrom(pb.PushContent(title=push[0], body=push[1]))
    return content


async def _create(
    admin: Stub, *contents: pb.TemplateContent, default_language: str = ""
) -> pb.Template:
    template = pb.Template(
        id=_id(), description="test", contents=contents, default_language=default_language
    )
    response = await admin.CreateTemplate(pb.CreateTemplateRequest(template=template), timeout=10)
    created: pb.Template = response.template
    return created


def _render_request(
    template_id: str,
    channel: common_pb2.Channel.ValueType = EMAIL,
    *,
    version: int = 0,
    language: str = "en",
    **variables: Any,
) -> pb.RenderTemplateRequest:
    struct = struct_pb2.Struct()
    struct.update(variables)
    return pb.RenderTemplateRequest(
        template_id=template_id,
        version=version,
        language=language,
        channel=channel,
        variables=struct,
    )


def _violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return {v.field: v.description for v in bad.field_violations}
    return {}


async def test_create_then_get(admin: Stub) -> None:
    created = await _create(
        admin,
        _content("en", subject="Hi {{ name }}", text="{{ count }} new", push=("T", "{{ body }}")),
        _content("fr", subject="Salut {{ name }}", text="{{ count }} nouveaux"),
    )
    assert created.version == 1
    assert created.default_language == "en"
    assert list(created.variables) == ["body", "count", "name"]
    assert created.create_time.seconds > 0

    got = (await admin.GetTemplate(pb.GetTemplateRequest(id=created.id), timeout=5)).template
    assert got == created
    assert [c.language for c in got.contents] == ["en", "fr"]
    assert got.contents[0].HasField("push") and not got.contents[1].HasField("push")


async def test_new_version_becomes_current_and_old_one_still_renders(
    admin: Stub, worker: Stub
) -> None:
    created = await _create(admin, _content("en", subject="v1 {{ name }}"))
    before = await worker.RenderTemplate(_render_request(created.id, name="Ann"), timeout=5)
    assert before.email.subject == "v1 Ann"

    response = await admin.CreateTemplateVersion(
        pb.CreateTemplateVersionRequest(
            template_id=created.id, contents=[_content("en", subject="v2 {{ name }} {{ extra }}")]
        ),
        timeout=10,
    )
    assert response.template.version == 2
    assert list(response.template.variables) == ["extra", "name"]
    assert response.template.create_time == created.create_time

    current = await worker.RenderTemplate(
        _render_request(created.id, name="Ann", extra="!"), timeout=5
    )
    assert (current.version, current.email.subject) == (2, "v2 Ann !")
    old = await worker.RenderTemplate(_render_request(created.id, version=1, name="Ann"), timeout=5)
    assert (old.version, old.email.subject) == (1, "v1 Ann")

    got = await admin.GetTemplate(pb.GetTemplateRequest(id=created.id), timeout=5)
    assert got.template.version == 2


async def test_language_fallback(admin: Stub, worker: Stub) -> None:
    created = await _create(
        admin,
        _content("en", subject="english"),
        _content("fr", subject="français"),
        _content("fr-CA", subject="québécois"),
        default_language="en",
    )
    cases = {"fr-CA": "fr-CA", "fr_ca": "fr-CA", "fr-BE": "fr", "fr": "fr", "de-AT": "en", "": "en"}
    for requested, expected in cases.items():
        rendered = await worker.RenderTemplate(
            _render_request(created.id, language=requested, name="x"), timeout=5
        )
        assert rendered.language == expected, requested


async def test_html_is_escaped_and_text_is_not(admin: Stub, worker: Stub) -> None:
    created = await _create(
        admin,
        _content("en", subject="{{ name }}", text="{{ name }}", html="<p>{{ name }}</p>"),
    )
    rendered = await worker.RenderTemplate(
        _render_request(created.id, name="<script>alert(1)</script>"), timeout=5
    )
    assert rendered.email.html_body == "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"
    assert rendered.email.text_body == "<script>alert(1)</script>"
    assert rendered.email.subject == "<script>alert(1)</script>"


async def test_whole_numbers_render_without_fraction(admin: Stub, worker: Stub) -> None:
    created = await _create(admin, _content("en", text="{{ n }} items, {{ price }} each"))
    rendered = await worker.RenderTemplate(
        _render_request(created.id, name="x", n=3, price=2.5), timeout=5
    )
    assert rendered.email.text_body == "3 items, 2.5 each"


async def test_push_channel(admin: Stub, worker: Stub) -> None:
    created = await _create(admin, _content("en", email=False, push=("  {{ t }}  ", "{{ b }}")))
    rendered = await worker.RenderTemplate(
        _render_request(created.id, PUSH, t="T", b="B"), timeout=5
    )
    assert (rendered.push.title, rendered.push.body) == ("T", "B")
    assert not rendered.HasField("email")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.RenderTemplate(_render_request(created.id, EMAIL), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value.trailing_metadata()).reason == "CHANNEL_NOT_IN_TEMPLATE"


async def test_missing_variable(admin: Stub, worker: Stub) -> None:
    created = await _create(admin, _content("en", subject="Hi {{ name }}", text="{{ user.city }}"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.RenderTemplate(_render_request(created.id, user={"city": "Oslo"}), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value.trailing_metadata())
    assert info.reason == "MISSING_VARIABLE"
    assert info.metadata["variable"] == "name"
    assert info.metadata["field"] == "email.subject"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.RenderTemplate(_render_request(created.id, name="A", user={}), timeout=5)
    info = error_info(caught.value.trailing_metadata())
    assert (info.reason, info.metadata["variable"]) == ("MISSING_VARIABLE", "city")


async def test_template_errors_at_render_time(admin: Stub, worker: Stub) -> None:
    created = await _create(admin, _content("en", text="{{ n + 1 }}"))
    ok = await worker.RenderTemplate(_render_request(created.id, name="x", n=1), timeout=5)
    assert ok.email.text_body == "2"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.RenderTemplate(_render_request(created.id, name="x", n="one"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value.trailing_metadata())
    assert (info.reason, info.metadata["field"]) == ("RENDER_FAILED", "email.text_body")


async def test_syntax_error_is_rejected_with_field_path(admin: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _create(admin, _content("en"), _content("fr", subject="Salut {{ name "))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value.trailing_metadata()).reason == "INVALID_TEMPLATE"
    assert list(_violations(caught.value)) == ["template.contents[1].email.subject"]


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ name.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",
        "{{ 'a' * 100000000 }}",
        "{{ 2 ** 100000 }}",
        # Each builds far more than _MAX_REPEAT_LENGTH in one step. Assigned, not printed,
        # so that only the size checks (not the output budget) can refuse them.
        "{% set _ = 'x'|center(50000000) %}",
        "{% set _ = '%50000000s'|format('x') %}",
        "{% set _ = ('x' * 1000)|replace('x', 'y' * 10000) %}",
        "{% set _ = '{:>50000000}'.format('x') %}",
        "{% set _ = 'x'.ljust(50000000) %}",
        "{% set _ = ('\\n' * 1000)|indent(10000) %}",
        "{% set _ = ([''] * 10000)|join('y' * 1000) %}",
        "{% set _ = ('a ' * 1000)|wordwrap(1, wrapstring='y' * 10000) %}",
        "{% set _ = ([1] * 100000)|tojson(100) %}",
        "{% set _ = ([['y'] * 100000] * 20)|sum(start=[]) %}",
        "{% set _ = [['y' * 10000] * 1000]|map('join')|list %}",
        "{% set _ = '%*s' % (50000000, 'x') %}",
        "{% set _ = '%(a)s%(a)s' % {'a': 'y' * 1000000} %}",
        "{% set _ = ('{0}' * 1000).format('y' * 10000) %}",
        "{% set _ = '{:{w}}'.format('x', w=50000000) %}",
        "{% set _ = ('y' * 10000).join([''] * 1000) %}",
        "{% set _ = ('\\t' * 1000).expandtabs(10000) %}",
        "{% set _ = ('x' * 1000).translate({120: 'y' * 10000}) %}",
        "{% set _ = ('x' * 1000000) ~ ('x' * 1000000) %}",
        "{% set _ = ('x' * 1000000) + ('x' * 1000000) %}",
        "{% set _ = ('x' * 1000).encode() * 10000 %}",
        "{% set a = [1] * 600000 %}{% set _ = a.extend(a) %}",
    ],
)
async def test_sandbox_violations_are_rejected_on_save(admin: Stub, source: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _create(admin, _content("en", text=source))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value.trailing_metadata()).reason == "INVALID_TEMPLATE"
    assert list(_violations(caught.value)) == ["template.contents[0].email.text_body"]


async def test_runaway_loop_is_rejected_on_save(tight_stub_for: StubFor) -> None:
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _create(tight_stub_for("gateway"), _content("en", text=loops))
    assert error_info(caught.value.trailing_metadata()).reason == "INVALID_TEMPLATE"
    assert list(_violations(caught.value)) == ["template.contents[0].email.text_body"]


async def test_runaway_loops_stop_and_give_their_processes_back(
    tight_stub_for: StubFor,
) -> None:
    """Loops that call nothing used to spin on after the caller gave up, one pool slot each."""
    gateway = tight_stub_for("gateway")
    loops = "{% set a = [1] * 1000000 %}{% for x in a %}{% for y in a %}{% endfor %}{% endfor %}"
    outcomes = await asyncio.gather(
        *(_create(gateway, _content("en", text=loops)) for _ in range(TIGHT_PROCESSES)),
        return_exceptions=True,
    )
    for outcome in outcomes:
        assert isinstance(outcome, grpc.aio.AioRpcError)
        assert error_info(outcome.trailing_metadata()).reason == "INVALID_TEMPLATE"
        assert list(_violations(outcome)) == ["template.contents[0].email.text_body"]
    # Every render process is free again: a normal template is test-rendered in time.
    created = await _create(gateway, _content("en", subject="s", text="{{ n }}"))
    assert list(created.variables) == ["n"]


@pytest.mark.parametrize(
    "source",
    [
        "{% set a = [1] * 1000000 %}{% for x in a %}{% for y in a %}{% endfor %}{% endfor %}",
        "{% set a = [1] * 1000000 %}{% for x in a %}{% for y in a if y %}{% endfor %}{% endfor %}",
    ],
)
def test_runaway_loop_stops_its_thread_at_the_deadline(source: str) -> None:
    problems: list[sandbox.TemplateProblem] = []
    finished = threading.Event()

    def analyse() -> None:
        try:
            sandbox.analyse(
                sandbox.Sandbox.create(), "email.text_body", source, timeout=0.2, max_bytes=100
            )
        except sandbox.TemplateProblem as exc:
            problems.append(exc)
        finally:
            finished.set()

    threading.Thread(target=analyse, daemon=True).start()
    assert finished.wait(timeout=10), "the render thread did not stop at its deadline"
    assert len(problems) == 1


@pytest.mark.parametrize(
    ("source", "variables", "expected"),
    [
        (
            "{% for x in 'abc' %}{{ loop.index }}{{ x }}/{{ loop.length }}"
            "{% if loop.last %}.{% endif %}{% endfor %}",
            {},
            "1a/32b/33c/3.",
        ),
        (
            "{% for k in d %}{{ k }}{% endfor %}|{% for k, v in d.items() %}{{ k }}={{ v }};"
            "{% endfor %}|{% for k, v in d|dictsort %}{{ k }}{% endfor %}",
            {"d": {"b": 2, "a": 1}},
            "ba|b=2;a=1;|ab",
        ),
        ("{% for x in [] %}x{% else %}empty{% endfor %}", {}, "empty"),
        (
            "{% for x in range(10) if x is odd %}{{ x }}{{ loop.revindex }}{% endfor %}",
            {},
            "1534537291",
        ),
        (
            "{% for x in 'ab' %}{{ loop.cycle('x', 'y') }}{{ loop.previtem|default('-') }}"
            "{{ loop.nextitem|default('-') }}{{ loop.first }}{% endfor %}",
            {},
            "x-bTrueya-False",
        ),
        (
            "{% for n in tree recursive %}{{ n.name }}{{ loop.depth }}"
            "{% if n.children %}({{ loop(n.children) }}){% endif %}{% endfor %}",
            {
                "tree": [
                    {"name": "a", "children": [{"name": "b", "children": []}]},
                    {"name": "c", "children": []},
                ]
            },
            "a1(b2)c1",
        ),
        ("{{ 'a' ~ n ~ none }}", {"n": 1}, "a1None"),
        (
            "{{ n|center(5) }}|{{ '%05d'|format(n) }}|{{ '%d'|format(5000000) }}",
            {"n": 3},
            "  3  |00003|5000000",
        ),
        ("{{ 'banana'|replace('a', 'o') }}|{{ 'ba'.replace('a', 'o') }}", {}, "bonono|bo"),
        ("{{ '{:>4}'.format('ab') }}|{{ '{a}'.format_map({'a': 1}) }}", {}, "  ab|1"),
        (
            "{{ 'ab'.ljust(4, '.') }}|{{ 'ab'.zfill(4) }}|{{ 'a\tb'.expandtabs(4) }}",
            {},
            "ab..|00ab|a   b",
        ),
        (
            "{{ users|join(', ', attribute='name') }}|{{ '-'.join('abc') }}",
            {"users": [{"name": "a"}, {"name": "b"}]},
            "a, b|a-b-c",
        ),
        (
            "{{ [1, 2]|map('string')|join }}|{{ [[1], [2]]|sum(start=[]) }}|{{ [1] + [2] }}",
            {},
            "12|[1, 2]|[1, 2]",
        ),
        (
            "{{ 'a b c'|wordwrap(3) }}|{{ 'a\nb'|indent(2) }}|{{ {'a': 1}|tojson(2) }}",
            {},
            'a b\nc|a\n  b|{\n  "a": 1\n}',
        ),
        ("{{ '%s-%s' % ('a', 'b') }}|{{ 'abc'.translate({97: 'AA'}) }}", {}, "a-b|AAbc"),
        # Materialized before extending: over a generator of itself this used to never end.
        ("{% set a = [1, 2] %}{{ a.extend(a|map('string')) or a|join(',') }}", {}, "1,2,1,2"),
    ],
)
def test_guarded_loops_filters_and_operators_behave_as_before(
    source: str, variables: dict[str, Any], expected: str
) -> None:
    template = sandbox.Sandbox.create().text.from_string(source)
    assert template.render(variables) == expected


def test_guarded_concat_and_format_still_escape_html() -> None:
    source = (
        "{{ '<b>'|safe ~ name }}|{{ name ~ '!' }}|{{ ('<p>{}</p>'|safe).format(name) }}"
        "|{% autoescape false %}{{ name ~ '!' }}{% endautoescape %}"
        "|{{ ['<a>', name]|join('<br>'|safe) }}"
    )
    template = sandbox.Sandbox.create().html.from_string(source)
    assert template.render(name="<i>") == (
        "<b>&lt;i&gt;|&lt;i&gt;!|<p>&lt;i&gt;</p>|<i>!|&lt;a&gt;<br>&lt;i&gt;"
    )


def test_memory_error_in_the_test_render_rejects_the_template() -> None:
    box = sandbox.Sandbox.create()

    def exhaust() -> None:
        raise MemoryError

    box.text.globals["exhaust"] = exhaust
    with pytest.raises(sandbox.TemplateProblem):
        sandbox.analyse(box, "email.text_body", "{{ exhaust() }}", timeout=1, max_bytes=100)


async def test_bounded_filters_still_render_normal_uses(admin: Stub, worker: Stub) -> None:
    text = (
        "{{ name|center(9) }}|{{ '%05d'|format(n) }}|{{ name|replace('n', 'N') }}"
        "|{{ '{:>5}'.format(name) }}|{{ name.ljust(5, '.') }}|{{ items|join(', ') }}"
        "|{{ name ~ n }}|{% for i in items %}{{ loop.index }}{{ i }}{% endfor %}"
    )
    created = await _create(admin, _content("en", subject="s", text=text))
    rendered = await worker.RenderTemplate(
        _render_request(created.id, name="Ann", n=3, items=["x", "y"]), timeout=5
    )
    assert rendered.email.text_body == "   Ann   |00003|ANN|  Ann|Ann..|x, y|Ann3|1x2y"


async def test_nul_characters_are_rejected(admin: Stub) -> None:
    """PostgreSQL text cannot hold NUL: it must be an invalid argument, not an internal error."""
    template = pb.Template(
        id=_id(),
        description="a\x00b",
        contents=[_content("en", subject="Hi\x00{{ name }}", push=("T", "b\x00"))],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateTemplate(pb.CreateTemplateRequest(template=template), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value.trailing_metadata()).reason == "INVALID_TEMPLATE"
    assert set(_violations(caught.value)) == {
        "template.description",
        "template.contents[0].email.subject",
        "template.contents[0].push.body",
    }

    created = await _create(admin, _content("en"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateTemplateVersion(
            pb.CreateTemplateVersionRequest(
                template_id=created.id, contents=[_content("en", html="<p>\x00</p>")]
            ),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(_violations(caught.value)) == ["contents[0].email.html_body"]


async def test_line_break_in_rendered_subject_is_rejected(admin: Stub, worker: Stub) -> None:
    created = await _create(admin, _content("en", subject="Hello {{ name }}"))
    ok = await worker.RenderTemplate(_render_request(created.id, name="Ann \r\n"), timeout=5)
    assert ok.email.subject == "Hello Ann"  # stripped: trailing whitespace is harmless

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.RenderTemplate(
            _render_request(created.id, name="Ann\r\nBcc: victim@example.com"), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value.trailing_metadata())
    assert (info.reason, info.metadata["field"]) == ("UNSAFE_OUTPUT", "email.subject")


async def test_literal_line_break_in_subject_is_rejected_on_save(
    admin: Stub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _create(admin, _content("en", subject="Hello\n{{ name }}"))
    assert list(_violations(caught.value)) == ["template.contents[0].email.subject"]


async def test_output_cap_and_render_timeout(tight_stub_for: StubFor) -> None:
    created = await _create(
        tight_stub_for("gateway"),
        _content(
            "en",
            subject="s",
            text="{{ word * n }}",
            html="{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}",
        ),
    )
    worker = tight_stub_for("email_worker")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.RenderTemplate(_render_request(created.id, word="abc", n=100), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value.trailing_metadata()).reason == "OUTPUT_TOO_LARGE"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.RenderTemplate(_render_request(created.id, word="", n=100000), timeout=5)
    # The template used its whole budget: its own fault, not worth a retry.
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value.trailing_metadata()).reason == "RENDER_TIMEOUT"

    # The caller left it less than the budget: more time might do.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.RenderTemplate(_render_request(created.id, word="", n=100000), timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_unknown_template(admin: Stub, worker: Stub) -> None:
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: admin.GetTemplate(pb.GetTemplateRequest(id="no-such-template"), timeout=5),
        lambda: worker.RenderTemplate(_render_request("no-such-template"), timeout=5),
        lambda: worker.RenderTemplate(_render_request("no-such-template", version=3), timeout=5),
        lambda: admin.CreateTemplateVersion(
            pb.CreateTemplateVersionRequest(
                template_id="no-such-template", contents=[_content("en")]
            ),
            timeout=5,
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value.trailing_metadata()).reason == "TEMPLATE_NOT_FOUND"

    created = await _create(admin, _content("en"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.RenderTemplate(_render_request(created.id, version=7), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value.trailing_metadata()).reason == "VERSION_NOT_FOUND"


async def test_duplicate_id_is_rejected(admin: Stub) -> None:
    created = await _create(admin, _content("en"))
    template = pb.Template(id=created.id, contents=[_content("en")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateTemplate(pb.CreateTemplateRequest(template=template), timeout=5)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(caught.value.trailing_metadata()).reason == "TEMPLATE_EXISTS"


async def test_invalid_templates_report_every_field(admin: Stub) -> None:
    # The id's format is the contract's rule, checked before the service looks at the rest.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateTemplate(
            pb.CreateTemplateRequest(template=pb.Template(id="Bad Id", contents=[_content("en")])),
            timeout=5,
        )
    assert error_info(caught.value.trailing_metadata()).reason == "INVALID_REQUEST"
    assert list(_violations(caught.value)) == ["template.id"]

    template = pb.Template(
        id=_id(),
        description="x" * (64 * 1024 + 1),
        default_language="de",
        contents=[
            _content("en", subject="  "),
            _content("EN", push=("", "body"), email=False),
            _content("not a tag"),
            pb.TemplateContent(language="fr"),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateTemplate(pb.CreateTemplateRequest(template=template), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value.trailing_metadata()).reason == "INVALID_TEMPLATE"
    assert set(_violations(caught.value)) == {
        "template.description",
        "template.contents[0].email.subject",
        "template.contents[1].language",  # "EN" is "en" again
        "template.contents[1].push.title",
        "template.contents[2].language",
        "template.contents[3]",
        "template.default_language",
    }

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateTemplate(
            pb.CreateTemplateRequest(template=pb.Template(id=_id())), timeout=5
        )
    assert list(_violations(caught.value)) == ["template.contents"]


async def test_new_version_keeps_a_default_it_has_or_must_name_one(
    admin: Stub, worker: Stub
) -> None:
    created = await _create(admin, _content("en", subject="en"), _content("fr", subject="fr"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateTemplateVersion(
            pb.CreateTemplateVersionRequest(
                template_id=created.id, contents=[_content("fr", subject="fr2")]
            ),
            timeout=5,
        )
    assert list(_violations(caught.value)) == ["default_language"]

    response = await admin.CreateTemplateVersion(
        pb.CreateTemplateVersionRequest(
            template_id=created.id, contents=[_content("fr", subject="fr2")], default_language="fr"
        ),
        timeout=10,
    )
    assert response.template.default_language == "fr"
    # Version 1 keeps its own fallback (en) even though the template's default moved.
    old = await worker.RenderTemplate(
        _render_request(created.id, version=1, language="de", name="x"), timeout=5
    )
    assert (old.language, old.email.subject) == ("en", "en")


async def test_access_matrix(stub_for: StubFor, admin: Stub) -> None:
    created = await _create(admin, _content("en"))
    email_worker, gateway = stub_for("email_worker"), stub_for("gateway")

    rendered = await email_worker.RenderTemplate(_render_request(created.id, name="A"), timeout=5)
    assert rendered.email.subject == "Hello A"
    got = await gateway.GetTemplate(pb.GetTemplateRequest(id=created.id), timeout=5)
    assert got.template.id == created.id

    user_svc = stub_for("user_svc")
    denied: list[Callable[[], Awaitable[Any]]] = [
        lambda: email_worker.CreateTemplate(
            pb.CreateTemplateRequest(template=pb.Template(id=_id(), contents=[_content("en")])),
            timeout=5,
        ),
        lambda: gateway.RenderTemplate(_render_request(created.id, name="A"), timeout=5),
        lambda: user_svc.GetTemplate(pb.GetTemplateRequest(id=created.id), timeout=5),
    ]
    for call in denied:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value.trailing_metadata()).reason == "ACCESS_DENIED"


def test_config_from_env(certs_dir: Path) -> None:
    config = Config.from_env({"NOTIFY_TLS_DIR": str(certs_dir), "NOTIFY_RENDER_TIMEOUT": "0.5"})
    assert config.common.listen == "127.0.0.1:50053"
    assert config.dsn.endswith("/notify_template")
    assert (config.render.timeout, config.render.max_bytes) == (0.5, 256 * 1024)
    with pytest.raises(SettingsError):
        Config.from_env({"NOTIFY_TLS_DIR": str(certs_dir), "NOTIFY_RENDER_MAX_BYTES": "0"})


def test_pick_language() -> None:
    available = {"en", "fr", "zh-Hant"}
    assert pick_language("zh-Hant-TW", available, "en") == "zh-Hant"
    assert pick_language("FR_ca.UTF-8", available, "en") == "fr"
    assert pick_language("C", available, "en") == "en"


def test_lru_cache_evicts_least_recently_used() -> None:
    cache: LruCache[str, int] = LruCache(max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)


def test_a_render_process_loads_only_the_template_engine() -> None:
    """One render process runs per busy render and counts against its service's memory:
    it must not pull in gRPC, protobuf or asyncio (measured: 43 MB with them, 20 without)."""
    probe = (
        "import sys, notify_kit.templating.render_process\n"
        "print(' '.join(m for m in ('grpc', 'google.protobuf', 'asyncio', 'notify.v1')"
        " if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert loaded == []
