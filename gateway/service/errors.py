"""Exceptions -> gRPC status codes, in one place for every RPC.

A client is told its own mistakes in full; failures of ours go to the log, and the client gets
a short status without a traceback."""

from __future__ import annotations

import logging

import grpc

from gateway.asr import itn
from gateway.asr.audio import AudioDecodeError
from gateway.asr.decoding import DecodingError
from gateway.asr.hotwords import HotwordError
from gateway.asr.streaming import StreamConfigError
from gateway.asr.tokenizer import UnknownLanguageError
from gateway.asr.transcriber import ModelMismatchError, VadUnavailableError
from gateway.asr.triton_client import TritonInferenceError, TritonUnavailableError
from gateway.service.admission import RETRY_AFTER_KEY, abort_refused
from gateway.service.options import AdmissionError, MissingRoleError, RequestError, StreamIdleError, quote
from gateway.service.ticket_service import TicketExists, TicketNotFound, TicketServiceError

log = logging.getLogger("gateway")

# Status messages stay well under 1 KB whatever the client sent: a client value is quoted
# shortened (options.quote), and every message is cut to this many UTF-8 bytes.
MAX_STATUS_BYTES = 900


def bounded(message: str, limit: int = MAX_STATUS_BYTES) -> str:
    encoded = message.encode("utf-8")
    if len(encoded) <= limit:
        return message
    return encoded[: limit - 3].decode("utf-8", errors="ignore") + "..."

INVALID_ARGUMENT_ERRORS = (
    RequestError, AudioDecodeError, UnknownLanguageError, StreamConfigError, HotwordError, itn.ItnError,
    TicketServiceError,
)


async def abort_for(context, error: BaseException, where: str) -> None:
    """Abort the RPC with the status that fits ``error`` (never a traceback to the client)."""
    if isinstance(error, AdmissionError):
        await abort_refused(context, error)
    if isinstance(error, MissingRoleError):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, bounded(str(error)))
    if isinstance(error, StreamIdleError):
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, bounded(str(error)))
    if isinstance(error, TicketNotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, bounded(str(error)))
    if isinstance(error, TicketExists):
        await context.abort(grpc.StatusCode.ALREADY_EXISTS, bounded(str(error)))
    if isinstance(error, UnknownLanguageError):
        # the message would list every code the model knows; the client's value, shortened
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            bounded(f"unknown language {quote(error.language)}; valid codes: {', '.join(error.valid)}"),
        )
    if isinstance(error, INVALID_ARGUMENT_ERRORS):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(str(error)))
    if isinstance(error, VadUnavailableError):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, bounded(str(error)))
    if isinstance(error, TritonUnavailableError):
        log.warning("%s: %s", where, error)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "inference server unavailable; retry later",
            trailing_metadata=((RETRY_AFTER_KEY, "1000"),),
        )
    if isinstance(error, (TritonInferenceError, ModelMismatchError, DecodingError)):
        log.error("%s: %s", where, error)
        await context.abort(grpc.StatusCode.INTERNAL, "inference failed; see gateway log")
    log.error("%s failed", where, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see gateway log")
