"""Command-line client for the gateway.

    python -m gateway.clients.cli transcribe FILE... [--server localhost:50051] [--json] [--language zh]
        [--word-timestamps] [--separate-channels [--channel-labels agent,caller]]
    python -m gateway.clients.cli stream FILE [--realtime] [--language zh]   # StreamingRecognize: partials + finals
    python -m gateway.clients.cli batch INPUT_DIR --out OUT_DIR [--concurrency 4] [--server localhost:50051]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

from gateway.clients.channel import (
    DEFAULT_SERVER,
    ChannelSecurity,
    add_security_arguments,
    open_channel,
    response_to_dict,
    security_from_args,
)
from gateway.protocol import asr_pb2, asr_pb2_grpc


def transcribe_files(
    paths: list[Path],
    *,
    server: str = DEFAULT_SERVER,
    language: str = "",
    beam_size: int = 0,
    timeout_s: float = 600.0,
    word_timestamps: bool = False,
    channel_labels: list[str] | None = None,
    security: ChannelSecurity | None = None,
):
    """Yields (path, response dict or None, error message or None) per file.

    ``channel_labels`` (even empty) transcribes each channel on its own (CHANNEL_MODE_SEPARATE)."""
    with open_channel(server, security) as channel:
        stub = asr_pb2_grpc.AsrStub(channel)
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError as error:
                yield path, None, f"cannot read: {error.strerror}"
                continue
            request = asr_pb2.TranscribeRequest(
                audio_content=data, language=language, beam_size=beam_size, request_id=path.name,
                word_timestamps=word_timestamps,
            )
            if channel_labels is not None:
                request.channel_mode = asr_pb2.CHANNEL_MODE_SEPARATE
                request.channel_labels.extend(channel_labels)
            try:
                response = stub.Transcribe(request, timeout=timeout_s)
            except grpc.RpcError as error:
                yield path, None, f"{error.code().name}: {error.details()}"
                continue
            yield path, response_to_dict(response), None


def _cmd_transcribe(args: argparse.Namespace) -> int:
    failures = 0
    results = []
    labels = None
    if args.separate_channels:
        labels = [x.strip() for x in args.channel_labels.split(",")] if args.channel_labels else []
    for path, result, error in transcribe_files(
        args.files, server=args.server, language=args.language, beam_size=args.beam_size, timeout_s=args.timeout,
        word_timestamps=args.word_timestamps, channel_labels=labels, security=security_from_args(args),
    ):
        if error:
            failures += 1
            print(f"{path}: error: {error}", file=sys.stderr)
            continue
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            target = args.out / f"{path.stem}.json"
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"file": str(path), **result}, ensure_ascii=False, indent=2), encoding="utf-8")
            tmp.replace(target)
        if args.json:
            results.append({"file": str(path), **result})
        else:
            duration = float(result.get("audio_duration_s", 0.0))
            took = float(result.get("processing_time_s", 0.0))
            print(f"{path} [{duration:.1f} s audio, {took:.2f} s, {result.get('language', '')}]: {result.get('text', '')}")
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    return 1 if failures else 0


def _add_unavailable_batch_parser(sub, error: ImportError) -> None:
    def explain(_args: argparse.Namespace) -> int:
        print(f"batch needs the full requirements (requirements.txt): {error}", file=sys.stderr)
        return 2

    p = sub.add_parser("batch", help=f"unavailable here: {error}")
    p.set_defaults(func=explain)


def stream_file(path: Path, *, server: str = DEFAULT_SERVER, language: str = "", realtime: bool = False,
                chunk_s: float = 0.1, word_timestamps: bool = False, timeout_s: float = 3600.0,
                security: ChannelSecurity | None = None):
    """Send a file as a StreamingRecognize stream (16 kHz s16 PCM, paced in real time when
    ``realtime``); yields the responses."""
    import time

    from gateway.asr.audio import SAMPLE_RATE, decode_audio

    pcm = (decode_audio(path.read_bytes()).clip(-1, 1) * 32767).astype("<i2").tobytes()
    step = int(SAMPLE_RATE * chunk_s) * 2

    def requests():
        yield asr_pb2.StreamingRecognizeRequest(config=asr_pb2.StreamingConfig(
            encoding=asr_pb2.RawAudio.S16LE, sample_rate_hz=SAMPLE_RATE, language=language,
            word_timestamps=word_timestamps, request_id=path.name))
        started = time.monotonic()
        for i in range(0, len(pcm), step):
            if realtime:
                time.sleep(max(0.0, started + i / 2 / SAMPLE_RATE - time.monotonic()))
            yield asr_pb2.StreamingRecognizeRequest(audio=pcm[i : i + step])

    with open_channel(server, security) as channel:
        yield from asr_pb2_grpc.AsrStub(channel).StreamingRecognize(requests(), timeout=timeout_s)


def _cmd_stream(args: argparse.Namespace) -> int:
    try:
        for response in stream_file(args.file, server=args.server, language=args.language, realtime=args.realtime,
                                    word_timestamps=args.word_timestamps, security=security_from_args(args)):
            r = response.result
            if args.json:
                print(json.dumps(response_to_dict(response), ensure_ascii=False), flush=True)
            else:
                kind = "final  " if r.is_final else f"partial {r.stability:.2f}"
                print(f"[{r.start_s:7.2f}-{r.end_s:7.2f}] #{r.utterance} {kind}: {r.text}", flush=True)
    except grpc.RpcError as error:
        print(f"{args.file}: error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"{args.file}: error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.clients.cli", description="ASR gateway client")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("transcribe", help="transcribe audio files")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--server", default=DEFAULT_SERVER)
    p.add_argument("--language", default="", help="language code (e.g. zh, en); empty: detect")
    p.add_argument("--beam-size", type=int, default=0, help="0: server default (5); 1: greedy")
    p.add_argument("--json", action="store_true", help="print JSON instead of text lines")
    p.add_argument("--out", type=Path, help="also write OUT/<name>.json per file")
    p.add_argument("--timeout", type=float, default=600.0, help="per-file deadline in seconds")
    p.add_argument("--word-timestamps", action="store_true", help="segments from Whisper timestamps, words with times")
    p.add_argument("--separate-channels", action="store_true", help="transcribe each channel on its own")
    p.add_argument("--channel-labels", default="", help="speaker label per channel, e.g. agent,caller")
    add_security_arguments(p)
    p.set_defaults(func=_cmd_transcribe)
    p = sub.add_parser("stream", help="send a file as a live stream; prints partial and final results")
    p.add_argument("file", type=Path)
    p.add_argument("--server", default=DEFAULT_SERVER)
    p.add_argument("--language", default="")
    p.add_argument("--realtime", action="store_true", help="pace the audio like a live call")
    p.add_argument("--word-timestamps", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per response")
    add_security_arguments(p)
    p.set_defaults(func=_cmd_stream)
    try:
        from gateway.clients.batch import add_batch_parser  # needs analysis/ and its packages (not in the gateway image)
    except ImportError as error:
        _add_unavailable_batch_parser(sub, error)
    else:
        add_batch_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
