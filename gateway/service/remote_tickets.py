"""Tickets kept by another gateway: ``--ticket-service HOST:PORT``.

The ticket history is one SQLite file with one writer. Replicated gateways (deploy/k8s/gateway.yaml)
therefore open no history of their own: started with ``--ticket-service``, a gateway sends
AnalyzeTicket, CorrectTicket and the analysis step of Transcribe(analyze=true) over gRPC to the
gateway that owns the history (the workbench pod's ``records`` container), which analyses and
records them there - one history for the workbench, and duplicates found against every ticket.
The forwarding gateway loads no analyzer, embedding model or history.

Identity. The forwarder calls with its own API key (roles analyze, correct, delegate) and names
its caller in ``x-on-behalf-of-bin``: the caller's identity as this gateway authenticated it
(``agent-console``, ``wangfang via workbench``), that is, the name a local history would have
recorded. The owner lists the forwarder's key name in ``--ticket-forwarders`` and records a
correction it forwards under exactly that name (ticket_service.TicketService.author; the audit
line adds ``forwarded_by``). The key's own roles still decide what it may do, and only a key named
there is trusted to pass an identity on; an owner that does not list it records
``<name> via <forwarder key>`` (plain delegation, gateway/service/auth.py). A name longer than
auth's 64 characters cannot be passed on: INVALID_ARGUMENT.

Errors. The owner's NOT_FOUND, ALREADY_EXISTS and INVALID_ARGUMENT come back with their status
and message, as the local path gives them; an owner that cannot be reached or does not answer
within ``--ticket-service-timeout-s`` -> UNAVAILABLE "ticket service unavailable: ..." with the
retry hint (after a timeout a record=true may have been recorded: a retry with its ticket_id gets
ALREADY_EXISTS); a refused key or an owner's failure -> INTERNAL, with the reason in this
gateway's log. Transcription itself never depends on the ticket service.

Segments. Transcribe's analysis reads the transcript's segments (evidence times); the
AnalyzeTicketRequest has no field for them, so they travel as JSON in the ticket metadata key
``gateway.segments`` (ticket_service.SEGMENTS_KEY), which the owner takes out before analysis.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import grpc

from gateway.protocol import asr_pb2, asr_pb2_grpc
from gateway.service.auth import MAX_ON_BEHALF_OF_CHARS, current_identity
from gateway.service.options import AdmissionError
from gateway.service.ticket_service import (
    SEGMENTS_KEY,
    TicketExists,
    TicketNotFound,
    TicketService,
    TicketServiceError,
    segments_from_metadata,
)
from gateway.tls import channel_credentials

log = logging.getLogger("gateway")

KEY_ENV = "TICKET_SERVICE_API_KEY"  # the key from the environment when no --ticket-service-api-key-file
DEFAULT_TIMEOUT_S = 60.0
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 64 * 1024 * 1024),  # a ticket's text (1 MiB at most) and its segments
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # a restarted owner is found again within seconds (gRPC's default backoff grows to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
UNAVAILABLE = "ticket service unavailable: the gateway that keeps the ticket history"


class TicketServiceUnavailable(AdmissionError):
    """The owner of the history cannot be reached or does not answer (UNAVAILABLE, with the retry hint)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, grpc.StatusCode.UNAVAILABLE, retry_after_s)


class RemoteTicketError(RuntimeError):
    """The owner refused this gateway's key or failed (INTERNAL to the caller; the reason is logged)."""


@dataclass(frozen=True)
class RemoteTicketConfig:
    """Where the history's owner is and how to reach it: the settings of the gateway's clients
    (CA -> TLS, a client certificate -> mutual TLS, an API key as ``authorization: Bearer``)."""

    address: str  # HOST:PORT of the gateway that keeps the history
    tls_ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    token: str = field(default="", repr=False)  # this gateway's API key there (never in a log line)
    timeout_s: float = DEFAULT_TIMEOUT_S
    retry_after_s: float = 2.0  # the hint sent with UNAVAILABLE

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls_ca:
            return None
        return channel_credentials(self.tls_ca, self.client_cert, self.client_key)


