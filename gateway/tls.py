"""Client-side TLS for calls to a gateway (the CLI and batch, the workbench, a gateway forwarding
tickets): one place that turns a CA file and an optional client certificate into credentials.
Top level of the package so that every layer may use it (tests/test_layering.py)."""

from __future__ import annotations

from pathlib import Path

import grpc


def channel_credentials(tls_ca: Path | str, client_cert: Path | str | None = None,
                        client_key: Path | str | None = None) -> grpc.ChannelCredentials:
    """TLS trusting `tls_ca`; with `client_cert` and `client_key` also mutual TLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes(),
        private_key=Path(client_key).read_bytes() if client_key else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
    )
