"""Gateway configuration, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from buf.validate import validate_pb2
from notify.v1 import user_service_pb2

from gateway.limits import Rate, Window
from notify_kit.amqp import EMAIL, PUSH, Topology
from notify_kit.settings import (
    CommonSettings,
    SettingsError,
    env_float,
    env_int,
    env_optional,
    env_str,
    postgres_dsn,
)

DEFAULT_KEY_RATE = Rate(1000.0, 2000)
DEFAULT_AUTH_FAILURE_RATE = Rate(1.0, 20)


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the gateway needs; see docs/ARCHITECTURE.md for the variables."""

    common: CommonSettings
    dsn: str
    redis_url: str
    amqp_url: str
    topology: Topology
    user_svc_addr: str
    template_svc_addr: str
    # A key created (or kept) at start-up with every scope: how a fresh install gets its
    # first admin key. Empty: none.
    bootstrap_api_key: str = ""
    idempotency_ttl: int = 24 * 3600
    # The accept path's budget. SendNotification gives each phase its own timeout (they
    # add up; none comes out of one shared deadline). Worst case with the defaults: API
    # key 4 s (KeyStore: acquire 2 + query 2) + idempotency claim 15 s (up to 3 Redis
    # commands, each up to 5 x the 1 s Redis timeout) + profile || template 5 s
    # (upstream_timeout) + the record 10 s (its batch waits for the one out, then its own
    # CreateNotificationRecords: upstream_timeout each) + confirms 5 s (publish_timeout)
    # + idempotency record 5 s (1 Redis command) = 44 s, 46 s with
    # Envoy's 2 s connect. Envoy's route timeout (envoy/envoy.yaml, 50 s) must stay above
    # it, or a client gets a 504 for a notification the gateway went on to accept: raise
    # it with either value here. tests/test_reconnect.py recomputes the sum and fails first.
    upstream_timeout: float = 5.0
    publish_timeout: float = 5.0
    # How long a gateway trusts what it read about a key: a revocation, rotation or expiry
    # is refused by every gateway within this.
    auth_cache_ttl: float = 2.0
    template_cache_ttl: float = 10.0
    # The reconciler (gateway/reconciler.py): deliveries in flight and untouched for
    # ``reconcile_after`` seconds are resolved, checked every ``reconcile_interval``.
    reconcile_after: float = 900.0
    reconcile_interval: float = 60.0
    # The most records one CreateNotificationRecords call carries (gateway/records.py);
    # 1 turns grouping off.
    record_batch_max: int = 64
    # Rate limits (gateway/limits.py). A key without its own: NOTIFY_KEY_RATE requests/s
    # in bursts of NOTIFY_KEY_BURST (rate 0: none). Failed key lookups per client
    # address: NOTIFY_AUTH_FAILURE_RATE / _BURST. Per recipient and channel:
    # NOTIFY_RECIPIENT_LIMITS, "email=100/3600,push=10/3600" (at most N in any S seconds;
    # empty: none).
    key_rate: Rate | None = DEFAULT_KEY_RATE
    auth_failure_rate: Rate = DEFAULT_AUTH_FAILURE_RATE
    recipient_limits: Mapping[str, Window] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read ``NOTIFY_*`` variables; fail fast on malformed ones."""
        record_batch_max = env_int("NOTIFY_RECORD_BATCH_MAX", 64, env)
        most = _records_per_call()
        if not 1 <= record_batch_max <= most:
            raise SettingsError(f"environment variable NOTIFY_RECORD_BATCH_MAX must be 1..{most}")
        return cls(
            common=CommonSettings.from_env("gateway", 50051, env),
            dsn=env_str("NOTIFY_GATEWAY_DSN", postgres_dsn("notify_gateway", env), env),
            redis_url=env_str("NOTIFY_REDIS_URL", "redis://127.0.0.1:6379/0", env),
            amqp_url=env_str("NOTIFY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/", env),
            topology=Topology.from_env(env),
            user_svc_addr=env_str("NOTIFY_USER_SVC_ADDR", "127.0.0.1:50052", env),
            template_svc_addr=env_str("NOTIFY_TEMPLATE_SVC_ADDR", "127.0.0.1:50053", env),
            bootstrap_api_key=env_optional("NOTIFY_BOOTSTRAP_API_KEY", env),
            idempotency_ttl=env_int("NOTIFY_IDEMPOTENCY_TTL", 24 * 3600, env),
            upstream_timeout=env_float("NOTIFY_UPSTREAM_TIMEOUT", 5.0, env),
            publish_timeout=env_float("NOTIFY_PUBLISH_TIMEOUT", 5.0, env),
            reconcile_after=env_float("NOTIFY_RECONCILE_AFTER", 900.0, env),
            reconcile_interval=env_float("NOTIFY_RECONCILE_INTERVAL", 60.0, env),
            record_batch_max=record_batch_max,
            auth_cache_ttl=env_float("NOTIFY_AUTH_CACHE_TTL", 2.0, env),
            key_rate=_rate("NOTIFY_KEY", Rate(1000.0, 2000), env),
            auth_failure_rate=_failure_rate(env),
            recipient_limits=_recipient_limits(env_optional("NOTIFY_RECIPIENT_LIMITS", env)),
        )


def _rate(prefix: str, default: Rate, env: Mapping[str, str] | None) -> Rate | None:
    """``PREFIX_RATE`` per second in bursts of ``PREFIX_BURST``; a rate of 0 is no limit."""
    per_second = env_float(f"{prefix}_RATE", default.per_second, env)
    burst = env_int(f"{prefix}_BURST", default.burst, env)
    if per_second < 0 or burst < 1:
        raise SettingsError(f"{prefix}_RATE must be >= 0 and {prefix}_BURST >= 1")
    return Rate(per_second, burst) if per_second > 0 else None


def _failure_rate(env: Mapping[str, str] | None) -> Rate:
    """Failed key lookups per client address: always limited (a rate of 0 is refused,
    not read as "no limit": that would let guessing hammer the database)."""
    rate = _rate("NOTIFY_AUTH_FAILURE", DEFAULT_AUTH_FAILURE_RATE, env)
    if rate is None:
        raise SettingsError("NOTIFY_AUTH_FAILURE_RATE must be more than 0")
    return rate


def _recipient_limits(spec: str) -> dict[str, Window]:
    """``"email=100/3600,push=10/3600"``: at most N per channel in any S seconds."""
    limits: dict[str, Window] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            channel, _, rule = part.partition("=")
            count, _, seconds = rule.partition("/")
            window = Window(int(count), float(seconds))
        except ValueError:
            window = Window(0, 0.0)
        if channel not in (EMAIL.key, PUSH.key) or window.limit < 1 or window.seconds <= 0:
            raise SettingsError(
                "NOTIFY_RECIPIENT_LIMITS must look like email=100/3600,push=10/3600"
            )
        limits[channel] = window
    return limits


def _records_per_call() -> int:
    """The contract's bound on the records of one CreateNotificationRecords call."""
    field = user_service_pb2.CreateNotificationRecordsRequest.DESCRIPTOR.fields_by_name["records"]
    return int(field.GetOptions().Extensions[validate_pb2.field].repeated.max_items)
