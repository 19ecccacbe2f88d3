"""Admission control: how much the gateway takes on at once, decided before a message is read.

gRPC receives a unary request whole before its handler runs, so a limit checked in the handler
comes after the memory is spent: 16 concurrent 64 MB Transcribe calls held 4.6 GB of request
bytes and copies in the gateway before any of them could be refused. The interceptor
(gateway/service/auth.py) therefore serves every unary method as stream-unary and asks this
object, in order:

1. :meth:`Admission.call` - before reading anything: Triton ready (else UNAVAILABLE) and the
   call within ``max_transcribes`` / ``max_streams`` (else RESOURCE_EXHAUSTED). A refused
   call's bytes are never read; HTTP/2 flow control leaves them with the client (about 8 MB
   per waiting call, measured, instead of the whole message);
2. :meth:`Admission.receiving` - at most ``max_receiving`` messages are read at once; a call
   that waits longer than ``receive_wait_s`` for its turn (a slow upload holds one) is refused,
   and so is one whose turn comes when the request budget below is already full;
3. :meth:`Admission.holding_request` - the request's bytes count against
   ``max_request_bytes_in_flight`` until the call ends;
4. :meth:`Admission.holding_audio` (the service, after decoding) - decoded audio counts against
   ``max_audio_in_flight_s`` while the call transcribes it.

Each budget admits a call alone whatever its size (the per-call limits bound that), and every
refusal is RESOURCE_EXHAUSTED with the retry hint. One event loop runs the gateway, so the
counters need no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import grpc

from gateway.service.options import MIB, AdmissionError

RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of RESOURCE_EXHAUSTED and UNAVAILABLE

# RPC name -> what the count limit calls it; other RPCs are not counted (they are small and short)
COUNTED_RPCS = {"Transcribe": "Transcribe calls", "StreamingRecognize": "streams"}
NEEDS_TRITON = frozenset(COUNTED_RPCS)


async def abort_refused(context, error: AdmissionError) -> None:
    """End the RPC with the refusal's status and its retry hint (milliseconds, trailing metadata)."""
    await context.abort(error.code, str(error), trailing_metadata=((RETRY_AFTER_KEY, str(int(error.retry_after_s * 1000))),))


@dataclass(frozen=True)
class AdmissionLimits:
    max_transcribes: int
    max_streams: int
    max_receiving: int  # request messages read at once
    receive_wait_s: float  # the longest a call waits for its turn to be read
    max_request_bytes_in_flight: int  # request bytes held by calls at once
    max_audio_in_flight_s: float  # decoded audio held by Transcribe calls at once (channel-seconds)
    retry_after_s: float

    def __post_init__(self) -> None:
        if min(self.max_transcribes, self.max_streams, self.max_receiving) < 1:
            raise ValueError("max_transcribes, max_streams and max_receiving must be >= 1")
        if min(self.receive_wait_s, self.max_request_bytes_in_flight, self.max_audio_in_flight_s, self.retry_after_s) <= 0:
            raise ValueError("receive_wait_s, the in-flight budgets and retry_after_s must be positive")


class Admission:
    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.triton_ready = False  # kept in step with Triton by server.watch_triton
        self.running = dict.fromkeys(COUNTED_RPCS, 0)
        self.request_bytes = 0
        self.audio_s = 0.0
        self._receiving: asyncio.Semaphore | None = None  # made in the server's loop

    def _refuse(self, message: str, code=grpc.StatusCode.RESOURCE_EXHAUSTED) -> AdmissionError:
        return AdmissionError(message, code, self.limits.retry_after_s)

    @contextlib.contextmanager
    def call(self, rpc: str):
        """The call counted against its RPC's limit while it runs; AdmissionError at once when it
        would only queue (Triton not ready, or the limit reached)."""
        if rpc in NEEDS_TRITON and not self.triton_ready:
            raise self._refuse("the inference server is not ready", grpc.StatusCode.UNAVAILABLE)
        what = COUNTED_RPCS.get(rpc)
        if what is None:
            yield
            return
        limit = self.limits.max_transcribes if rpc == "Transcribe" else self.limits.max_streams
        if self.running[rpc] >= limit:
            raise self._refuse(f"this gateway serves at most {limit} {what} at once")
        self.running[rpc] += 1
        try:
            yield
        finally:
            self.running[rpc] -= 1

    @contextlib.asynccontextmanager
    async def receiving(self):
        """A turn to read one request message (max_receiving at once)."""
        if self._receiving is None:
            self._receiving = asyncio.Semaphore(self.limits.max_receiving)
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result and drops
            # a cancellation that arrives as its awaitable completes (the call would go on)
            async with asyncio.timeout(self.limits.receive_wait_s):
                await self._receiving.acquire()
        except TimeoutError:
            raise self._refuse(
                f"this gateway is receiving {self.limits.max_receiving} other requests; "
                f"none finished within {self.limits.receive_wait_s:g} s"
            ) from None
        try:
            # the calls admitted in the meantime may have filled the request budget: then this
            # one's bytes would only be read to be refused
            self._check_request_bytes(1)
            yield
        finally:
            self._receiving.release()

    def _check_request_bytes(self, size_bytes: int) -> None:
        held, limit = self.request_bytes, self.limits.max_request_bytes_in_flight
        if held > 0 and held + size_bytes > limit:
            raise self._refuse(
                f"this gateway holds {held / MIB:.1f} MiB of requests in flight and at most {limit / MIB:.0f} MiB at once"
            )

    @contextlib.contextmanager
    def holding_request(self, size_bytes: int):
        """The request's bytes counted against max_request_bytes_in_flight while the call runs."""
        self._check_request_bytes(size_bytes)
        self.request_bytes += size_bytes
        try:
            yield
        finally:
            self.request_bytes -= size_bytes

    @contextlib.contextmanager
    def holding_audio(self, seconds: float):
        """``seconds`` of decoded audio counted against max_audio_in_flight_s while the call holds it."""
        held, limit = self.audio_s, self.limits.max_audio_in_flight_s
        if held > 0 and held + seconds > limit:
            raise self._refuse(f"this gateway holds {held:.0f} s of decoded audio for calls in flight and at most {limit:.0f} s at once")
        self.audio_s += seconds
        try:
            yield
        finally:
            self.audio_s -= seconds
