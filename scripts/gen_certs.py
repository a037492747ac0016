"""Make the dev CA and one certificate per mesh identity (``make certs``).

Every certificate names its service in the subject common name (the identity the
access matrix checks) and carries ``localhost``/``127.0.0.1`` plus the service name as
subject alternative names, so the same files work for local processes and compose.
Keys are EC P-256; the CA is only for development and tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import json
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_KEY_PREFIX = "nsk_"
SERVICE_KEYS_FILE = "service-keys.json"
IDENTITIES = (
    "gateway",
    "user_svc",
    "template_svc",
    "email_worker",
    "push_worker",
    "envoy",
    "operator",
)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "notify dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_ca(
    directory: Path, name: str = "notify dev CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create ``ca.pem``/``ca-key.pem`` in ``directory`` and return them."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, directory / "ca-key.pem")
    return cert, key


def make_leaf(
    directory: Path, identity: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    """Create ``IDENTITY.pem``/``IDENTITY-key.pem`` signed by the CA (server and client use)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names = dict.fromkeys(("localhost", identity, identity.replace("_", "-")))
    sans: list[x509.GeneralName] = [
        *(x509.DNSName(n) for n in names),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / f"{identity}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, directory / f"{identity}-key.pem")


def generate(directory: Path, identities: tuple[str, ...] = IDENTITIES) -> None:
    """A fresh CA, a certificate and a service key for every identity in ``directory``."""
    ca_cert, ca_key = make_ca(directory)
    for identity in identities:
        make_leaf(directory, identity, ca_cert, ca_key)
    ensure_service_keys(directory, identities)


def ensure_service_keys(directory: Path, identities: tuple[str, ...] = IDENTITIES) -> None:
    """Give every identity without one a service key (``IDENTITY.service-key``, 0600, 256
    random bits) and write ``service-keys.json``: each identity's key as SHA-256, which
    is all a server needs to check one (it never holds another's key)."""
    digests: dict[str, str] = {}
    for identity in identities:
        path = directory / f"{identity}.service-key"
        if not path.is_file():
            path.touch(mode=0o600)
            path.write_text(SERVICE_KEY_PREFIX + secrets.token_urlsafe(32))
        digests[identity] = hashlib.sha256(path.read_text().strip().encode()).hexdigest()
    (directory / SERVICE_KEYS_FILE).write_text(json.dumps(digests, indent=2, sort_keys=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("var/certs"))
    parser.add_argument("--force", action="store_true", help="replace existing certificates")
    args = parser.parse_args()
    if (args.dir / "ca.pem").exists() and not args.force:
        ensure_service_keys(args.dir)  # a directory from before service keys gets them
        print(f"certificates already in {args.dir} (use --force to replace)")
        return 0
    generate(args.dir)
    print(f"wrote a dev CA and {len(IDENTITIES)} certificates to {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
