"""gRPC gateway: asr.v1.Asr + grpc.health.v1 + server reflection.

    python -m gateway.service.server --port 50051 --triton localhost:8001 --model-dir build/models/whisper-base

Stateless: any number of replicas can share one Triton. ``--triton a:8001,b:8001`` spreads the
work over several Tritons (gateway.asr.triton_client.TritonReplicas: a window's decoder
sequence stays on the replica that started it). Health answers NOT_SERVING until a Triton's
encoder and decoder are ready (and again whenever none answers).

Silero VAD (``--vad-model``, default build/vad/silero_vad.onnx from tools/setup_vad.py) segments
Transcribe requests and drives StreamingRecognize. Without the model (an error is logged at
start) Transcribe falls back to fixed 30 s windows and streams get FAILED_PRECONDITION.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from gateway.asr import itn
from gateway.asr.audio import MAX_CONTAINER_CHANNELS, SAMPLE_RATE
from gateway.asr.hotword_lists import HotwordRegistry, default_hotword_dir
from gateway.asr.script import simplify_stream_result, simplify_transcript
from gateway.asr.streaming import DecodeGate, RecognitionStream, StreamResult
from gateway.asr.transcriber import ModelMismatchError, Transcriber
from gateway.asr.triton_client import (
    CURRENT_REQUEST,
    TritonInferenceError,
    TritonReplicas,
    TritonUnavailableError,
)
from gateway.asr.vad import DEFAULT_MODEL_PATH, SileroVad, VadModelError
from gateway.protocol import asr_pb2, asr_pb2_grpc
from gateway.service import options as request_options
from gateway.service import metrics, remote_tickets, responses
from gateway.service.admission import Admission, AdmissionLimits
from gateway.service.auth import ApiKeys, GatewayInterceptor, current_identity, require_role
from gateway.service.decode_pool import WORKER_IDLE_S, DecodeJob, DecodePool, default_decode_workers, run_job
from gateway.service.heap import DEFAULT_MALLOC_ARENAS, cap_malloc_arenas, release_free_heap
from gateway.service.errors import abort_for
from gateway.service.options import MIB, RequestError, StreamIdleError
from gateway.service.ticket_service import TicketService

log = logging.getLogger("gateway")

SERVICE_NAME = asr_pb2.DESCRIPTOR.services_by_name["Asr"].full_name


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate and key (PEM); with ``client_ca`` every client must present a certificate it signed (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (Path(self.key).read_bytes(), Path(self.cert).read_bytes())
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: Path
    triton_url: str = "localhost:8001"  # several Tritons: comma-separated (TritonReplicas)
    host: str = "127.0.0.1"  # loopback unless asked: --host 0.0.0.0 (containers) exposes it
    port: int = 50051
    # One Transcribe's audio is held whole: the request (a few copies of its bytes on the way in)
    # plus its samples (float32 at 16 kHz, 230 MB an hour). These defaults keep the largest
    # request (64 MB that decode to 1 h) under 1.5 GB of gateway memory, measured by
    # tests/test_reliability_suite.py::test_largest_request (README, Reliability). Longer
    # recordings: StreamingRecognize, which holds only the open utterance.
    max_audio_bytes: int = 64 * MIB
    max_audio_duration_s: float = 3600.0  # per Transcribe, and per stream unless max_stream_duration_s
    max_stream_duration_s: float | None = None  # a stream holds only its open utterance: may be longer
    max_audio_channels: int = MAX_CONTAINER_CHANNELS  # refused from the header, before decoding
    health_poll_interval_s: float = 1.0
    # windows decoded at once, over all calls: each holds 37 MB of cross K/V (and its KV cache) in
    # the search model; on 2 CPU cores 4 decode about as fast as 8 (a decoder step costs nearly
    # the same per window at any batch: README, Performance) in 16% less memory. A GPU, where
    # batching pays, wants more
    max_concurrent_windows: int = 4
    # beam search inside Triton (model `search`) when it serves it (hotword windows too, where it
    # was rendered with search_hotwords); False: every window stepwise through `decoder`
    server_search: bool = True
    # ... and the search model encodes each window's features itself (its input_features): the
    # encoder output stays in Triton. False: the gateway asks the encoder and sends the output on
    # (on a GPU the encoder then batches windows of several calls)
    server_encode: bool = True
    vad_model: Path | None = None  # None: build/vad/silero_vad.onnx when it exists
    # Admission: calls past these get RESOURCE_EXHAUSTED at once with a retry hint, instead of
    # queueing past their deadlines. Sized on the 2-core CPU test machine (README, Reliability).
    # concurrent Transcribe calls: twice the windows decoded at once (max_concurrent_windows),
    # so Triton's batcher stays fed while calls decode audio; measured on the loaded 2-core box,
    # 8 admitted 2.6 s clips (beam 5) finish within 35 s, the rest are refused in 20 ms
    max_transcribes: int = 16
    # Decoded audio held by Transcribe calls at once (channel-seconds): what bounds the gateway's
    # memory under many large requests (about 1.25 GB for the largest one, README Reliability).
    # A call that would pass it is refused after decoding with RESOURCE_EXHAUSTED and a retry hint;
    # one call alone is always admitted. None: max_audio_duration_s (one largest call at a time).
    max_audio_in_flight_s: float | None = None
    max_streams: int = 8  # concurrent StreamingRecognize calls
    # Request messages are read only once a call is admitted (gateway/service/admission.py):
    # this many at once, each waiting at most receive_wait_s for its turn; the bytes of the
    # requests in flight are bounded too (None: max_audio_bytes, one largest request at a time)
    max_receiving: int = 2
    receive_wait_s: float = 10.0
    max_request_bytes_in_flight: int | None = None
    retry_after_s: float = 2.0  # the hint sent with RESOURCE_EXHAUSTED
    stream_idle_timeout_s: float = 30.0  # a stream with no message for this long is closed
    max_stream_decodes: int = 4  # stream decodes in flight over all streams (finals first)
    # audio decoder processes (0: decode in the gateway process); default: one per two cores, 1-2
    decode_workers: int = field(default_factory=default_decode_workers)
    decode_worker_idle_s: float = WORKER_IDLE_S  # ... unused this long, they exit until the next call (0: never)
    hotword_dir: Path | None = None  # None: $ASR_HOTWORD_DIR or config/hotwords
    history_db: Path | None = None  # ticket history; None: store.path of analysis/config/defaults.yaml
    # Load the ticket analyzer (its embedding model: about 220 MB of the gateway's memory, 4 s)
    # at start; False: at the first Transcribe(analyze) / AnalyzeTicket (CorrectTicket and
    # transcription never need it; the batch job analyses in its own process). On for a gateway
    # that keeps the history and serves analyses (the workbench's: docker-compose, k8s records)
    preload_analysis: bool = False
    tls: TlsConfig | None = None  # None: plaintext (loopback use)
    api_keys: Path | None = None  # None: no authentication (local default; see gateway/service/auth.py)
    audit_log: Path | None = None  # corrections, one JSON line each; None: the gateway log
    ticket_service: remote_tickets.RemoteTicketConfig | None = None  # tickets kept by another gateway: no local history
    ticket_forwarders: tuple[str, ...] = ()  # API-key names of gateways forwarding tickets here (remote_tickets)

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "model_info.json").is_file():
            raise FileNotFoundError(f"{self.model_dir}/model_info.json not found; run `make export` first")
        stream_limit = self.max_audio_duration_s if self.max_stream_duration_s is None else self.max_stream_duration_s
        if min(self.max_audio_bytes, self.max_audio_duration_s, stream_limit) <= 0:
            raise ValueError("max_audio_bytes, max_audio_duration_s and max_stream_duration_s must be positive")
        if self.max_audio_channels < 1 or self.decode_workers < 0 or self.decode_worker_idle_s < 0:
            raise ValueError("max_audio_channels must be >= 1, decode_workers and decode_worker_idle_s >= 0")
        if self.stream_idle_timeout_s <= 0:
            raise ValueError("stream_idle_timeout_s must be positive")
        self.admission_limits()  # validates the rest

    def admission_limits(self) -> AdmissionLimits:
        return AdmissionLimits(
            max_transcribes=self.max_transcribes,
            max_streams=self.max_streams,
            max_receiving=self.max_receiving,
            receive_wait_s=self.receive_wait_s,
            max_request_bytes_in_flight=self.max_request_bytes_in_flight or self.max_audio_bytes,
            max_audio_in_flight_s=self.max_audio_in_flight_s or self.max_audio_duration_s,
            retry_after_s=self.retry_after_s,
        )


STREAM_QUEUE_SIZE = 256  # responses buffered for a slow reader before the stream waits
# after a Transcribe of at least this much audio (channel-seconds) the freed C heap goes back to
# the system: the arrays of a long recording otherwise stay in the process as free heap
TRIM_AFTER_AUDIO_S = 60.0


class AsrService(asr_pb2_grpc.AsrServicer):
    def __init__(
        self,
        config: GatewayConfig,
        transcriber: Transcriber,
        vad: SileroVad | None = None,
        *,
        admission: Admission,
        hotwords: HotwordRegistry | None = None,
        tickets: TicketService | None = None,
        decode_pool: DecodePool | None = None,
    ) -> None:
        self.config = config
        self.transcriber = transcriber
        self.vad = vad
        self.hotwords = hotwords  # None: the model family has no hotword vocabulary
        self.tickets = tickets or TicketService(config.history_db)
        self.decode_pool = decode_pool  # None: decode in a thread of this process
        self.admission = admission  # calls are admitted by the interceptor; decoded audio here
        self._stream_gate = DecodeGate(config.max_stream_decodes)

    def _decode_job(self, request, keep_channels: bool = False) -> DecodeJob:
        """The request's audio as a decode job; the request gives its copy of the bytes up (the
        job holds them now: two copies of a 64 MB request would double its memory)."""
        kind = request.WhichOneof("audio")
        if kind is None:
            raise RequestError("request has no audio: set audio_content or raw_audio")
        limits = dict(keep_channels=keep_channels, max_duration_s=self.config.max_audio_duration_s)
        # each read of a bytes field copies it: read once
        if kind == "audio_content":
            data = request.audio_content
            request_options.audio_size(len(data), self.config.max_audio_bytes)
            job = DecodeJob(data, max_channels=self.config.max_audio_channels, **limits)
        else:
            raw = request.raw_audio
            data = raw.pcm
            request_options.audio_size(len(data), self.config.max_audio_bytes)
            encoding = request_options.pcm_format("raw_audio", raw.encoding, raw.sample_rate_hz, raw.channels)
            job = DecodeJob(
                data, pcm_sample_rate=raw.sample_rate_hz, pcm_encoding=encoding, pcm_channels=raw.channels or 1, **limits
            )
        request.ClearField("audio")
        return job

    async def _decode(self, job: DecodeJob) -> np.ndarray:
        if self.decode_pool is not None:
            return await self.decode_pool.decode(job)
        return await asyncio.to_thread(run_job, job)

    async def Transcribe(self, request, context):
        started = time.perf_counter()
        try:
            if request.analyze:
                require_role("analyze")
            separate = request_options.separate_channels(request)
            scorer = await asyncio.to_thread(request_options.hotword_scorer, self.hotwords, request)
            options = request_options.transcribe_options(request, scorer, have_vad=self.vad is not None)
            itn_options = request_options.itn_options(self.hotwords, request)
            self.transcriber.validate_language(options.language)
            audio = await self._decode(self._decode_job(request, separate))
            labels = request_options.channel_labels(request, audio.shape[0]) if separate else None
            audio_s = audio.size / SAMPLE_RATE
            with self.admission.holding_audio(audio_s):
                transcript = await self.transcriber.transcribe(audio, options, channel_labels=labels)
            del audio
            if audio_s >= TRIM_AFTER_AUDIO_S:  # its arrays (audio, features, encoder outputs) are freed now
                await asyncio.to_thread(release_free_heap)
            if not request.keep_model_script:
                transcript = simplify_transcript(transcript)
            normalized: list[str] = []  # per segment, with itn
            if itn_options is not None:
                # segments only: the whole text is their join, as for the raw text
                normalized = await asyncio.to_thread(lambda: [itn.normalize(s.text, itn_options) for s in transcript.segments])
            ticket = None
            if request.analyze:
                segment_dicts = [{"start_s": s.start_s, "end_s": s.end_s, "text": s.text} for s in transcript.segments]
                ticket = await self.tickets.analyze(
                    transcript.text, dict(request.ticket_metadata), segments=segment_dicts or None, record=request.record_ticket
                )
        except Exception as error:  # noqa: BLE001 - mapped to a status, never a traceback
            await abort_for(context, error, f"request {request.request_id[:64]}")
        return responses.transcribe_response(
            transcript, normalized, model_name=self.transcriber.model_name,
            processing_time_s=time.perf_counter() - started, ticket=ticket,
        )

    async def AnalyzeTicket(self, request, context):
        try:
            text = request_options.ticket_text(request.text)
            return await self.tickets.analyze(text, dict(request.metadata), record=request.record)
        except Exception as error:  # noqa: BLE001 - mapped to a status, never a traceback
            await abort_for(context, error, "AnalyzeTicket")

    async def CorrectTicket(self, request, context):
        try:
            identity = current_identity.get()
            # with authentication on, the key's name is who corrected it, whatever the request says
            by = identity.name if identity is not None else request.corrected_by
            return await self.tickets.correct(request.ticket_id, request.field, request.value, by)
        except Exception as error:  # noqa: BLE001 - mapped to a status, never a traceback
            await abort_for(context, error, "CorrectTicket")

    # ------------------------------------------------------------------ streaming
    async def StreamingRecognize(self, request_iterator, context):
        if self.vad is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "streaming needs the Silero VAD model, which this gateway lacks")
        stream = None
        pump = None
        request_id = ""
        try:
            try:
                first = await self._next_message(request_iterator)
            except StopAsyncIteration:
                return
            if first.WhichOneof("request") != "config":
                raise RequestError("the first message of a stream must be a config")
            tag = CURRENT_REQUEST.get()  # named by the interceptor (auth.GatewayInterceptor): the request log's id
            request_id = tag.request_id if tag is not None else ""
            # hotwords and ITN are checked (and the scorer built) once, before any audio
            scorer = await asyncio.to_thread(request_options.hotword_scorer, self.hotwords, first.config)
            itn_options = request_options.itn_options(self.hotwords, first.config)
            options = request_options.streaming_options(first.config, scorer)
            self.transcriber.validate_language(options.language)
            decoder = request_options.stream_decoder(first.config)
            queue: asyncio.Queue = asyncio.Queue(maxsize=STREAM_QUEUE_SIZE)

            async def emit(result: StreamResult) -> None:
                await queue.put(result)

            stream = RecognitionStream(
                self.transcriber,
                self.vad,
                options,
                decoder,
                emit,
                max_duration_s=self.config.max_stream_duration_s or self.config.max_audio_duration_s,
                decode_gate=self._stream_gate,
                on_error=lambda error: queue.put_nowait(error) if not queue.full() else None,
            )
            pump = asyncio.create_task(self._pump(request_iterator, stream, queue))
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if not first.config.keep_model_script:
                    item = simplify_stream_result(item)
                normalized = ""
                if itn_options is not None and item.text:  # in order, off the event loop (1-2 ms a result)
                    normalized = await asyncio.to_thread(itn.normalize, item.text, itn_options)
                yield responses.stream_response(item, model_name=self.transcriber.model_name, normalized_text=normalized)
            await pump
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status, never a traceback
            await abort_for(context, error, f"stream {request_id}")
        finally:
            # shielded: a second cancellation must not stop the decoder sequences being ended
            await asyncio.shield(self._close_stream(pump, stream))

    @staticmethod
    async def _close_stream(pump: asyncio.Task | None, stream: RecognitionStream | None) -> None:
        if pump is not None and not pump.done():
            pump.cancel()
        if stream is not None:
            await stream.close()  # the decodes go first: a pump inside finish() waits for them
        if pump is not None:
            await asyncio.gather(pump, return_exceptions=True)

    async def _next_message(self, request_iterator):
        """The client's next message, or StreamIdleError after the idle timeout (StopAsyncIteration at the end)."""
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that
            # arrives as the read completes, and a client's cancel ends its reads at that moment
            # (the pump then took the cancel for a half-close and decoded the rest of the stream)
            async with asyncio.timeout(self.config.stream_idle_timeout_s):
                return await request_iterator.__anext__()
        except TimeoutError:
            raise StreamIdleError(
                f"no message for {self.config.stream_idle_timeout_s:g} s; idle streams are closed"
            ) from None

    async def _pump(self, request_iterator, stream: RecognitionStream, queue: asyncio.Queue) -> None:
        """Client messages -> the stream; half-close finalises; errors go to the response loop."""
        try:
            while True:
                try:
                    message = await self._next_message(request_iterator)
                except StopAsyncIteration:
                    break
                kind = message.WhichOneof("request")
                if kind == "config":
                    raise RequestError("config may only be sent once, as the first message")
                if kind == "audio":
                    audio = message.audio
                    request_options.audio_size(len(audio), self.config.max_audio_bytes)
                    await stream.push(audio)
            await stream.finish()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - handed to the response loop
            await queue.put(error)
            return
        await queue.put(None)


