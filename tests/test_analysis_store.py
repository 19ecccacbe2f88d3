"""History store: duplicates across days, corrections, export, corrupt files."""

from __future__ import annotations

import json
import sqlite3

import pytest

from analysis import (
    CorrectionError,
    HistoryStore,
    HistoryStoreCorruptError,
    TicketNotFoundError,
    analyze_ticket,
    default_analyzer,
)


@pytest.fixture(scope="module")
def analyzer():
    return default_analyzer()


@pytest.fixture()
def store(tmp_path, analyzer):
    with HistoryStore(tmp_path / "history.sqlite", categories=analyzer.config.taxonomy.names) as opened:
        yield opened


def add(analyzer, store, text, when, ticket_id):
    return analyze_ticket(text, {"received_at": when, "ticket_id": ticket_id}, analyzer=analyzer, store=store)


def test_repeat_report_on_a_later_day_is_a_duplicate(analyzer, store):
    first = add(analyzer, store, "你好，我是老城区幸福路12号的，楼下那个路灯坏了三天了，晚上黑得啥也看不见", "2026-11-16T08:00:00", "T1")
    other = add(analyzer, store, "幸福路12号门口的井盖没了，很危险", "2026-11-17T08:00:00", "T2")
    repeat = add(analyzer, store, "幸福路12号门口那个路灯还是不亮，我上个礼拜就打过电话了，再不修我就投诉", "2026-11-18T08:30:00", "T3")
    assert first.duplicate_of is None
    assert other.duplicate_of is None  # same address, another problem
    assert repeat.duplicate_of == "T1"
    assert "同一地址" in repeat.duplicate_reason and repeat.duplicate_score >= 0.85
    assert store.count() == 3


def test_duplicates_point_only_backwards_and_within_the_window(analyzer, store):
    add(analyzer, store, "幸福家园5栋的电梯又坏了，有人被困在里面", "2026-11-20T08:00:00", "LATER")
    earlier = add(analyzer, store, "幸福家园5栋电梯坏了，我家老人下不了楼", "2026-11-19T08:00:00", "EARLIER")
    assert earlier.duplicate_of is None  # the later call is not its original
    months_later = add(analyzer, store, "幸福家园5栋的电梯又坏了，有人被困在里面", "2027-03-01T08:00:00", "MARCH")
    assert months_later.duplicate_of is None  # outside the 30-day window


def test_reanalysing_the_same_ticket_does_not_duplicate_itself(analyzer, store):
    add(analyzer, store, "望江苑小区外面的雨水篦子堵死了", "2026-11-16T08:00:00", "SAME")
    again = add(analyzer, store, "望江苑小区外面的雨水篦子堵死了", "2026-11-16T08:00:00", "SAME")
    assert again.duplicate_of is None and store.count() == 1


def test_corrections_are_recorded_and_exported(analyzer, store, tmp_path):
    add(analyzer, store, "鼓楼广场跳广场舞的音响太大声了", "2026-11-16T20:00:00", "N1")
    add(analyzer, store, "鼓楼广场广场舞又在放了，声音比上次还大", "2026-11-18T20:00:00", "N2")
    correction = store.correct("N1", "urgency", "medium", by="王芳")
    assert (correction.old_value, correction.new_value, correction.corrected_by) == ("low", "medium", "王芳")
    store.correct("N1", "urgency", "high", by="李强")
    store.correct("N2", "district", "江南区", by="王芳")
    ticket = store.get("N1")
    assert ticket.urgency == "high" and ticket.corrected_fields == ("urgency",)
    assert store.get("N2").place["district"] == "江南区"

    out = tmp_path / "corrections.jsonl"
    assert store.export_corrections(out) == 3
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [record["new_value"] for record in records] == ["medium", "high", "江南区"]
    assert records[1]["old_value"] == "medium" and records[1]["machine_value"] == "low"
    assert records[0]["text"].startswith("鼓楼广场") and records[0]["corrected_at"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("colour", "red", "not a correctable field"),
        ("urgency", "urgent", "one of high"),
        ("category", "天气", "unknown category"),
        ("duplicate_of", "NOPE", "no earlier ticket"),
        ("duplicate_of", "C1", "cannot duplicate itself"),
        ("department", "  ", "non-empty"),
    ],
)
def test_bad_corrections_are_refused(analyzer, store, field, value, message):
    add(analyzer, store, "路灯坏了", "2026-11-16T08:00:00", "C1")
    with pytest.raises(CorrectionError, match=message):
        store.correct("C1", field, value, by="王芳")
    assert store.corrections() == []


def test_correction_needs_a_name_and_a_ticket(analyzer, store):
    add(analyzer, store, "路灯坏了", "2026-11-16T08:00:00", "C2")
    with pytest.raises(CorrectionError, match="who"):
        store.correct("C2", "urgency", "high", by="")
    with pytest.raises(TicketNotFoundError):
        store.correct("MISSING", "urgency", "high", by="王芳")


def test_clearing_a_duplicate_link(analyzer, store):
    add(analyzer, store, "幸福路12号的路灯坏了三天了", "2026-11-16T08:00:00", "D1")
    repeat = add(analyzer, store, "幸福路12号那个路灯还是不亮，上周就反映过了", "2026-11-18T08:00:00", "D2")
    assert repeat.duplicate_of == "D1"
    store.correct("D2", "duplicate_of", "none", by="王芳")
    assert store.get("D2").duplicate_of is None


def test_garbage_file_is_reported_not_reset(tmp_path):
    path = tmp_path / "history.sqlite"
    path.write_bytes(b"this is not a database, it is a text file that happens to be here" * 100)
    before = path.read_bytes()
    with pytest.raises(HistoryStoreCorruptError, match="not a readable SQLite database"):
        HistoryStore(path)
    assert path.read_bytes() == before


def test_damaged_store_is_reported(tmp_path, analyzer):
    path = tmp_path / "history.sqlite"
    with HistoryStore(path) as store:
        for index in range(30):
            add(analyzer, store, f"幸福路{index}号的路灯坏了" * 20, "2026-11-16T08:00:00", f"X{index}")
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    data = bytearray(path.read_bytes())
    data[4096 * 2: 4096 * 2 + 2048] = b"\xff" * 2048  # scribble over a b-tree page
    path.write_bytes(bytes(data))
    with pytest.raises(HistoryStoreCorruptError):
        HistoryStore(path)


def test_another_applications_database_is_not_touched(tmp_path):
    path = tmp_path / "other.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE accounts (id INTEGER)")
    connection.commit()
    connection.close()
    with pytest.raises(HistoryStoreCorruptError, match="another application"):
        HistoryStore(path)


def test_store_path_that_cannot_be_created(tmp_path):
    from analysis import HistoryStoreError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(HistoryStoreError, match="cannot create its folder"):
        HistoryStore(blocker / "history.sqlite")
