"""The morning outputs: ledger.xlsx (one row per call), dashboard.html with PNG charts.

Every row and page says the content is machine-generated (AI生成) so staff check it
rather than retype it; the ledger has empty columns for the checker's name and verdict.
All files are written atomically.
"""

from __future__ import annotations

import html
import io
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Mapping, Sequence

from analysis import charts
from analysis.atomic import atomic_write_bytes, atomic_write_text

URGENCY_LABELS = {"high": "高", "medium": "中", "low": "低"}
AI_MARK = "是（机器生成，请人工核对）"
FLAG_LABELS = {
    "empty_transcript": "转写为空",
    "not_chinese": "非中文",
    "mixed_language": "中英混杂",
    "truncated": "文本过长已截断",
    "district_unknown": "区县不在本市",
    "district_missing": "未识别区县",
    "low_confidence": "类型置信度低",
    "place_by_sound": "地名按读音纠正",
    "no_words": "没有文字",
}


@dataclass(frozen=True)
class CallRecord:
    """One analysed call: the ticket (Ticket.to_dict()) and where it came from."""

    ticket: Mapping[str, Any]
    file: str = ""
    duration_s: float | None = None

    @property
    def day(self) -> date:
        return datetime.fromisoformat(self.ticket["received_at"]).date()


def format_clock(seconds: float | None) -> str:
    if seconds is None:
        return ""
    whole = int(seconds)
    return f"{whole // 3600:d}:{whole % 3600 // 60:02d}:{whole % 60:02d}" if whole >= 3600 else f"{whole // 60:02d}:{whole % 60:02d}"


def key_phrase_times(ticket: Mapping[str, Any]) -> str:
    """路灯 @00:03；尽快 @00:12 — where in the recording a reviewer can listen."""
    parts = []
    for item in ticket.get("key_phrases", []):
        at = format_clock(item.get("start_s"))
        parts.append(f"{item['text']} @{at}" if at else item["text"])
    return "；".join(parts)


LEDGER_COLUMNS: tuple[tuple[str, int], ...] = (
    ("工单号", 22), ("来电时间", 18), ("录音文件", 22), ("时长(秒)", 9), ("诉求类型", 13), ("类型置信度", 10),
    ("紧急程度", 9), ("紧急原因", 30), ("区县", 9), ("街道/社区", 14), ("小区/地址", 22), ("责任部门", 26),
    ("分派依据", 30), ("重复工单", 22), ("重复依据", 30), ("摘要", 40), ("关键词及录音时间", 36), ("转写全文", 60),
    ("待核对提示", 20), ("需人工核对", 30), ("模型版本", 22), ("AI生成", 22), ("核对人", 10), ("核对结果", 14),
)


def ledger_row(record: CallRecord) -> list[Any]:
    ticket = record.ticket
    place = ticket.get("place", {})
    received = datetime.fromisoformat(ticket["received_at"])
    district = place.get("district") or (f"{place['district_unknown']}（非本市）" if place.get("district_unknown") else "")
    return [
        ticket["ticket_id"],
        received,
        record.file,
        round(record.duration_s, 1) if record.duration_s is not None else None,
        ticket["category"],
        ticket["category_confidence"],
        URGENCY_LABELS.get(ticket["urgency"], ticket["urgency"]),
        "；".join(ticket.get("urgency_reasons", [])),
        district,
        " ".join(filter(None, (place.get("street"), place.get("community")))),
        place.get("address") or place.get("compound") or place.get("landmark") or place.get("road") or "",
        ticket["department"],
        ticket.get("department_reason", ""),
        ticket.get("duplicate_of") or "",
        ticket.get("duplicate_reason") or "",
        ticket["summary"],
        key_phrase_times(ticket),
        ticket["transcript"],
        "、".join(FLAG_LABELS.get(flag, flag) for flag in ticket.get("flags", [])),
        ("是：" + "；".join(ticket.get("review_reasons", []))) if ticket.get("needs_review") else "",
        ticket.get("model_version") or "规则（无训练模型）",
        AI_MARK if ticket.get("machine_generated", True) else "否（已人工核对）",
        "",
        "",
    ]