def load_vad(path: Path | None) -> SileroVad | None:
    """The VAD model: ``path`` must load when given; the default path may be missing (warning)."""
    if path is not None:
        return SileroVad(path)
    try:
        return SileroVad()
    except VadModelError as error:
        log.error("%s; Transcribe falls back to fixed 30 s windows, StreamingRecognize is unavailable", error)
        return None


async def watch_triton(
    client: TritonReplicas, transcriber: Transcriber, health: HealthServicer, interval_s: float, admission: Admission | None = None
) -> None:
    """Keep the health status (and ``admission.triton_ready``) in step with Triton; recovers by itself when Triton returns."""
    serving = None
    while True:
        polled = time.perf_counter()
        ready = await client.models_ready()
        metrics.TRITON_RTT.observe(time.perf_counter() - polled)
        if ready and not serving:
            try:
                await transcriber.check_deployment()
            except (ModelMismatchError, TritonUnavailableError, TritonInferenceError) as error:
                log.error("%s", error)
                ready = False
        if ready != serving:
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await health.set(name, status)
            if admission is not None:
                admission.triton_ready = bool(ready)
            metrics.TRITON_READY.set(1 if ready else 0)
            log.info("triton %s: %s", client.url, "ready, SERVING" if ready else "not ready, NOT_SERVING")
            serving = ready
        await asyncio.sleep(interval_s)


