"""mTLS credentials for servers (client certificates required) and clients."""

from __future__ import annotations

import grpc

from notify_kit.settings import TlsSettings


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """Server credentials that refuse any client without a certificate from our CA."""
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=tls.ca_file.read_bytes(),
        require_client_auth=True,
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    """Client credentials presenting this service's certificate and trusting our CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_file.read_bytes(),
        private_key=tls.key_file.read_bytes(),
        certificate_chain=tls.cert_file.read_bytes(),
    )
