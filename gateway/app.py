"""The gateway process, wired by hand: pools, channels, publisher, servicers, server."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import grpc
from notify.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    dead_letter_service_pb2,
    dead_letter_service_pb2_grpc,
    delivery_service_pb2_grpc,
    notification_service_pb2,
    notification_service_pb2_grpc,
    template_service_pb2,
    template_service_pb2_grpc,
    user_service_pb2,
)

from gateway.admin_server import AdminServicer
from gateway.auth import ApiKeyInterceptor, Authenticator
from gateway.cache import IdempotencyCache
from gateway.config import Config
from gateway.dead_letter_server import DeadLetterConsumer, DeadLetterServicer
from gateway.dead_letters import DeadLetterStore
from gateway.limits import RateLimiter
from gateway.proxy import ForwardingHandler
from gateway.reconciler import Reconciler
from gateway.records import RecordWriter
from gateway.server import NotificationServicer
from gateway.store import KeyStore, TenantStore
from notify_kit import acl, amqp, db, health
from notify_kit.kv import redis_client
from notify_kit.queue_watch import QueueWatch
from notify_kit.rpc import secure_channel
from notify_kit.server import GrpcServer

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"

SERVICE_NAMES = (
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    notification_service_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name,
    user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name,
    template_service_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name,
    dead_letter_service_pb2.DESCRIPTOR.services_by_name["DeadLetterService"].full_name,
)


class App:
    """A running gateway."""

    def __init__(self, stack: contextlib.AsyncExitStack, server: GrpcServer) -> None:
        self._stack = stack
        self.server = server
        self.port = server.port

    @classmethod
    async def start(cls, config: Config) -> App:
        """Build everything; on any failure close what was opened and re-raise."""
        async with contextlib.AsyncExitStack() as stack:
            await db.ensure_database(config.dsn)
            pool = await db.create_pool(config.dsn, application="gateway", max_size=5)
            stack.push_async_callback(db.close_pool, pool)
            await db.migrate(pool, MIGRATIONS)
            keys = KeyStore(pool)
            if config.bootstrap_api_key:
                await keys.ensure(
                    config.bootstrap_api_key, "bootstrap", frozenset({acl.ADMIN_SCOPE})
                )
            redis = redis_client(config.redis_url)
            stack.push_async_callback(redis.aclose)
            limiter = RateLimiter(redis)
            connection = await amqp.connect(config.amqp_url)
            stack.push_async_callback(connection.close)
            publisher = amqp.Publisher(connection, config.topology, timeout=config.publish_timeout)
            await publisher.start()
            stack.push_async_callback(publisher.close)
            tls = config.common.tls
            user_channel = secure_channel(
                config.user_svc_addr, tls, default_timeout=config.upstream_timeout
            )
            stack.push_async_callback(user_channel.close)
            template_channel = secure_channel(
                config.template_svc_addr, tls, default_timeout=config.upstream_timeout
            )
            stack.push_async_callback(template_channel.close)
            users = delivery_service_pb2_grpc.DeliveryServiceStub(user_channel)
            records = RecordWriter(
                users, timeout=config.upstream_timeout, max_batch=config.record_batch_max
            )
            records.start()
            stack.push_async_callback(records.close)
            servicer = NotificationServicer(
                users,
                records,
                template_service_pb2_grpc.TemplateServiceStub(template_channel),
                publisher,
                IdempotencyCache(redis, ttl=config.idempotency_ttl),
                upstream_timeout=config.upstream_timeout,
                template_cache_ttl=config.template_cache_ttl,
                profiles=redis,
                limiter=limiter,
                recipient_limits=config.recipient_limits,
            )
            dead_letters = DeadLetterStore(pool)
            dead_letter_admin = DeadLetterServicer(
                dead_letters,
                publisher,
                users,
                upstream_timeout=config.upstream_timeout,
            )
            forwarding = ForwardingHandler(
                {"user_svc": user_channel, "template_svc": template_channel},
                timeout=config.upstream_timeout,
            )

            def register(server: grpc.aio.Server) -> None:
                notification_service_pb2_grpc.add_NotificationServiceServicer_to_server(
                    servicer, server
                )
                dead_letter_service_pb2_grpc.add_DeadLetterServiceServicer_to_server(
                    dead_letter_admin, server
                )
                admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
                    AdminServicer(keys, TenantStore(pool), config.recipient_limits), server
                )
                server.add_generic_rpc_handlers((forwarding,))

            server = GrpcServer(
                config.common,
                [register],
                SERVICE_NAMES,
                extra_interceptors=[
                    ApiKeyInterceptor(
                        Authenticator(
                            keys,
                            limiter,
                            ttl=config.auth_cache_ttl,
                            failure_rate=config.auth_failure_rate,
                        ),
                        limiter,
                        default_rate=config.key_rate,
                    )
                ],
                dependencies=[
                    health.postgres(pool),
                    health.broker(connection),
                    health.redis(redis),
                ],
            )
            await server.start()
            stack.push_async_callback(server.stop)
            # Dead letters are filed by one consumer per gateway (competing consumers
            # when there are several); it stops before the server drains.
            consumer = DeadLetterConsumer(connection, config.topology, dead_letters)
            await consumer.start()
            stack.push_async_callback(consumer.stop)
            depth = QueueWatch(connection, config.topology, [config.topology.failed_queue])
            depth.start()
            stack.push_async_callback(depth.close)
            reconciler = Reconciler(
                users,
                publisher,
                dead_letters,
                after=config.reconcile_after,
                interval=config.reconcile_interval,
                timeout=config.upstream_timeout,
            )
            reconciler.start()
            stack.push_async_callback(reconciler.stop)
            return cls(stack.pop_all(), server)
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        """Drain the server first (stack order), then close channels, broker, pools."""
        await self._stack.aclose()