async def serve(config: GatewayConfig, stop: asyncio.Event | None = None) -> None:
    client = TritonReplicas(config.triton_url)
    vad = load_vad(config.vad_model)
    transcriber = Transcriber(client, config.model_dir, max_concurrent_windows=config.max_concurrent_windows, vad=vad,
                              server_search=config.server_search, server_encode=config.server_encode)
    keys = ApiKeys.load(config.api_keys) if config.api_keys else None
    admission = Admission(config.admission_limits())
    server = grpc.aio.server(
        interceptors=[GatewayInterceptor(keys, admission)],
        options=[
            ("grpc.max_receive_message_length", config.max_audio_bytes + MIB),
            ("grpc.max_send_message_length", 64 * MIB),
        ],
    )
    decode_pool = DecodePool(config.decode_workers, config.decode_worker_idle_s) if config.decode_workers else None
    if decode_pool is not None:
        await asyncio.to_thread(decode_pool.warm_up)
    hotwords = None
    vocabulary = transcriber.family.hotword_vocabulary()
    if vocabulary is not None:
        hotwords = HotwordRegistry(config.hotword_dir or default_hotword_dir(), vocabulary)
    tickets = remote_tickets.open_ticket_service(
        config.history_db, config.ticket_service, config.ticket_forwarders, preload_analyzer=config.preload_analysis
    )
    await asyncio.to_thread(itn.load)  # FSTs load once (about 0.5 s), before the first request
    await asyncio.to_thread(tickets.warm_up)
    service = AsrService(config, transcriber, vad, admission=admission, hotwords=hotwords, tickets=tickets, decode_pool=decode_pool)
    asr_pb2_grpc.add_AsrServicer_to_server(service, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    bound = server.add_secure_port(address, config.tls.credentials()) if config.tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind gRPC gateway to {address}")
    await server.start()
    log.info(
        "gateway listening on %s (%s, %s), triton at %s, model dir %s", address,
        "TLS" + (" with client certificates" if config.tls and config.tls.client_ca else "") if config.tls else "plaintext",
        f"API keys from {config.api_keys}" if keys else "no authentication", config.triton_url, config.model_dir,
    )
    if keys is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without authentication: anyone who reaches it can use every RPC", config.host)
    watcher = asyncio.create_task(watch_triton(client, transcriber, health, config.health_poll_interval_s, admission))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway shutting down")
    await health.enter_graceful_shutdown()
    watcher.cancel()
    await server.stop(grace=5.0)
    await client.close()
    if decode_pool is not None:
        decode_pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("build/models/whisper-base"))
    parser.add_argument("--triton", default="localhost:8001", help="Triton gRPC address; several: comma-separated (scale-out)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 (every interface) only when asked")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--max-audio-mb", type=float, default=64.0, help="largest audio in one message")
    parser.add_argument("--max-audio-duration-s", type=float, default=3600.0, help="longest audio of one Transcribe")
    parser.add_argument("--max-stream-duration-s", type=float, default=None, help="longest stream (default: --max-audio-duration-s)")
    parser.add_argument("--vad-model", type=Path, default=None, help=f"Silero VAD ONNX model (default {DEFAULT_MODEL_PATH})")
    parser.add_argument("--max-concurrent-windows", type=int, default=4,
                        help="chunks of Transcribe requests decoded at once (all calls together)")
    parser.add_argument("--stepwise-only", action="store_true",
                        help="every window searched here, one Triton decoder step per token (default: windows "
                             "searched inside Triton when it serves the `search` model)")
    parser.add_argument("--encode-in-gateway", action="store_true",
                        help="ask the encoder here and send its output to the search model (default: the search "
                             "model encodes the window's features itself, the output staying in Triton)")
    parser.add_argument("--max-audio-channels", type=int, default=MAX_CONTAINER_CHANNELS)
    parser.add_argument("--max-transcribes", type=int, default=16, help="concurrent Transcribe calls; more: RESOURCE_EXHAUSTED")
    parser.add_argument("--max-audio-in-flight-s", type=float, default=None,
                        help="decoded audio held by Transcribe calls at once (default: --max-audio-duration-s); more: RESOURCE_EXHAUSTED")
    parser.add_argument("--max-streams", type=int, default=8, help="concurrent streams; more: RESOURCE_EXHAUSTED")
    parser.add_argument("--max-receiving", type=int, default=2, help="request messages read at once (admitted calls only)")
    parser.add_argument("--receive-wait-s", type=float, default=10.0, help="longest wait for a turn to be read; then RESOURCE_EXHAUSTED")
    parser.add_argument("--max-request-mb-in-flight", type=float, default=None,
                        help="request bytes held by calls at once (default: --max-audio-mb); more: RESOURCE_EXHAUSTED")
    parser.add_argument("--retry-after-s", type=float, default=2.0, help="retry hint sent with RESOURCE_EXHAUSTED")
    parser.add_argument("--stream-idle-timeout-s", type=float, default=30.0)
    parser.add_argument("--decode-workers", type=int, default=default_decode_workers(),
                        help="audio decoder processes (0: in the gateway process; default: one per two cores, 1-2)")
    parser.add_argument("--decode-worker-idle-s", type=float, default=WORKER_IDLE_S,
                        help="decoder processes unused this long exit until the next call (0: never)")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM); with --tls-key: TLS")
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-client-ca", type=Path, help="CA of client certificates: mutual TLS")
    parser.add_argument("--api-keys", type=Path, help="API-key file (config/api_keys.example.yaml); none: no authentication")
    parser.add_argument("--audit-log", type=Path, help="corrections audit log, one JSON line each (default: the gateway log)")
    parser.add_argument("--max-stream-decodes", type=int, default=4, help="stream decodes in flight (finals first)")
    parser.add_argument("--hotword-dir", type=Path, default=None, help="server-side hotword lists (default config/hotwords)")
    parser.add_argument("--history-db", type=Path, default=None, help="SQLite ticket history (default from analysis config)")
    parser.add_argument("--preload-analysis", action="store_true",
                        help="load the ticket analyzer (about 220 MB) at start, not at the first analysis")
    remote_tickets.add_arguments(parser)  # --ticket-service ... (replicas), --ticket-forwarders (the history's owner)
    parser.add_argument("--malloc-arenas", type=int, default=DEFAULT_MALLOC_ARENAS,
                        help="glibc malloc arenas of this process at most (0: glibc's default, 8 per core)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="json: one JSON object per line")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics on this port (0: off)")
    parser.add_argument("--metrics-host", default=None, help="address of /metrics (default: --host)")
    args = parser.parse_args(argv)
    cap_malloc_arenas(args.malloc_arenas)  # before the gRPC server's threads
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        parser.error("--tls-cert and --tls-key go together; --tls-client-ca needs them")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(metrics.JsonFormatter())
    if args.metrics_port:
        metrics.serve_metrics(args.metrics_host or args.host, args.metrics_port)
    if args.audit_log:
        handler = logging.FileHandler(args.audit_log, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("gateway.audit").addHandler(handler)
    config = GatewayConfig(
        model_dir=args.model_dir,
        triton_url=args.triton,
        host=args.host,
        port=args.port,
        max_audio_bytes=int(args.max_audio_mb * MIB),
        max_audio_duration_s=args.max_audio_duration_s,
        max_stream_duration_s=args.max_stream_duration_s,
        vad_model=args.vad_model,
        max_concurrent_windows=args.max_concurrent_windows,
        server_search=not args.stepwise_only,
        server_encode=not args.encode_in_gateway,
        max_audio_channels=args.max_audio_channels,
        max_transcribes=args.max_transcribes,
        max_audio_in_flight_s=args.max_audio_in_flight_s,
        max_streams=args.max_streams,
        max_receiving=args.max_receiving,
        receive_wait_s=args.receive_wait_s,
        max_request_bytes_in_flight=int(args.max_request_mb_in_flight * MIB) if args.max_request_mb_in_flight else None,
        retry_after_s=args.retry_after_s,
        stream_idle_timeout_s=args.stream_idle_timeout_s,
        decode_workers=args.decode_workers,
        decode_worker_idle_s=args.decode_worker_idle_s,
        tls=TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        api_keys=args.api_keys,
        audit_log=args.audit_log,
        max_stream_decodes=args.max_stream_decodes,
        hotword_dir=args.hotword_dir,
        history_db=args.history_db,
        preload_analysis=args.preload_analysis,
        ticket_service=remote_tickets.config_from_args(args, parser),
        ticket_forwarders=remote_tickets.forwarders_from_args(args),
    )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
