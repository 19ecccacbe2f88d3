"""The one server interceptor: request parsing, API-key authentication and roles.

Every RPC except grpc.health.v1 goes through :class:`GatewayInterceptor`:

- requests are parsed here, not by gRPC: bytes that are not a valid message (a string field
  that is not UTF-8) get INVALID_ARGUMENT instead of UNKNOWN "Unexpected DecodeError";
- unary methods are served as stream-unary, so that authentication and admission
  (gateway/service/admission.py) come before the message is read;
- with an API-key file (``--api-keys config/api_keys.yaml``), a call needs
  ``authorization: Bearer <key>`` (or ``x-api-key: <key>``) metadata; no or an unknown key ->
  UNAUTHENTICATED, a key without the RPC's role -> PERMISSION_DENIED. Roles: transcribe
  (Transcribe, StreamingRecognize), analyze (AnalyzeTicket, Transcribe with analyze=true),
  correct (CorrectTicket), delegate (may name the end user it acts for, below), admin
  (everything, server reflection and delegate included).

Delegation. A front end that serves many people with one key (the review workbench) names
the person it acts for in ``x-on-behalf-of-bin: <UTF-8 bytes>`` (or ``x-on-behalf-of:
<ASCII text>``) metadata. The call then runs as ``<user> via <key name>``: that is the
corrected_by of a CorrectTicket (so a workbench correction reads ``wangfang via workbench``,
not ``workbench``), and the identity in the request log. The key's own roles still decide
what the call may do; the user named gains nothing. With keys on, a header that cannot be
honoured is refused, never ignored:

- from a key without the ``delegate`` role -> PERMISSION_DENIED (an ordinary client cannot
  put words in someone else's mouth, and a front end whose key lacks the role fails loudly
  instead of attributing every edit to itself);
- empty, over 64 characters, with control characters, not UTF-8, or given twice with
  different values -> INVALID_ARGUMENT.

The name is the front end's word for its logged-in user (the workbench authenticates its
users itself); the suffix ``via <key name>`` always names the key that vouched for it.
Without keys (authentication off) the header is ignored and CorrectTicket takes the
request's ``corrected_by``.

The key file holds SHA-256 digests, never keys (keys are 32 random bytes, so a plain digest
is enough; no salt or slow hash is needed against guessing)::

    keys:
      - name: agent-console          # becomes corrected_by of its corrections
        sha256: 5e884898da28...      # python -m gateway.service.auth new-key NAME --roles ...
        roles: [transcribe, analyze]
      - name: workbench              # corrections read "<user> via workbench"
        sha256: 9f86d081884c...
        roles: [transcribe, analyze, correct, delegate]

Without ``--api-keys`` authentication is off (the local default, loopback only); the
parsing still applies.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from gateway.asr.triton_client import RequestTag, tag_request
from gateway.service.admission import Admission, abort_refused
from gateway.service.metrics import IN_FLIGHT, RequestRecord, request_id_of, status_of
from gateway.service.options import AdmissionError, MissingRoleError, RequestError

ROLES = ("transcribe", "analyze", "correct", "delegate", "admin")
ADMIN = "admin"
DELEGATE = "delegate"
ON_BEHALF_OF = ("x-on-behalf-of", "x-on-behalf-of-bin")  # ASCII text / UTF-8 bytes
MAX_ON_BEHALF_OF_CHARS = 64
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
    key_name: str
    roles: frozenset[str]
    on_behalf_of: str | None = None  # the end user a delegate key acts for

    @property
    def name(self) -> str:
        """Who the call is attributed to (corrected_by, the request log): the key's name, or
        ``<user> via <key name>`` for a delegate key that named its user."""
        return f"{self.on_behalf_of} via {self.key_name}" if self.on_behalf_of else self.key_name

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


def _on_behalf_of(metadata) -> tuple[str | None, str | None]:
    """(the user named in x-on-behalf-of[-bin], or None when absent; the reason it is unusable, or None)."""
    values = []
    for name, value in metadata or ():
        if name not in ON_BEHALF_OF:
            continue
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                return "", "x-on-behalf-of-bin must be UTF-8"
        values.append(value.strip())
    if not values:
        return None, None
    user = values[0]
    if any(value != user for value in values):
        return user, "x-on-behalf-of is given twice with different users"
    if not user or len(user) > MAX_ON_BEHALF_OF_CHARS:
        return user, f"x-on-behalf-of must name a user in 1 to {MAX_ON_BEHALF_OF_CHARS} characters"
    if any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in user):
        return user, "x-on-behalf-of must not hold control characters"
    return user, None


def _authorize(identity: Identity | None, role: str, metadata) -> tuple[Identity | None, tuple | None]:
    """(the identity the call runs as, the refusal (code, message) or None), with authentication on."""
    if identity is None:
        return None, (grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required (authorization: Bearer <key>)")
    if not identity.allows(role):
        return identity, (grpc.StatusCode.PERMISSION_DENIED, f"this key lacks the {role!r} role")
    user, problem = _on_behalf_of(metadata)
    if user is None:
        return identity, None
    if not identity.allows(DELEGATE):
        return identity, (grpc.StatusCode.PERMISSION_DENIED, f"this key may not act on behalf of a user (x-on-behalf-of needs the {DELEGATE!r} role)")
    if problem:
        return identity, (grpc.StatusCode.INVALID_ARGUMENT, problem)
    return dataclasses.replace(identity, on_behalf_of=user), None


def require_role(role: str) -> None:
    """For a role that depends on the request (Transcribe with analyze=true): MissingRoleError if missing."""
    identity = current_identity.get()
    if identity is not None and not identity.allows(role):
        raise MissingRoleError(f"this key lacks the {role!r} role")


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys | None, admission: Admission) -> None:
        self.keys = keys
        self.admission = admission

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.split("/")[1] in UNAUTHENTICATED_SERVICES:
            return handler
        identity = None
        refusal = None
        if self.keys is not None:  # without keys x-on-behalf-of is ignored: CorrectTicket takes the request's corrected_by
            metadata = handler_call_details.invocation_metadata
            role = METHOD_ROLES.get(method, ADMIN)  # reflection and anything new: admin only
            identity, refusal = _authorize(self.keys.identify(_presented_key(metadata)), role, metadata)
        return _wrap(handler, method, identity, refusal, self.admission)


def _finish(record: RequestRecord, context, error: BaseException | None, counted: bool) -> None:
    """The request's end: out of the in-flight gauge (if it got in), its log line and metrics."""
    if counted:
        IN_FLIGHT.labels(record.rpc).dec()
    if not record.request_id:
        record.request_id = request_id_of(None)
    record.finish(*status_of(context, error))


