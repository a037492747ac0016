"""Run the whole mesh as local processes: the five services, Envoy, and the dev peers.

One implementation serves ``make run`` (fixed, documented ports), the end-to-end tests
and the benchmark (free ports, throwaway databases, a private RabbitMQ prefix), so what
the tests exercise is exactly what a newcomer starts: the real ``python -m`` entry
points configured through the environment, and the committed ``envoy/envoy.yaml`` with
only addresses and paths rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from notify_kit.settings import METRICS_PORTS, TlsSettings
from notify_kit.tls import channel_credentials
from scripts.backing import reachable

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("user_svc", "template_svc", "gateway", "email_worker", "push_worker")
# Credentials the local SendGrid and OneSignal stand-ins accept (they are no secret).
LOCAL_SENDGRID_KEY = "SG.local-stand-in"
LOCAL_ONESIGNAL_APP = "00000000-0000-4000-8000-00000000a991"
LOCAL_ONESIGNAL_KEY = "os_v2_local_stand_in"
# Each service's database is ``<db_prefix><name>``.
DATABASES = ("gateway", "user", "template", "email", "push")


T = TypeVar("T")


async def poll(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """Run ``probe`` until ``done(result)``: the one readiness-polling loop we have.

    Used where nothing can notify us (a process coming up, a status a client reads);
    ``probe`` may raise to stop early, e.g. when the process it waits for has died.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout}s (last: {result!r:.300})")
        await asyncio.sleep(interval)  # the probe interval


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux's default otherwise)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_issued: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, outside the kernel's ephemeral range.

    A port the OS picks with ``bind(0)`` comes from the ephemeral range, and between
    releasing it here and a service binding it, any process's outgoing connection may
    take it as its local port (seen in CI: ``Address already in use`` starting a worker
    with sixteen such ports chosen per system). Ports below or above the range are never
    handed out implicitly, so only another listener can race us; those we check by
    binding, and this process never returns one port twice.
    """
    low, high = _ephemeral_range()
    pools = [range(10000, low), range(high + 1, 65536)]
    pool = max(pools, key=len)
    for _ in range(1000):
        port = random.choice(pool)
        if port in _issued:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _issued.add(port)
        return port
    raise RuntimeError(f"no free port in {pool.start}..{pool.stop - 1}")


@dataclass(frozen=True, slots=True)
class Ports:
    """Every port the system listens on."""

    gateway: int = 50051
    user_svc: int = 50052
    template_svc: int = 50053
    email_worker: int = 50054
    push_worker: int = 50055
    http: int = 8080
    envoy_admin: int = 9901
    smtp: int = 1025
    fcm: int = 8089
    sendgrid: int = 8090
    onesignal: int = 8091
    # Each process's Prometheus metrics.
    gateway_metrics: int = METRICS_PORTS["gateway"]
    user_svc_metrics: int = METRICS_PORTS["user_svc"]
    template_svc_metrics: int = METRICS_PORTS["template_svc"]
    email_worker_metrics: int = METRICS_PORTS["email_worker"]
    push_worker_metrics: int = METRICS_PORTS["push_worker"]

    def metrics(self, service: str) -> int:
        """The metrics port of ``service``."""
        port: int = getattr(self, f"{service}_metrics")
        return port

    @classmethod
    def free(cls) -> Ports:
        """All ports freshly chosen by the OS (tests, benchmarks)."""
        return cls(*(free_port() for _ in dataclasses.fields(cls)))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Ports:
        """The documented ports, except where ``NOTIFY_<SERVICE>_LISTEN`` or
        ``NOTIFY_<SERVICE>_METRICS_LISTEN`` says otherwise."""
        ports = cls()
        chosen = {
            field: int(env[name].rsplit(":", 1)[1])
            for s in SERVICES
            for field, name in (
                (s, f"NOTIFY_{s.upper()}_LISTEN"),
                (f"{s}_metrics", f"NOTIFY_{s.upper()}_METRICS_LISTEN"),
            )
            if env.get(name)
        }
        return dataclasses.replace(ports, **chosen)


@dataclass(slots=True)
class SystemConfig:
    """Where the system keeps its state and how it reaches the backing servers."""

    var: Path
    certs: Path
    ports: Ports = field(default_factory=Ports)
    db_prefix: str = "notify_"
    amqp_prefix: str = ""
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    pg_base: str = "postgresql://postgres@127.0.0.1:5432"
    api_key: str = "notify-dev-key"
    fcm_credentials: Path | None = None
    log_level: str = "INFO"
    # The user's own NOTIFY_* settings (``make run``) or a test's: they win over the
    # local defaults, exactly as they would for a service started by hand.
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def local_smtp(self) -> bool:
        """Mail goes to the local mail catcher unless the user named an SMTP relay."""
        return "NOTIFY_SMTP_HOST" not in self.extra_env

    @property
    def local_fcm(self) -> bool:
        """Pushes go to the FCM stand-in unless the user gave FCM credentials."""
        return "NOTIFY_FCM_CREDENTIALS" not in self.extra_env

    @property
    def local_sendgrid(self) -> bool:
        """A SendGrid stand-in backs up the local mail catcher (never a real relay: mail
        failed over from a real provider must not vanish into a stand-in)."""
        return self.local_smtp and "NOTIFY_SENDGRID_API_KEY" not in self.extra_env

    @property
    def local_onesignal(self) -> bool:
        """A OneSignal stand-in backs up the FCM stand-in, on the same terms."""
        return self.local_fcm and "NOTIFY_ONESIGNAL_APP_ID" not in self.extra_env


def user_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``NOTIFY_*`` variables of ``environ``: what a user set for the system."""
    return {k: v for k, v in environ.items() if k.startswith("NOTIFY_")}


