"""The contracts: generated code is fresh, buf lint passes, the contracts are compatible with
the released ones (``proto/released.binpb``), every external RPC is routed."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from google.api import annotations_pb2
from notify.v1 import access_pb2

from notify_kit import acl
from scripts import access_matrix
from scripts.gen_certs import IDENTITIES
from scripts.system import ROOT

BIN = Path(sys.executable).parent
# The descriptor image of the last released contracts (``make contracts-release``).
RELEASED = ROOT / "proto" / "released.binpb"


def _buf_breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    """``buf breaking`` of ``workspace``'s contracts against the released image, as make runs it."""
    return subprocess.run(
        [
            str(BIN / "buf"),
            "breaking",
            "proto",
            "--against",
            str(RELEASED),
            "--error-format",
            "json",
        ],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


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
    for module in acl.SERVICE_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.GetOptions().HasExtension(annotations_pb2.http):
                    bound.add(f"/{service.full_name}/{method.name}")
    assert bound == {method.path for method in acl.public_methods()}


def test_every_service_and_rpc_declares_who_may_call_it() -> None:
    """The matrix is read from every generated module that has a service, and each RPC
    names exactly one of a scope and its callers (``declarations`` refuses otherwise)."""
    with_services = set()
    for path in sorted((ROOT / "gen" / "notify" / "v1").glob("*_pb2.py")):
        module = importlib.import_module(f"notify.v1.{path.stem}")
        if module.DESCRIPTOR.services_by_name:
            with_services.add(module)
    assert with_services == set(acl.SERVICE_MODULES)
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in with_services
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(acl.declarations()) == methods


def test_every_identity_of_the_contracts_gets_a_certificate() -> None:
    names = {
        value.GetOptions().Extensions[access_pb2.common_name]
        for value in access_pb2.Identity.DESCRIPTOR.values
        if value.number
    }
    assert names == set(IDENTITIES)


def test_make_buf_checks_against_the_committed_baseline() -> None:
    plan = subprocess.run(
        ["make", "-n", "buf"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert "breaking proto --against proto/released.binpb" in plan.stdout, plan.stdout
    assert ".git#" not in plan.stdout  # not the same checkout again
    assert RELEASED.is_file()


def test_contracts_are_compatible_with_the_released_ones() -> None:
    out = _buf_breaking(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def _edit(path: Path, pattern: str, replacement: str) -> None:
    text, count = re.subn(pattern, replacement, path.read_text(), count=1, flags=re.MULTILINE)
    assert count == 1, f"{pattern!r} not found in {path.name}: update this test"
    path.write_text(text)


def test_breaking_check_fails_on_a_deleted_field_and_a_renamed_rpc(tmp_path: Path) -> None:
    """The check has teeth: a copy of the contracts with a field removed and an RPC renamed
    fails against the baseline, naming the rules it broke."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copytree(ROOT / "third_party", tmp_path / "third_party")
    v1 = tmp_path / "proto" / "notify" / "v1"
    _edit(v1 / "common.proto", r"^\s*string correlation_id = 7\b[^;]*;\n", "")
    _edit(v1 / "user_service.proto", r"^(\s*)rpc GetUser\(", r"\1rpc FetchUser(")

    out = _buf_breaking(tmp_path)

    assert out.returncode != 0, out.stdout + out.stderr
    rules = {json.loads(line)["type"] for line in out.stdout.splitlines() if line.strip()}
    assert {"FIELD_NO_DELETE", "RPC_NO_DELETE"} <= rules, out.stdout + out.stderr


def test_the_security_document_shows_the_matrix_the_protos_declare() -> None:
    text = access_matrix.DOCUMENT.read_text()
    assert access_matrix.document_with_table(text) == text, (
        "docs/SECURITY.md is stale: run python -m scripts.access_matrix --write"
    )
