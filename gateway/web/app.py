"""The workbench app: pages, the JSON endpoints their JavaScript calls, login, CSRF and audit."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from gateway.web import audio as audio_kinds
from gateway.web.auth import User, authenticate, load_users
from gateway.web.gateway_client import GatewayClient, error_text, to_dict
from gateway.web.history import HistoryReader, HistoryUnavailable, ListFilters
from gateway.web.state import STATUSES, WorkbenchState

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "wb_session"
LOGIN_COOKIE = "wb_login"
URGENCY_LABELS = {"high": "高", "medium": "中", "low": "低"}
FIELD_LABELS = {
    "category": "诉求类型", "urgency": "紧急程度", "district": "区县", "address": "地址",
    "department": "责任部门", "duplicate_of": "重复工单", "summary": "摘要",
}
ACTION_LABELS = {
    "login": "登录", "login_failed": "登录失败", "logout": "退出", "upload": "上传录音", "upload_rejected": "上传被拒",
    "correct": "修改字段", "status": "更新状态", "reviewed": "标记已核对", "rerecognize": "重新识别", "ledger": "下载台账",
}


@dataclass
class WebConfig:
    gateway: str
    users_file: Path
    history_db: Path
    data_dir: Path  # var/web: state.sqlite, audio/
    max_upload_bytes: int = 50 * 1024 * 1024
    secure_cookies: bool = False  # True when served over TLS
    session_minutes: float = 480.0
    gateway_ca: Path | None = None
    gateway_api_key: str | None = None
    gateway_client_cert: Path | None = None
    gateway_client_key: Path | None = None
    analysis_config: Path | None = None
    ledger_max_rows: int = 20000
    language: str = "zh"


@dataclass
class Choices:
    categories: tuple[str, ...]
    districts: tuple[str, ...]
    departments: tuple[str, ...]
    urgencies: dict[str, str] = field(default_factory=lambda: dict(URGENCY_LABELS))


def load_choices(config_dir: Path | None) -> Choices:
    """Choices for the edit controls: the taxonomy, the gazetteer's districts, every department the matrix can name."""
    from analysis import load_config

    config = load_config(config_dir)
    districts = config.gazetteer.district_names
    departments: list[str] = []
    matrix = config.matrix
    for routing in matrix.categories.values():
        for assignment in (routing.default, *(route.assignment for route in routing.routes)):
            if assignment.district_template:
                departments += [assignment.district_template.format(district=d) for d in districts]
            if assignment.city:
                departments.append(assignment.city)
            departments += list(assignment.overrides.values())
    departments.append(matrix.fallback)
    return Choices(config.taxonomy.names, districts, tuple(dict.fromkeys(departments)))