def _wrap(handler, method: str, identity: Identity | None, refusal, admission: Admission):
    """The handler with parsing, the refusal (if any), admission, metrics and the request log line
    around it. Unary methods are served as stream-unary so that a call is refused (or admitted)
    before its message is read (gateway/service/admission.py)."""
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

        async def unary(raw_iterator, context):
            record = RequestRecord(rpc, name, context.peer())
            error = None
            counted = False
            try:
                if refusal:
                    await context.abort(*refusal)
                current_identity.set(identity)
                with admission.call(rpc):
                    async with admission.receiving():
                        raw = await context.read()
                    if raw is grpc.aio.EOF:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_MESSAGE)
                    with admission.holding_request(len(raw)):
                        try:
                            request = parse(raw)
                        except _BadMessage:
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, BAD_MESSAGE)
                        del raw
                        record.request_id = request_id_of(request)
                        tag_request(record.request_id)  # Triton's request ids carry the id of this log line
                        IN_FLIGHT.labels(rpc).inc()
                        counted = True
                        response = await handler.unary_unary(request, context)
                record.audio_s = float(getattr(response, "audio_duration_s", 0.0) or 0.0)
                return response
            except AdmissionError as refused:  # its abort ends the call: the record reads the context's status
                await abort_refused(context, refused)
            except BaseException as raised:
                error = raised
                raise
            finally:
                _finish(record, context, error, counted)

        return grpc.stream_unary_rpc_method_handler(unary, None, handler.response_serializer)

    if handler.stream_stream is not None:

        async def requests(raw_iterator, record: RequestRecord, tag: RequestTag):
            async for raw in raw_iterator:
                message = parse(raw)  # _BadMessage surfaces in the handler's read loop
                if not record.request_id:
                    record.request_id = tag.request_id = request_id_of(message)
                yield message

        async def stream_stream(raw_iterator, context):
            record = RequestRecord(rpc, name, context.peer())
            error = None
            counted = False
            try:
                if refusal:
                    await context.abort(*refusal)
                current_identity.set(identity)
                tag = tag_request("")  # named by the stream's first message (requests above)
                with admission.call(rpc):
                    IN_FLIGHT.labels(rpc).inc()
                    counted = True
                    async for response in handler.stream_stream(requests(raw_iterator, record, tag), context):
                        result = getattr(response, "result", None)
                        if result is not None and result.is_final:
                            record.audio_s = max(record.audio_s, float(result.end_s))
                        yield response
            except AdmissionError as refused:  # its abort ends the call: the record reads the context's status
                await abort_refused(context, refused)
            except BaseException as raised:
                error = raised
                raise
            finally:
                _finish(record, context, error, counted)

        return grpc.stream_stream_rpc_method_handler(stream_stream, None, handler.response_serializer)

    if refusal:  # unary-stream / stream-unary (none in asr.v1; reflection is stream-stream)
        async def refuse(_request, context):
            await context.abort(*refusal)

        return grpc.unary_unary_rpc_method_handler(refuse)
    return handler


BAD_MESSAGE = "the request is not a valid message (text fields must be UTF-8)"
NO_MESSAGE = "the call carried no request message"


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
