"""The one server interceptor: request parsing, API-key authentication and roles.

Every RPC except grpc.health.v1 goes through :class:`GatewayInterceptor`:

- requests are parsed here, not by gRPC: bytes that are not a valid message (a string field
  that is not UTF-8) get INVALID_ARGUMENT instead of UNKNOWN "Unexpected DecodeError";
- with an API-key file (``--api-keys config/api_keys.yaml``), a call needs
  ``authorization: Bearer <key>`` (or ``x-api-key: <key>``) metadata; no or an unknown key ->
  UNAUTHENTICATED, a key without the RPC's role -> PERMISSION_DENIED. Roles: transcribe
  (Transcribe, StreamingRecognize), analyze (AnalyzeTicket, Transcribe with analyze=true),
  correct (CorrectTicket), admin (everything, server reflection included).

The key file holds SHA-256 digests, never keys (keys are 32 random bytes, so a plain digest
is enough; no salt or slow hash is needed against guessing)::

    keys:
      - name: agent-console          # becomes corrected_by of its corrections
        sha256: 5e884898da28...      # python -m gateway.service.auth new-key NAME --roles ...
        roles: [transcribe, analyze]

Without ``--api-keys`` authentication is off (the local default, loopback only); the
parsing still applies.
"""

from __future__ import annotations

import argparse
import contextvars
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from gateway.service.metrics import IN_FLIGHT, RequestRecord, request_id_of, status_of
from gateway.service.options import MissingRoleError, RequestError

ROLES = ("transcribe", "analyze", "correct", "admin")
ADMIN = "admin"
UNAUTHENTICATED_SERVICES = ("grpc.health.v1.Health",)  # probes carry no key
METHOD_ROLES = {  # method name -> role it needs (admin has all)
    "/asr.v1.Asr/Transcribe": "transcribe",
    "/asr.v1.Asr/StreamingRecognize": "transcribe",
    "/asr.v1.Asr/AnalyzeTicket": "analyze",
    "/asr.v1.Asr/CorrectTicket": "correct",
}
MAX_KEY_CHARS = 256
KEY_BYTES = 32

# The authenticated caller of the running RPC (None with authentication off).
current_identity: contextvars.ContextVar["Identity | None"] = contextvars.ContextVar("current_identity", default=None)


class AuthConfigError(ValueError):
    """The API-key file is missing, malformed or names an unknown role."""


@dataclass(frozen=True)
class Identity:
    name: str
    roles: frozenset[str]

    def allows(self, role: str) -> bool:
        return ADMIN in self.roles or role in self.roles


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKeys:
    """SHA-256 digest -> identity, from the key file."""

    by_digest: dict

    @classmethod
    def load(cls, path: Path) -> "ApiKeys":
        import yaml

        try:
            document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise AuthConfigError(f"cannot read API keys from {path}: {error}") from error
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list) or not entries:
            raise AuthConfigError(f"{path}: expected a non-empty list under 'keys'")
        by_digest = {}
        for number, entry in enumerate(entries, 1):
            if not isinstance(entry, dict):
                raise AuthConfigError(f"{path}: key {number} is not a mapping")
            name, key_digest, roles = entry.get("name"), str(entry.get("sha256", "")).lower(), entry.get("roles")
            if not name or len(key_digest) != 64 or any(c not in "0123456789abcdef" for c in key_digest):
                raise AuthConfigError(f"{path}: key {number} needs a name and a 64-hex-digit sha256")
            if not isinstance(roles, list) or not roles or any(role not in ROLES for role in roles):
                raise AuthConfigError(f"{path}: key {name!r} needs roles from {', '.join(ROLES)}")
            if key_digest in by_digest:
                raise AuthConfigError(f"{path}: key {name!r} repeats the digest of {by_digest[key_digest].name!r}")
            by_digest[key_digest] = Identity(str(name), frozenset(roles))
        return cls(by_digest)

    def identify(self, key: str) -> Identity | None:
        if not key or len(key) > MAX_KEY_CHARS:
            return None
        wanted = digest(key)
        found = None
        for key_digest, identity in self.by_digest.items():  # constant time per entry
            if hmac.compare_digest(key_digest, wanted):
                found = identity
        return found


def _presented_key(metadata) -> str:
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
        if name == "x-api-key" and isinstance(value, str):
            return value.strip()
    return ""


