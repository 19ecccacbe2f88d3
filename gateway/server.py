"""gRPC gateway: asr.v1.Asr + grpc.health.v1 + server reflection.

    python -m gateway.server --port 50051 --triton localhost:8001 --model-dir build/models/whisper-base

Stateless: any number of replicas can share one Triton. Health answers NOT_SERVING until
Triton's encoder and decoder are ready (and again whenever they stop answering).

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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from gateway.audio import (
    ALLOWED_DEMUXERS,
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    AudioDecodeError,
    ContainerStream,
    PcmStream,
    decode_audio,
    pcm_to_float,
)
from gateway import itn
from gateway.decoding import DecodingError
from gateway.hotwords import HotwordError, HotwordRegistry, default_hotword_dir
from gateway.ticket_service import TicketNotFound, TicketService, TicketServiceError
from gateway.protocol import asr_pb2, asr_pb2_grpc
from gateway.streaming import (
    DEFAULT_PARTIAL_INTERVAL_S,
    DecodeGate,
    DEFAULT_STREAM_BEAM_SIZE,
    STREAMING_VAD,
    RecognitionStream,
    StreamConfigError,
    StreamingOptions,
    StreamResult,
)
from gateway.transcriber import (
    DEFAULT_BEAM_SIZE,
    MAX_BEAM_SIZE,
    ModelMismatchError,
    Transcriber,
    TranscribeOptions,
    VadUnavailableError,
    Word,
    join_text,
)
from gateway.vad import DEFAULT_MODEL_PATH, SileroVad, VadModelError, VadOptions, VadOptionsError
from gateway.tokenizer import UnknownLanguageError
from gateway.triton_client import TritonAsrClient, TritonInferenceError, TritonUnavailableError

log = logging.getLogger("gateway")

SERVICE_NAME = asr_pb2.DESCRIPTOR.services_by_name["Asr"].full_name
MIB = 1024 * 1024
MAX_TICKET_TEXT_BYTES = 1 * MIB


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: Path
    triton_url: str = "localhost:8001"
    host: str = "0.0.0.0"
    port: int = 50051
    max_audio_bytes: int = 512 * MIB
    max_audio_duration_s: float = 4 * 3600.0
    health_poll_interval_s: float = 1.0
    max_concurrent_windows: int = 8
    vad_model: Path | None = None  # None: build/vad/silero_vad.onnx when it exists
    max_streams: int = 64  # concurrent StreamingRecognize calls; more get RESOURCE_EXHAUSTED
    max_stream_decodes: int = 4  # stream decodes in flight over all streams (finals first)
    hotword_dir: Path | None = None  # None: $ASR_HOTWORD_DIR or config/hotwords
    history_db: Path | None = None  # ticket history; None: store.path of analysis/config/defaults.yaml

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "model_info.json").is_file():
            raise FileNotFoundError(f"{self.model_dir}/model_info.json not found; run `make export` first")
        if self.max_audio_bytes <= 0 or self.max_audio_duration_s <= 0:
            raise ValueError("max_audio_bytes and max_audio_duration_s must be positive")


class RequestError(ValueError):
    """A client error that maps to INVALID_ARGUMENT."""


_RAW_ENCODINGS = {
    asr_pb2.RawAudio.S16LE: "s16le",
    asr_pb2.RawAudio.F32LE: "f32le",
}
STREAM_QUEUE_SIZE = 256  # responses buffered for a slow reader before the stream waits


def _check_pcm_format(what: str, encoding_value: int, sample_rate_hz: int, channels: int) -> str:
    encoding = _RAW_ENCODINGS.get(encoding_value)
    if encoding is None:
        names = ", ".join(asr_pb2.RawAudio.Encoding.Name(v) for v in _RAW_ENCODINGS)
        raise RequestError(f"{what}.encoding {encoding_value} is not supported; use one of {names}")
    if sample_rate_hz == 0:
        raise RequestError(f"{what}.sample_rate_hz is required ({MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz)")
    if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise RequestError(
            f"{what}.sample_rate_hz {sample_rate_hz} Hz is outside {MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz"
        )
    if channels < 0:
        raise RequestError(f"{what}.channels must be >= 0, got {channels}")
    return encoding


def vad_options(message, base: VadOptions) -> VadOptions | None:
    """VadConfig (0 = default per field) -> VadOptions over ``base``; None when disabled."""
    if message.disabled:
        return None
    changes = {}
    if message.threshold:
        changes["threshold"] = round(float(message.threshold), 4)
    if message.max_segment_s:
        changes["max_segment_s"] = round(float(message.max_segment_s), 3)
    for name in ("min_silence_ms", "speech_pad_ms", "min_speech_ms"):
        if getattr(message, name):
            changes[name] = int(getattr(message, name))
    try:
        return replace(base, **changes) if changes else base
    except VadOptionsError as error:
        raise RequestError(f"vad: {error}") from error


def _words_pb(words: list[Word]) -> list:
    return [
        asr_pb2.Word(text=w.text, start_s=w.start_s, end_s=w.end_s, confidence=w.confidence, token_ids=w.token_ids)
        for w in words
    ]


def _hotword_scorer(registry: HotwordRegistry | None, request):
    """Per-request hotwords merged with the server lists; None when there is nothing to boost."""
    if registry is None:
        if request.hotwords:
            raise HotwordError("hotwords are not supported for this model family")
        return None
    requested = {}
    for hotword in request.hotwords:
        requested[hotword.phrase] = hotword.weight or 1.0
    return registry.scorer(
        requested or None,
        use_server_lists=not request.disable_server_hotwords,
        boost=request.hotword_boost or None,
    )


# what a client may be told about a failure: its own mistakes in full, ours only in the log
_INVALID_ARGUMENT_ERRORS = (
    RequestError, AudioDecodeError, UnknownLanguageError, StreamConfigError, HotwordError, itn.ItnError,
    TicketServiceError,
)


async def _abort_for(context, error: BaseException, where: str) -> None:
    """Abort the RPC with the status that fits ``error`` (never a traceback to the client)."""
    if isinstance(error, TicketNotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
    if isinstance(error, _INVALID_ARGUMENT_ERRORS):
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


def _itn_options(registry: HotwordRegistry | None, request) -> itn.ItnOptions | None:
    """ITN settings of a TranscribeRequest or StreamingConfig; None without ``itn``.

    Protected terms (left as spoken): the server lists' phrases + the request's hotwords.
    """
    if request.itn_time_format not in ("", "24h", "chinese"):
        raise RequestError(f"itn_time_format must be '24h' or 'chinese', got {request.itn_time_format!r}")
    if not request.itn:
        return None
    server_terms = registry.terms if registry else frozenset()
    protected = server_terms | {h.phrase for h in request.hotwords}
    return itn.ItnOptions(enabled=True, time_format=request.itn_time_format or "24h", protected_terms=protected)


class AsrService(asr_pb2_grpc.AsrServicer):
    def __init__(
        self,
        config: GatewayConfig,
        transcriber: Transcriber,
        vad: SileroVad | None = None,
        *,
        hotwords: HotwordRegistry | None = None,
        tickets: TicketService | None = None,
    ) -> None:
        self.config = config
        self.transcriber = transcriber
        self.vad = vad
        self.hotwords = hotwords  # None: the model family has no hotword vocabulary
        self.tickets = tickets or TicketService(config.history_db)
        self._streams = 0
        self._stream_gate = DecodeGate(config.max_stream_decodes)

    def _decode(self, request, keep_channels: bool = False) -> np.ndarray:
        kind = request.WhichOneof("audio")
        if kind is None:
            raise RequestError("request has no audio: set audio_content or raw_audio")
        if kind == "audio_content":
            data = request.audio_content
            self._check_size(len(data))
            return decode_audio(data, max_duration_s=self.config.max_audio_duration_s, keep_channels=keep_channels)
        raw = request.raw_audio
        self._check_size(len(raw.pcm))
        encoding = _check_pcm_format("raw_audio", raw.encoding, raw.sample_rate_hz, raw.channels)
        return pcm_to_float(
            raw.pcm,
            raw.sample_rate_hz,
            encoding=encoding,
            channels=raw.channels or 1,
            max_duration_s=self.config.max_audio_duration_s,
            keep_channels=keep_channels,
        )

    def _check_size(self, n_bytes: int) -> None:
        if n_bytes > self.config.max_audio_bytes:
            raise RequestError(f"audio is {n_bytes} bytes; this server accepts at most {self.config.max_audio_bytes}")

    async def Transcribe(self, request, context):
        started = time.perf_counter()
        try:
            beam_size = request.beam_size or DEFAULT_BEAM_SIZE
            if not 1 <= beam_size <= MAX_BEAM_SIZE:
                raise RequestError(f"beam_size must be in 1..{MAX_BEAM_SIZE}, got {request.beam_size}")
            if request.channel_mode not in (asr_pb2.CHANNEL_MODE_UNSPECIFIED, asr_pb2.CHANNEL_MODE_DOWNMIX, asr_pb2.CHANNEL_MODE_SEPARATE):
                raise RequestError(f"unknown channel_mode {request.channel_mode}")
            separate = request.channel_mode == asr_pb2.CHANNEL_MODE_SEPARATE
            options = TranscribeOptions(
                language=request.language or None,
                beam_size=beam_size,
                word_timestamps=request.word_timestamps,
                vad=vad_options(request.vad, VadOptions()),
                scorer=await asyncio.to_thread(_hotword_scorer, self.hotwords, request),
            )
            itn_options = _itn_options(self.hotwords, request)
            if options.vad is not None and self.vad is None:
                options = replace(options, vad=None)  # no VAD model: fixed 30 s windows (logged at start)
            self.transcriber.validate_language(options.language)
            audio = await asyncio.to_thread(self._decode, request, separate)
            labels = None
            if separate:
                given = list(request.channel_labels)
                labels = [given[i] if i < len(given) and given[i] else f"channel {i}" for i in range(audio.shape[0])]
            transcript = await self.transcriber.transcribe(audio, options, channel_labels=labels)
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
            await _abort_for(context, error, f"request {request.request_id}")
        segments = [
            asr_pb2.Segment(
                start_s=s.start_s,
                end_s=s.end_s,
                text=s.text,
                confidence=s.confidence,
                token_ids=s.token_ids,
                avg_logprob=s.avg_logprob,
                words=_words_pb(s.words),
                channel=s.channel,
                speaker=s.speaker,
                normalized_text=normalized[i] if normalized else "",
            )
            for i, s in enumerate(transcript.segments)
        ]
        return asr_pb2.TranscribeResponse(
            text=transcript.text,
            segments=segments,
            audio_duration_s=transcript.duration_s,
            processing_time_s=time.perf_counter() - started,
            model_name=self.transcriber.model_name,
            language=transcript.language,
            normalized_text=join_text(normalized, transcript.language) if normalized else "",
            ticket=ticket,
        )

    async def AnalyzeTicket(self, request, context):
        try:
            if len(request.text.encode("utf-8")) > MAX_TICKET_TEXT_BYTES:
                raise RequestError(f"text is over {MAX_TICKET_TEXT_BYTES} bytes")
            return await self.tickets.analyze(request.text, dict(request.metadata), record=request.record)
        except Exception as error:  # noqa: BLE001 - mapped to a status, never a traceback
            await _abort_for(context, error, "AnalyzeTicket")

    async def CorrectTicket(self, request, context):
        try:
            return await self.tickets.correct(request.ticket_id, request.field, request.value, request.corrected_by)
        except Exception as error:  # noqa: BLE001 - mapped to a status, never a traceback
            await _abort_for(context, error, "CorrectTicket")

    # ------------------------------------------------------------------ streaming
    def _stream_setup(self, config, scorer=None) -> tuple[StreamingOptions, PcmStream | ContainerStream]:
        beam_size = config.beam_size or DEFAULT_STREAM_BEAM_SIZE
        if not 1 <= beam_size <= MAX_BEAM_SIZE:
            raise RequestError(f"beam_size must be in 1..{MAX_BEAM_SIZE}, got {config.beam_size}")
        language = config.language or None
        self.transcriber.validate_language(language)
        vad = vad_options(config.vad, STREAMING_VAD)
        if vad is None:
            raise RequestError("vad.disabled is not supported for streams: utterances are found by VAD")
        try:
            options = StreamingOptions(
                language=language,
                beam_size=beam_size,
                word_timestamps=config.word_timestamps,
                vad=vad,
                interim_results=config.interim_results if config.HasField("interim_results") else True,
                partial_interval_s=round(config.partial_interval_s, 3) or DEFAULT_PARTIAL_INTERVAL_S,
                scorer=scorer,
            )
        except StreamConfigError as error:
            raise RequestError(str(error)) from error
        container = config.container.strip().lower()
        if container:
            if container != "auto" and container not in ALLOWED_DEMUXERS.split(","):
                raise RequestError(f"config.container {config.container!r} is not supported; use one of auto,{ALLOWED_DEMUXERS}")
            decoder = ContainerStream("" if container == "auto" else container)
        else:
            encoding = _check_pcm_format("config", config.encoding, config.sample_rate_hz, config.channels)
            decoder = PcmStream(config.sample_rate_hz, encoding, config.channels or 1)
        return options, decoder

    async def StreamingRecognize(self, request_iterator, context):
        if self.vad is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "streaming needs the Silero VAD model, which this gateway lacks")
        if self._streams >= self.config.max_streams:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"this gateway serves at most {self.config.max_streams} streams at once"
            )
        self._streams += 1
        stream = None
        pump = None
        request_id = ""
        try:
            try:
                first = await request_iterator.__anext__()
            except StopAsyncIteration:
                return
            if first.WhichOneof("request") != "config":
                raise RequestError("the first message of a stream must be a config")
            request_id = first.config.request_id
            # hotwords and ITN are checked (and the scorer built) once, before any audio
            scorer = await asyncio.to_thread(_hotword_scorer, self.hotwords, first.config)
            itn_options = _itn_options(self.hotwords, first.config)
            options, decoder = self._stream_setup(first.config, scorer)
            queue: asyncio.Queue = asyncio.Queue(maxsize=STREAM_QUEUE_SIZE)

            async def emit(result: StreamResult) -> None:
                await queue.put(result)

            stream = RecognitionStream(
                self.transcriber,
                self.vad,
                options,
                decoder,
                emit,
                max_duration_s=self.config.max_audio_duration_s,
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
                normalized = ""
                if itn_options is not None and item.text:  # in order, off the event loop (1-2 ms a result)
                    normalized = await asyncio.to_thread(itn.normalize, item.text, itn_options)
                yield self._stream_response(item, normalized)
            await pump
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status, never a traceback
            await _abort_for(context, error, f"stream {request_id}")
        finally:
            self._streams -= 1
            if pump is not None and not pump.done():
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            if stream is not None:
                await stream.close()

    async def _pump(self, request_iterator, stream: RecognitionStream, queue: asyncio.Queue) -> None:
        """Client messages -> the stream; half-close finalises; errors go to the response loop."""
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "config":
                    raise RequestError("config may only be sent once, as the first message")
                if kind == "audio":
                    self._check_size(len(message.audio))
                    await stream.push(message.audio)
            await stream.finish()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - handed to the response loop
            await queue.put(error)
            return
        await queue.put(None)

    def _stream_response(self, result: StreamResult, normalized_text: str = ""):
        return asr_pb2.StreamingRecognizeResponse(
            result=asr_pb2.StreamingResult(
                text=result.text,
                is_final=result.is_final,
                stability=result.stability,
                start_s=result.start_s,
                end_s=result.end_s,
                words=_words_pb(result.words),
                confidence=result.confidence,
                avg_logprob=result.avg_logprob,
                token_ids=result.token_ids,
                language=result.language,
                utterance=result.utterance,
                normalized_text=normalized_text,
            ),
            audio_received_s=result.audio_received_s,
            model_name=self.transcriber.model_name,
        )


def load_vad(path: Path | None) -> SileroVad | None:
    """The VAD model: ``path`` must load when given; the default path may be missing (warning)."""
    if path is not None:
        return SileroVad(path)
    try:
        return SileroVad()
    except VadModelError as error:
        log.error("%s; Transcribe falls back to fixed 30 s windows, StreamingRecognize is unavailable", error)
        return None


async def watch_triton(client: TritonAsrClient, transcriber: Transcriber, health: HealthServicer, interval_s: float) -> None:
    """Keep the health status in step with Triton; recovers by itself when Triton returns."""
    serving = None
    while True:
        ready = await client.models_ready()
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
            log.info("triton %s: %s", client.url, "ready, SERVING" if ready else "not ready, NOT_SERVING")
            serving = ready
        await asyncio.sleep(interval_s)


async def serve(config: GatewayConfig, stop: asyncio.Event | None = None) -> None:
    client = TritonAsrClient(config.triton_url)
    vad = load_vad(config.vad_model)
    transcriber = Transcriber(client, config.model_dir, max_concurrent_windows=config.max_concurrent_windows, vad=vad)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_audio_bytes + MIB),
            ("grpc.max_send_message_length", 64 * MIB),
        ]
    )
    hotwords = None
    vocabulary = transcriber.family.hotword_vocabulary()
    if vocabulary is not None:
        hotwords = HotwordRegistry(config.hotword_dir or default_hotword_dir(), vocabulary)
    tickets = TicketService(config.history_db)
    await asyncio.to_thread(itn.load)  # FSTs load once (about 0.5 s), before the first request
    await asyncio.to_thread(tickets.warm_up)
    asr_pb2_grpc.add_AsrServicer_to_server(AsrService(config, transcriber, vad, hotwords=hotwords, tickets=tickets), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot bind gRPC gateway to {address}")
    await server.start()
    log.info("gateway listening on %s, triton at %s, model dir %s", address, config.triton_url, config.model_dir)
    watcher = asyncio.create_task(watch_triton(client, transcriber, health, config.health_poll_interval_s))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("build/models/whisper-base"))
    parser.add_argument("--triton", default="localhost:8001", help="Triton gRPC address")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--max-audio-mb", type=float, default=512.0)
    parser.add_argument("--max-audio-duration-s", type=float, default=4 * 3600.0)
    parser.add_argument("--vad-model", type=Path, default=None, help=f"Silero VAD ONNX model (default {DEFAULT_MODEL_PATH})")
    parser.add_argument("--max-concurrent-windows", type=int, default=8, help="chunks of Transcribe requests decoded at once")
    parser.add_argument("--max-streams", type=int, default=64)
    parser.add_argument("--max-stream-decodes", type=int, default=4, help="stream decodes in flight (finals first)")
    parser.add_argument("--hotword-dir", type=Path, default=None, help="server-side hotword lists (default config/hotwords)")
    parser.add_argument("--history-db", type=Path, default=None, help="SQLite ticket history (default from analysis config)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = GatewayConfig(
        model_dir=args.model_dir,
        triton_url=args.triton,
        host=args.host,
        port=args.port,
        max_audio_bytes=int(args.max_audio_mb * MIB),
        max_audio_duration_s=args.max_audio_duration_s,
        vad_model=args.vad_model,
        max_concurrent_windows=args.max_concurrent_windows,
        max_streams=args.max_streams,
        max_stream_decodes=args.max_stream_decodes,
        hotword_dir=args.hotword_dir,
        history_db=args.history_db,
    )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
