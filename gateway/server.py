"""gRPC gateway: asr.v1.Asr + grpc.health.v1 + server reflection.

    python -m gateway.server --port 50051 --triton localhost:8001 --model-dir build/models/whisper-base

Stateless: any number of replicas can share one Triton. Health answers NOT_SERVING until
Triton's encoder and decoder are ready (and again whenever they stop answering).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from gateway.audio import AudioDecodeError, decode_audio, pcm_to_float
from gateway.protocol import asr_pb2, asr_pb2_grpc
from gateway.transcriber import (
    DEFAULT_BEAM_SIZE,
    MAX_BEAM_SIZE,
    ModelMismatchError,
    Transcriber,
    TranscribeOptions,
)
from gateway.tokenizer import UnknownLanguageError
from gateway.triton_client import TritonAsrClient, TritonInferenceError, TritonUnavailableError

log = logging.getLogger("gateway")

SERVICE_NAME = asr_pb2.DESCRIPTOR.services_by_name["Asr"].full_name
MIB = 1024 * 1024


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


class AsrService(asr_pb2_grpc.AsrServicer):
    def __init__(self, config: GatewayConfig, transcriber: Transcriber) -> None:
        self.config = config
        self.transcriber = transcriber

    def _decode(self, request) -> "np.ndarray":  # noqa: F821 - numpy array
        kind = request.WhichOneof("audio")
        if kind is None:
            raise RequestError("request has no audio: set audio_content or raw_audio")
        if kind == "audio_content":
            data = request.audio_content
            self._check_size(len(data))
            return decode_audio(data, max_duration_s=self.config.max_audio_duration_s)
        raw = request.raw_audio
        self._check_size(len(raw.pcm))
        encoding = _RAW_ENCODINGS.get(raw.encoding)
        if encoding is None:
            raise RequestError(f"unsupported raw_audio.encoding {raw.encoding}")
        return pcm_to_float(
            raw.pcm, raw.sample_rate_hz, encoding=encoding, channels=raw.channels or 1, max_duration_s=self.config.max_audio_duration_s
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
            options = TranscribeOptions(language=request.language or None, beam_size=beam_size)
            audio = await asyncio.to_thread(self._decode, request)
            transcript = await self.transcriber.transcribe(audio, options)
        except (RequestError, AudioDecodeError, UnknownLanguageError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except TritonUnavailableError as error:
            log.warning("request %s: %s", request.request_id, error)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "inference server unavailable; retry later")
        except (TritonInferenceError, ModelMismatchError) as error:
            log.error("request %s: %s", request.request_id, error)
            await context.abort(grpc.StatusCode.INTERNAL, "inference failed; see gateway log")
        except Exception:  # noqa: BLE001 - never send a traceback to a client
            log.exception("request %s failed", request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see gateway log")
        segments = [
            asr_pb2.Segment(
                start_s=s.start_s,
                end_s=s.end_s,
                text=s.text,
                confidence=s.confidence,
                token_ids=s.token_ids,
                avg_logprob=s.avg_logprob,
            )
            for s in transcript.segments
        ]
        return asr_pb2.TranscribeResponse(
            text=transcript.text,
            segments=segments,
            audio_duration_s=transcript.duration_s,
            processing_time_s=time.perf_counter() - started,
            model_name=self.transcriber.model_name,
            language=transcript.language,
        )


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
    transcriber = Transcriber(client, config.model_dir, max_concurrent_windows=config.max_concurrent_windows)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_audio_bytes + MIB),
            ("grpc.max_send_message_length", 64 * MIB),
        ]
    )
    asr_pb2_grpc.add_AsrServicer_to_server(AsrService(config, transcriber), server)
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
    )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
