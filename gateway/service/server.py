"""gRPC gateway: asr.v1.Asr + grpc.health.v1 + server reflection.

    python -m gateway.service.server --port 50051 --triton localhost:8001 --model-dir build/models/whisper-base

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from gateway.asr import itn
from gateway.asr.audio import decode_audio, pcm_to_float
from gateway.asr.hotwords import HotwordRegistry, default_hotword_dir
from gateway.asr.streaming import DecodeGate, RecognitionStream, StreamResult
from gateway.asr.transcriber import ModelMismatchError, Transcriber
from gateway.asr.triton_client import TritonAsrClient, TritonInferenceError, TritonUnavailableError
from gateway.asr.vad import DEFAULT_MODEL_PATH, SileroVad, VadModelError
from gateway.protocol import asr_pb2, asr_pb2_grpc
from gateway.service import options as request_options
from gateway.service import responses
from gateway.service.errors import abort_for
from gateway.service.options import MIB, RequestError
from gateway.service.ticket_service import TicketService

log = logging.getLogger("gateway")

SERVICE_NAME = asr_pb2.DESCRIPTOR.services_by_name["Asr"].full_name


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


STREAM_QUEUE_SIZE = 256  # responses buffered for a slow reader before the stream waits


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
            request_options.audio_size(len(data), self.config.max_audio_bytes)
            return decode_audio(data, max_duration_s=self.config.max_audio_duration_s, keep_channels=keep_channels)
        raw = request.raw_audio
        request_options.audio_size(len(raw.pcm), self.config.max_audio_bytes)
        encoding = request_options.pcm_format("raw_audio", raw.encoding, raw.sample_rate_hz, raw.channels)
        return pcm_to_float(
            raw.pcm,
            raw.sample_rate_hz,
            encoding=encoding,
            channels=raw.channels or 1,
            max_duration_s=self.config.max_audio_duration_s,
            keep_channels=keep_channels,
        )

    async def Transcribe(self, request, context):
        started = time.perf_counter()
        try:
            separate = request_options.separate_channels(request)
            scorer = await asyncio.to_thread(request_options.hotword_scorer, self.hotwords, request)
            options = request_options.transcribe_options(request, scorer, have_vad=self.vad is not None)
            itn_options = request_options.itn_options(self.hotwords, request)
            self.transcriber.validate_language(options.language)
            audio = await asyncio.to_thread(self._decode, request, separate)
            labels = request_options.channel_labels(request, audio.shape[0]) if separate else None
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
            await abort_for(context, error, f"request {request.request_id}")
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
            return await self.tickets.correct(request.ticket_id, request.field, request.value, request.corrected_by)
        except Exception as error:  # noqa: BLE001 - mapped to a status, never a traceback
            await abort_for(context, error, "CorrectTicket")

    # ------------------------------------------------------------------ streaming
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
                yield responses.stream_response(item, model_name=self.transcriber.model_name, normalized_text=normalized)
            await pump
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status, never a traceback
            await abort_for(context, error, f"stream {request_id}")
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
                    request_options.audio_size(len(message.audio), self.config.max_audio_bytes)
                    await stream.push(message.audio)
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
