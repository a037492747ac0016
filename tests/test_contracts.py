"""The contracts: generated code is fresh, buf lint passes, every external RPC is routed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.api import annotations_pb2
from notify.v1 import (
    dead_letter_service_pb2,
    notification_service_pb2,
    template_service_pb2,
    user_service_pb2,
)

from gateway.auth import METHOD_SCOPES
from scripts.system import ROOT

BIN = Path(sys.executable).parent


def test_generated_code_is_not_stale() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_buf_lint_passes() -> None:
    out = subprocess.run(
        [str(BIN / "buf"), "lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_http_bound_rpc_is_exposed_with_a_scope_and_nothing_else() -> None:
    bound = set()
    for module in (
        notification_service_pb2,
        user_service_pb2,
        template_service_pb2,
        dead_letter_service_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.GetOptions().HasExtension(annotations_pb2.http):
                    bound.add(f"/{service.full_name}/{method.name}")
    assert bound == set(METHOD_SCOPES)