def build_ledger(records: Sequence[CallRecord], path: Path, week: Sequence[CallRecord] = ()) -> None:
    """ledger.xlsx: sheet 工单台账 (this batch) and sheet 周汇总 (the week, category x day)."""
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter

    workbook = Workbook()
    sheet = workbook.active
    sheet.title = "工单台账"
    sheet.append([name for name, _ in LEDGER_COLUMNS])
    header_fill = PatternFill("solid", fgColor="1F4E78")
    for column, (_, width) in enumerate(LEDGER_COLUMNS, 1):
        cell = sheet.cell(row=1, column=column)
        cell.font = Font(bold=True, color="FFFFFF")
        cell.fill = header_fill
        cell.alignment = Alignment(horizontal="center", vertical="center", wrap_text=True)
        sheet.column_dimensions[get_column_letter(column)].width = width
    fills = {"高": PatternFill("solid", fgColor="F8CBAD"), "中": PatternFill("solid", fgColor="FFE699")}
    ai_fill = PatternFill("solid", fgColor="DDEBF7")
    names = [name for name, _ in LEDGER_COLUMNS]
    urgency_column, ai_column, time_column = names.index("紧急程度") + 1, names.index("AI生成") + 1, names.index("来电时间") + 1
    for record in sorted(records, key=lambda item: item.ticket["received_at"]):
        sheet.append(ledger_row(record))
        row = sheet.max_row
        for column in range(1, len(LEDGER_COLUMNS) + 1):
            sheet.cell(row=row, column=column).alignment = Alignment(vertical="top", wrap_text=column in (8, 13, 15, 16, 17, 18, 20))
        sheet.cell(row=row, column=time_column).number_format = "yyyy-mm-dd hh:mm"
        level = sheet.cell(row=row, column=urgency_column)
        if level.value in fills:
            level.fill = fills[level.value]
        sheet.cell(row=row, column=ai_column).fill = ai_fill
    sheet.freeze_panes = "B2"
    sheet.auto_filter.ref = f"A1:{get_column_letter(len(LEDGER_COLUMNS))}{max(1, sheet.max_row)}"

    weekly = workbook.create_sheet("周汇总")
    week_records = list(week) or list(records)
    days = sorted({record.day for record in week_records})
    weekly.append(["诉求类型", *[f"{day:%m-%d}" for day in days], "合计", "其中高紧急", "其中重复"])
    for cell in weekly[1]:
        cell.font = Font(bold=True)
    per_day = Counter((record.ticket["category"], record.day) for record in week_records)
    for category in sorted({record.ticket["category"] for record in week_records}):
        in_category = [record for record in week_records if record.ticket["category"] == category]
        weekly.append([
            category,
            *[per_day[(category, day)] for day in days],
            len(in_category),
            sum(1 for record in in_category if record.ticket["urgency"] == "high"),
            sum(1 for record in in_category if record.ticket.get("duplicate_of")),
        ])
    weekly.append(["合计", *[sum(1 for record in week_records if record.day == day) for day in days], len(week_records),
                   sum(1 for record in week_records if record.ticket["urgency"] == "high"),
                   sum(1 for record in week_records if record.ticket.get("duplicate_of"))])
    weekly.column_dimensions["A"].width = 16
    weekly.append([])
    weekly.append(["说明：本表由系统自动生成（AI生成），类型、紧急程度、责任部门等均需人工核对。"])

    buffer = io.BytesIO()
    workbook.save(buffer)
    atomic_write_bytes(path, buffer.getvalue())


def unknown_district_counts(records: Sequence[CallRecord]) -> Counter:
    """District names callers gave that the city does not have (kept as heard), with counts."""
    return Counter(
        record.ticket.get("place", {}).get("district_unknown")
        for record in records
        if record.ticket.get("place", {}).get("district_unknown")
    )


@dataclass(frozen=True)
class DashboardResult:
    html_path: Path
    charts: tuple[Path, ...]
    font: str | None
    notes: tuple[str, ...] = field(default=())


def _week_days(records: Sequence[CallRecord]) -> list[date]:
    if not records:
        return [date.today()]
    last = max(record.day for record in records)
    return [last - timedelta(days=offset) for offset in range(6, -1, -1)]


