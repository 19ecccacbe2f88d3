"""A ticket's recording for the page's player, and re-recognition of a time range of it with extra
hotwords (the gateway's Transcribe on that range; nothing is stored but the audit entry)."""

from __future__ import annotations

import asyncio

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from gateway.web import audio as audio_kinds
from gateway.web.context import Who, Workbench, api_user, workbench
from gateway.web.gateway_client import error_text, segments_of

router = APIRouter()


def _text(message: str, status_code: int) -> Response:
    return Response(message, status_code=status_code, media_type="text/plain; charset=utf-8")


@router.get("/tickets/{ticket_id}/audio")
async def ticket_audio(request: Request, ticket_id: str, wb: Workbench = Depends(workbench)):
    if wb.current(request) is None:
        return _text("请先登录", 401)
    call = wb.state.call(ticket_id)
    if call is None:
        return _text("没有录音", 404)
    path = wb.audio_dir / call["audio_file"]
    if not path.is_file():
        return _text("录音文件缺失", 404)
    return FileResponse(path, media_type=call["content_type"], headers={"Cache-Control": "private, no-store"})


@router.post("/api/tickets/{ticket_id}/rerecognize")
async def rerecognize(request: Request, ticket_id: str, wb: Workbench = Depends(workbench), who: Who = Depends(api_user)):
    body = await request.json()
    call = wb.state.call(ticket_id)
    if call is None:
        return JSONResponse({"error": "这张工单没有录音"}, status_code=404)
    try:
        start, end = float(body.get("start", 0)), float(body.get("end", 0))
    except (TypeError, ValueError):
        return JSONResponse({"error": "起止时间须为秒数"}, status_code=400)
    if not 0 <= start < end or end - start > 600:
        return JSONResponse({"error": "请选择有效的时间段（结束晚于开始，最长 10 分钟）"}, status_code=400)
    hotwords = [w.strip() for w in str(body.get("hotwords", "")).replace("，", ",").split(",") if w.strip()][:50]
    if any(len(w) > 64 for w in hotwords):
        return JSONResponse({"error": "热词每个最多 64 字"}, status_code=400)
    pcm = await asyncio.to_thread(audio_kinds.pcm16k_range, wb.audio_dir / call["audio_file"], start, end)
    if not pcm:
        return JSONResponse({"error": "该时间段没有音频"}, status_code=400)
    try:
        reply = await wb.gateway().transcribe_pcm(pcm, hotwords, who[0].name, wb.config.language)
    except grpc.aio.AioRpcError as error:
        return JSONResponse({"error": error_text(error)}, status_code=400)
    segments = segments_of(reply, offset_s=start)
    wb.audit(request, who[0].name, "rerecognize", ticket_id, {"start": start, "end": end, "hotwords": hotwords, "text": reply.text})
    return {"ok": True, "text": reply.text, "segments": segments}
