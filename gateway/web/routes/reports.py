"""The dashboard (category x district heatmap, daily volume by urgency, department load, 部门响应时效
TOP10), the ledger download (xlsx for a date range) and the audit log (supervisors and admins)."""

from __future__ import annotations

import asyncio
import tempfile
from collections import defaultdict
from datetime import date, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gateway.web.context import Who, Workbench, page_user, parse_date, workbench
from gateway.web.history import HistoryUnavailable

router = APIRouter()


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(request: Request, days: int = 30, wb: Workbench = Depends(workbench), who: Who = Depends(page_user)):
    days = max(1, min(days, 366))
    since = datetime.combine(date.today() - timedelta(days=days - 1), datetime.min.time())
    try:
        data = await asyncio.to_thread(wb.history.dashboard, since)
        error = ""
    except HistoryUnavailable as missing:
        data, error = {"heat": [], "daily": [], "load": []}, str(missing)
    heat: dict[tuple[str, str], int] = {(row["category"], row["district"]): row["n"] for row in data["heat"]}
    districts = list(wb.choices.districts) + ([""] if any(d == "" for _, d in heat) else [])
    categories = list(dict.fromkeys([*wb.choices.categories, *(c for c, _ in heat)]))
    heat_max = max(heat.values(), default=0)
    daily: dict[str, dict[str, int]] = defaultdict(lambda: {"high": 0, "medium": 0, "low": 0})
    for row in data["daily"]:
        daily[row["day"]][row["urgency"]] = row["n"]
    daily_max = max((sum(v.values()) for v in daily.values()), default=0)
    load_max = max((row["n"] for row in data["load"]), default=0)
    return wb.page(
        request, "dashboard.html", who, days=days, error=error, heat=heat, heat_max=heat_max, districts=districts,
        categories=categories, daily=sorted(daily.items()), daily_max=daily_max, load=data["load"], load_max=load_max,
        response_times=wb.state.response_times(10),
    )


@router.get("/ledger", response_class=HTMLResponse)
async def ledger_page(request: Request, error: str = "", wb: Workbench = Depends(workbench), who: Who = Depends(page_user)):
    today = date.today()
    return wb.page(request, "ledger.html", who, date_from=(today - timedelta(days=6)).isoformat(), date_to=today.isoformat(),
                   error=error, max_rows=wb.config.ledger_max_rows)


def _back_to_ledger(message: str) -> RedirectResponse:
    return RedirectResponse(f"/ledger?error={quote(message)}", status_code=303)


@router.get("/ledger.xlsx")
async def ledger_download(request: Request, wb: Workbench = Depends(workbench), who: Who = Depends(page_user)):
    start, end = parse_date(request.query_params.get("from")), parse_date(request.query_params.get("to"))
    if start is None or end is None or end < start:
        return _back_to_ledger("请选择有效的起止日期")
    max_rows = wb.config.ledger_max_rows
    try:
        records = await asyncio.to_thread(wb.history.records_between, start, end, max_rows)
    except HistoryUnavailable as missing:
        return _back_to_ledger(str(missing))
    if len(records) > max_rows:
        return _back_to_ledger(f"该时段工单超过 {max_rows} 条，请缩短日期范围")
    from analysis.report import build_ledger

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ledger.xlsx"
        await asyncio.to_thread(build_ledger, records, path)
        content = path.read_bytes()
    wb.audit(request, who[0].name, "ledger", None, {"from": start.isoformat(), "to": end.isoformat(), "rows": len(records)})
    filename = f"ledger_{start:%Y%m%d}_{end:%Y%m%d}.xlsx"
    return Response(
        content, media_type="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        headers={"Content-Disposition": f"attachment; filename=\"{filename}\"; filename*=UTF-8''{quote('工单台账_' + filename)}"},
    )


@router.get("/audit", response_class=HTMLResponse)
async def audit_page(request: Request, wb: Workbench = Depends(workbench), who: Who = Depends(page_user)):
    if not who[0].can_audit:
        return wb.page(request, "error.html", who, status_code=403, message="审计日志仅限主管查看")
    return wb.page(request, "audit.html", who, entries=wb.state.audit_log(500))
