"""The overnight batch against a real Triton + gateway: outputs, resume, failures, refusals."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from openpyxl import load_workbook

from gateway.clients.batch import BatchError, OutputNotWritableError, run_batch
from gateway.clients.cli import main as cli_main

CALLS_DIR = Path(__file__).resolve().parent.parent / "data" / "calls"
SHORT_CALLS = ("call_06_E014.flac", "call_13_E094.flac", "call_16_E116.flac")


@pytest.fixture()
def input_dir(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    manifest = {json.loads(line)["file"]: line for line in (CALLS_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()}
    for name in SHORT_CALLS:
        shutil.copy(CALLS_DIR / name, folder / name)
    (folder / "manifest.jsonl").write_text("\n".join(manifest[name] for name in SHORT_CALLS) + "\n", encoding="utf-8")
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + b"\x07" * 200)  # not decodable
    (folder / "notes.txt").write_text("not audio, ignored")
    return folder


def test_batch_outputs_resume_and_failures(gateway, input_dir, tmp_path):
    out, history = tmp_path / "out", tmp_path / "history.sqlite"
    summary = run_batch(input_dir, out, gateway.address, concurrency=2, beam_size=1, history_db=history, progress=False)
    failures_text = (out / "failures.csv").read_text(encoding="utf-8-sig")
    assert (summary.total, summary.transcribed, summary.failed, summary.skipped) == (4, 3, 1, 0), failures_text
    assert summary.audio_seconds > 15 and summary.throughput > 0

    document = json.loads((out / "call_16_E116.json").read_text(encoding="utf-8"))
    assert document["machine_generated"] is True and document["audio_sha256"]
    assert document["transcript"]["segments"] and document["transcript"]["text"]
    ticket = document["ticket"]
    assert ticket["category"] == "环境卫生" and ticket["received_at"] == "2026-11-19T14:50:00"
    assert any(item["start_s"] is not None for item in ticket["key_phrases"])

    sheet = load_workbook(out / "ledger.xlsx")["工单台账"]
    header = [cell.value for cell in sheet[1]]
    rows = [dict(zip(header, (cell.value for cell in row))) for row in sheet.iter_rows(min_row=2)]
    assert len(rows) == 3 and all(row["AI生成"].startswith("是") for row in rows)
    assert {row["录音文件"] for row in rows} == set(SHORT_CALLS)
    page = (out / "dashboard.html").read_text(encoding="utf-8")
    assert "AI生成" in page and all((out / "charts" / name).is_file() for name in ("heatmap.png", "departments.png", "daily.png", "urgency.png"))
    with (out / "failures.csv").open(encoding="utf-8-sig") as stream:
        failures = list(csv.DictReader(stream))
    assert [failure["file"] for failure in failures] == ["broken.wav"]
    assert failures[0]["stage"] == "transcribe" and failures[0]["reason"].startswith("INVALID_ARGUMENT")

    # Rerun through the command line: finished calls are skipped by content hash, a lost
    # result is redone, the broken file is tried again and fails again.
    (out / "call_06_E014.json").unlink()
    code = cli_main(["batch", str(input_dir), "--out", str(out), "--server", gateway.address, "--beam-size", "1",
                     "--history-db", str(history), "--no-progress"])
    assert code == 1  # a failure remains
    result = json.loads((out / "batch_summary.json").read_text(encoding="utf-8"))
    assert (result["transcribed"], result["skipped"], result["failed"]) == (1, 2, 1)
    assert len(list(load_workbook(out / "ledger.xlsx")["工单台账"].iter_rows(min_row=2))) == 3


def test_unwritable_output_fails_before_any_transcription(input_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # No gateway listens on port 1: reaching the transcription step would fail differently.
    with pytest.raises(OutputNotWritableError, match="not writable"):
        run_batch(input_dir, blocker / "out", "127.0.0.1:1", progress=False, history_db=tmp_path / "h.sqlite")
    assert not (tmp_path / "h.sqlite").exists()


def test_corrupt_history_fails_before_any_transcription(input_dir, tmp_path):
    history = tmp_path / "history.sqlite"
    history.write_bytes(b"not sqlite" * 500)
    with pytest.raises(BatchError, match="not a readable SQLite database"):
        run_batch(input_dir, tmp_path / "out", "127.0.0.1:1", progress=False, history_db=history)
    assert not list((tmp_path / "out").glob("*.json"))


def test_missing_input_folder_and_no_gateway(tmp_path):
    with pytest.raises(BatchError, match="does not exist"):
        run_batch(tmp_path / "nope", tmp_path / "out", "127.0.0.1:1", progress=False, history_db=tmp_path / "h.sqlite")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CALLS_DIR / SHORT_CALLS[0], folder)
    with pytest.raises(BatchError, match="no gateway answers"):
        run_batch(folder, tmp_path / "out", "127.0.0.1:1", progress=False, history_db=tmp_path / "h.sqlite", connect_timeout_s=1.0)


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="concurrency"):
        run_batch(tmp_path, tmp_path / "out", "127.0.0.1:1", concurrency=0)


# Three first reports and their repeat calls (data/calls/manifest.jsonl: duplicate_of), all in
# one batch run with four calls in flight: the repeats must still see the first reports.
DUPLICATE_PAIRS = (("call_01_E006.flac", "call_10_E069.flac"), ("call_02_E007.flac", "call_16_E116.flac"),
                   ("call_07_E030.flac", "call_15_E114.flac"))


def test_duplicates_within_one_concurrent_batch_run(gateway, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    manifest = {json.loads(line)["file"]: line for line in (CALLS_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()}
    names = [name for pair in DUPLICATE_PAIRS for name in pair]
    for name in names:
        shutil.copy(CALLS_DIR / name, folder / name)
    (folder / "manifest.jsonl").write_text("\n".join(manifest[name] for name in names) + "\n", encoding="utf-8")
    summary = run_batch(folder, out, gateway.address, concurrency=4, beam_size=1, history_db=tmp_path / "history.sqlite", progress=False)
    assert summary.transcribed == len(names) and summary.failed == 0
    tickets = {name: json.loads((out / name.replace(".flac", ".json")).read_text(encoding="utf-8"))["ticket"] for name in names}
    linked = sum(1 for first, repeat in DUPLICATE_PAIRS if tickets[repeat]["duplicate_of"] == tickets[first]["ticket_id"])
    assert linked >= 2, {repeat: tickets[repeat]["duplicate_of"] for _, repeat in DUPLICATE_PAIRS}
    assert all(not tickets[first]["duplicate_of"] for first, _ in DUPLICATE_PAIRS)  # nothing earlier to point to
