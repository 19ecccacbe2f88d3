"""The review workbench: a web app where operators hear, check and correct every ticket.

    python -m gateway.web --gateway localhost:50051 --users var/web/users.yaml   # http://127.0.0.1:8080/

Server-rendered pages (FastAPI + Jinja2, a little JavaScript) over the gateway's gRPC API
(Transcribe with word timestamps and analysis, CorrectTicket); the ticket list, the ticket
page and the dashboard read the history store read-only. Its own state (sessions, audit
log, uploaded audio, the transcripts with word times, ticket status) lives under var/web/.
"""
