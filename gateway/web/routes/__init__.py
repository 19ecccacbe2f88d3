"""The workbench's routes by area; gateway.web.app wires them into one FastAPI app.

- session: health, login, logout
- tickets: the list, one ticket's page, corrections (-> gateway CorrectTicket), status, reviewed
- audio: a ticket's recording for the player, re-recognition of a time range
- upload: the upload page and the upload (-> gateway Transcribe with analysis)
- reports: dashboard, ledger (xlsx), audit log
"""

from gateway.web.routes import audio, reports, session, tickets, upload

ROUTERS = (session.router, tickets.router, audio.router, upload.router, reports.router)