def create_app(config: WebConfig) -> FastAPI:
    users = load_users(config.users_file)
    state = WorkbenchState(config.data_dir / "state.sqlite", session_minutes=config.session_minutes)
    history = HistoryReader(config.history_db, config.data_dir / "search.sqlite")
    choices = load_choices(config.analysis_config)
    audio_dir = config.data_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    client_holder: dict[str, GatewayClient] = {}
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(URGENCY_LABELS=URGENCY_LABELS, FIELD_LABELS=FIELD_LABELS, STATUSES=STATUSES, ACTION_LABELS=ACTION_LABELS)
    templates.env.filters["pair"] = lambda value: (value, value)
    templates.env.filters["jsontext"] = lambda value: json.dumps(value, ensure_ascii=False)
    templates.env.filters["clock"] = lambda s: f"{int(s) // 60:02d}:{int(s) % 60:02d}" if s is not None else ""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if "client" in client_holder:
            await client_holder["client"].close()
        state.close()

    app = FastAPI(title="工单核对台", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.web = config
    app.state.workbench = state
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def gateway() -> GatewayClient:
        if "client" not in client_holder:  # created inside the server's event loop
            client_holder["client"] = GatewayClient(
                config.gateway, ca_file=config.gateway_ca, api_key=config.gateway_api_key,
                client_cert=config.gateway_client_cert, client_key=config.gateway_client_key,
            )
        return client_holder["client"]

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; media-src 'self' blob:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
        )
        if request.url.path not in ("/healthz",) and not request.url.path.startswith("/static"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    # -- helpers ------------------------------------------------------------------------------
    def set_cookie(response: Response, name: str, value: str, max_age: int | None = None, samesite: str = "lax") -> None:
        response.set_cookie(name, value, max_age=max_age, httponly=True, secure=config.secure_cookies, samesite=samesite, path="/")

    def current(request: Request) -> tuple[User, Any] | None:
        session = state.session(request.cookies.get(SESSION_COOKIE))
        if session is None or session.user not in users:
            return None
        return users[session.user], session

    def client_of(request: Request) -> str:
        return request.client.host if request.client else ""

    def login_redirect(request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    def expired_json(request: Request) -> JSONResponse:
        referer = request.headers.get("x-page", "/tickets")
        return JSONResponse({"error": "登录已过期，请重新登录", "login": f"/login?next={quote(referer)}"}, status_code=401)

    def csrf_ok(request: Request, session, form_token: str | None = None) -> bool:
        token = request.headers.get("x-csrf-token") or form_token or ""
        return bool(token) and secrets.compare_digest(token, session.csrf)

    async def api_user(request: Request) -> tuple[User, Any] | JSONResponse:
        who = current(request)
        if who is None:
            return expired_json(request)
        if not csrf_ok(request, who[1]):
            return JSONResponse({"error": "请求校验失败（CSRF），请刷新页面后重试"}, status_code=403)
        return who

    def page(request: Request, name: str, who: tuple[User, Any] | None, status_code: int = 200, **context) -> HTMLResponse:
        user, session = who if who else (None, None)
        return templates.TemplateResponse(
            request, name, {"user": user, "csrf": session.csrf if session else "", "choices": choices, **context}, status_code=status_code
        )

    def safe_next(target: str | None) -> str:
        return target if target and target.startswith("/") and not target.startswith("//") else "/tickets"

    # -- login ----------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request, next: str = "/tickets", error: str = ""):
        nonce = secrets.token_urlsafe(24)
        response = page(request, "login.html", None, next=safe_next(next), login_csrf=nonce, error=error)
        set_cookie(response, LOGIN_COOKIE, nonce, max_age=3600, samesite="strict")
        return response

    @app.post("/login")
    async def login(request: Request):
        form = await request.form()
        name, password = str(form.get("username", "")).strip(), str(form.get("password", ""))
        target = safe_next(str(form.get("next", "")))
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not secrets.compare_digest(nonce, str(form.get("csrf_token", ""))):
            return RedirectResponse(f"/login?next={quote(target)}&error={quote('页面已过期，请重新登录')}", status_code=303)
        user = await asyncio.to_thread(authenticate, users, name, password)
        if user is None:
            state.audit(name or "?", "login_failed", client=client_of(request))
            return RedirectResponse(f"/login?next={quote(target)}&error={quote('用户名或密码错误')}", status_code=303)
        session = state.new_session(user.name)
        state.audit(user.name, "login", client=client_of(request))
        response = RedirectResponse(target, status_code=303)
        set_cookie(response, SESSION_COOKIE, session.token, max_age=int(config.session_minutes * 60))
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    @app.post("/logout")
    async def logout(request: Request):
        who = current(request)
        if who is not None:
            form = await request.form()
            if not csrf_ok(request, who[1], str(form.get("csrf_token", ""))):
                return JSONResponse({"error": "请求校验失败（CSRF）"}, status_code=403)
            state.end_session(who[1].token)
            state.audit(who[0].name, "logout", client=client_of(request))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/")
    async def root():
        return RedirectResponse("/tickets", status_code=303)

    # -- ticket list ------------------------------------------------------------------------------
    def parse_date(value: str | None) -> date | None:
        try:
            return date.fromisoformat(value) if value else None
        except ValueError:
            return None

    @app.get("/tickets", response_class=HTMLResponse)
    async def ticket_list(request: Request):
        who = current(request)
        if who is None:
            return login_redirect(request)
        q = request.query_params
        filters = ListFilters(
            date_from=parse_date(q.get("from")), date_to=parse_date(q.get("to")),
            category=q.get("category", ""), urgency=q.get("urgency", ""), district=q.get("district", ""),
            department=q.get("department", ""), needs_review=q.get("needs_review") == "1", duplicate=q.get("duplicate") == "1",
            q=q.get("q", "").strip()[:100],
        )
        try:
            result = await asyncio.to_thread(history.list, filters, q.get("after"))
            error = ""
        except HistoryUnavailable as missing:
            result, error = None, str(missing)
        params = {k: v for k, v in q.items() if k != "after" and v}
        next_url = f"/tickets?{urlencode({**params, 'after': result.next_cursor})}" if result and result.next_cursor else ""
        first_url = f"/tickets?{urlencode(params)}" if params else "/tickets"
        return page(request, "list.html", who, page=result, error=error, params=params, next_url=next_url, first_url=first_url)

    # -- one ticket ---------------------------------------------------------------------------------
    @app.get("/tickets/{ticket_id}", response_class=HTMLResponse)
    async def ticket_page(request: Request, ticket_id: str):
        who = current(request)
        if who is None:
            return login_redirect(request)
        try:
            ticket = await asyncio.to_thread(history.get, ticket_id)
        except HistoryUnavailable:
            ticket = None
        if ticket is None:
            return page(request, "error.html", who, status_code=404, message=f"没有工单 {ticket_id}")
        call = state.call(ticket_id)
        duplicates = await asyncio.to_thread(history.duplicates_of, ticket_id)
        duplicate_exists = bool(ticket.duplicate_of) and await asyncio.to_thread(history.exists, ticket.duplicate_of)
        handling = state.handling(ticket_id)
        return page(
            request, "ticket.html", who, ticket=ticket, t=ticket.to_dict(), call=call, handling=handling,
            duplicates=duplicates, duplicate_exists=duplicate_exists, audit=state.audit_log(50, ticket_id),
        )

    @app.get("/tickets/{ticket_id}/audio")
    async def ticket_audio(request: Request, ticket_id: str):
        if current(request) is None:
            return Response("请先登录", status_code=401, media_type="text/plain; charset=utf-8")
        call = state.call(ticket_id)
        if call is None:
            return Response("没有录音", status_code=404, media_type="text/plain; charset=utf-8")
        path = audio_dir / call["audio_file"]
        if not path.is_file():
            return Response("录音文件缺失", status_code=404, media_type="text/plain; charset=utf-8")
        return FileResponse(path, media_type=call["content_type"], headers={"Cache-Control": "private, no-store"})

    @app.post("/api/tickets/{ticket_id}/correct")
    async def correct(request: Request, ticket_id: str):
        who = await api_user(request)
        if isinstance(who, JSONResponse):
            return who
        user = who[0]
        body = await request.json()
        field_name, value = str(body.get("field", "")), str(body.get("value", "")).strip()
        if field_name not in FIELD_LABELS:
            return JSONResponse({"error": f"不能修改字段 {field_name}"}, status_code=400)
        try:
            reply = await gateway().correct(ticket_id, field_name, value, user.name)
        except grpc.aio.AioRpcError as error:
            return JSONResponse({"error": error_text(error)}, status_code=400 if error.code() != grpc.StatusCode.UNAVAILABLE else 503)
        result = to_dict(reply)
        state.audit(user.name, "correct", ticket_id, {"field": field_name, "old": json.loads(result["old_value"] or "null"), "new": json.loads(result["new_value"] or "null")}, client_of(request))
        display = URGENCY_LABELS.get(value, value) if field_name == "urgency" else value
        return {"ok": True, "field": field_name, "value": value, "display": display, "corrected_by": reply.corrected_by, "corrected_at": reply.corrected_at}

    @app.post("/api/tickets/{ticket_id}/status")
    async def set_status(request: Request, ticket_id: str):
        who = await api_user(request)
        if isinstance(who, JSONResponse):
            return who
        body = await request.json()
        ticket = await asyncio.to_thread(history.get, ticket_id)
        if ticket is None:
            return JSONResponse({"error": "工单不存在"}, status_code=404)
        try:
            handling = state.set_status(ticket_id, str(body.get("status", "")), ticket.department, who[0].name, ticket.received_at.isoformat())
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        state.audit(who[0].name, "status", ticket_id, {"status": handling["status"]}, client_of(request))
        return {"ok": True, "handling": handling, "label": STATUSES[handling["status"]]}

    @app.post("/api/tickets/{ticket_id}/reviewed")
    async def reviewed(request: Request, ticket_id: str):
        who = await api_user(request)
        if isinstance(who, JSONResponse):
            return who
        ticket = await asyncio.to_thread(history.get, ticket_id)
        if ticket is None:
            return JSONResponse({"error": "工单不存在"}, status_code=404)
        handling = state.mark_reviewed(ticket_id, who[0].name, ticket.received_at.isoformat())
        state.audit(who[0].name, "reviewed", ticket_id, {}, client_of(request))
        return {"ok": True, "handling": handling}

    @app.post("/api/tickets/{ticket_id}/rerecognize")
    async def rerecognize(request: Request, ticket_id: str):
        who = await api_user(request)
        if isinstance(who, JSONResponse):
            return who
        body = await request.json()
        call = state.call(ticket_id)
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
        pcm = await asyncio.to_thread(audio_kinds.pcm16k_range, audio_dir / call["audio_file"], start, end)
        if not pcm:
            return JSONResponse({"error": "该时间段没有音频"}, status_code=400)
        try:
            reply = await gateway().transcribe_pcm(pcm, hotwords, config.language)
        except grpc.aio.AioRpcError as error:
            return JSONResponse({"error": error_text(error)}, status_code=400)
        segments = [
            {"start_s": s.start_s + start, "end_s": s.end_s + start, "text": s.text, "confidence": s.confidence,
             "words": [{"text": w.text, "start_s": w.start_s + start, "end_s": w.end_s + start, "confidence": w.confidence} for w in s.words]}
            for s in reply.segments
        ]
        state.audit(who[0].name, "rerecognize", ticket_id, {"start": start, "end": end, "hotwords": hotwords, "text": reply.text}, client_of(request))
        return {"ok": True, "text": reply.text, "segments": segments}

    # -- upload ----------------------------------------------------------------------------------
    @app.get("/upload", response_class=HTMLResponse)
    async def upload_page(request: Request):
        who = current(request)
        if who is None:
            return login_redirect(request)
        return page(request, "upload.html", who, max_mb=config.max_upload_bytes / (1024 * 1024), max_bytes=config.max_upload_bytes, accepted=audio_kinds.ACCEPTED)

    def reject(user: User, request: Request, message: str, status: int, detail: dict) -> JSONResponse:
        state.audit(user.name, "upload_rejected", None, {"reason": message, **detail}, client_of(request))
        return JSONResponse({"error": message}, status_code=status)

    @app.post("/api/upload")
    async def upload(request: Request):
        who = await api_user(request)
        if isinstance(who, JSONResponse):
            return who
        user = who[0]
        limit_mb = config.max_upload_bytes / (1024 * 1024)
        declared = int(request.headers.get("content-length") or 0)
        if declared > config.max_upload_bytes + 1024 * 1024:
            return reject(user, request, f"文件太大：上限 {limit_mb:.0f} MB，未保存任何内容", 413, {"bytes": declared})
        form = await request.form(max_part_size=config.max_upload_bytes + 1)
        upload_file = form.get("audio")
        if upload_file is None or not hasattr(upload_file, "read"):
            return JSONResponse({"error": "请选择录音文件"}, status_code=400)
        data = await upload_file.read(config.max_upload_bytes + 1)
        name = (upload_file.filename or "recording")[:200]
        if len(data) > config.max_upload_bytes:
            return reject(user, request, f"文件太大：上限 {limit_mb:.0f} MB，未保存任何内容", 413, {"file": name})
        if not data:
            return reject(user, request, "文件是空的，未保存任何内容", 400, {"file": name})
        kind = audio_kinds.sniff(data[:64])
        if kind is None:
            return reject(user, request, f"“{name}”不是支持的录音文件（支持 {audio_kinds.ACCEPTED}），未保存任何内容", 415, {"file": name})
        digest = hashlib.sha256(data).hexdigest()
        metadata = {"file": name, "audio_sha256": digest, "received_at": datetime.now().replace(microsecond=0).isoformat(), "source": "workbench", "uploaded_by": user.name}
        try:
            reply = await gateway().transcribe_and_record(data, metadata, config.language)
        except grpc.aio.AioRpcError as error:
            status = 400 if error.code() == grpc.StatusCode.INVALID_ARGUMENT else 502
            return reject(user, request, error_text(error) + "，未保存任何内容", status, {"file": name})
        ticket_id = reply.ticket.ticket_id
        if not ticket_id:
            return JSONResponse({"error": "识别完成但没有生成工单"}, status_code=502)
        playable, stored_kind = await asyncio.to_thread(audio_kinds.playable_copy, data, kind)
        audio_name = f"{ticket_id}{stored_kind.extension}"
        tmp = audio_dir / f".{audio_name}.{secrets.token_hex(4)}.part"
        tmp.write_bytes(playable)
        tmp.replace(audio_dir / audio_name)
        transcript = {
            "text": reply.text, "normalized_text": reply.normalized_text, "language": reply.language,
            "model_name": reply.model_name, "audio_duration_s": reply.audio_duration_s, "processing_time_s": reply.processing_time_s,
            "segments": [
                {"start_s": s.start_s, "end_s": s.end_s, "text": s.text, "confidence": s.confidence,
                 "words": [{"text": w.text, "start_s": w.start_s, "end_s": w.end_s, "confidence": w.confidence} for w in s.words]}
                for s in reply.segments
            ],
        }
        state.add_call(ticket_id, audio_name, stored_kind.content_type, name, len(data), reply.audio_duration_s, transcript, user.name)
        state.audit(user.name, "upload", ticket_id, {"file": name, "bytes": len(data), "sha256": digest, "kind": kind.name}, client_of(request))
        return {"ok": True, "ticket_id": ticket_id, "url": f"/tickets/{quote(ticket_id)}", "text": reply.text}

    # -- dashboard ---------------------------------------------------------------------------------
    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard(request: Request, days: int = 30):
        who = current(request)
        if who is None:
            return login_redirect(request)
        days = max(1, min(days, 366))
        since = datetime.combine(date.today() - timedelta(days=days - 1), datetime.min.time())
        try:
            data = await asyncio.to_thread(history.dashboard, since)
            error = ""
        except HistoryUnavailable as missing:
            data, error = {"heat": [], "daily": [], "load": []}, str(missing)
        heat: dict[tuple[str, str], int] = {(row["category"], row["district"]): row["n"] for row in data["heat"]}
        districts = list(choices.districts) + ([""] if any(d == "" for _, d in heat) else [])
        categories = list(dict.fromkeys([*choices.categories, *(c for c, _ in heat)]))
        heat_max = max(heat.values(), default=0)
        daily: dict[str, dict[str, int]] = defaultdict(lambda: {"high": 0, "medium": 0, "low": 0})
        for row in data["daily"]:
            daily[row["day"]][row["urgency"]] = row["n"]
        daily_max = max((sum(v.values()) for v in daily.values()), default=0)
        load_max = max((row["n"] for row in data["load"]), default=0)
        return page(
            request, "dashboard.html", who, days=days, error=error, heat=heat, heat_max=heat_max, districts=districts,
            categories=categories, daily=sorted(daily.items()), daily_max=daily_max, load=data["load"], load_max=load_max,
            response_times=state.response_times(10),
        )

    # -- ledger ---------------------------------------------------------------------------------------
    @app.get("/ledger", response_class=HTMLResponse)
    async def ledger_page(request: Request, error: str = ""):
        who = current(request)
        if who is None:
            return login_redirect(request)
        today = date.today()
        return page(request, "ledger.html", who, date_from=(today - timedelta(days=6)).isoformat(), date_to=today.isoformat(), error=error, max_rows=config.ledger_max_rows)

    @app.get("/ledger.xlsx")
    async def ledger_download(request: Request):
        who = current(request)
        if who is None:
            return login_redirect(request)
        start, end = parse_date(request.query_params.get("from")), parse_date(request.query_params.get("to"))
        if start is None or end is None or end < start:
            return RedirectResponse(f"/ledger?error={quote('请选择有效的起止日期')}", status_code=303)
        try:
            records = await asyncio.to_thread(history.records_between, start, end, config.ledger_max_rows)
        except HistoryUnavailable as missing:
            return RedirectResponse(f"/ledger?error={quote(str(missing))}", status_code=303)
        if len(records) > config.ledger_max_rows:
            return RedirectResponse(f"/ledger?error={quote(f'该时段工单超过 {config.ledger_max_rows} 条，请缩短日期范围')}", status_code=303)
        from analysis.report import build_ledger

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "ledger.xlsx"
            await asyncio.to_thread(build_ledger, records, path)
            content = path.read_bytes()
        state.audit(who[0].name, "ledger", None, {"from": start.isoformat(), "to": end.isoformat(), "rows": len(records)}, client_of(request))
        filename = f"ledger_{start:%Y%m%d}_{end:%Y%m%d}.xlsx"
        return Response(
            content, media_type="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            headers={"Content-Disposition": f"attachment; filename=\"{filename}\"; filename*=UTF-8''{quote('工单台账_' + filename)}"},
        )

    # -- audit --------------------------------------------------------------------------------------------
    @app.get("/audit", response_class=HTMLResponse)
    async def audit_page(request: Request):
        who = current(request)
        if who is None:
            return login_redirect(request)
        if not who[0].can_audit:
            return page(request, "error.html", who, status_code=403, message="审计日志仅限主管查看")
        return page(request, "audit.html", who, entries=state.audit_log(500))

    return app
