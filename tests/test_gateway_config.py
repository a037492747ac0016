"""The gateway's limit settings, read from the environment: defaults, off, refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import DEFAULT_AUTH_FAILURE_RATE, DEFAULT_KEY_RATE, Config
from gateway.limits import Rate, Window
from notify_kit.settings import SettingsError


def test_limit_settings(certs_dir: Path) -> None:
    tls = {"NOTIFY_TLS_DIR": str(certs_dir)}
    default = Config.from_env(tls)
    assert (default.key_rate, default.auth_failure_rate) == (
        DEFAULT_KEY_RATE,
        DEFAULT_AUTH_FAILURE_RATE,
    )
    assert default.recipient_limits == {} and default.auth_cache_ttl == 2.0
    tuned = Config.from_env(
        {
            **tls,
            "NOTIFY_KEY_RATE": "0",  # keys without their own limit: none
            "NOTIFY_AUTH_FAILURE_RATE": "0.5",
            "NOTIFY_AUTH_FAILURE_BURST": "3",
            "NOTIFY_RECIPIENT_LIMITS": "email=100/3600, push=10/60",
        }
    )
    assert tuned.key_rate is None
    assert tuned.auth_failure_rate == Rate(0.5, 3)
    assert tuned.recipient_limits == {"email": Window(100, 3600.0), "push": Window(10, 60.0)}
    for name, value, message in (
        ("NOTIFY_AUTH_FAILURE_RATE", "0", "must be more than 0"),
        ("NOTIFY_KEY_BURST", "0", "NOTIFY_KEY_BURST >= 1"),
        ("NOTIFY_RECIPIENT_LIMITS", "sms=1/60", "email=100/3600"),
        ("NOTIFY_RECIPIENT_LIMITS", "email=ten/60", "email=100/3600"),
        ("NOTIFY_RECIPIENT_LIMITS", "push=0/60", "email=100/3600"),
    ):
        with pytest.raises(SettingsError, match=message):
            Config.from_env({**tls, name: value})
