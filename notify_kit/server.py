"""gRPC server bootstrap shared by every service: mTLS, health, reflection, shutdown.

``GrpcServer.start()`` binds (port 0 works; ``port`` tells the real one), registers the
service's servicers, the async health service and reflection. ``serve_forever`` waits for
SIGTERM/SIGINT, flips health to NOT_SERVING first so load balancers drain, then stops
with a grace period for in-flight calls.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from notify_kit import metrics
from notify_kit.acl import AccessPolicy
from notify_kit.health import Dependency, DependencyHealth
from notify_kit.interceptors import ServerInterceptor
from notify_kit.settings import CommonSettings
from notify_kit.tls import server_credentials
from notify_kit.validation import ValidationInterceptor

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server], None]


class GrpcServer:
    """One grpc.aio server with the mesh's standard equipment."""

    def __init__(
        self,
        settings: CommonSettings,
        registrars: Sequence[Registrar],
        service_names: Sequence[str],
        *,
        extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        dependencies: Sequence[Dependency] = (),
    ) -> None:
        self._settings = settings
        self._registrars = registrars
        self._service_names = tuple(service_names)
        # Outermost first: the access check and error mapping wrap the contract's field
        # rules, which wrap the handler.
        self._interceptors = (
            ServerInterceptor(
                AccessPolicy.for_server(settings.service, settings.tls.service_key_digests)
            ),
            ValidationInterceptor(),
            *extra_interceptors,
        )
        self.health = health.aio.HealthServicer()
        self.dependencies = DependencyHealth(
            self.health,
            ("", *self._service_names),
            dependencies,
            interval=settings.health_interval,
        )
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics: metrics.MetricsServer | None = None

    async def start(self) -> int:
        """Bind, start, serve the metrics, set health from the dependencies (SERVING when
        they all answer) and keep it in step; return the bound port."""
        server = grpc.aio.server(
            interceptors=self._interceptors,
            options=[
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        for register in self._registrars:
            register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_secure_port(
            self._settings.listen, server_credentials(self._settings.tls)
        )
        if self.port == 0:
            raise RuntimeError(f"could not bind {self._settings.listen}")
        await server.start()
        if self._settings.metrics_listen:
            try:
                self._metrics = metrics.serve(self._settings.metrics_listen)
            except OSError:
                await server.stop(None)
                raise
        await self.dependencies.check()
        self.dependencies.start()
        self._server = server
        log.info("serving", extra={"listen": self._settings.listen, "port": self.port})
        return self.port

    async def stop(self) -> None:
        """Drain: NOT_SERVING first, then stop with the configured grace."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()  # for good: later probes change nothing
        await self.dependencies.stop()
        await self._server.stop(self._settings.shutdown_grace)
        self._server = None
        if self._metrics is not None:  # last: a scrape during the drain still answers
            await asyncio.to_thread(self._metrics.close)
            self._metrics = None


async def wait_for_shutdown_signal() -> None:
    """Return on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown signal received")
