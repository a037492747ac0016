"""The local tooling: backing-server checks, certificates, the Envoy config rewrite."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import yaml
from cryptography import x509

from scripts import backing, gen_certs
from scripts.system import ROOT, Ports, SystemConfig, poll, render_envoy_config, service_env


def test_running_backing_servers_need_nothing() -> None:
    assert backing.ensure_backing() == []  # this machine runs all three


def test_certificates_name_their_service(tmp_path: Path) -> None:
    gen_certs.generate(tmp_path, ("user_svc",))
    cert = x509.load_pem_x509_certificate((tmp_path / "user_svc.pem").read_bytes())
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert cn == "user_svc"
    assert {"localhost", "user_svc", "user-svc"} <= set(sans.get_values_for_type(x509.DNSName))
    assert oct((tmp_path / "user_svc-key.pem").stat().st_mode & 0o777) == "0o600"


def test_envoy_config_rewrite_changes_only_addresses_and_paths(tmp_path: Path) -> None:
    ports = Ports(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
    cfg = SystemConfig(var=tmp_path, certs=tmp_path / "c", ports=ports)
    out = yaml.safe_load(render_envoy_config(cfg, tmp_path / "e.yaml").read_text())
    listener = out["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == ports.http
    assert out["admin"]["address"]["socket_address"]["port_value"] == ports.envoy_admin
    cluster = out["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == ports.gateway
    assert "/c/envoy.pem" in str(cluster["transport_socket"])


def test_every_service_gets_its_own_database_and_the_shared_peers(tmp_path: Path) -> None:
    cfg = SystemConfig(var=tmp_path, certs=tmp_path, db_prefix="notify_x_")
    env = service_env(cfg, "gateway")
    dsns = {v for k, v in env.items() if k.endswith("_DSN")}
    assert len(dsns) == 5 and all("/notify_x_" in d for d in dsns)
    assert env["NOTIFY_USER_SVC_ADDR"].endswith(":50052")


def _gone(pid: int) -> bool:
    """No such process, or only its zombie left for a reaper."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state


async def test_processes_die_with_the_launcher_that_started_them(tmp_path: Path) -> None:
    launcher = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from scripts.system import LocalSystem, SystemConfig\n"
        "async def main():\n"
        f"    system = LocalSystem(SystemConfig(var=Path({str(tmp_path)!r}), certs=Path('.')))\n"
        "    await system.spawn('sleeper', sys.executable, '-c', 'import time; time.sleep(120)')\n"
        "    print(system.procs['sleeper'].pid, flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", launcher, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    child = int(await asyncio.wait_for(proc.stdout.readline(), 20))
    assert not _gone(child)
    proc.kill()  # SIGKILL: the launcher cleans nothing up itself
    await proc.wait()

    async def child_gone() -> bool:
        return _gone(child)

    await poll(child_gone, bool, timeout=10, what="the orphaned child")