def _passable(name: str | None) -> bool:
    """Whether auth.py accepts ``name`` in x-on-behalf-of (1-64 characters, no control characters)."""
    return bool(name) and len(name) <= MAX_ON_BEHALF_OF_CHARS and not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in name)


class RemoteTicketService:
    """TicketService's interface (warm_up, analyze, correct) over gRPC to the history's owner."""

    def __init__(self, config: RemoteTicketConfig) -> None:
        self.config = config
        self._credentials = config.credentials()  # reads the PEM files now: a missing one stops the start
        self._stub: asr_pb2_grpc.AsrStub | None = None

    def warm_up(self) -> None:
        config = self.config
        log.info("tickets: no local history; AnalyzeTicket, CorrectTicket and Transcribe's analysis go to the ticket service at %s (%s, %s)",
                 config.address, "TLS" if config.tls_ca else "plaintext", "with an API key" if config.token else "no API key")
        if config.token and not config.tls_ca and self.config.address.rsplit(":", 1)[0] not in LOOPBACK:
            log.warning("the ticket service key travels in plaintext to %s; give --ticket-service-ca", self.config.address)

    def _rpc(self) -> asr_pb2_grpc.AsrStub:
        if self._stub is None:  # on the event loop, at the first call
            options = list(CHANNEL_OPTIONS)
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(self.config.address, self._credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(self.config.address, options=options)
            self._stub = asr_pb2_grpc.AsrStub(channel)
        return self._stub

    def _metadata(self, on_behalf_of: str | None) -> tuple:
        metadata = []
        if self.config.token:
            metadata.append(("authorization", f"Bearer {self.config.token}"))
        if on_behalf_of:
            metadata.append(("x-on-behalf-of-bin", on_behalf_of.encode("utf-8")))
        return tuple(metadata)

    async def _call(self, rpc: str, request, on_behalf_of: str | None):
        method = getattr(self._rpc(), rpc)
        try:
            return await method(request, timeout=self.config.timeout_s, metadata=self._metadata(on_behalf_of))
        except grpc.aio.AioRpcError as error:
            raise self._mapped(error, rpc) from None

    def _mapped(self, error: grpc.aio.AioRpcError, rpc: str) -> Exception:
        """The owner's status as the exception the local path raises for it (gateway/service/errors.py maps it back)."""
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.NOT_FOUND:
            return TicketNotFound(details)
        if code == grpc.StatusCode.ALREADY_EXISTS:
            return TicketExists(details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return TicketServiceError(details)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.warning("%s: ticket service %s: %s %s", rpc, self.config.address, code.name, details)
            reason = "cannot be reached" if code == grpc.StatusCode.UNAVAILABLE else f"did not answer within {self.config.timeout_s:g} s"
            return TicketServiceUnavailable(f"{UNAVAILABLE} {reason}", self.config.retry_after_s)
        hint = ""
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            hint = " (--ticket-service-api-key-file: a key of that gateway with the roles analyze, correct and delegate)"
        return RemoteTicketError(f"{rpc} at the ticket service {self.config.address}: {code.name} {details}{hint}")

    async def analyze(self, text: str, metadata: Mapping[str, str], *, segments: Iterable[Mapping] | None = None,
                      record: bool = False) -> asr_pb2.Ticket:
        metadata = {str(key): str(value) for key, value in metadata.items()}
        if segments is not None:
            segments_from_metadata(metadata)  # a caller's own value is checked as the local path checks it
            metadata[SEGMENTS_KEY] = json.dumps(
                [{"start_s": s["start_s"], "end_s": s["end_s"], "text": s["text"]} for s in segments], ensure_ascii=False
            )
        identity = current_identity.get()
        name = identity.name if identity is not None else None  # for the owner's request log only
        request = asr_pb2.AnalyzeTicketRequest(text=text, metadata=metadata, record=record)
        return await self._call("AnalyzeTicket", request, name if _passable(name) else None)

    async def correct(self, ticket_id: str, field: str, value: str, by: str) -> asr_pb2.CorrectTicketResponse:
        """``by``: the caller's identity here (its key's name, ``<user> via <key>``, or with auth off
        the request's corrected_by), passed on to be recorded as is (module docstring)."""
        by = (by or "").strip()
        if by and not _passable(by):
            raise TicketServiceError(
                f"the caller's name is over {MAX_ON_BEHALF_OF_CHARS} characters or holds control characters; "
                "it cannot be passed on to the ticket service"
            )
        request = asr_pb2.CorrectTicketRequest(ticket_id=ticket_id, field=field, value=value, corrected_by=by)
        return await self._call("CorrectTicket", request, by or None)


def open_ticket_service(
    history_db: Path | None, remote: RemoteTicketConfig | None, forwarders: Iterable[str] = (), *, preload_analyzer: bool = True
):
    """The gateway's ticket service: the remote owner's (``--ticket-service``) or a local history
    (its analyzer loaded by warm_up when ``preload_analyzer``, else at the first analysis)."""
    if remote is not None:
        return RemoteTicketService(remote)
    return TicketService(history_db, forwarders=forwarders, preload_analyzer=preload_analyzer)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ticket history kept by another gateway (replicas share one history)")
    group.add_argument("--ticket-service", metavar="HOST:PORT",
                       help="send AnalyzeTicket, CorrectTicket and Transcribe's analysis to the gateway that keeps the "
                            "ticket history; no local history (excludes --history-db)")
    group.add_argument("--ticket-service-ca", type=Path, help="CA certificate of that gateway (PEM): TLS")
    group.add_argument("--ticket-service-client-cert", type=Path, help="with --ticket-service-ca: this gateway's certificate for mutual TLS")
    group.add_argument("--ticket-service-client-key", type=Path)
    group.add_argument("--ticket-service-api-key-file", type=Path,
                       help=f"this gateway's API key there, roles analyze, correct, delegate (default: ${KEY_ENV})")
    group.add_argument("--ticket-service-timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    group.add_argument("--ticket-forwarders", default="", metavar="KEY[,KEY]",
                       help="on the gateway that keeps the history: API-key names of gateways started with --ticket-service; "
                            "a correction they forward is recorded as the caller they name")


def forwarders_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(name.strip() for name in args.ticket_forwarders.split(",") if name.strip())


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RemoteTicketConfig | None:
    """The --ticket-service settings, checked (parser.error on a mistake); None without --ticket-service."""
    client_options = (args.ticket_service_ca, args.ticket_service_client_cert, args.ticket_service_client_key, args.ticket_service_api_key_file)
    if not args.ticket_service:
        if any(client_options):
            parser.error("--ticket-service-ca/-client-cert/-client-key/-api-key-file need --ticket-service")
        return None
    if args.history_db:
        parser.error("--ticket-service and --history-db exclude each other: the ticket service keeps the history")
    if args.ticket_forwarders:
        parser.error("--ticket-forwarders is for the gateway that keeps the history, not one with --ticket-service")
    host, _, port = args.ticket_service.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--ticket-service {args.ticket_service!r}: expected HOST:PORT")
    if int(port) == args.port and host in (*LOOPBACK, args.host, "0.0.0.0"):
        parser.error("--ticket-service names this gateway itself; give the address of the gateway that keeps the history")
    if bool(args.ticket_service_client_cert) != bool(args.ticket_service_client_key):
        parser.error("--ticket-service-client-cert and --ticket-service-client-key go together")
    if args.ticket_service_client_cert and not args.ticket_service_ca:
        parser.error("a client certificate needs --ticket-service-ca (mutual TLS)")
    if args.ticket_service_timeout_s <= 0:
        parser.error("--ticket-service-timeout-s must be positive")
    try:
        token = args.ticket_service_api_key_file.read_text(encoding="utf-8").strip() if args.ticket_service_api_key_file else os.environ.get(KEY_ENV, "").strip()
        config = RemoteTicketConfig(
            args.ticket_service, args.ticket_service_ca, args.ticket_service_client_cert, args.ticket_service_client_key,
            token, args.ticket_service_timeout_s, args.retry_after_s,
        )
        config.credentials()  # the PEM files are readable
    except OSError as error:
        parser.error(f"--ticket-service: {error}")
    if args.ticket_service_api_key_file and not token:
        parser.error(f"--ticket-service-api-key-file {args.ticket_service_api_key_file} is empty")
    return config
