"""Read-only views of the ticket history (analysis/'s SQLite store): the list with filters and
keyset paging, one ticket, the dashboard's aggregates, the ledger's rows.

The file is opened with mode=ro: the workbench never writes the history; corrections go
through the gateway's CorrectTicket. The list's filters and text search run on the workbench's
own index of it (gateway.web.list_index); paging is by (received_at, ticket_id) from the last
row shown, so page 1,000 costs what page 1 costs.
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
from gateway.web.list_index import FILTER_COLUMNS, INDEXED, INDEXED_SQL, ListIndex

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


LIST_COLUMNS = (
    "ticket_id, received_at, category, urgency, district, department, duplicate_of, "
    "json_extract(ticket_json, '$.summary') AS summary, json_extract(ticket_json, '$.needs_review') AS needs_review, "
    "json_extract(ticket_json, '$.corrected_fields') AS corrected_fields"
)


def _index_query(filters: ListFilters, cursor: str | None, limit: int) -> tuple[str, list]:
    """The ids of a page from the index: every filter is a column of its narrow rows (indexed)."""
    where, params = [], []
    if filters.date_from:
        where.append("received_at >= ?")
        params.append(filters.date_from.isoformat())
    if filters.date_to:
        where.append("received_at < ?")
        params.append((filters.date_to + timedelta(days=1)).isoformat())
    for column in FILTER_COLUMNS:
        value = getattr(filters, column)
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if filters.duplicate:
        where.append("duplicate_of IS NOT NULL")
    if filters.needs_review:
        where.append("needs_review = 1")
    if filters.q:
        where.append("(rid IN (SELECT rid FROM idx.texts WHERE instr(transcript, ?) > 0) OR ticket_id = ?)")
        params += [filters.q, filters.q]
    if cursor:
        at, _, ticket_id = cursor.partition("|")
        if at:
            where.append("(received_at < ? OR (received_at = ? AND ticket_id < ?))")
            params += [at, at, ticket_id]
    sql = (
        "SELECT ticket_id, rid, received_at, category, urgency, district, department, needs_review, duplicate_of FROM idx.rows"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY received_at DESC, ticket_id DESC LIMIT ?"
    )
    return sql, [*params, limit]


def _list_row(row: sqlite3.Row) -> dict:
    out = {key: row[key] for key in ("ticket_id", "received_at", "category", "urgency", "district", "department", "duplicate_of", "summary", "needs_review")}
    out["corrected_fields"] = json.loads(row["corrected_fields"] or "[]")
    return out


class HistoryReader:
    def __init__(self, path: Path, index_path: Path) -> None:
        """index_path: the workbench's own index of the list's filters and the transcripts
        (gateway.web.list_index, var/web/search.sqlite); the history itself is only read."""
        self.path = Path(path)
        self.index = ListIndex(index_path, self.path)
        self._local = threading.local()

    def close(self) -> None:
        self.index.close()

    def _db(self) -> sqlite3.Connection:
        connection = getattr(self._local, "db", None)
        if connection is None:
            if not self.path.exists():
                raise HistoryUnavailable(f"工单库 {self.path} 不存在（先上传一通录音或运行批处理）")
            self.index.sync()  # creates the index file before it is attached
            connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=30.0)
            connection.row_factory = sqlite3.Row
            connection.execute("ATTACH DATABASE ? AS idx", (f"file:{self.index.path}?mode=ro",))
            self._local.db = connection
        return connection

    def _rows(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        try:
            return self._db().execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return []
            raise

    # -- list -------------------------------------------------------------------------------
    def list(self, filters: ListFilters, cursor: str | None = None, page_size: int = PAGE_SIZE) -> Page:
        """A page of the list: the ticket ids from the index (its filters, its order), the rest
        from the history. A shown row whose history differs from the index (re-analysed in
        place) is re-indexed and the page asked again."""
        self._db()
        self.index.sync()
        for _ in range(3):
            hits = self._rows(*_index_query(filters, cursor, page_size + 1))
            ids = [hit["ticket_id"] for hit in hits]
            shown = {row["ticket_id"]: row for row in self._rows(
                f"SELECT {LIST_COLUMNS}, {INDEXED_SQL} FROM tickets WHERE ticket_id IN ({', '.join('?' * len(ids))})", ids
            )}
            stale = [hit["ticket_id"] for hit in hits
                     if hit["ticket_id"] not in shown or tuple(hit)[2:] != tuple(shown[hit["ticket_id"]])[-len(INDEXED):]]
            if not stale:
                break
            self.index.reindex(stale)
        rows = [_list_row(shown[hit["ticket_id"]]) for hit in hits if hit["ticket_id"] in shown]
        more = len(rows) > page_size
        rows = rows[:page_size]
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
        """Later tickets marked as duplicates of this one: found in the index (the history has no
        index on duplicate_of), confirmed in the history."""
        self._db()
        self.index.sync()
        rows = self._rows(
            "SELECT t.ticket_id, t.received_at FROM (SELECT ticket_id FROM idx.rows WHERE duplicate_of = ? ORDER BY received_at LIMIT ?) AS hit "
            "JOIN tickets AS t ON t.ticket_id = hit.ticket_id WHERE t.duplicate_of = ? ORDER BY t.received_at",
            (ticket_id, limit, ticket_id),
        )
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
