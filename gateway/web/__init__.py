"""The review workbench: a web app where operators hear, check and correct every ticket.

    python -m gateway.web --gateway localhost:50051 --users var/web/users.yaml   # http://127.0.0.1:8080/

Server-rendered pages (FastAPI + Jinja2, a little JavaScript) over the gateway's gRPC API
(Transcribe with word timestamps and analysis, CorrectTicket); the ticket list, the ticket
page and the dashboard read the history store read-only. Its own state (sessions, audit
log, uploaded audio, the transcripts with word times, ticket status, the list's index) lives
under var/web/.

    app.py          create_app: the shared parts, security headers, the routers
    context.py      WebConfig, the shared parts (Workbench) and the login / CSRF dependencies
    routes/         session (login), tickets (list, page, corrections), audio (player,
                    re-recognition), upload, reports (dashboard, ledger, audit)
    gateway_client  the gRPC calls, in the logged-in user's name (x-on-behalf-of)
    history         the history, read-only; list_index: the list's own index of it
    state           sessions, audit log, uploaded calls, handling status
"""
