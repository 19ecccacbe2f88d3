"""Read-only views of the ticket history (analysis/'s SQLite store): the list with filters and
keyset paging, one ticket, the dashboard's aggregates, the ledger's rows.

The file is opened with mode=ro: the workbench never writes the history; corrections go
through the gateway's CorrectTicket. Paging is by (received_at, ticket_id) from the last row
shown, so page 1,000 costs what page 1 costs (the store indexes received_at).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from analysis.ticket import Ticket

PAGE_SIZE = 50


@dataclass
class ListFilters:
    date_from: date | None = None
    date_to: date | None = None
    category: str = ""
    urgency: str = ""
    district: str = ""
    department: str = ""
    needs_review: bool = False
    duplicate: bool = False
    q: str = ""

    def active(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass
class Page:
    rows: list[dict]
    next_cursor: str | None
    filters: ListFilters
    first: bool = True
    extra: dict = field(default_factory=dict)


class HistoryUnavailable(RuntimeError):
    pass


class HistoryReader:
    def __init__(self, path: Path, search_index: Path | None = None) -> None:
        """search_index: the workbench's own compact copy of (rowid, ticket_id, transcript) for text
        search (var/web/search.sqlite); None: search scans the history itself."""
        self.path = Path(path)
        self.search_index = Path(search_index) if search_index else None
        self._local = threading.local()
        self._sync_lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        connection = getattr(self._local, "db", None)
        if connection is None:
            if not self.path.exists():
                raise HistoryUnavailable(f"工单库 {self.path} 不存在（先上传一通录音或运行批处理）")
            connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=30.0)
            connection.row_factory = sqlite3.Row
            if self.search_index:
                self._sync_search()
                connection.execute("ATTACH DATABASE ? AS search", (f"file:{self.search_index}?mode=ro",))
            self._local.db = connection
        return connection

    def _sync_search(self) -> None:
        """Copy tickets added since the last sync (by rowid: new tickets get higher rowids) into the search index.

        A 100,000-ticket history is ~150-400 MB (the JSON of each ticket); the transcripts alone
        are a few MB, so a substring search over them is a scan of a small file. A ticket analysed
        again in place keeps its rowid: its new transcript is not picked up (rare; search only)."""
        with self._sync_lock:
            index = sqlite3.connect(self.search_index, timeout=30.0)
            try:
                index.execute("CREATE TABLE IF NOT EXISTS search (rid INTEGER PRIMARY KEY, ticket_id TEXT NOT NULL, transcript TEXT NOT NULL)")
                last = index.execute("SELECT COALESCE(MAX(rid), 0) FROM search").fetchone()[0]
                source = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0)
                try:
                    while True:
                        rows = source.execute("SELECT rowid, ticket_id, transcript FROM tickets WHERE rowid > ? ORDER BY rowid LIMIT 20000", (last,)).fetchall()
                        if not rows:
                            break
                        with index:
                            index.executemany("INSERT OR REPLACE INTO search VALUES (?, ?, ?)", rows)
                        last = rows[-1][0]
                except sqlite3.OperationalError as error:
                    if "no such table" not in str(error):
                        raise
                finally:
                    source.close()
            finally:
                index.close()

    def _rows(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        try:
            return self._db().execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return []
            raise

    # -- list -------------------------------------------------------------------------------
    def list(self, filters: ListFilters, cursor: str | None = None, page_size: int = PAGE_SIZE) -> Page:
        where, params = [], []
        if filters.date_from:
            where.append("received_at >= ?")
            params.append(filters.date_from.isoformat())
        if filters.date_to:
            where.append("received_at < ?")
            params.append((filters.date_to + timedelta(days=1)).isoformat())
        for column in ("category", "urgency", "district", "department"):
            value = getattr(filters, column)
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        if filters.duplicate:
            where.append("duplicate_of IS NOT NULL AND duplicate_of != ''")
        if filters.needs_review:
            where.append("json_extract(ticket_json, '$.needs_review') = 1")
        if filters.q:
            if self.search_index:
                self._sync_search()
                where.append("(ticket_id IN (SELECT ticket_id FROM search.search WHERE instr(transcript, ?) > 0) OR ticket_id = ?)")
            else:
                where.append("(instr(transcript, ?) > 0 OR ticket_id = ?)")
            params += [filters.q, filters.q]
        if cursor:
            try:
                at, ticket_id = cursor.split("|", 1)
            except ValueError:
                at, ticket_id = "", ""
            if at:
                where.append("(received_at < ? OR (received_at = ? AND ticket_id < ?))")
                params += [at, at, ticket_id]
        sql = (
            "SELECT ticket_id, received_at, category, urgency, district, department, duplicate_of, "
            "json_extract(ticket_json, '$.summary') AS summary, json_extract(ticket_json, '$.needs_review') AS needs_review, "
            "json_extract(ticket_json, '$.corrected_fields') AS corrected_fields FROM tickets"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY received_at DESC, ticket_id DESC LIMIT ?"
        )
        rows = [dict(row) for row in self._rows(sql, [*params, page_size + 1])]
        more = len(rows) > page_size
        rows = rows[:page_size]
        for row in rows:
            row["corrected_fields"] = json.loads(row["corrected_fields"] or "[]")
        next_cursor = f"{rows[-1]['received_at']}|{rows[-1]['ticket_id']}" if more and rows else None
        return Page(rows, next_cursor, filters, first=not cursor)

    def count(self) -> int:
        rows = self._rows("SELECT COUNT(*) FROM tickets")
        return rows[0][0] if rows else 0

    # -- one ticket -------------------------------------------------------------------------
    def get(self, ticket_id: str) -> Ticket | None:
        rows = self._rows("SELECT ticket_json FROM tickets WHERE ticket_id = ?", (ticket_id,))
        return Ticket.from_dict(json.loads(rows[0][0])) if rows else None

    def exists(self, ticket_id: str) -> bool:
        return bool(self._rows("SELECT 1 FROM tickets WHERE ticket_id = ?", (ticket_id,)))

    def duplicates_of(self, ticket_id: str, limit: int = 20) -> list[dict]:
        """Later tickets marked as duplicates of this one (scan; the store has no index on it)."""
        rows = self._rows("SELECT ticket_id, received_at FROM tickets WHERE duplicate_of = ? ORDER BY received_at LIMIT ?", (ticket_id, limit))
        return [dict(row) for row in rows]

    # -- dashboard --------------------------------------------------------------------------
    def dashboard(self, since: datetime) -> dict[str, Any]:
        start = since.isoformat()
        heat = self._rows("SELECT category, COALESCE(district, '') AS district, COUNT(*) AS n FROM tickets WHERE received_at >= ? GROUP BY 1, 2", (start,))
        daily = self._rows("SELECT substr(received_at, 1, 10) AS day, urgency, COUNT(*) AS n FROM tickets WHERE received_at >= ? GROUP BY 1, 2 ORDER BY 1", (start,))
        load = self._rows("SELECT department, COUNT(*) AS n FROM tickets WHERE received_at >= ? GROUP BY 1 ORDER BY 2 DESC LIMIT 15", (start,))
        return {
            "heat": [dict(row) for row in heat],
            "daily": [dict(row) for row in daily],
            "load": [dict(row) for row in load],
        }

    # -- ledger -----------------------------------------------------------------------------
    def records_between(self, start: date, end: date, limit: int) -> list:
        """analysis.report.CallRecords of [start, end] (at most limit + 1: the caller tells the user when there are more)."""
        from analysis.report import CallRecord  # matplotlib: only when a ledger is asked for

        rows = self._rows(
            "SELECT ticket_json FROM tickets WHERE received_at >= ? AND received_at < ? ORDER BY received_at LIMIT ?",
            (start.isoformat(), (end + timedelta(days=1)).isoformat(), limit + 1),
        )
        records = []
        for row in rows:
            ticket = Ticket.from_dict(json.loads(row[0]))
            records.append(CallRecord(ticket.to_dict(), str(ticket.metadata.get("file", ""))))
        return records