def build_dashboard(
    records: Sequence[CallRecord],
    out_dir: Path,
    *,
    week: Sequence[CallRecord] = (),
    categories: Sequence[str] = (),
    districts: Sequence[str] = (),
    title: str = "12345 热线工单看板",
    failures: int = 0,
) -> DashboardResult:
    """dashboard.html + charts/*.png over the week (7 days up to the latest call)."""
    week_records = list(week) or list(records)
    days = _week_days(week_records)
    in_week = [record for record in week_records if days[0] <= record.day <= days[-1]]
    rows = [
        {
            "category": record.ticket["category"],
            "district": record.ticket.get("place", {}).get("district"),
            "department": record.ticket["department"],
            "urgency": record.ticket["urgency"],
            "day": record.day,
        }
        for record in in_week
    ]
    categories = list(categories) or sorted({row["category"] for row in rows})
    chart_dir = out_dir / "charts"
    pictures = {
        "heatmap.png": ("诉求类型 × 区县", charts.heatmap_category_district(rows, categories, districts)),
        "departments.png": ("责任部门工单量", charts.top_departments(rows)),
        "daily.png": ("每日来电量", charts.daily_volume(rows, days)),
        "urgency.png": ("紧急程度构成", charts.urgency_mix(rows)),
    }
    written = []
    for name, (_, data) in pictures.items():
        atomic_write_bytes(chart_dir / name, data)
        written.append(chart_dir / name)
    font = charts.cjk_font()
    notes = [] if font else ["未找到中文字体（apt-get install fonts-wqy-microhei），图中汉字可能显示为方框。"]

    batch_high = [record for record in records if record.ticket["urgency"] == "high"]
    duplicates = sum(1 for record in records if record.ticket.get("duplicate_of"))
    flagged = sum(1 for record in records if record.ticket.get("flags"))
    review = sum(1 for record in records if record.ticket.get("needs_review"))
    unknown_districts = unknown_district_counts(records)
    escape = html.escape

    def card(label: str, value: Any, tone: str = "") -> str:
        return f'<div class="card {tone}"><div class="value">{escape(str(value))}</div><div class="label">{escape(label)}</div></div>'

    high_rows = "".join(
        "<tr>"
        f"<td>{escape(record.ticket['ticket_id'])}</td>"
        f"<td>{escape(record.ticket['received_at'].replace('T', ' ')[:16])}</td>"
        f"<td>{escape(record.ticket['category'])}</td>"
        f"<td>{escape(record.ticket['department'])}</td>"
        f"<td>{escape(record.ticket['summary'])}</td>"
        f"<td>{escape('；'.join(record.ticket.get('urgency_reasons', [])))}</td>"
        "</tr>"
        for record in sorted(batch_high, key=lambda item: item.ticket["received_at"])[:50]
    )
    figures = "".join(
        f'<figure><img src="charts/{name}" alt="{escape(caption)}"><figcaption>{escape(caption)}</figcaption></figure>'
        for name, (caption, _) in pictures.items()
    )
    unknown_html = (
        "<h2>来电所说区县不在本市（按原话记录）</h2><table><tr><th>区县</th><th>工单数</th></tr>"
        + "".join(f"<tr><td>{escape(name)}</td><td>{count}</td></tr>" for name, count in unknown_districts.most_common())
        + "</table>"
    ) if unknown_districts else ""
    page = f"""<!DOCTYPE html>
<html lang="zh-CN"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>
body {{ font-family: "Noto Sans CJK SC", "WenQuanYi Micro Hei", "Microsoft YaHei", sans-serif; margin: 24px; color: #222; background: #f6f7f9; }}
h1 {{ margin: 0 0 4px; }} .sub {{ color: #666; margin-bottom: 16px; }}
.banner {{ background: #fff3cd; border: 1px solid #ffe08a; padding: 8px 12px; border-radius: 6px; margin-bottom: 16px; }}
.cards {{ display: flex; gap: 12px; flex-wrap: wrap; margin-bottom: 16px; }}
.card {{ background: #fff; border-radius: 8px; padding: 12px 18px; min-width: 120px; box-shadow: 0 1px 3px rgba(0,0,0,.1); }}
.card .value {{ font-size: 28px; font-weight: bold; }} .card .label {{ color: #666; }}
.card.alert .value {{ color: #d9534f; }} .card.warn .value {{ color: #e0a800; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 16px; }}
figure {{ background: #fff; margin: 0; padding: 12px; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.1); }}
figure img {{ max-width: 100%; }} figcaption {{ color: #666; text-align: center; }}
table {{ border-collapse: collapse; width: 100%; background: #fff; margin-top: 8px; }}
th, td {{ border: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; font-size: 14px; }}
th {{ background: #1f4e78; color: #fff; }}
</style></head><body>
<h1>{escape(title)}</h1>
<div class="sub">统计区间 {days[0]:%Y-%m-%d} 至 {days[-1]:%Y-%m-%d}（7 天）· 生成于 {datetime.now():%Y-%m-%d %H:%M}</div>
<div class="banner">AI生成：以下内容由语音识别和自动分析生成，供值班人员核对，不能直接作为办理结论。{''.join(escape(note) for note in notes)}</div>
<div class="cards">
{card("本批来电", len(records))}{card("本周来电", len(in_week))}{card("本批高紧急", len(batch_high), "alert")}
{card("本批疑似重复", duplicates, "warn")}{card("待核对提示", flagged)}{card("需人工核对", review, "warn" if review else "")}
{card("区县不在本市", sum(unknown_districts.values()), "warn" if unknown_districts else "")}{card("处理失败", failures, "alert" if failures else "")}
</div>
<div class="grid">{figures}</div>
{unknown_html}
<h2>本批高紧急工单</h2>
<table><tr><th>工单号</th><th>来电时间</th><th>诉求类型</th><th>责任部门</th><th>摘要</th><th>紧急原因</th></tr>{high_rows or '<tr><td colspan="6">无</td></tr>'}</table>
</body></html>
"""
    html_path = out_dir / "dashboard.html"
    atomic_write_text(html_path, page)
    return DashboardResult(html_path, tuple(written), font, tuple(notes))
