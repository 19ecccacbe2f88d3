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
from gateway.service.options import RequestError
from gateway.service.ticket_service import TicketNotFound, TicketServiceError

log = logging.getLogger("gateway")

INVALID_ARGUMENT_ERRORS = (
    RequestError, AudioDecodeError, UnknownLanguageError, StreamConfigError, HotwordError, itn.ItnError,
    TicketServiceError,
)


async def abort_for(context, error: BaseException, where: str) -> None:
    """Abort the RPC with the status that fits ``error`` (never a traceback to the client)."""
    if isinstance(error, TicketNotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
    if isinstance(error, INVALID_ARGUMENT_ERRORS):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, VadUnavailableError):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    if isinstance(error, TritonUnavailableError):
        log.warning("%s: %s", where, error)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "inference server unavailable; retry later")
    if isinstance(error, (TritonInferenceError, ModelMismatchError, DecodingError)):
        log.error("%s: %s", where, error)
        await context.abort(grpc.StatusCode.INTERNAL, "inference failed; see gateway log")
    log.error("%s failed", where, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see gateway log")
