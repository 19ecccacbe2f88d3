"""Command-line client for the gateway.

    python -m gateway.cli transcribe FILE... [--server localhost:50051] [--json] [--language zh]
    python -m gateway.cli batch INPUT_DIR --out OUT_DIR [--concurrency 4] [--server localhost:50051]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from gateway.protocol import asr_pb2, asr_pb2_grpc

DEFAULT_SERVER = "localhost:50051"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024


def response_to_dict(response) -> dict:
    return MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def transcribe_files(
    paths: list[Path],
    *,
    server: str = DEFAULT_SERVER,
    language: str = "",
    beam_size: int = 0,
    timeout_s: float = 600.0,
):
    """Yields (path, response dict or None, error message or None) per file."""
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(server, options=options) as channel:
        stub = asr_pb2_grpc.AsrStub(channel)
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError as error:
                yield path, None, f"cannot read: {error.strerror}"
                continue
            request = asr_pb2.TranscribeRequest(
                audio_content=data, language=language, beam_size=beam_size, request_id=path.name
            )
            try:
                response = stub.Transcribe(request, timeout=timeout_s)
            except grpc.RpcError as error:
                yield path, None, f"{error.code().name}: {error.details()}"
                continue
            yield path, response_to_dict(response), None


def _cmd_transcribe(args: argparse.Namespace) -> int:
    failures = 0
    results = []
    for path, result, error in transcribe_files(
        args.files, server=args.server, language=args.language, beam_size=args.beam_size, timeout_s=args.timeout
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.cli", description="ASR gateway client")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("transcribe", help="transcribe audio files")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--server", default=DEFAULT_SERVER)
    p.add_argument("--language", default="", help="language code (e.g. zh, en); empty: detect")
    p.add_argument("--beam-size", type=int, default=0, help="0: server default (5); 1: greedy")
    p.add_argument("--json", action="store_true", help="print JSON instead of text lines")
    p.add_argument("--out", type=Path, help="also write OUT/<name>.json per file")
    p.add_argument("--timeout", type=float, default=600.0, help="per-file deadline in seconds")
    p.set_defaults(func=_cmd_transcribe)
    try:
        from gateway.batch import add_batch_parser  # needs analysis/ and its packages (not in the gateway image)
    except ImportError as error:
        _add_unavailable_batch_parser(sub, error)
    else:
        add_batch_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
