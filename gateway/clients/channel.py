"""What every client of the gateway shares: the default address, message limits, a channel
(plaintext, TLS, mutual TLS, with or without an API key) and the response -> dict conversion
(JSON-ready, field names as in the proto)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from gateway.tls import channel_credentials

DEFAULT_SERVER = "localhost:50051"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
TOKEN_ENV = "ASR_API_KEY"  # the key from the environment, so it is not on the command line


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach a gateway started with --tls-cert / --tls-client-ca / --api-keys."""

    tls_ca: Path | None = None  # CA that signed the gateway's certificate: TLS
    client_cert: Path | None = None  # with client_key: mutual TLS
    client_key: Path | None = None
    token: str = ""  # API key, sent as "authorization: Bearer <key>"

    def __post_init__(self) -> None:
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("--tls-client-cert and --tls-client-key go together")
        if self.client_cert and not self.tls_ca:
            raise ValueError("a client certificate needs --tls-ca (mutual TLS)")

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls_ca:
            return None
        return channel_credentials(self.tls_ca, self.client_cert, self.client_key)


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
    grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor,
):
    """Adds the API key to every call (works over plaintext too, unlike call credentials)."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details):
        metadata = tuple(details.metadata or ()) + self._metadata
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)
        self.metadata = metadata


def open_channel(server: str = DEFAULT_SERVER, security: ChannelSecurity | None = None) -> grpc.Channel:
    security = security or ChannelSecurity()
    credentials = security.credentials()
    if credentials is not None:
        channel = grpc.secure_channel(server, credentials, options=list(CHANNEL_OPTIONS))
    else:
        channel = grpc.insecure_channel(server, options=list(CHANNEL_OPTIONS))
    if security.token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(security.token))
    return channel


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", type=Path, help="CA certificate of the gateway (PEM): connect with TLS")
    parser.add_argument("--tls-client-cert", type=Path, help="client certificate for mutual TLS (PEM)")
    parser.add_argument("--tls-client-key", type=Path, help="its private key (PEM)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV, ""), help=f"API key (default: ${TOKEN_ENV})")


def security_from_args(args: argparse.Namespace) -> ChannelSecurity:
    return ChannelSecurity(
        tls_ca=args.tls_ca, client_cert=args.tls_client_cert, client_key=args.tls_client_key, token=args.token
    )


def response_to_dict(response) -> dict:
    return MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
