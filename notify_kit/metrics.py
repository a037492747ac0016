"""Prometheus metrics: every metric of the mesh, declared once, served on a port per process.

The metrics are declared here, with their labels and help, so the names an alert, a
dashboard panel or docs/OPERATIONS.md uses exist in one place (a test checks every
query of the dashboard and the alert rules against this module). Each process serves
them over plain HTTP on its own metrics port (``NOTIFY_<SERVICE>_METRICS_LISTEN``,
``serve``); the exposition is prometheus-client's, on a thread of its own, so a scrape
never waits for the event loop and the event loop never waits for a scrape.

Labels are bounded sets: a method name, a status code, a channel, a provider, a queue,
an outcome. No id of a user, notification or key is ever a label.

The collectors register with prometheus-client's default registry when this module is
first imported (that is how the library works); nothing is served or started until
``serve`` is called.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger(__name__)

# Seconds: from a cache hit to a slow provider.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# --- gRPC (notify_kit.interceptors) ------------------------------------------------------
RPC_SERVER_SECONDS = Histogram(
    "notify_rpc_server_duration_seconds",
    "Time a gRPC call took in this server, by full method and status code.",
    ["method", "code"],
    buckets=_LATENCY,
)
RPC_CLIENT_SECONDS = Histogram(
    "notify_rpc_client_duration_seconds",
    "Time a gRPC call this process made took, by full method and status code.",
    ["method", "code"],
    buckets=_LATENCY,
)

# --- RabbitMQ (notify_kit.amqp, notify_kit.jobs) ----------------------------------------
QUEUE_MESSAGES = Gauge(
    "notify_queue_messages",
    "Messages ready in a queue, as its consumer last saw it (every few seconds).",
    ["queue"],
)
QUEUE_CONSUMERS = Gauge(
    "notify_queue_consumers", "Consumers of a queue, as its consumer last saw it.", ["queue"]
)
QUEUE_PUBLISHED = Counter(
    "notify_queue_published",
    "Messages published and confirmed by the broker, by routing key (the queue).",
    ["queue"],
)
QUEUE_PUBLISH_SECONDS = Histogram(
    "notify_queue_publish_duration_seconds",
    "From a publish to the broker's answer, by queue and outcome (confirmed, rejected, "
    "failed: no answer in time or no connection): the broker's share of a send's latency "
    "(nothing is OK-ed before its confirm).",
    ["queue", "outcome"],
    buckets=_LATENCY,
)
QUEUE_CONSUMED = Counter("notify_queue_consumed", "Messages a worker took from a queue.", ["queue"])
QUEUE_SETTLED = Counter(
    "notify_queue_settled",
    "Messages a worker settled: acked (done) or requeued (a bug; the delivery limit parks it).",
    ["queue", "outcome"],
)

# --- PostgreSQL (notify_kit.db): read from the pools at scrape time by PoolCollector ------
POOL_CONNECTIONS = (
    "notify_db_pool_connections",
    "Connections of a database pool, in use or idle.",
    ("pool", "state"),
)
POOL_MAX = ("notify_db_pool_max", "The most connections a pool opens.", ("pool",))
POOL_WAITING = ("notify_db_pool_waiting", "Callers waiting for a pool's connection.", ("pool",))

# --- Health (notify_kit.health) ----------------------------------------------------------
DEPENDENCY_UP = Gauge(
    "notify_dependency_up",
    "Whether a dependency answered this process's last health probe (1) or not (0).",
    ["dependency"],
)

# --- Redis ---------------------------------------------------------------------------------
REDIS_ERRORS = Counter(
    "notify_redis_errors",
    "Redis calls that failed (the caller fell back: a cache miss, a limit not enforced).",
    ["operation"],
)

# --- Deliveries (notify_kit.jobs) ------------------------------------------------------------
DELIVERIES = Counter(
    "notify_deliveries",
    "Deliveries that reached a terminal outcome (delivered, failed, expired), by channel "
    'and the provider that delivered (provider="none" when none did).',
    ["channel", "provider", "outcome"],
)
RETRIES = Counter(
    "notify_delivery_retries",
    "Delivery attempts that failed and were scheduled again.",
    ["channel"],
)
DEAD_LETTERS = Counter(
    "notify_dead_letters",
    "Jobs a worker moved to the failed queue (failed for good, or undecodable).",
    ["channel"],
)
PROVIDER_CALLS = Histogram(
    "notify_provider_call_duration_seconds",
    "One provider's try at one delivery, by outcome (ok, transient, permanent, unknown).",
    ["channel", "provider", "outcome"],
    buckets=_LATENCY,
)
BREAKER_STATE = Gauge(
    "notify_breaker_state",
    "A provider's circuit breaker: 0 closed, 1 half open, 2 open.",
    ["channel", "provider"],
)
BREAKER_TRANSITIONS = Counter(
    "notify_breaker_transitions",
    "Circuit-breaker state changes, by the state entered.",
    ["channel", "provider", "state"],
)
RENDER_SECONDS = Histogram(
    "notify_render_duration_seconds",
    "Rendering one channel of a template in a render process, by outcome (ok, failed).",
    ["channel", "outcome"],
    buckets=_LATENCY,
)

# --- Gateway -------------------------------------------------------------------------------
NOTIFICATIONS_ACCEPTED = Counter(
    "notify_notifications_accepted",
    "Notifications the gateway accepted (recorded and queued), by channel and status.",
    ["channel", "status"],
)
RATE_LIMITED = Counter(
    "notify_rate_limited",
    "Requests refused by a rate limit (api_key, recipient, failed_key_lookups).",
    ["limit"],
)
IDEMPOTENT_REPLAYS = Counter(
    "notify_idempotent_replays",
    "Sends answered from an earlier request with the same idempotency key.",
)
DEAD_LETTER_REPLAYS = Counter(
    "notify_dead_letter_replays", "Dead letters an operator replayed.", ["channel"]
)

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class PoolCollector(Collector):
    """Size, use and waiters of every asyncpg pool of this process, read at scrape time.

    asyncpg counts size and idle connections; how many callers wait for a connection it
    keeps only in its queue of waiters (``Pool._queue._getters``), read here defensively:
    a release of asyncpg that renames it shows 0 waiting, never breaks a scrape.
    """

    def __init__(self) -> None:
        # By identity: asyncpg pools take no weak references. notify_kit.db adds each pool
        # it creates and discards it when it closes it.
        self._pools: dict[int, tuple[asyncpg.Pool, str]] = {}
        self._lock = threading.Lock()

    def add(self, pool: asyncpg.Pool, name: str) -> None:
        """Report ``pool`` under ``name`` until ``discard``."""
        with self._lock:
            self._pools[id(pool)] = (pool, name)

    def discard(self, pool: asyncpg.Pool) -> None:
        """Stop reporting ``pool``."""
        with self._lock:
            self._pools.pop(id(pool), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        connections, largest, waiting = (
            GaugeMetricFamily(name, documentation, labels=list(labels))
            for name, documentation, labels in (POOL_CONNECTIONS, POOL_MAX, POOL_WAITING)
        )
        with self._lock:
            pools = list(self._pools.values())
        for pool, name in pools:
            if pool.is_closing():
                continue
            size, idle = pool.get_size(), pool.get_idle_size()
            connections.add_metric([name, "in_use"], size - idle)
            connections.add_metric([name, "idle"], idle)
            largest.add_metric([name], pool.get_max_size())
            waiting.add_metric([name], _waiters(pool))
        yield connections
        yield largest
        yield waiting

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


def _waiters(pool: Any) -> int:
    """Callers waiting for a connection. Read on the scrape's thread while the event
    loop changes the deque: ``list()`` copies it in one step (under the GIL), where
    iterating it could meet "deque mutated during iteration"."""
    queue = getattr(pool, "_queue", None)
    getters = getattr(queue, "_getters", None)
    return sum(1 for f in list(getters) if not f.done()) if getters is not None else 0


POOLS = PoolCollector()
REGISTRY.register(POOLS)


@dataclass
class MetricsServer:
    """The HTTP endpoint of one process's metrics."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (useful when asked for port 0)."""
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(listen: str) -> MetricsServer:
    """Serve ``/metrics`` on ``listen`` (``host:port``; port 0 picks a free one)."""
    host, _, port = listen.rpartition(":")
    server, thread = start_http_server(int(port), addr=host or "0.0.0.0")
    metrics = MetricsServer(server, thread)
    log.info("metrics served", extra={"listen": f"{host}:{metrics.port}"})
    return metrics


@dataclass(frozen=True, slots=True)
class Documented:
    """One metric as docs/OPERATIONS.md lists it (the name as scraped)."""

    name: str
    kind: str
    labels: tuple[str, ...]
    documentation: str


def catalogue() -> list[Documented]:
    """Every metric this module declares, in declaration order."""
    found = []
    for value in globals().values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            suffix = "_total" if family.type == "counter" else ""
            labels = tuple(value._labelnames)  # no public accessor
            found.append(
                Documented(family.name + suffix, family.type, labels, family.documentation)
            )
    for name, documentation, labels in (POOL_CONNECTIONS, POOL_MAX, POOL_WAITING):
        found.append(Documented(name, "gauge", labels, documentation))
    return found


def breaker_labels(name: str) -> tuple[str, str]:
    """(channel, provider) of a breaker named ``channel/provider``."""
    channel, _, provider = name.rpartition("/")
    return channel, provider
