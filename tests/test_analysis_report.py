"""Ledger, dashboard and the `python -m analysis` command line."""

from __future__ import annotations

import json

import pytest
from openpyxl import load_workbook

from analysis import HistoryStore, analyze_ticket, default_analyzer
from analysis.__main__ import main as analysis_main
from analysis.report import AI_MARK, CallRecord, build_dashboard, build_ledger, key_phrase_times

CALLS = [
    ("2026-11-16T08:00:00", "你好，我是老城区幸福路12号的，楼下那个路灯坏了三天了，麻烦尽快来修"),
    ("2026-11-16T10:30:00", "我在阳光花园3栋，楼道里一股很重的煤气味，你们快派人来"),
    ("2026-11-17T09:00:00", "公司三个月没发工资了，老板人也找不到，我在高新区上班"),
    ("2026-11-18T08:30:00", "幸福路12号门口那个路灯还是不亮，我上个礼拜就打过电话了"),
]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    analyzer = default_analyzer()
    path = tmp_path_factory.mktemp("history") / "history.sqlite"
    with HistoryStore(path) as store:
        tickets = [
            analyze_ticket(
                None,
                {"received_at": when, "ticket_id": f"R{index}"},
                segments=[{"start_s": 0.0, "end_s": 2.0, "text": text[:8]}, {"start_s": 2.0, "end_s": 9.0, "text": text[8:]}],
                analyzer=analyzer,
                store=store,
            )
            for index, (when, text) in enumerate(CALLS)
        ]
    return [CallRecord(ticket.to_dict(), f"call_{index}.flac", 9.0) for index, ticket in enumerate(tickets)]


def test_ledger_rows_are_marked_machine_generated(records, tmp_path):
    path = tmp_path / "ledger.xlsx"
    build_ledger(records, path)
    workbook = load_workbook(path)
    sheet = workbook["工单台账"]
    header = [cell.value for cell in sheet[1]]
    for column in ("工单号", "诉求类型", "紧急程度", "责任部门", "重复工单", "摘要", "关键词及录音时间", "转写全文", "AI生成"):
        assert column in header
    rows = [dict(zip(header, (cell.value for cell in row))) for row in sheet.iter_rows(min_row=2)]
    assert len(rows) == 4
    assert all(row["AI生成"] == AI_MARK for row in rows)
    assert rows[1]["紧急程度"] == "高" and rows[1]["责任部门"] == "滨江燃气集团"
    assert rows[3]["重复工单"] == "R0"
    assert "煤气味 @00:0" in rows[1]["关键词及录音时间"]  # said in the second segment (2 s to 9 s)
    assert "@00:00" not in rows[1]["关键词及录音时间"].split("煤气味")[1]
    weekly = workbook["周汇总"]
    assert weekly["A1"].value == "诉求类型" and weekly.max_row >= 4


def test_key_phrase_times_format():
    ticket = {"key_phrases": [{"text": "路灯", "start_s": 3.2}, {"text": "尽快", "start_s": 75.0}, {"text": "电梯", "start_s": None}]}
    assert key_phrase_times(ticket) == "路灯 @00:03；尽快 @01:15；电梯"


def test_dashboard_has_charts_and_the_ai_notice(records, tmp_path):
    config = default_analyzer().config
    result = build_dashboard(records, tmp_path, categories=config.taxonomy.names, districts=config.gazetteer.district_names)
    page = result.html_path.read_text(encoding="utf-8")
    assert "AI生成" in page and "本批高紧急" in page
    for chart in ("heatmap.png", "departments.png", "daily.png", "urgency.png"):
        data = (tmp_path / "charts" / chart).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
        assert f'src="charts/{chart}"' in page
    assert "滨江燃气集团" in page  # the gas leak is listed among high-urgency calls


def test_command_line_analyze_correct_export(tmp_path, capsys):
    db = str(tmp_path / "cli.sqlite")
    assert analysis_main(["analyze", "幸福路12号的路灯坏了三天了", "--received-at", "2026-11-16T09:00:00", "--ticket-id", "CLI1", "--history-db", db]) == 0
    ticket = json.loads(capsys.readouterr().out)
    assert ticket["ticket_id"] == "CLI1" and ticket["category"] == "市政设施维修"

    assert analysis_main(["correct", "CLI1", "urgency", "high", "--by", "王芳", "--history-db", db]) == 0
    assert json.loads(capsys.readouterr().out)["corrected_by"] == "王芳"
    assert analysis_main(["correct", "CLI1", "category", "天气", "--by", "王芳", "--history-db", db]) == 2
    assert "unknown category" in capsys.readouterr().err

    out = tmp_path / "corrections.jsonl"
    assert analysis_main(["export-corrections", str(out), "--history-db", db]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1

    report_dir = tmp_path / "report"
    assert analysis_main(["report", str(report_dir), "--until", "2026-11-17T00:00:00", "--history-db", db]) == 0
    assert (report_dir / "ledger.xlsx").is_file() and (report_dir / "dashboard.html").is_file()


def test_command_line_refuses_a_corrupt_history(tmp_path, capsys):
    db = tmp_path / "broken.sqlite"
    db.write_bytes(b"\x00garbage" * 1000)
    assert analysis_main(["analyze", "路灯坏了", "--history-db", str(db)]) == 2
    assert "not a readable SQLite database" in capsys.readouterr().err
