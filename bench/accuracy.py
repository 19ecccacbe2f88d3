"""Accuracy and latency of the full path (gateway + Triton) beside faster-whisper.

Same Whisper-base weights, same beam size, same clips, same machine, one run:

    make bench            # or: python -m bench.accuracy --model-dir build/models/whisper-base

Prints a per-clip table (transcripts, CER for zh / WER for en) and writes
build/bench/accuracy.json. Also times the first and the warm request for a 10 s clip.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
import wave
from pathlib import Path

import grpc
import jiwer
import numpy as np

from gateway.asr.audio import decode_audio
from gateway.launch.local import GatewayProcess
from gateway.protocol import asr_pb2, asr_pb2_grpc
from gateway.launch.triton_process import TritonProcess
from model_repository.render import render_repository
from tests.conftest import cer, sample_clips


def wer(hypothesis: str, reference: str) -> float:
    import re

    def words(text: str) -> str:
        return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())

    return jiwer.wer(words(reference), words(hypothesis)) if words(reference) else 0.0


def error_rate(language: str, hypothesis: str, reference: str) -> float:
    return 100 * (cer(hypothesis, reference) if language == "zh" else wer(hypothesis, reference))


def wav_bytes(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def ten_second_clip() -> bytes:
    zh = [decode_audio(c.path.read_bytes()) for c in sample_clips() if c.language == "zh"]
    gap = np.zeros(8000, np.float32)
    audio = np.concatenate([part for clip in zh for part in (clip, gap)])
    audio = np.concatenate([audio, audio])[: 10 * 16000]
    return wav_bytes(audio)


def run_gateway(model_dir: Path, precision: str, beam_size: int, work: Path) -> dict:
    repository = work / f"repo-{precision}"
    started = time.perf_counter()
    render_repository(model_dir, repository, precision=precision)
    results: dict = {"clips": {}}
    with TritonProcess(repository, log_path=work / f"triton-{precision}.log") as triton, GatewayProcess(
        model_dir, triton.grpc_url, log_path=work / f"gateway-{precision}.log"
    ) as gateway:
        results["startup_s"] = time.perf_counter() - started
        with grpc.insecure_channel(gateway.address) as channel:
            stub = asr_pb2_grpc.AsrStub(channel)
            clip10 = ten_second_clip()
            latencies = []
            for _ in range(6):
                t0 = time.perf_counter()
                stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=clip10, language="zh", beam_size=beam_size), timeout=300)
                latencies.append(time.perf_counter() - t0)
            results["latency_10s_first_s"] = latencies[0]
            results["latency_10s_warm_s"] = statistics.median(latencies[1:])
            for clip in sample_clips():
                t0 = time.perf_counter()
                response = stub.Transcribe(
                    asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), language=clip.language, beam_size=beam_size),
                    timeout=300,
                )
                results["clips"][clip.name] = {"text": response.text, "seconds": time.perf_counter() - t0}
    return results


def run_faster_whisper(model_dir: Path, compute_type: str, beam_size: int) -> dict:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(model_dir / "ct2"), device="cpu", compute_type=compute_type, cpu_threads=2)
    results: dict = {"clips": {}}
    for clip in sample_clips():
        audio = decode_audio(clip.path.read_bytes())
        t0 = time.perf_counter()
        segments, _ = model.transcribe(audio, language=clip.language, beam_size=beam_size, condition_on_previous_text=False, vad_filter=False)
        text = "".join(s.text for s in segments).strip()
        results["clips"][clip.name] = {"text": text, "seconds": time.perf_counter() - t0}
    audio10 = decode_audio(ten_second_clip())
    latencies = []
    for _ in range(6):
        t0 = time.perf_counter()
        list(model.transcribe(audio10, language="zh", beam_size=beam_size, vad_filter=False)[0])
        latencies.append(time.perf_counter() - t0)
    results["latency_10s_first_s"] = latencies[0]
    results["latency_10s_warm_s"] = statistics.median(latencies[1:])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("build/models/whisper-base"))
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("build/bench/accuracy.json"))
    args = parser.parse_args(argv)

    engines: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "int8"):
            print(f"gateway+triton {precision} ...", flush=True)
            engines[f"ours-{precision}"] = run_gateway(args.model_dir, precision, args.beam_size, Path(tmp))
    for compute_type in ("float32", "int8"):
        print(f"faster-whisper {compute_type} ...", flush=True)
        engines[f"faster-whisper-{compute_type}"] = run_faster_whisper(args.model_dir, compute_type, args.beam_size)

    clips = sample_clips()
    print(f"\nbeam {args.beam_size}; error = CER % (zh, t2s + no punctuation) or WER % (en)\n")
    print("| clip | reference | " + " | ".join(engines) + " |")
    print("|---|---|" + "---|" * len(engines))
    summary = {name: [] for name in engines}
    for clip in clips:
        cells = []
        for name, result in engines.items():
            text = result["clips"][clip.name]["text"]
            err = error_rate(clip.language, text, clip.reference_text)
            result["clips"][clip.name]["error"] = err
            summary[name].append(err)
            cells.append(f"{text} ({err:.1f})")
        print(f"| {clip.name} | {clip.reference_text} | " + " | ".join(cells) + " |")
    print("| **mean error** | | " + " | ".join(f"{statistics.mean(v):.2f}" for v in summary.values()) + " |")
    print("| 10 s clip, first request (s) | | " + " | ".join(f"{r['latency_10s_first_s']:.3f}" for r in engines.values()) + " |")
    print("| 10 s clip, warm median (s) | | " + " | ".join(f"{r['latency_10s_warm_s']:.3f}" for r in engines.values()) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(engines, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
