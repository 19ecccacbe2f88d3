"""The ticket list (filters, text search, keyset paging), one ticket's page, and the edits made on
it: a field correction (the gateway's CorrectTicket, in the logged-in user's name), the handling
status and "reviewed" (the workbench's own state)."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlencode

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse

from gateway.web.context import FIELD_LABELS, URGENCY_LABELS, Who, Workbench, api_user, page_user, parse_date, workbench
from gateway.web.gateway_client import error_text, to_dict
from gateway.web.history import HistoryUnavailable, ListFilters
from gateway.web.state import STATUSES

router = APIRouter()


@router.get("/tickets", response_class=HTMLResponse)
async def ticket_list(request: Request, wb: Workbench = Depends(workbench), who: Who = Depends(page_user)):
    q = request.query_params
    filters = ListFilters(
        date_from=parse_date(q.get("from")), date_to=parse_date(q.get("to")),
        category=q.get("category", ""), urgency=q.get("urgency", ""), district=q.get("district", ""),
        department=q.get("department", ""), needs_review=q.get("needs_review") == "1", duplicate=q.get("duplicate") == "1",
        q=q.get("q", "").strip()[:100],
    )
    try:
        result = await asyncio.to_thread(wb.history.list, filters, q.get("after"))
        error = ""
    except HistoryUnavailable as missing:
        result, error = None, str(missing)
    params = {k: v for k, v in q.items() if k != "after" and v}
    next_url = f"/tickets?{urlencode({**params, 'after': result.next_cursor})}" if result and result.next_cursor else ""
    first_url = f"/tickets?{urlencode(params)}" if params else "/tickets"
    return wb.page(request, "list.html", who, page=result, error=error, params=params, next_url=next_url, first_url=first_url)


@router.get("/tickets/{ticket_id}", response_class=HTMLResponse)
async def ticket_page(request: Request, ticket_id: str, wb: Workbench = Depends(workbench), who: Who = Depends(page_user)):
    history = wb.history
    try:
        ticket = await asyncio.to_thread(history.get, ticket_id)
    except HistoryUnavailable:
        ticket = None
    if ticket is None:
        return wb.page(request, "error.html", who, status_code=404, message=f"没有工单 {ticket_id}")
    duplicates = await asyncio.to_thread(history.duplicates_of, ticket_id)
    duplicate_exists = bool(ticket.duplicate_of) and await asyncio.to_thread(history.exists, ticket.duplicate_of)
    return wb.page(
        request, "ticket.html", who, ticket=ticket, t=ticket.to_dict(), call=wb.state.call(ticket_id), handling=wb.state.handling(ticket_id),
        duplicates=duplicates, duplicate_exists=duplicate_exists, audit=wb.state.audit_log(50, ticket_id),
    )


@router.post("/api/tickets/{ticket_id}/correct")
async def correct(request: Request, ticket_id: str, wb: Workbench = Depends(workbench), who: Who = Depends(api_user)):
    user = who[0]
    body = await request.json()
    field_name, value = str(body.get("field", "")), str(body.get("value", "")).strip()
    if field_name not in FIELD_LABELS:
        return JSONResponse({"error": f"不能修改字段 {field_name}"}, status_code=400)
    try:
        reply = await wb.gateway().correct(ticket_id, field_name, value, user.name)
    except grpc.aio.AioRpcError as error:
        return JSONResponse({"error": error_text(error)}, status_code=400 if error.code() != grpc.StatusCode.UNAVAILABLE else 503)
    result = to_dict(reply)
    detail = {"field": field_name, "old": json.loads(result["old_value"] or "null"), "new": json.loads(result["new_value"] or "null")}
    wb.audit(request, user.name, "correct", ticket_id, detail)
    display = URGENCY_LABELS.get(value, value) if field_name == "urgency" else value
    return {"ok": True, "field": field_name, "value": value, "display": display, "corrected_by": reply.corrected_by, "corrected_at": reply.corrected_at}


@router.post("/api/tickets/{ticket_id}/status")
async def set_status(request: Request, ticket_id: str, wb: Workbench = Depends(workbench), who: Who = Depends(api_user)):
    body = await request.json()
    ticket = await asyncio.to_thread(wb.history.get, ticket_id)
    if ticket is None:
        return JSONResponse({"error": "工单不存在"}, status_code=404)
    try:
        handling = wb.state.set_status(ticket_id, str(body.get("status", "")), ticket.department, who[0].name, ticket.received_at.isoformat())
    except ValueError as error:
        return JSONResponse({"error": str(error)}, status_code=400)
    wb.audit(request, who[0].name, "status", ticket_id, {"status": handling["status"]})
    return {"ok": True, "handling": handling, "label": STATUSES[handling["status"]]}


@router.post("/api/tickets/{ticket_id}/reviewed")
async def reviewed(request: Request, ticket_id: str, wb: Workbench = Depends(workbench), who: Who = Depends(api_user)):
    ticket = await asyncio.to_thread(wb.history.get, ticket_id)
    if ticket is None:
        return JSONResponse({"error": "工单不存在"}, status_code=404)
    handling = wb.state.mark_reviewed(ticket_id, who[0].name, ticket.received_at.isoformat())
    wb.audit(request, who[0].name, "reviewed", ticket_id, {})
    return {"ok": True, "handling": handling}
