"""Settings read from the environment once, in ``__main__``, failing fast.

Every service composes its frozen config dataclass from these helpers, so a missing or
malformed variable stops the process at start-up with the variable's name in the
message instead of failing on the first request.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# NOTIFY_TRACING values (notify_kit.telemetry).
TRACING_MODES = ("off", "console", "otlp")
# Where each process serves its Prometheus metrics unless NOTIFY_<SERVICE>_METRICS_LISTEN
# says otherwise (empty: not served).
METRICS_PORTS = {
    "gateway": 9461,
    "user_svc": 9462,
    "template_svc": 9463,
    "email_worker": 9464,
    "push_worker": 9465,
}


class SettingsError(RuntimeError):
    """A required environment variable is missing or malformed."""


def env_str(name: str, default: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Return ``name`` from the environment, or ``default``; raise when neither exists."""
    source = os.environ if env is None else env
    value = source.get(name, default)
    if value is None or value == "":
        raise SettingsError(f"environment variable {name} is required")
    return value


def env_optional(name: str, env: Mapping[str, str] | None = None, default: str = "") -> str:
    """Return ``name`` from the environment, or ``default`` when unset; set but empty
    stays empty (a way to turn off what the default turns on)."""
    source = os.environ if env is None else env
    return source.get(name, default)


def env_int(name: str, default: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """Return ``name`` as an int; raise with the variable's name when it is not one."""
    raw = env_str(name, None if default is None else str(default), env)
    try:
        return int(raw)
    except ValueError as exc:
        raise SettingsError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def env_float(
    name: str, default: float | None = None, env: Mapping[str, str] | None = None
) -> float:
    """Return ``name`` as a float; raise with the variable's name when it is not one."""
    raw = env_str(name, None if default is None else str(default), env)
    try:
        return float(raw)
    except ValueError as exc:
        raise SettingsError(f"environment variable {name} must be a number, got {raw!r}") from exc


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """This service's mesh credentials: its certificate and key, the CA that signs the
    mesh, its service key, and the digests of every service key (to check callers')."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    service_key: str = field(default="", repr=False)
    service_key_digests: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def for_service(cls, service: str, env: Mapping[str, str] | None = None) -> TlsSettings:
        """``NOTIFY_TLS_DIR`` (default ``var/certs``) holds ``ca.pem``, ``NAME[-key].pem``,
        ``NAME.service-key`` and ``service-keys.json`` (``scripts/gen_certs.py``)."""
        directory = Path(env_str("NOTIFY_TLS_DIR", "var/certs", env))
        own_key = directory / f"{service}.service-key"
        digests = directory / "service-keys.json"
        paths = (
            Path(env_str("NOTIFY_TLS_CA", str(directory / "ca.pem"), env)),
            Path(env_str("NOTIFY_TLS_CERT", str(directory / f"{service}.pem"), env)),
            Path(env_str("NOTIFY_TLS_KEY", str(directory / f"{service}-key.pem"), env)),
        )
        for path in (*paths, own_key, digests):
            if not path.is_file():
                raise SettingsError(f"TLS file {path} is missing; run `make certs`")
        try:
            known = json.loads(digests.read_text())
        except ValueError as exc:
            raise SettingsError(f"{digests} is not JSON; run `make certs`") from exc
        return cls(
            *paths,
            service_key=own_key.read_text().strip(),
            service_key_digests={str(k): str(v) for k, v in known.items()},
        )


@dataclass(frozen=True, slots=True)
class CommonSettings:
    """What every service needs: identity, listen address, TLS, logging."""

    service: str
    listen: str
    tls: TlsSettings
    log_level: str
    shutdown_grace: float
    # NOTIFY_TRACING: where spans go: off (no instrumentation at all), console, or otlp
    # (the default when NOTIFY_OTLP_ENDPOINT names a collector).
    tracing: str = "off"
    # NOTIFY_OTLP_ENDPOINT: the OTLP/gRPC collector, e.g. http://collector:4317.
    otlp_endpoint: str = ""
    # NOTIFY_TRACE_SAMPLE_RATIO: the share of traces started here that are kept (a trace
    # continued from a caller keeps the caller's decision).
    trace_sample_ratio: float = 0.1
    # NOTIFY_<SERVICE>_METRICS_LISTEN: host:port of /metrics; empty: none served.
    metrics_listen: str = ""
    # NOTIFY_HEALTH_INTERVAL: seconds between dependency probes (notify_kit.health).
    health_interval: float = 2.0

    @classmethod
    def from_env(
        cls, service: str, default_port: int, env: Mapping[str, str] | None = None
    ) -> CommonSettings:
        """Read ``NOTIFY_<SERVICE>_LISTEN``, TLS paths, ``NOTIFY_LOG_LEVEL``, grace, tracing,
        ``NOTIFY_<SERVICE>_METRICS_LISTEN``."""
        key = service.upper()
        endpoint = env_optional("NOTIFY_OTLP_ENDPOINT", env)
        tracing = env_str("NOTIFY_TRACING", "otlp" if endpoint else "off", env)
        if tracing not in TRACING_MODES:
            raise SettingsError(f"NOTIFY_TRACING must be one of {', '.join(TRACING_MODES)}")
        if tracing == "otlp" and not endpoint:
            raise SettingsError("NOTIFY_TRACING=otlp needs NOTIFY_OTLP_ENDPOINT")
        ratio = env_float("NOTIFY_TRACE_SAMPLE_RATIO", 0.1, env)
        if not 0.0 <= ratio <= 1.0:
            raise SettingsError("NOTIFY_TRACE_SAMPLE_RATIO must be between 0 and 1")
        return cls(
            service=service,
            listen=env_str(f"NOTIFY_{key}_LISTEN", f"127.0.0.1:{default_port}", env),
            tls=TlsSettings.for_service(service, env),
            log_level=env_str("NOTIFY_LOG_LEVEL", "INFO", env),
            shutdown_grace=env_float("NOTIFY_SHUTDOWN_GRACE", 5.0, env),
            tracing=tracing,
            otlp_endpoint=endpoint,
            trace_sample_ratio=ratio,
            # Set but empty: not served.
            metrics_listen=env_optional(
                f"NOTIFY_{key}_METRICS_LISTEN",
                env,
                f"127.0.0.1:{METRICS_PORTS[service]}" if service in METRICS_PORTS else "",
            ),
            health_interval=env_float("NOTIFY_HEALTH_INTERVAL", 2.0, env),
        )


def postgres_dsn(database: str, env: Mapping[str, str] | None = None) -> str:
    """DSN for one service database: ``NOTIFY_PG_DSN_BASE`` plus ``/database``."""
    base = env_str("NOTIFY_PG_DSN_BASE", "postgresql://postgres@127.0.0.1:5432", env)
    return f"{base.rstrip('/')}/{database}"
