"""The upload page and the upload itself: size and kind checked before anything reaches the
gateway or the disk, then Transcribe with word times, analysis and record_ticket; the audio (a
copy browsers can seek in) and the transcript are kept for the ticket page."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from datetime import datetime
from urllib.parse import quote

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse

from gateway.web import audio as audio_kinds
from gateway.web.auth import User
from gateway.web.context import Who, Workbench, api_user, page_user, workbench
from gateway.web.gateway_client import error_text, segments_of

router = APIRouter()


@router.get("/upload", response_class=HTMLResponse)
async def upload_page(request: Request, wb: Workbench = Depends(workbench), who: Who = Depends(page_user)):
    limit = wb.config.max_upload_bytes
    return wb.page(request, "upload.html", who, max_mb=limit / (1024 * 1024), max_bytes=limit, accepted=audio_kinds.ACCEPTED)


def _reject(wb: Workbench, user: User, request: Request, message: str, status: int, detail: dict) -> JSONResponse:
    wb.audit(request, user.name, "upload_rejected", None, {"reason": message, **detail})
    return JSONResponse({"error": message}, status_code=status)


@router.post("/api/upload")
async def upload(request: Request, wb: Workbench = Depends(workbench), who: Who = Depends(api_user)):
    user, limit = who[0], wb.config.max_upload_bytes
    too_big = f"文件太大：上限 {limit / (1024 * 1024):.0f} MB，未保存任何内容"
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit + 1024 * 1024:
        return _reject(wb, user, request, too_big, 413, {"bytes": declared})
    form = await request.form(max_part_size=limit + 1)
    upload_file = form.get("audio")
    if upload_file is None or not hasattr(upload_file, "read"):
        return JSONResponse({"error": "请选择录音文件"}, status_code=400)
    data = await upload_file.read(limit + 1)
    name = (upload_file.filename or "recording")[:200]
    if len(data) > limit:
        return _reject(wb, user, request, too_big, 413, {"file": name})
    if not data:
        return _reject(wb, user, request, "文件是空的，未保存任何内容", 400, {"file": name})
    kind = audio_kinds.sniff(data[:64])
    if kind is None:
        return _reject(wb, user, request, f"“{name}”不是支持的录音文件（支持 {audio_kinds.ACCEPTED}），未保存任何内容", 415, {"file": name})
    digest = hashlib.sha256(data).hexdigest()
    metadata = {"file": name, "audio_sha256": digest, "received_at": datetime.now().replace(microsecond=0).isoformat(), "source": "workbench", "uploaded_by": user.name}
    try:
        reply = await wb.gateway().transcribe_and_record(data, metadata, user.name, wb.config.language)
    except grpc.aio.AioRpcError as error:
        status = 400 if error.code() == grpc.StatusCode.INVALID_ARGUMENT else 502
        return _reject(wb, user, request, error_text(error) + "，未保存任何内容", status, {"file": name})
    ticket_id = reply.ticket.ticket_id
    if not ticket_id:
        return JSONResponse({"error": "识别完成但没有生成工单"}, status_code=502)
    playable, stored_kind = await asyncio.to_thread(audio_kinds.playable_copy, data, kind)
    audio_name = f"{ticket_id}{stored_kind.extension}"
    tmp = wb.audio_dir / f".{audio_name}.{secrets.token_hex(4)}.part"
    tmp.write_bytes(playable)
    tmp.replace(wb.audio_dir / audio_name)
    transcript = {
        "text": reply.text, "normalized_text": reply.normalized_text, "language": reply.language,
        "model_name": reply.model_name, "audio_duration_s": reply.audio_duration_s, "processing_time_s": reply.processing_time_s,
        "segments": segments_of(reply),
    }
    wb.state.add_call(ticket_id, audio_name, stored_kind.content_type, name, len(data), reply.audio_duration_s, transcript, user.name)
    wb.audit(request, user.name, "upload", ticket_id, {"file": name, "bytes": len(data), "sha256": digest, "kind": kind.name})
    return {"ok": True, "ticket_id": ticket_id, "url": f"/tickets/{quote(ticket_id)}", "text": reply.text}