def require_role(role: str) -> None:
    """For a role that depends on the request (Transcribe with analyze=true): MissingRoleError if missing."""
    identity = current_identity.get()
    if identity is not None and not identity.allows(role):
        raise MissingRoleError(f"this key lacks the {role!r} role")


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys | None) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.split("/")[1] in UNAUTHENTICATED_SERVICES:
            return handler
        identity = None
        refusal = None
        if self.keys is not None:
            identity = self.keys.identify(_presented_key(handler_call_details.invocation_metadata))
            role = METHOD_ROLES.get(method, ADMIN)  # reflection and anything new: admin only
            if identity is None:
                refusal = (grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required (authorization: Bearer <key>)")
            elif not identity.allows(role):
                refusal = (grpc.StatusCode.PERMISSION_DENIED, f"this key lacks the {role!r} role")
        return _wrap(handler, method, identity, refusal)


def _wrap(handler, method: str, identity: Identity | None, refusal):
    """The handler with parsing, the refusal (if any), metrics and the request log line around it."""
    deserialize = handler.request_deserializer
    rpc = method.rsplit("/", 1)[-1]
    name = identity.name if identity else None

    def parse(raw: bytes):
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except DecodeError as error:
            raise _BadMessage() from error

    if handler.unary_unary is not None:

        async def unary_unary(raw, context):
            record = RequestRecord(rpc, name, context.peer())
            error = None
            counted = False
            try:
                if refusal:
                    await context.abort(*refusal)
                current_identity.set(identity)
                try:
                    request = parse(raw)
                except _BadMessage:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, BAD_MESSAGE)
                record.request_id = request_id_of(request)
                IN_FLIGHT.labels(rpc).inc()
                counted = True
                response = await handler.unary_unary(request, context)
                record.audio_s = float(getattr(response, "audio_duration_s", 0.0) or 0.0)
                return response
            except BaseException as raised:
                error = raised
                raise
            finally:
                if counted:
                    IN_FLIGHT.labels(rpc).dec()
                if not record.request_id:
                    record.request_id = request_id_of(None)
                record.finish(*status_of(context, error))

        return grpc.unary_unary_rpc_method_handler(unary_unary, None, handler.response_serializer)

    if handler.stream_stream is not None:

        async def requests(raw_iterator, record: RequestRecord):
            async for raw in raw_iterator:
                message = parse(raw)  # _BadMessage surfaces in the handler's read loop
                if not record.request_id:
                    record.request_id = request_id_of(message)
                yield message

        async def stream_stream(raw_iterator, context):
            record = RequestRecord(rpc, name, context.peer())
            error = None
            counted = False
            try:
                if refusal:
                    await context.abort(*refusal)
                current_identity.set(identity)
                IN_FLIGHT.labels(rpc).inc()
                counted = True
                async for response in handler.stream_stream(requests(raw_iterator, record), context):
                    result = getattr(response, "result", None)
                    if result is not None and result.is_final:
                        record.audio_s = max(record.audio_s, float(result.end_s))
                    yield response
            except BaseException as raised:
                error = raised
                raise
            finally:
                if counted:
                    IN_FLIGHT.labels(rpc).dec()
                if not record.request_id:
                    record.request_id = request_id_of(None)
                record.finish(*status_of(context, error))

        return grpc.stream_stream_rpc_method_handler(stream_stream, None, handler.response_serializer)

    if refusal:  # unary-stream / stream-unary (none in asr.v1; reflection is stream-stream)
        async def refuse(_request, context):
            await context.abort(*refusal)

        return grpc.unary_unary_rpc_method_handler(refuse)
    return handler


BAD_MESSAGE = "the request is not a valid message (text fields must be UTF-8)"


class _BadMessage(RequestError):
    """A request's bytes do not parse (maps to INVALID_ARGUMENT)."""

    def __str__(self) -> str:
        return BAD_MESSAGE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.service.auth", description="API keys for the gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new-key", help="print a new key and its entry for the key file")
    new.add_argument("name")
    new.add_argument("--roles", default="transcribe", help=f"comma-separated, of {', '.join(ROLES)}")
    args = parser.parse_args(argv)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        parser.error(f"unknown roles {unknown}; use {', '.join(ROLES)}")
    key = secrets.token_urlsafe(KEY_BYTES)
    print(f"key (give it to the client, it is not stored): {key}", file=sys.stderr)
    print(f"  - name: {args.name}\n    sha256: {digest(key)}\n    roles: [{', '.join(roles)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
