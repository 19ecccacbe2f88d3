"""Health, login (a CSRF nonce cookie on the form, scrypt check, a new server-side session) and logout."""

from __future__ import annotations

import asyncio
import secrets
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from gateway.web.auth import authenticate
from gateway.web.context import LOGIN_COOKIE, SESSION_COOKIE, Workbench, csrf_ok, safe_next, workbench

router = APIRouter()


@router.get("/healthz")
async def healthz():
    return {"ok": True}


@router.get("/")
async def root():
    return RedirectResponse("/tickets", status_code=303)


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, next: str = "/tickets", error: str = "", wb: Workbench = Depends(workbench)):
    nonce = secrets.token_urlsafe(24)
    response = wb.page(request, "login.html", None, next=safe_next(next), login_csrf=nonce, error=error)
    wb.set_cookie(response, LOGIN_COOKIE, nonce, max_age=3600, samesite="strict")
    return response


@router.post("/login")
async def login(request: Request, wb: Workbench = Depends(workbench)):
    form = await request.form()
    name, password = str(form.get("username", "")).strip(), str(form.get("password", ""))
    target = safe_next(str(form.get("next", "")))
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not secrets.compare_digest(nonce, str(form.get("csrf_token", ""))):
        return RedirectResponse(f"/login?next={quote(target)}&error={quote('页面已过期，请重新登录')}", status_code=303)
    user = await asyncio.to_thread(authenticate, wb.users, name, password)
    if user is None:
        wb.audit(request, name or "?", "login_failed")
        return RedirectResponse(f"/login?next={quote(target)}&error={quote('用户名或密码错误')}", status_code=303)
    session = wb.state.new_session(user.name)
    wb.audit(request, user.name, "login")
    response = RedirectResponse(target, status_code=303)
    wb.set_cookie(response, SESSION_COOKIE, session.token, max_age=int(wb.config.session_minutes * 60))
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


@router.post("/logout")
async def logout(request: Request, wb: Workbench = Depends(workbench)):
    who = wb.current(request)
    if who is not None:
        form = await request.form()
        if not csrf_ok(request, who[1], str(form.get("csrf_token", ""))):
            return JSONResponse({"error": "请求校验失败（CSRF）"}, status_code=403)
        wb.state.end_session(who[1].token)
        wb.audit(request, who[0].name, "logout")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
