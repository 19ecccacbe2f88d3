"""The workbench app: create_app opens the shared parts (gateway.web.context), adds the security
headers and mounts the routes of each area (gateway.web.routes)."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from gateway.web.context import HERE, Choices, Refused, WebConfig, Workbench, load_choices
from gateway.web.routes import ROUTERS

__all__ = ["Choices", "WebConfig", "create_app", "load_choices"]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; media-src 'self' blob:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
)


async def security_headers(request: Request, call_next):
    response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    if request.url.path not in ("/healthz",) and not request.url.path.startswith("/static"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


async def refused(_request: Request, refusal: Refused):
    return refusal.response


def create_app(config: WebConfig) -> FastAPI:
    context = Workbench(config)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await context.close()

    app = FastAPI(title="工单核对台", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.web = config
    app.state.workbench = context.state
    app.state.context = context
    app.middleware("http")(security_headers)
    app.add_exception_handler(Refused, refused)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    for router in ROUTERS:
        app.include_router(router)
    return app
