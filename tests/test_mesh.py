"""The mesh's security and operability: mTLS, access matrix, health, reflection."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from notify.v1 import user_service_pb2, user_service_pb2_grpc

from notify_kit.errors import error_info
from notify_kit.settings import TlsSettings
from notify_kit.tls import channel_credentials
from scripts import gen_certs
from scripts.system import SERVICES
from tests.e2e_support import E2E

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def _tls(certs: Path, identity: str) -> TlsSettings:
    return TlsSettings(certs / "ca.pem", certs / f"{identity}.pem", certs / f"{identity}-key.pem")


async def _check(target: str, creds: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(target, creds) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return int(reply.status)


@pytest.mark.parametrize("service", SERVICES)
async def test_every_service_is_healthy_over_mtls(e2e: E2E, certs_dir: Path, service: str) -> None:
    port = getattr(e2e.cfg.ports, service)
    creds = channel_credentials(_tls(certs_dir, "operator"))
    assert await _check(f"127.0.0.1:{port}", creds) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", SERVICES)
async def test_every_service_lists_services_through_reflection(
    e2e: E2E, certs_dir: Path, service: str
) -> None:
    port = getattr(e2e.cfg.ports, service)
    out = await asyncio.to_thread(
        subprocess.run,
        [
            GRPCURL,
            "-cacert",
            str(certs_dir / "ca.pem"),
            "-cert",
            str(certs_dir / "operator.pem"),
            "-key",
            str(certs_dir / "operator-key.pem"),
            f"localhost:{port}",
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "grpc.health.v1.Health" in out.stdout.split()


async def test_grpcurl_lists_services_for_operators_but_not_through_envoy(
    e2e: E2E, certs_dir: Path
) -> None:
    """Reflection is the operator's, on the services' mTLS ports; Envoy does not serve it."""
    public = await asyncio.to_thread(
        subprocess.run,
        [GRPCURL, "-plaintext", f"localhost:{e2e.cfg.ports.http}", "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert public.returncode != 0
    operator = await asyncio.to_thread(
        subprocess.run,
        [
            GRPCURL,
            *("-cacert", str(certs_dir / "ca.pem")),
            *("-cert", str(certs_dir / "operator.pem")),
            *("-key", str(certs_dir / "operator-key.pem")),
            f"localhost:{e2e.cfg.ports.gateway}",
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert operator.returncode == 0, operator.stderr
    assert "notify.v1.NotificationService" in operator.stdout.split()


@pytest.mark.parametrize("service", ["gateway", "user_svc", "template_svc"])
async def test_client_without_certificate_is_refused(
    e2e: E2E, certs_dir: Path, service: str
) -> None:
    port = getattr(e2e.cfg.ports, service)
    creds = grpc.ssl_channel_credentials(root_certificates=(certs_dir / "ca.pem").read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _check(f"127.0.0.1:{port}", creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["gateway", "user_svc", "template_svc"])
async def test_certificate_from_another_ca_is_refused(
    e2e: E2E, certs_dir: Path, tmp_path: Path, service: str
) -> None:
    gen_certs.generate(tmp_path, ("gateway",))  # same name, wrong CA
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs_dir / "ca.pem").read_bytes(),
        private_key=(tmp_path / "gateway-key.pem").read_bytes(),
        certificate_chain=(tmp_path / "gateway.pem").read_bytes(),
    )
    port = getattr(e2e.cfg.ports, service)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _check(f"127.0.0.1:{port}", creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("caller", "service"),
    [
        ("envoy", "user_svc"),  # the edge may not bypass the gateway's API-key check
        ("email_worker", "user_svc"),  # workers may report status, not create users
        ("operator", "user_svc"),
        ("gateway", "gateway"),
    ],
)
async def test_access_matrix_denies_before_the_handler(
    e2e: E2E, certs_dir: Path, caller: str, service: str
) -> None:
    port = getattr(e2e.cfg.ports, service)
    creds = channel_credentials(_tls(certs_dir, caller))
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateUser(
                user_service_pb2.CreateUserRequest(
                    user=user_service_pb2.User(email="mallory@example.com")
                ),
                timeout=5,
            )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(err.value.trailing_metadata()).reason == "ACCESS_DENIED"
