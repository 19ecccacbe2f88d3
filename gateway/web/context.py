"""What every route of the workbench shares: its configuration, the open stores, the templates and
the session / CSRF / page helpers. One `Workbench` per app (app.state.context); a route gets it
with `Depends(workbench)`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from gateway.web.auth import User, load_users
from gateway.web.gateway_client import GatewayClient
from gateway.web.history import HistoryReader
from gateway.web.state import STATUSES, Session, WorkbenchState

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

Who = tuple[User, Session]


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


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(URGENCY_LABELS=URGENCY_LABELS, FIELD_LABELS=FIELD_LABELS, STATUSES=STATUSES, ACTION_LABELS=ACTION_LABELS)
    templates.env.filters["pair"] = lambda value: (value, value)
    templates.env.filters["jsontext"] = lambda value: json.dumps(value, ensure_ascii=False)
    templates.env.filters["clock"] = lambda s: f"{int(s) // 60:02d}:{int(s) % 60:02d}" if s is not None else ""
    return templates


def parse_date(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


def safe_next(target: str | None) -> str:
    """Where to go after login: a path on this site only (no `//host` open redirect)."""
    return target if target and target.startswith("/") and not target.startswith("//") else "/tickets"


def client_of(request: Request) -> str:
    return request.client.host if request.client else ""


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


def expired_json(request: Request) -> JSONResponse:
    """An API call with no live session: the page's script sends the user to login and keeps the edit."""
    referer = request.headers.get("x-page", "/tickets")
    return JSONResponse({"error": "登录已过期，请重新登录", "login": f"/login?next={quote(referer)}"}, status_code=401)


def csrf_ok(request: Request, session: Session, form_token: str | None = None) -> bool:
    token = request.headers.get("x-csrf-token") or form_token or ""
    return bool(token) and secrets.compare_digest(token, session.csrf)


class Workbench:
    """The app's shared parts, opened once by create_app and closed by its lifespan."""

    def __init__(self, config: WebConfig) -> None:
        self.config = config
        self.users = load_users(config.users_file)
        self.state = WorkbenchState(config.data_dir / "state.sqlite", session_minutes=config.session_minutes)
        self.history = HistoryReader(config.history_db, config.data_dir / "search.sqlite")
        self.choices = load_choices(config.analysis_config)
        self.audio_dir = config.data_dir / "audio"
        self.audio_dir.mkdir(parents=True, exist_ok=True)
        self.templates = _templates()
        self._client: GatewayClient | None = None

    def gateway(self) -> GatewayClient:
        if self._client is None:  # created inside the server's event loop
            config = self.config
            self._client = GatewayClient(
                config.gateway, ca_file=config.gateway_ca, api_key=config.gateway_api_key,
                client_cert=config.gateway_client_cert, client_key=config.gateway_client_key,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        self.history.close()
        self.state.close()

    # -- sessions -----------------------------------------------------------------------------
    def current(self, request: Request) -> Who | None:
        session = self.state.session(request.cookies.get(SESSION_COOKIE))
        if session is None or session.user not in self.users:
            return None
        return self.users[session.user], session

    def set_cookie(self, response: Response, name: str, value: str, max_age: int | None = None, samesite: str = "lax") -> None:
        response.set_cookie(name, value, max_age=max_age, httponly=True, secure=self.config.secure_cookies, samesite=samesite, path="/")

    def audit(self, request: Request, user: str, action: str, ticket_id: str | None = None, detail: dict | None = None) -> None:
        self.state.audit(user, action, ticket_id, detail, client_of(request))

    # -- pages --------------------------------------------------------------------------------
    def page(self, request: Request, name: str, who: Who | None, status_code: int = 200, **context: Any) -> HTMLResponse:
        user, session = who if who else (None, None)
        return self.templates.TemplateResponse(
            request, name, {"user": user, "csrf": session.csrf if session else "", "choices": self.choices, **context}, status_code=status_code
        )


def workbench(request: Request) -> Workbench:
    """The FastAPI dependency: this app's Workbench."""
    return request.app.state.context


class Refused(Exception):
    """Raised by the user dependencies; the app answers with `response` (gateway.web.app)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def page_user(request: Request, wb: Workbench = Depends(workbench)) -> Who:
    """The logged-in user of a page; without a live session: to the login page, then back here."""
    who = wb.current(request)
    if who is None:
        raise Refused(login_redirect(request))
    return who


def api_user(request: Request, wb: Workbench = Depends(workbench)) -> Who:
    """The logged-in user of a JSON call with its CSRF header; else 401 (the script goes to login
    and keeps the edit) or 403."""
    who = wb.current(request)
    if who is None:
        raise Refused(expired_json(request))
    if not csrf_ok(request, who[1]):
        raise Refused(JSONResponse({"error": "请求校验失败（CSRF），请刷新页面后重试"}, status_code=403))
    return who
