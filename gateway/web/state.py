"""The workbench's own state (SQLite under var/web/): sessions, the audit log, uploaded calls
(audio file + transcript with word times) and each ticket's handling status.

The ticket history itself belongs to analysis/ and is changed only through the gateway
(CorrectTicket); this file never holds a second copy of a ticket's fields.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

STATUSES = {"open": "待处理", "dispatched": "已派单", "closed": "已办结"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    token TEXT PRIMARY KEY, user TEXT NOT NULL, csrf TEXT NOT NULL,
    created_at TEXT NOT NULL, expires_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, user TEXT NOT NULL,
    action TEXT NOT NULL, ticket_id TEXT, detail TEXT NOT NULL DEFAULT '{}', client TEXT
);
CREATE INDEX IF NOT EXISTS audit_ticket ON audit (ticket_id);
CREATE TABLE IF NOT EXISTS calls (
    ticket_id TEXT PRIMARY KEY, audio_file TEXT NOT NULL, content_type TEXT NOT NULL,
    original_name TEXT, size_bytes INTEGER, duration_s REAL, transcript TEXT NOT NULL,
    uploaded_by TEXT NOT NULL, uploaded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS handling (
    ticket_id TEXT PRIMARY KEY, status TEXT NOT NULL, department TEXT,
    opened_at TEXT, dispatched_at TEXT, closed_at TEXT,
    reviewed_by TEXT, reviewed_at TEXT, updated_by TEXT, updated_at TEXT
);
"""


def _now() -> datetime:
    return datetime.now().replace(microsecond=0)


@dataclass(frozen=True)
class Session:
    token: str
    user: str
    csrf: str
    expires_at: datetime


class WorkbenchState:
    def __init__(self, path: Path, session_minutes: float = 480.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.session_lifetime = timedelta(minutes=session_minutes)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        with self._db:
            self._db.executescript(_SCHEMA)
        self._db.execute("PRAGMA journal_mode = WAL")

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _write(self, sql: str, params: tuple = ()) -> None:
        with self._lock, self._db:
            self._db.execute(sql, params)

    # -- sessions --------------------------------------------------------------------------
    def new_session(self, user: str) -> Session:
        session = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), _now() + self.session_lifetime)
        self._write("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)", (session.token, user, session.csrf, _now().isoformat(), session.expires_at.isoformat()))
        self._write("DELETE FROM sessions WHERE expires_at < ?", (_now().isoformat(),))
        return session

    def session(self, token: str | None) -> Session | None:
        if not token:
            return None
        rows = self._query("SELECT token, user, csrf, expires_at FROM sessions WHERE token = ?", (token,))
        if not rows:
            return None
        expires = datetime.fromisoformat(rows[0]["expires_at"])
        if expires <= _now():
            self.end_session(token)
            return None
        return Session(rows[0]["token"], rows[0]["user"], rows[0]["csrf"], expires)

    def end_session(self, token: str) -> None:
        self._write("DELETE FROM sessions WHERE token = ?", (token,))

    def expire_session_now(self, token: str) -> None:
        """Tests and admins: make a session expired without deleting it."""
        self._write("UPDATE sessions SET expires_at = ? WHERE token = ?", ((_now() - timedelta(seconds=1)).isoformat(), token))

    # -- audit -----------------------------------------------------------------------------
    def audit(self, user: str, action: str, ticket_id: str | None = None, detail: dict | None = None, client: str | None = None) -> None:
        self._write(
            "INSERT INTO audit (at, user, action, ticket_id, detail, client) VALUES (?, ?, ?, ?, ?, ?)",
            (_now().isoformat(), user, action, ticket_id, json.dumps(detail or {}, ensure_ascii=False), client),
        )

    def audit_log(self, limit: int = 200, ticket_id: str | None = None) -> list[dict]:
        sql, params = "SELECT at, user, action, ticket_id, detail, client FROM audit", ()
        if ticket_id:
            sql, params = sql + " WHERE ticket_id = ?", (ticket_id,)
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
        return [{**dict(row), "detail": json.loads(row["detail"])} for row in rows]

    # -- uploaded calls --------------------------------------------------------------------
    def add_call(self, ticket_id: str, audio_file: str, content_type: str, original_name: str, size_bytes: int,
                 duration_s: float, transcript: dict, uploaded_by: str) -> None:
        self._write(
            "INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ticket_id, audio_file, content_type, original_name, size_bytes, duration_s, json.dumps(transcript, ensure_ascii=False), uploaded_by, _now().isoformat()),
        )

    def call(self, ticket_id: str) -> dict | None:
        rows = self._query("SELECT * FROM calls WHERE ticket_id = ?", (ticket_id,))
        if not rows:
            return None
        return {**dict(rows[0]), "transcript": json.loads(rows[0]["transcript"])}

    def call_count(self) -> int:
        return self._query("SELECT COUNT(*) FROM calls")[0][0]

    # -- handling status -------------------------------------------------------------------
    def handling(self, ticket_id: str) -> dict:
        rows = self._query("SELECT * FROM handling WHERE ticket_id = ?", (ticket_id,))
        return dict(rows[0]) if rows else {"ticket_id": ticket_id, "status": "open"}

    def set_status(self, ticket_id: str, status: str, department: str | None, by: str, received_at: str | None) -> dict:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        current = self.handling(ticket_id)
        at = _now().isoformat()
        opened = current.get("opened_at") or received_at or at
        dispatched = current.get("dispatched_at")
        closed = current.get("closed_at")
        if status == "open":
            dispatched = closed = None
        elif status == "dispatched":
            dispatched, closed = dispatched or at, None
        else:
            dispatched, closed = dispatched or at, closed or at
        self._write(
            """INSERT INTO handling (ticket_id, status, department, opened_at, dispatched_at, closed_at, updated_by, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (ticket_id) DO UPDATE SET status = excluded.status, department = excluded.department,
                 opened_at = excluded.opened_at, dispatched_at = excluded.dispatched_at, closed_at = excluded.closed_at,
                 updated_by = excluded.updated_by, updated_at = excluded.updated_at""",
            (ticket_id, status, department, opened, dispatched, closed, by, at),
        )
        return self.handling(ticket_id)

    def mark_reviewed(self, ticket_id: str, by: str, received_at: str | None) -> dict:
        current = self.handling(ticket_id)
        at = _now().isoformat()
        self._write(
            """INSERT INTO handling (ticket_id, status, opened_at, reviewed_by, reviewed_at, updated_by, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (ticket_id) DO UPDATE SET reviewed_by = excluded.reviewed_by, reviewed_at = excluded.reviewed_at,
                 updated_by = excluded.updated_by, updated_at = excluded.updated_at""",
            (ticket_id, current.get("status", "open"), current.get("opened_at") or received_at or at, by, at, by, at),
        )
        return self.handling(ticket_id)

    def response_times(self, limit: int = 10) -> list[dict[str, Any]]:
        """部门响应时效: per department, closed tickets and mean hours from the call to dispatch / close."""
        rows = self._query(
            """SELECT department, COUNT(*) AS closed,
                      AVG((julianday(dispatched_at) - julianday(opened_at)) * 24) AS dispatch_h,
                      AVG((julianday(closed_at) - julianday(opened_at)) * 24) AS close_h
               FROM handling WHERE status = 'closed' AND department IS NOT NULL AND department != ''
               GROUP BY department ORDER BY close_h ASC LIMIT ?""",
            (limit,),
        )
        return [dict(row) for row in rows]
