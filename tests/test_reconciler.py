"""The reconciler resolves deliveries left in flight, against the running system.

A reconciler is built in-process the way the gateway builds it (the gateway's
certificate for UserService, the system's broker topology and dead-letter database),
and made to look at every in-flight delivery at once (``older_than=0``). The records it
resolves are made the way a failing gateway leaves them: written, never published.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aio_pika
import pytest
from google.protobuf import timestamp_pb2
from notify.v1 import common_pb2, delivery_service_pb2_grpc, jobs_pb2, user_service_pb2

from gateway.dead_letters import DeadLetterStore, Incoming
from gateway.reconciler import Reconciler
from notify_kit import db, rpc
from notify_kit.amqp import Publisher, Topology
from notify_kit.settings import TlsSettings
from tests.e2e_support import E2E

QUEUED = common_pb2.NOTIFICATION_STATUS_QUEUED


@dataclass
class Parts:
    reconciler: Reconciler
    users: delivery_service_pb2_grpc.DeliveryServiceStub
    dead_letters: DeadLetterStore


@pytest.fixture
async def parts(e2e: E2E, tls_for: Callable[[str], TlsSettings]) -> AsyncIterator[Parts]:
    cfg = e2e.cfg
    channel = rpc.secure_channel(f"127.0.0.1:{cfg.ports.user_svc}", tls_for("gateway"))
    users = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
    connection = await aio_pika.connect_robust(cfg.amqp_url, timeout=10)
    publisher = Publisher(connection, Topology(prefix=cfg.amqp_prefix))
    await publisher.start()
    pool = await db.create_pool(f"{cfg.pg_base}/{cfg.db_prefix}gateway", application="test")
    store = DeadLetterStore(pool)
    reconciler = Reconciler(users, publisher, store, after=900, interval=60, timeout=5, batch=500)
    yield Parts(reconciler, users, store)
    await db.close_pool(pool)
    await publisher.close()
    await connection.close()
    await channel.close()


async def unpublished(parts: Parts, user_id: str, email: str, *, expired: bool = False) -> str:
    """A notification recorded with its outbox job but never published."""
    nid = str(uuid.uuid4())
    expire = timestamp_pb2.Timestamp()
    expire.GetCurrentTime()
    expire.seconds += -60 if expired else 3600
    job = jobs_pb2.EmailJob(
        meta=jobs_pb2.JobMeta(
            notification_id=nid,
            attempt=1,
            correlation_id=uuid.uuid4().hex,
            user_id=user_id,
            expire_time=expire,
        ),
        to_address=email,
        to_name="Ada",
        template_id="welcome",
        language="en",
    )
    job.variables.update({"name": "Ada"})
    record = common_pb2.Notification(
        id=nid,
        user_id=user_id,
        template_id="welcome",
        deliveries=[common_pb2.Delivery(channel=common_pb2.CHANNEL_EMAIL, status=QUEUED)],
    )
    outbox = user_service_pb2.OutboxJob(
        channel=common_pb2.CHANNEL_EMAIL, job=job.SerializeToString(), expire_time=expire
    )
    await parts.users.CreateNotificationRecord(
        user_service_pb2.CreateNotificationRecordRequest(notification=record, outbox=[outbox]),
        timeout=5,
    )
    return nid


async def test_a_job_never_published_is_republished_and_delivered_once(
    e2e: E2E, parts: Parts
) -> None:
    email = f"rc{uuid.uuid4().hex[:10]}@example.com"
    user_id = await e2e.new_user(devices=0, email=email)
    nid = await unpublished(parts, user_id, email)
    done = await parts.reconciler.run_once(older_than=0)
    assert done.republished >= 1
    settled = await e2e.settle(nid)
    assert settled["notification"]["deliveries"][0]["status"] == "NOTIFICATION_STATUS_DELIVERED"
    assert sum(email in str(m["To"]) for m in e2e.mail.messages) == 1
    # Claimed once already: a second pass does not publish it again.
    again = await parts.reconciler.run_once(older_than=0)
    assert again.republished == 0


async def test_a_stale_delivery_past_its_ttl_expires(e2e: E2E, parts: Parts) -> None:
    email = f"rx{uuid.uuid4().hex[:10]}@example.com"
    user_id = await e2e.new_user(devices=0, email=email)
    nid = await unpublished(parts, user_id, email, expired=True)
    done = await parts.reconciler.run_once(older_than=0)
    assert done.expired >= 1
    _, got = await e2e.api("GET", f"/v1/notifications/{nid}")
    delivery = got["notification"]["deliveries"][0]
    assert delivery["status"] == "NOTIFICATION_STATUS_EXPIRED", delivery


async def test_a_job_parked_by_the_broker_ends_failed_with_the_reason(
    e2e: E2E, parts: Parts
) -> None:
    email = f"rp{uuid.uuid4().hex[:10]}@example.com"
    user_id = await e2e.new_user(devices=0, email=email)
    nid = await unpublished(parts, user_id, email)
    await parts.dead_letters.put(
        Incoming(
            job_key=f"email:{nid}",
            kind="email",
            notification_id=nid,
            generation=0,
            reason="dead-lettered by the broker",
            attempts=0,
            correlation_id="",
            body=b"",
            history="[]",
        )
    )
    done = await parts.reconciler.run_once(older_than=0)
    assert done.failed >= 1
    _, got = await e2e.api("GET", f"/v1/notifications/{nid}")
    delivery = got["notification"]["deliveries"][0]
    assert delivery["status"] == "NOTIFICATION_STATUS_FAILED", delivery
    assert "dead-lettered by the broker" in delivery["detail"]
