"""The e-mail worker against real RabbitMQ, PostgreSQL, SMTP (MailCatcher) and mTLS gRPC.

The stand-in upstreams, the broker and ``start_worker`` are shared with the push worker's
tests (``tests/worker_support.py``); what is here is the e-mail worker's own.
The runner's guarantees (retries, dead letters, redeliveries, expiry, bugs) are tested
once, against a fake handler, in ``tests/test_jobs.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.policy
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesParser
from functools import partial
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from notify.v1 import (
    common_pb2,
    jobs_pb2,
    template_service_pb2,
    template_service_pb2_grpc,
    worker_admin_pb2,
    worker_admin_pb2_grpc,
)

from email_worker import app as email_app
from email_worker import mime, sendgrid
from email_worker.config import Config
from email_worker.outgoing import OutgoingEmail
from email_worker.sender import SmtpProvider, SmtpSettings
from notify_kit import rpc
from notify_kit.amqp import EMAIL, Topology
from notify_kit.breaker import BreakerSettings
from notify_kit.errors import NotFound
from notify_kit.jobs.app import WorkerApp
from notify_kit.jobs.errors import OutcomeUnknown, PermanentError, TransientError
from notify_kit.settings import SettingsError, TlsSettings
from scripts.mailcatcher import MailCatcher
from tests import worker_support
from tests.worker_support import (
    DELIVERED,
    FAILED,
    SENDING,
    WAIT,
    Broker,
    ConfigFields,
    RecordingUsers,
    health_status,
    job_meta,
    publish,
    statuses,
)

# The shared fixtures, bound here so pytest finds them in this module.
users = worker_support.users
upstreams = worker_support.upstreams
topo = worker_support.own_topology("ew.")
config_fields = worker_support.config_fields
broker = worker_support.broker
start_worker = worker_support.start_worker


class FixedTemplates(template_service_pb2_grpc.TemplateServiceServicer):
    """Renders one fixed e-mail from the ``name`` variable; ``missing`` does not exist."""

    def __init__(self) -> None:
        self.requests: list[template_service_pb2.RenderTemplateRequest] = []

    async def RenderTemplate(
        self,
        request: template_service_pb2.RenderTemplateRequest,
        context: grpc.aio.ServicerContext,
    ) -> template_service_pb2.RenderTemplateResponse:
        self.requests.append(request)
        if request.template_id == "missing":
            raise NotFound("TEMPLATE_NOT_FOUND", "no such template")
        name = request.variables["name"]
        return template_service_pb2.RenderTemplateResponse(
            version=1,
            language=request.language,
            email=template_service_pb2.EmailContent(
                subject=f"Welcome, {name}",
                text_body=f"Hello {name},\nthanks for joining.\n",
                html_body=f"<p>Hello <b>{name}</b></p>",
            ),
        )


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def templates() -> FixedTemplates:
    return FixedTemplates()  # type: ignore[abstract]


@pytest.fixture(scope="module")
async def catcher() -> AsyncIterator[MailCatcher]:
    mail = MailCatcher()
    await mail.start("127.0.0.1", 0)
    yield mail
    await mail.stop()


@pytest.fixture(scope="module")
async def config(
    config_fields: Callable[[str], Awaitable[ConfigFields]],
    catcher: MailCatcher,
) -> Config:
    return Config(
        **await config_fields("email_worker"),
        smtp=SmtpSettings(host="127.0.0.1", port=catcher.port, timeout=5.0),
    )


@pytest.fixture(scope="module")
def launch(config: Config) -> Callable[..., Awaitable[WorkerApp]]:
    """How ``start_worker`` starts this worker: real SMTP unless a ``sender`` is given."""
    return partial(email_app.start, config)


def email_job(
    *, to: str = "ana@example.com", name: str = "Zoë", template: str = "welcome"
) -> jobs_pb2.EmailJob:
    job = jobs_pb2.EmailJob(
        meta=job_meta(),
        to_address=to,
        to_name=name,
        template_id=template,
        language="en",
    )
    job.variables.update({"name": name})
    return job


async def mail_for(catcher: MailCatcher, nid: str) -> EmailMessage:
    """Wait for the message whose Message-ID names ``nid``."""
    wanted = f"<{nid}@notify>"
    async with asyncio.timeout(WAIT):
        count = 1
        while True:
            messages = await catcher.wait_for(count, WAIT)
            for message in messages:
                if message["Message-ID"] == wanted:
                    return message
            count = len(messages) + 1


# --- the worker -----------------------------------------------------------------------


@dataclasses.dataclass
class InMemoryEmailProvider:
    """A provider for the failover tests: records e-mails, or fails as told first.

    ``fail_next(n)`` makes the next ``n`` sends raise ``TransientError`` (or
    ``PermanentError`` with ``permanent=True``) before anything is recorded.
    """

    name: str = "memory"
    sent: list[OutgoingEmail] = dataclasses.field(default_factory=list)
    _failures: int = dataclasses.field(default=0, init=False, repr=False)
    _permanent: bool = dataclasses.field(default=False, init=False, repr=False)

    def fail_next(self, count: int = 1, *, permanent: bool = False) -> None:
        """Make the next ``count`` sends fail."""
        self._failures = count
        self._permanent = permanent

    async def send(self, email: OutgoingEmail) -> str:
        """Record the e-mail, or fail as told."""
        if self._failures > 0:
            self._failures -= 1
            if self._permanent:
                raise PermanentError("in-memory provider told to fail permanently")
            raise TransientError("in-memory provider told to fail transiently")
        self.sent.append(email)
        return f"in-memory-{len(self.sent)}"

    async def close(self) -> None:
        """Nothing to release."""


async def test_delivers_rendered_mail_and_reports_delivered(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
    templates: FixedTemplates,
    catcher: MailCatcher,
    tls_for: Callable[[str], TlsSettings],
) -> None:
    app = await start_worker()
    job = email_job(name="Zoë Ångström")
    nid = job.meta.notification_id
    await publish(broker[0], EMAIL, job.SerializeToString(), nid)

    updates = await users.wait_status(nid, DELIVERED)
    assert statuses(updates) == [SENDING, DELIVERED]
    assert {u.channel for u in updates} == {common_pb2.CHANNEL_EMAIL}
    assert updates[-1].attempt == 1
    rendered = [r for r in templates.requests if r.variables["name"] == "Zoë Ångström"]
    assert rendered[0].channel == common_pb2.CHANNEL_EMAIL
    assert rendered[0].template_id == "welcome"

    mail = await mail_for(catcher, nid)
    assert mail["Subject"] == "Welcome, Zoë Ångström"
    assert mail["To"].addresses[0].display_name == "Zoë Ångström"
    assert mail["To"].addresses[0].addr_spec == "ana@example.com"
    assert mail["From"].addresses[0].addr_spec == "no-reply@notify.localhost"
    assert mail["X-Notify-Notification-Id"] == nid
    assert mail.get_content_type() == "multipart/alternative"
    plain, html = mail.get_body(("plain",)), mail.get_body(("html",))
    assert plain is not None and "Hello Zoë Ångström," in plain.get_content()
    assert html is not None and "<b>Zoë Ångström</b>" in html.get_content()

    history = await app.store.history(nid)
    assert [(a.attempt, a.status) for a in history] == [(1, "DELIVERED")]

    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health_status(app.port, tls_for("operator")) == serving


async def test_smtp_outage_fails_over_to_sendgrid_and_opens_the_breaker(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
    tls_for: Callable[[str], TlsSettings],
) -> None:
    smtp, sendgrid = InMemoryEmailProvider(name="smtp"), InMemoryEmailProvider(name="sendgrid")
    smtp.fail_next(1_000)
    app = await start_worker(smtp, sendgrid)
    jobs = [email_job() for _ in range(8)]
    for job in jobs:
        await publish(broker[0], EMAIL, job.SerializeToString(), job.meta.notification_id)
    for job in jobs:
        nid = job.meta.notification_id
        updates = await users.wait_status(nid, DELIVERED)
        assert statuses(updates) == [SENDING, DELIVERED]  # no attempt spent on the outage
        assert updates[-1].detail.startswith("sendgrid: in-memory-")
        assert [(a.status, a.provider) for a in await app.store.history(nid)] == [
            ("DELIVERED", "sendgrid")
        ]
    assert 5 <= 1_000 - smtp._failures <= 8  # only the threshold's worth reached SMTP

    # Operators see it with the operator certificate; nobody else may ask.
    channel = rpc.secure_channel(f"127.0.0.1:{app.port}", tls_for("operator"))
    async with channel:
        admin = worker_admin_pb2_grpc.WorkerAdminServiceStub(channel)
        status = await admin.GetProviderStatus(worker_admin_pb2.GetProviderStatusRequest())
    assert status.channel == "email" and status.consuming
    assert [(p.name, p.state) for p in status.providers] == [
        ("smtp", worker_admin_pb2.BREAKER_STATE_OPEN),
        ("sendgrid", worker_admin_pb2.BREAKER_STATE_CLOSED),
    ]
    assert "in-memory provider told to fail" in status.providers[0].last_failure
    assert status.providers[0].retry_in.ToMilliseconds() > 0
    channel = rpc.secure_channel(f"127.0.0.1:{app.port}", tls_for("gateway"))
    async with channel:
        admin = worker_admin_pb2_grpc.WorkerAdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await admin.GetProviderStatus(worker_admin_pb2.GetProviderStatusRequest())
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_every_provider_down_holds_the_queue_until_a_probe_succeeds(
    config: Config,
    broker: Broker,
    users: RecordingUsers,
) -> None:
    smtp, sendgrid = InMemoryEmailProvider(name="smtp"), InMemoryEmailProvider(name="sendgrid")
    smtp.fail_next(2)
    sendgrid.fail_next(2)
    quick = dataclasses.replace(config, breaker=BreakerSettings(2, 30.0, 0.5, 1))
    app = await email_app.start(quick, providers=[smtp, sendgrid])
    try:
        jobs = [email_job() for _ in range(6)]
        for job in jobs:
            await publish(broker[0], EMAIL, job.SerializeToString(), job.meta.notification_id)
        for job in jobs:
            updates = await users.wait_status(job.meta.notification_id, DELIVERED)
            assert FAILED not in statuses(updates)
            assert max(u.attempt for u in updates) <= 2  # the outage spent one attempt at most
        assert len(smtp.sent) + len(sendgrid.sent) == 6
    finally:
        await app.stop()


async def test_smtp_rejection_fails_permanently(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
) -> None:
    app = await start_worker()
    job = email_job(to="reject-me@example.com")
    nid = job.meta.notification_id
    await publish(broker[0], EMAIL, job.SerializeToString(), nid)

    updates = await users.wait_status(nid, FAILED)
    assert statuses(updates) == [SENDING, FAILED]
    dead = await broker[1].wait_for(nid)
    assert dead.headers["x-notify-kind"] == "email"
    assert jobs_pb2.EmailJob.FromString(dead.body) == job
    history = await app.store.history(nid)
    assert [a.status for a in history] == ["FAILED"]


async def test_unknown_template_fails_permanently(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
) -> None:
    await start_worker()
    job = email_job(template="missing")
    nid = job.meta.notification_id
    await publish(broker[0], EMAIL, job.SerializeToString(), nid)

    updates = await users.wait_status(nid, FAILED)
    assert statuses(updates) == [SENDING, FAILED]
    assert "TEMPLATE_NOT_FOUND" in updates[-1].detail
    await broker[1].wait_for(nid)


async def test_header_injection_fails_permanently(
    start_worker: Callable[..., Awaitable[WorkerApp]],
    broker: Broker,
    users: RecordingUsers,
    catcher: MailCatcher,
) -> None:
    await start_worker()
    job = email_job(name="Ana\r\nBcc: victim@example.com")
    nid = job.meta.notification_id
    before = len(catcher.messages)
    await publish(broker[0], EMAIL, job.SerializeToString(), nid)

    updates = await users.wait_status(nid, FAILED)
    assert statuses(updates) == [SENDING, FAILED]
    await broker[1].wait_for(nid)
    assert len(catcher.messages) == before


# --- SMTP client against the real SMTP server -----------------------------------------


@pytest.fixture
async def smtp_peer() -> AsyncIterator[tuple[MailCatcher, int]]:
    mail = MailCatcher()
    port = await mail.start("127.0.0.1", 0)
    yield mail, port
    await mail.stop()


def outgoing(to: str = "b@example.com", nid: str | None = None) -> OutgoingEmail:
    return OutgoingEmail(
        notification_id=nid or str(uuid.uuid4()),
        from_name="",
        from_address="a@example.com",
        to_name="",
        to_address=to,
        subject="hi",
        text_body="body",
        html_body="",
    )


def smtp_to(port: int, timeout: float = 5.0, pool_size: int = 4) -> SmtpProvider:
    return SmtpProvider(
        SmtpSettings(host="127.0.0.1", port=port, timeout=timeout, pool_size=pool_size)
    )


async def test_smtp_provider_classifies_replies(smtp_peer: tuple[MailCatcher, int]) -> None:
    mail, port = smtp_peer
    sender = smtp_to(port, pool_size=1)
    try:
        reply = await sender.send(outgoing())
        assert "queued" in reply
        with pytest.raises(PermanentError):
            await sender.send(outgoing("reject@example.com"))
        with pytest.raises(TransientError):
            await sender.send(outgoing("defer@example.com"))
        # The session survives refusals: the next message goes through on it.
        await sender.send(outgoing("c@example.com"))
        assert [m["Subject"] for m in await mail.wait_for(2, WAIT)] == ["hi", "hi"]
        assert len(mail._sessions) == 1
    finally:
        await sender.close()


async def test_smtp_provider_reuses_a_small_pool_of_connections(
    smtp_peer: tuple[MailCatcher, int],
) -> None:
    mail, port = smtp_peer
    sender = smtp_to(port, pool_size=3)
    try:
        await asyncio.gather(*(sender.send(outgoing()) for _ in range(12)))
        assert len(await mail.wait_for(12, WAIT)) == 12
        assert 1 <= len(mail._sessions) <= 3
    finally:
        await sender.close()


async def test_smtp_provider_reconnects_after_the_relay_dropped_it(
    smtp_peer: tuple[MailCatcher, int],
) -> None:
    mail, port = smtp_peer
    sender = smtp_to(port)
    try:
        await sender.send(outgoing())
        await mail.stop()  # closes the open session too
        restarted = MailCatcher()
        await restarted.start("127.0.0.1", port)
        try:
            await sender.send(outgoing())
            assert len(await restarted.wait_for(1, WAIT)) == 1
        finally:
            await restarted.stop()
    finally:
        await sender.close()


async def test_smtp_provider_unreachable_relay_is_transient(
    smtp_peer: tuple[MailCatcher, int],
) -> None:
    mail, port = smtp_peer
    await mail.stop()
    sender = smtp_to(port, timeout=2.0)
    with pytest.raises(TransientError) as caught:
        await sender.send(outgoing())
    assert not isinstance(caught.value, OutcomeUnknown)
    await sender.close()


async def test_smtp_provider_timeout_during_data_is_outcome_unknown() -> None:
    """A relay that takes the message but never answers the final dot."""

    async def silent_after_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        while line := await reader.readline():
            if line.upper().startswith((b"EHLO", b"HELO")):
                writer.write(b"250 ok\r\n")
            elif line.upper().startswith(b"DATA"):
                writer.write(b"354 go\r\n")
            elif line.rstrip() == b".":
                continue  # never answer: the outcome is unknown
            elif line.upper().startswith((b"MAIL", b"RCPT")):
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(silent_after_data, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = smtp_to(port, timeout=0.5)
    try:
        with pytest.raises(OutcomeUnknown):
            await sender.send(outgoing())
    finally:
        await sender.close()
        server.close()
        await server.wait_closed()


# --- message assembly and configuration -----------------------------------------------


def parse(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def test_long_non_ascii_subject_is_encoded_and_folded() -> None:
    subject = "Votre réservation à l'hôtel " * 6
    raw = mime.build_message(
        from_header="notify <n@example.com>",
        to_address="a@example.com",
        to_name="",
        subject=subject,
        text_body="x",
        html_body="",
        notification_id="n1",
    )
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    message = parse(raw)
    assert message["Subject"] == subject
    assert message.get_content_type() == "text/plain"
    assert message.get_content() == "x"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", "Hi\r\nBcc: x@example.com"),
        ("to_name", "Ana\nBcc: x@example.com"),
        ("to_address", "a@example.com\r\nBcc: x@example.com"),
        ("to_address", "not an address"),
        ("to_address", "zoë@example.com"),
        ("notification_id", "n1>\r\nX: y"),
    ],
)
def test_unsafe_header_values_are_refused(field: str, value: str) -> None:
    values = {
        "from_header": "notify <n@example.com>",
        "to_address": "a@example.com",
        "to_name": "Ana",
        "subject": "Hi",
        "text_body": "x",
        "html_body": "",
        "notification_id": "n1",
    }
    values[field] = value
    with pytest.raises(mime.MessageError):
        mime.build_message(**values)


def test_body_is_quoted_printable_utf8() -> None:
    text = "naïve line with trailing space \n" + "é" * 100 + "\n.leading dot\n"
    message = parse(
        mime.build_message(
            from_header="n@example.com",
            to_address="a@example.com",
            to_name='Ana "the" Best, Jr.',
            subject="Hi",
            text_body=text,
            html_body="",
            notification_id="n1",
        )
    )
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content().replace("\r\n", "\n") == text
    assert message["To"].addresses[0].display_name == 'Ana "the" Best, Jr.'


# Text a receiver would decode into a line break, a second recipient or a quote if it
# went on the wire as it is; each fits one encoded-word (see the long-name test for why).
LOOKS_ENCODED = [
    "=?UTF-8?Q?=0D=0A?=Bcc: evil@x.com",
    "=?utf-8?b?DQpCY2M6IGV2aWxAeC5jb20=?=",
    "Re: =?iso-8859-1?q?=0A?= hi",
    "glued=?utf-8?q?=0d=0a?=text",
    '"=?utf-8?q?=22=2C_e=40x=2Ecom_=3C?="',
    "Zoë =?UTF-8?Q?=0D=0A?= x",
    "a=?b",
]
# Display names with RFC 5322 specials: each must stay one name of one recipient.
SPECIAL_NAMES = [
    "evil@x.com",
    "a, b <evil@x.com>",
    'Ana "the" Best',
    "back\\slash",
    "semi;colon: group",
    "<evil@x.com>",
    '"',
    "\\",
    'Mallory" <evil@x.com>, "x',
    'a\\" <evil@x.com>, b',
    "(comment) Ana",
    "  spaced  out ",
    "tab\there",
]


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def message_for(*, name: str = "", subject: str = "Hi") -> bytes:
    return mime.build_message(
        from_header=mime.format_address(name, "n@example.com"),
        to_address="a@example.com",
        to_name=name,
        subject=subject,
        text_body="x",
        html_body="",
        notification_id="n1",
    )


@pytest.mark.parametrize("text", LOOKS_ENCODED)
def test_text_that_looks_like_an_encoded_word_is_sent_as_text(text: str) -> None:
    raw = message_for(name=text, subject=text)
    head = header_block(raw)
    # The user's own encoded-word never reaches the wire unencoded.
    assert text.encode() not in head
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    subject = str(message["Subject"])
    assert subject == text
    assert "\r" not in subject and "\n" not in subject
    for field, address in (("To", "a@example.com"), ("From", "n@example.com")):
        header = message[field]
        assert header.defects == ()
        assert [(a.display_name, a.addr_spec) for a in header.addresses] == [(text, address)]


@pytest.mark.parametrize("name", SPECIAL_NAMES)
def test_display_names_with_specials_cannot_add_recipients(name: str) -> None:
    message = email.message_from_bytes(message_for(name=name), policy=email.policy.default)
    to = message["To"]
    assert to.defects == ()
    assert [(a.display_name, a.addr_spec) for a in to.addresses] == [(name, "a@example.com")]


@pytest.mark.parametrize(
    "name", ["Zoë " * 30, "x" * 100, "a, b <evil@x.com>; " * 8, "=?UTF-8?Q?=0D=0A?=Bcc " * 6]
)
def test_long_display_names_are_folded_and_decode_exactly(name: str) -> None:
    """Several encoded-words, folded; RFC 2047 decoding gives back exactly the name.

    Python 3.11's address parser keeps the folding space between adjacent encoded-words
    in a display name (CPython gh-128110, against RFC 2047 section 6.2), so the exact
    text is checked with the RFC-conforming ``email.header.decode_header`` and the
    parsed header only for its structure.
    """
    raw = message_for(name=name)
    head = header_block(raw)
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    to_value = next(
        line
        for line in head.decode("ascii").replace("\r\n ", " ").split("\r\n")
        if line.startswith("To: ")
    )[len("To: ") :]
    phrase, _, address = to_value.rpartition(" <")
    assert address == "a@example.com>"
    assert str(make_header(decode_header(phrase))) == name
    to = email.message_from_bytes(raw, policy=email.policy.default)["To"]
    assert [a.addr_spec for a in to.addresses] == ["a@example.com"]
    assert "\n" not in to.addresses[0].display_name


async def test_hostile_names_and_subjects_reach_the_relay_as_text(
    smtp_peer: tuple[MailCatcher, int],
) -> None:
    mail, port = smtp_peer
    sender = smtp_to(port, pool_size=1)
    texts = [*LOOKS_ENCODED, *SPECIAL_NAMES]
    try:
        for text in texts:
            await sender.send(
                dataclasses.replace(outgoing(), to_name=text, subject=text, from_name=text)
            )
        received = await mail.wait_for(len(texts), WAIT)
    finally:
        await sender.close()
    assert [str(m["Subject"]) for m in received] == texts
    assert [[a.addr_spec for a in m["To"].addresses] for m in received] == [
        ["b@example.com"]
    ] * len(texts)
    assert [m["To"].addresses[0].display_name for m in received] == texts
    assert all(m["Bcc"] is None and m["Cc"] is None for m in received)


@pytest.mark.parametrize("text", [*LOOKS_ENCODED, *SPECIAL_NAMES])
def test_sendgrid_json_carries_names_and_subject_as_plain_text(text: str) -> None:
    """SendGrid gets the text in JSON strings, which no text can leave; it does the MIME."""
    email_ = dataclasses.replace(outgoing(), to_name=text, from_name=text, subject=text)
    body = json.loads(json.dumps(sendgrid.request_body(email_)))
    assert body["subject"] == text
    assert body["from"] == {"email": "a@example.com", "name": text}
    assert body["personalizations"] == [
        {
            "to": [{"email": "b@example.com", "name": text}],
            "custom_args": {"notification_id": email_.notification_id},
        }
    ]
    assert body["headers"] == {sendgrid.NOTIFICATION_HEADER: email_.notification_id}


def test_config_from_env(certs_dir: Path) -> None:
    env = {"NOTIFY_TLS_DIR": str(certs_dir)}
    config = Config.from_env(env)
    assert config.common.listen == "127.0.0.1:50054"
    assert config.dsn == "postgresql://postgres@127.0.0.1:5432/notify_email"
    assert config.worker.topology == Topology(prefix="")
    assert config.smtp == SmtpSettings()
    assert config.worker.runner.prefetch == 32
    assert config.providers == ("smtp",) and config.sendgrid is None

    env |= {
        "NOTIFY_AMQP_PREFIX": "dev.",
        "NOTIFY_SMTP_PORT": "2525",
        "NOTIFY_SMTP_STARTTLS": "1",
        "NOTIFY_SMTP_USERNAME": "u",
        "NOTIFY_SMTP_PASSWORD": "p",
    }
    config = Config.from_env(env)
    assert config.worker.topology.queue(EMAIL) == "dev.email.queue"
    assert (config.smtp.port, config.smtp.starttls, config.smtp.username) == (2525, True, "u")
    with pytest.raises(SettingsError):
        Config.from_env({**env, "NOTIFY_SMTP_STARTTLS": "yes"})
    with pytest.raises(SettingsError):
        Config.from_env({**env, "NOTIFY_SMTP_PASSWORD": ""})

    sendgrid = {**env, "NOTIFY_SENDGRID_API_KEY": "SG.k", "NOTIFY_SENDGRID_URL": "http://x:1"}
    config = Config.from_env(sendgrid)
    assert config.providers == ("smtp", "sendgrid")
    assert config.sendgrid is not None and config.sendgrid.url == "http://x:1"
    config = Config.from_env({**sendgrid, "NOTIFY_EMAIL_PROVIDERS": "sendgrid,smtp"})
    assert config.providers == ("sendgrid", "smtp")
    assert Config.from_env({**env, "NOTIFY_EMAIL_PROVIDERS": "sendgrid,smtp"}).providers == (
        "smtp",
    )
    with pytest.raises(SettingsError):
        Config.from_env({**env, "NOTIFY_EMAIL_PROVIDERS": "smtp,carrier-pigeon"})
