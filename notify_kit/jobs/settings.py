"""What every worker is configured with, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from notify_kit.amqp import Topology
from notify_kit.breaker import BreakerSettings
from notify_kit.settings import SettingsError, env_float, env_int, env_optional, env_str
from notify_kit.templating.renderer import RenderSettings


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """How many jobs one process holds at once, and how long it may take to stop.

    ``unexpected_error_backoff`` is the first pause of consumption after an outage or a
    bug; it doubles up to ``max_backoff`` while they repeat.
    """

    prefetch: int = 32
    unexpected_error_backoff: float = 0.5
    max_backoff: float = 30.0
    stop_timeout: float = 10.0
    # The lease on an attempt being sent, renewed every third of it while the send runs:
    # a worker killed mid-send loses its claims within one lease.
    claim_lease: float = 15.0
    claim_poll: float = 0.5
    # SENDING is reported only for a send still running after this many seconds: a quick
    # one goes from QUEUED straight to its outcome, one status report instead of two
    # (0: always report SENDING first). NOTIFY_SENDING_REPORT_AFTER.
    sending_report_after: float = 0.25


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The broker, the topology, the upstream services and the runner's limits."""

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    topology: Topology = field(default_factory=Topology)
    user_svc_addr: str = "127.0.0.1:50052"
    template_svc_addr: str = "127.0.0.1:50053"
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    rpc_timeout: float = 5.0
    # NOTIFY_RENDER_*: the worker renders its jobs' template versions itself, under the
    # limits TemplateService uses; one render process by default (NOTIFY_RENDER_PROCESSES).
    render: RenderSettings = field(default_factory=lambda: RenderSettings(processes=1))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """``NOTIFY_AMQP_URL``/``_PREFIX``, the upstream addresses, ``NOTIFY_PREFETCH``,
        ``NOTIFY_RPC_TIMEOUT``."""
        return cls(
            amqp_url=env_str("NOTIFY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/", env),
            topology=Topology.from_env(env),
            user_svc_addr=env_str("NOTIFY_USER_SVC_ADDR", "127.0.0.1:50052", env),
            template_svc_addr=env_str("NOTIFY_TEMPLATE_SVC_ADDR", "127.0.0.1:50053", env),
            runner=RunnerSettings(
                prefetch=env_int("NOTIFY_PREFETCH", 32, env),
                sending_report_after=env_float("NOTIFY_SENDING_REPORT_AFTER", 0.25, env),
            ),
            rpc_timeout=env_float("NOTIFY_RPC_TIMEOUT", 5.0, env),
            render=RenderSettings.from_env(env, processes=1),
        )


def breaker_from_env(env: Mapping[str, str] | None = None) -> BreakerSettings:
    """``NOTIFY_BREAKER_THRESHOLD``/``_WINDOW``/``_OPEN_SECONDS``/``_PROBES``."""
    default = BreakerSettings()
    return BreakerSettings(
        failure_threshold=env_int("NOTIFY_BREAKER_THRESHOLD", default.failure_threshold, env),
        window=env_float("NOTIFY_BREAKER_WINDOW", default.window, env),
        open_seconds=env_float("NOTIFY_BREAKER_OPEN_SECONDS", default.open_seconds, env),
        probes=env_int("NOTIFY_BREAKER_PROBES", default.probes, env),
    )


def provider_order(
    variable: str,
    known: tuple[str, ...],
    configured: set[str],
    env: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """The failover order from ``variable`` (comma-separated; default: ``known``).

    An unknown name is an error; a known provider without its settings is left out,
    so the default order names every provider and each is used once configured.
    """
    raw = env_optional(variable, env) or ",".join(known)
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SettingsError(f"{variable}: unknown provider(s) {unknown}; known: {list(known)}")
    chosen = tuple(n for n in dict.fromkeys(names) if n in configured)
    if not chosen:
        raise SettingsError(f"{variable}: none of {list(names)} is configured")
    return chosen