def render_envoy_config(cfg: SystemConfig, out: Path) -> Path:
    """The committed Envoy config with ports and file paths pointed at ``cfg``."""
    doc: dict[str, Any] = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    doc["admin"]["address"]["socket_address"]["port_value"] = cfg.ports.envoy_admin
    listener = doc["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = cfg.ports.http
    for flt in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
        if flt["name"] == "envoy.filters.http.grpc_json_transcoder":
            flt["typed_config"]["proto_descriptor"] = str(ROOT / "gen" / "descriptor.binpb")
    cluster = doc["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = cfg.ports.gateway
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    tls["tls_certificates"][0]["certificate_chain"]["filename"] = str(cfg.certs / "envoy.pem")
    tls["tls_certificates"][0]["private_key"]["filename"] = str(cfg.certs / "envoy-key.pem")
    tls["validation_context"]["trusted_ca"]["filename"] = str(cfg.certs / "ca.pem")
    endpoint = cfg.extra_env.get("NOTIFY_OTLP_ENDPOINT", "")
    if endpoint:
        ratio = float(cfg.extra_env.get("NOTIFY_TRACE_SAMPLE_RATIO", "0.1"))
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["tracing"], collector = envoy_tracing(endpoint, ratio)
        doc["static_resources"]["clusters"].append(collector)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def envoy_tracing(endpoint: str, ratio: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Envoy's tracing block and collector cluster for an OTLP/gRPC ``endpoint``: Envoy
    starts each trace (or continues the caller's ``traceparent``), keeps ``ratio`` of the
    ones it starts, and passes its decision on, which every service follows."""
    where = urlsplit(endpoint)
    tracing = {
        "random_sampling": {"value": ratio * 100},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otlp_collector"}, "timeout": "2s"},
                "service_name": "envoy",
            },
        },
    }
    cluster = {
        "name": "otlp_collector",
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "otlp_collector",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": where.hostname or "127.0.0.1",
                                        "port_value": where.port or 4317,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    return tracing, cluster


def service_env(cfg: SystemConfig, service: str) -> dict[str, str]:
    """The environment one service process gets."""
    p = cfg.ports
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    peers: dict[str, str] = {}
    if cfg.local_smtp:
        peers |= {"NOTIFY_SMTP_HOST": "127.0.0.1", "NOTIFY_SMTP_PORT": str(p.smtp)}
    if cfg.local_fcm:
        peers["NOTIFY_FCM_URL"] = f"http://127.0.0.1:{p.fcm}/v1/projects/{{0}}/messages:send"
        if cfg.fcm_credentials is not None:
            peers["NOTIFY_FCM_CREDENTIALS"] = str(cfg.fcm_credentials)
    if cfg.local_sendgrid:
        peers["NOTIFY_SENDGRID_URL"] = f"http://127.0.0.1:{p.sendgrid}"
        peers["NOTIFY_SENDGRID_API_KEY"] = LOCAL_SENDGRID_KEY
    if cfg.local_onesignal:
        peers["NOTIFY_ONESIGNAL_URL"] = f"http://127.0.0.1:{p.onesignal}"
        peers["NOTIFY_ONESIGNAL_APP_ID"] = LOCAL_ONESIGNAL_APP
        peers["NOTIFY_ONESIGNAL_API_KEY"] = LOCAL_ONESIGNAL_KEY
    env = {
        **inherited,
        "NOTIFY_TLS_DIR": str(cfg.certs),
        "NOTIFY_LOG_LEVEL": cfg.log_level,
        "NOTIFY_PG_DSN_BASE": cfg.pg_base,
        "NOTIFY_REDIS_URL": cfg.redis_url,
        "NOTIFY_AMQP_URL": cfg.amqp_url,
        "NOTIFY_AMQP_PREFIX": cfg.amqp_prefix,
        "NOTIFY_USER_SVC_ADDR": f"127.0.0.1:{p.user_svc}",
        "NOTIFY_TEMPLATE_SVC_ADDR": f"127.0.0.1:{p.template_svc}",
        "NOTIFY_GATEWAY_LISTEN": f"127.0.0.1:{p.gateway}",
        "NOTIFY_USER_SVC_LISTEN": f"127.0.0.1:{p.user_svc}",
        "NOTIFY_TEMPLATE_SVC_LISTEN": f"127.0.0.1:{p.template_svc}",
        "NOTIFY_EMAIL_WORKER_LISTEN": f"127.0.0.1:{p.email_worker}",
        "NOTIFY_PUSH_WORKER_LISTEN": f"127.0.0.1:{p.push_worker}",
        **{f"NOTIFY_{s.upper()}_METRICS_LISTEN": f"127.0.0.1:{p.metrics(s)}" for s in SERVICES},
        "NOTIFY_GATEWAY_DSN": f"{cfg.pg_base}/{cfg.db_prefix}gateway",
        "NOTIFY_USER_SVC_DSN": f"{cfg.pg_base}/{cfg.db_prefix}user",
        "NOTIFY_TEMPLATE_SVC_DSN": f"{cfg.pg_base}/{cfg.db_prefix}template",
        "NOTIFY_EMAIL_WORKER_DSN": f"{cfg.pg_base}/{cfg.db_prefix}email",
        "NOTIFY_PUSH_WORKER_DSN": f"{cfg.pg_base}/{cfg.db_prefix}push",
        "NOTIFY_BOOTSTRAP_API_KEY": cfg.api_key,
        "PYTHONUNBUFFERED": "1",
        # Render processes are forked and exec'd while gRPC channels are active; gRPC's
        # fork handlers can crash such a child (grpc/grpc#43055), and nothing here
        # forks to keep using gRPC in the child.
        "GRPC_ENABLE_FORK_SUPPORT": "false",
        **peers,
        **cfg.extra_env,
    }
    return env


class LocalSystem:
    """Starts and stops the processes; knows how to wait until each is ready."""

    def __init__(self, cfg: SystemConfig) -> None:
        self.cfg = cfg
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._logs: list[Any] = []
        (cfg.var / "log").mkdir(parents=True, exist_ok=True)

    def log_path(self, name: str) -> Path:
        """Where a process's output goes."""
        return self.cfg.var / "log" / f"{name}.log"

    async def spawn(self, name: str, *argv: str, env: Mapping[str, str] | None = None) -> None:
        """Start one process with its output in ``var/log/NAME.log``."""
        log = self.log_path(name).open("ab")
        self._logs.append(log)
        self.procs[name] = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            env=dict(env or os.environ),
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # runs in the child before exec
        )

    async def start_services(self, timeout: float = 60.0) -> None:
        """The five services, in dependency order, each waited on via gRPC health."""
        for group in (("user_svc", "template_svc"), ("gateway", "email_worker", "push_worker")):
            await asyncio.gather(*(self.start_service(s, timeout) for s in group))

    async def start_service(self, service: str, timeout: float = 60.0) -> None:
        """Start (or restart) one service and wait until it reports SERVING."""
        await self.spawn(service, sys.executable, "-m", service, env=service_env(self.cfg, service))
        await self.wait_healthy(service, timeout)

    async def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process and wait for it to exit (chaos tests)."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        await proc.wait()

    async def start_envoy(self, timeout: float = 30.0) -> None:
        """Envoy with the rendered config, waited on until the gateway is healthy behind it."""
        config = render_envoy_config(self.cfg, self.cfg.var / "envoy.yaml")
        envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or "envoy"
        await self.spawn(
            "envoy", envoy, "-c", str(config), "--disable-hot-restart", "--log-level", "warn"
        )
        await self.wait_envoy(timeout)

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.returncode is not None:
            tail = self.log_path(name).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    async def wait_healthy(self, service: str, timeout: float) -> None:
        """Poll ``grpc.health.v1.Health/Check`` (as the operator) until SERVING."""
        port = getattr(self.cfg.ports, service)
        tls = TlsSettings(
            self.cfg.certs / "ca.pem",
            self.cfg.certs / "operator.pem",
            self.cfg.certs / "operator-key.pem",
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials(tls)) as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            async def status() -> int | None:
                self._check_alive(service)
                try:
                    reply = await stub.Check(
                        health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True
                    )
                except grpc.aio.AioRpcError:
                    return None
                return int(reply.status)

            serving = health_pb2.HealthCheckResponse.SERVING
            await poll(status, lambda s: s == serving, timeout=timeout, what=service)

    async def wait_envoy(self, timeout: float) -> None:
        """Poll Envoy's admin API until it is live (its listener accepts requests) and
        the gateway cluster has a host that passed its health check.

        Both, and that cluster by name: with tracing on, the collector's cluster (no
        health check) has a healthy host at once, before the listener is up, and the
        benchmark's first request was refused."""
        admin = f"http://127.0.0.1:{self.cfg.ports.envoy_admin}"

        async def healthy_host() -> bool:
            self._check_alive("envoy")
            with contextlib.suppress(OSError, ValueError):
                if (await asyncio.to_thread(_get, f"{admin}/ready")).strip() != "LIVE":
                    return False
                body = await asyncio.to_thread(_get, f"{admin}/clusters?format=json")
                for cluster in json.loads(body).get("cluster_statuses", []):
                    if cluster.get("name") != "gateway":
                        continue
                    for host in cluster.get("host_statuses", []):
                        if "failed_active_health_check" not in host.get("health_status", {}):
                            return True
            return False

        await poll(healthy_host, bool, timeout=timeout, what="envoy")

    async def wait_port(self, name: str, port: int, timeout: float = 20.0) -> None:
        """A peer is ready when it accepts TCP connections (and has not died)."""

        async def accepting() -> bool:
            self._check_alive(name)
            return reachable(port)

        await poll(accepting, bool, timeout=timeout, what=name)

    async def stop(self) -> None:
        """SIGTERM everything (reverse start order), SIGKILL what ignores it."""
        for name, proc in reversed(list(self.procs.items())):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            del name
        self.procs.clear()
        for log in self._logs:
            log.close()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launching process dies (Linux).

    A test run or ``make run`` killed outright (a CI timeout, SIGKILL) must not leave
    five services and Envoy running, holding ports, CPU and database connections.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (our own admin port)
        body: bytes = resp.read()
        return body.decode()
