"""History store (SQLite): tickets, transcripts, embeddings and human corrections.

One file, path configurable (defaults.yaml `store.path`, or --history-db). A file that
is not an intact store (not SQLite, damaged pages, another application's tables) raises
HistoryStoreCorruptError and is left untouched: history is never reset silently.

    with HistoryStore("var/hotline_history.sqlite") as store:
        store.correct("HL-20261116-1a2b3c4d", "category", "环境卫生", by="王芳")
        store.export_corrections("corrections.jsonl")
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from analysis.atomic import atomic_write_text
from analysis.config import URGENCY_LEVELS
from analysis.duplicates import HistoryCandidates, issue_keys_of, place_keys_of
from analysis.errors import CorrectionError, HistoryStoreCorruptError, HistoryStoreError, TicketNotFoundError
from analysis.ticket import CORRECTABLE_FIELDS, Ticket, now, parse_time

APPLICATION_ID = 0x31323334  # "1234": SQLite's application_id marks the file as ours
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (
    ticket_id       TEXT PRIMARY KEY,
    received_at     TEXT NOT NULL,
    category        TEXT NOT NULL,
    urgency         TEXT NOT NULL,
    department      TEXT NOT NULL,
    district        TEXT,
    address_key     TEXT,
    place_keys      TEXT NOT NULL DEFAULT '[]',
    issue_keys      TEXT NOT NULL DEFAULT '[]',
    duplicate_of    TEXT,
    transcript      TEXT NOT NULL,
    ticket_json     TEXT NOT NULL,
    embedding       BLOB,
    embedding_model TEXT,
    updated_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tickets_received ON tickets (received_at);
CREATE TABLE IF NOT EXISTS corrections (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    ticket_id     TEXT NOT NULL REFERENCES tickets (ticket_id),
    field         TEXT NOT NULL,
    old_value     TEXT,
    new_value     TEXT,
    corrected_by  TEXT NOT NULL,
    corrected_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS corrections_ticket ON corrections (ticket_id);
"""


@dataclass(frozen=True)
class Correction:
    ticket_id: str
    field: str
    old_value: Any
    new_value: Any
    corrected_by: str
    corrected_at: datetime

    def to_dict(self) -> dict:
        return {
            "ticket_id": self.ticket_id,
            "field": self.field,
            "old_value": self.old_value,
            "new_value": self.new_value,
            "corrected_by": self.corrected_by,
            "corrected_at": self.corrected_at.isoformat(),
        }


class HistoryStore:
    def __init__(self, path: Path | str, *, categories: Sequence[str] | None = None) -> None:
        """Open (or create) the store. `categories`: allowed values when correcting `category`."""
        self.path = Path(path)
        self.categories = tuple(categories) if categories else None
        self._lock = threading.RLock()
        self._connection = self._open()

    # -- opening -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise HistoryStoreError(self.path, f"cannot create its folder: {error.strerror}") from error
        existed = self.path.exists() and self.path.stat().st_size > 0
        try:
            connection = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as error:
            raise HistoryStoreError(self.path, f"cannot open: {error}") from error
        try:
            if existed:
                self._check_existing(connection)
            else:
                self._initialise(connection)
            connection.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as error:
            connection.close()
            raise HistoryStoreCorruptError(self.path, f"not a readable SQLite database ({error}); move it aside or restore a backup") from error
        except HistoryStoreError:
            connection.close()
            raise
        return connection

    def _check_existing(self, connection: sqlite3.Connection) -> None:
        # quick_check reads every page: damaged files fail here, not halfway through a batch.
        result = connection.execute("PRAGMA quick_check").fetchone()
        if not result or result[0] != "ok":
            raise HistoryStoreCorruptError(self.path, f"integrity check failed: {result[0] if result else 'no result'}; restore a backup")
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if application_id != APPLICATION_ID:
            raise HistoryStoreCorruptError(self.path, f"SQLite file of another application (application_id {application_id:#x}); not touching it")
        if version > SCHEMA_VERSION:
            raise HistoryStoreError(self.path, f"written by a newer version (schema {version} > {SCHEMA_VERSION})")
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = {"tickets", "corrections"} - tables
        if missing:
            raise HistoryStoreCorruptError(self.path, f"tables {sorted(missing)} are missing")

    def _initialise(self, connection: sqlite3.Connection) -> None:
        try:
            with connection:
                connection.executescript(_SCHEMA)
                connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            connection.execute("PRAGMA journal_mode = WAL")  # readers (reports) do not block the batch
        except sqlite3.OperationalError as error:
            raise HistoryStoreError(self.path, f"cannot create the store: {error}") from error

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> "HistoryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, sql: str, params: Sequence | dict) -> None:
        try:
            with self._lock, self._connection:
                self._connection.execute(sql, params)
        except sqlite3.DatabaseError as error:
            raise HistoryStoreError(self.path, f"write failed: {error}") from error

    # -- tickets -------------------------------------------------------------------------

    def add(self, ticket: Ticket, embedding: np.ndarray | None) -> None:
        """Insert or replace the ticket (the same call analysed again replaces itself)."""
        vector = None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes()
        self._write(
            """INSERT INTO tickets (ticket_id, received_at, category, urgency, department, district, address_key,
                                    place_keys, issue_keys, duplicate_of, transcript, ticket_json, embedding, embedding_model, updated_at)
               VALUES (:ticket_id, :received_at, :category, :urgency, :department, :district, :address_key,
                       :place_keys, :issue_keys, :duplicate_of, :transcript, :ticket_json, :embedding, :embedding_model, :updated_at)
               ON CONFLICT (ticket_id) DO UPDATE SET
                   received_at = excluded.received_at, category = excluded.category, urgency = excluded.urgency,
                   department = excluded.department, district = excluded.district, address_key = excluded.address_key,
                   place_keys = excluded.place_keys, issue_keys = excluded.issue_keys, duplicate_of = excluded.duplicate_of, transcript = excluded.transcript,
                   ticket_json = excluded.ticket_json, embedding = excluded.embedding,
                   embedding_model = excluded.embedding_model, updated_at = excluded.updated_at""",
            {
                "ticket_id": ticket.ticket_id,
                "received_at": ticket.received_at.isoformat(),
                "category": ticket.category,
                "urgency": ticket.urgency,
                "department": ticket.department,
                "district": ticket.district,
                "address_key": ticket.place.get("address_key"),
                "place_keys": json.dumps(list(place_keys_of(ticket.place)), ensure_ascii=False),
                "issue_keys": json.dumps(list(issue_keys_of(ticket.category_evidence)), ensure_ascii=False),
                "duplicate_of": ticket.duplicate_of,
                "transcript": ticket.transcript,
                "ticket_json": json.dumps(ticket.to_dict(), ensure_ascii=False),
                "embedding": vector,
                "embedding_model": ticket.embedding_model if vector is not None else None,
                "updated_at": now().isoformat(),
            },
        )

    def get(self, ticket_id: str) -> Ticket:
        with self._lock:
            row = self._connection.execute("SELECT ticket_json FROM tickets WHERE ticket_id = ?", (ticket_id,)).fetchone()
        if row is None:
            raise TicketNotFoundError(ticket_id)
        return Ticket.from_dict(json.loads(row[0]))

    def __contains__(self, ticket_id: str) -> bool:
        with self._lock:
            return self._connection.execute("SELECT 1 FROM tickets WHERE ticket_id = ?", (ticket_id,)).fetchone() is not None

    def count(self) -> int:
        with self._lock:
            return self._connection.execute("SELECT COUNT(*) FROM tickets").fetchone()[0]

    def tickets_between(self, start: datetime, end: datetime) -> list[Ticket]:
        """Tickets received in [start, end), oldest first."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT ticket_json FROM tickets WHERE received_at >= ? AND received_at < ? ORDER BY received_at",
                (start.isoformat(), end.isoformat()),
            ).fetchall()
        return [Ticket.from_dict(json.loads(row[0])) for row in rows]

    def candidates(self, embedding_model: str | None, *, received_before: datetime, window_days: float = 30.0) -> HistoryCandidates:
        """Tickets embedded by the same model, received in the window before `received_before`."""
        if embedding_model is None:
            return HistoryCandidates.empty()
        earliest = received_before - timedelta(days=window_days)
        with self._lock:
            rows = self._connection.execute(
                """SELECT ticket_id, received_at, category, address_key, place_keys, issue_keys, embedding, district, transcript FROM tickets
                   WHERE embedding_model = ? AND embedding IS NOT NULL AND received_at >= ? AND received_at <= ?
                   ORDER BY received_at""",
                (embedding_model, earliest.isoformat(), received_before.isoformat()),
            ).fetchall()
        if not rows:
            return HistoryCandidates.empty()
        vectors = np.stack([np.frombuffer(row[6], dtype=np.float32) for row in rows])
        return HistoryCandidates(
            ticket_ids=tuple(row[0] for row in rows),
            received_at=tuple(parse_time(row[1]) for row in rows),
            categories=tuple(row[2] for row in rows),
            address_keys=tuple(row[3] for row in rows),
            place_keys=tuple(tuple(json.loads(row[4])) for row in rows),
            issue_keys=tuple(tuple(json.loads(row[5])) for row in rows),
            vectors=vectors,
            districts=tuple(row[7] for row in rows),
            transcripts=tuple(row[8] for row in rows),
        )

    # -- corrections ---------------------------------------------------------------------

    def _validated(self, ticket_id: str, field: str, value: Any) -> Any:
        if field not in CORRECTABLE_FIELDS:
            raise CorrectionError(ticket_id, field, f"not a correctable field (one of {', '.join(CORRECTABLE_FIELDS)})")
        if field == "duplicate_of":
            if value in (None, "", "none", "无"):
                return None
            if value == ticket_id:
                raise CorrectionError(ticket_id, field, "a ticket cannot duplicate itself")
            if value not in self:
                raise CorrectionError(ticket_id, field, f"no earlier ticket {value!r} in the history")
            return value
        if not isinstance(value, str) or not value.strip():
            raise CorrectionError(ticket_id, field, "the new value must be non-empty text")
        value = value.strip()
        if field == "urgency" and value not in URGENCY_LEVELS:
            raise CorrectionError(ticket_id, field, f"must be one of {', '.join(URGENCY_LEVELS)}")
        if field == "category" and self.categories and value not in self.categories:
            raise CorrectionError(ticket_id, field, f"unknown category {value!r} (one of {', '.join(self.categories)})")
        return value

    def correct(self, ticket_id: str, field: str, value: Any, by: str) -> Correction:
        """Set a field of a ticket by hand; who, when, the old and the new value are recorded."""
        if not isinstance(by, str) or not by.strip():
            raise CorrectionError(ticket_id, field, "say who corrects it (by)")
        value = self._validated(ticket_id, field, value)
        with self._lock:
            ticket = self.get(ticket_id)
            old = ticket.place.get(field) if field in ("district", "address") else getattr(ticket, field)
            corrected = ticket.with_correction(field, value)
            correction = Correction(ticket_id, field, old, value, by.strip(), now())
            column = {"district": "district", "category": "category", "urgency": "urgency", "department": "department", "duplicate_of": "duplicate_of"}.get(field)
            try:
                with self._connection:
                    self._connection.execute(
                        "INSERT INTO corrections (ticket_id, field, old_value, new_value, corrected_by, corrected_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (ticket_id, field, json.dumps(old, ensure_ascii=False), json.dumps(value, ensure_ascii=False), correction.corrected_by, correction.corrected_at.isoformat()),
                    )
                    assignments = "ticket_json = ?, updated_at = ?" + (f", {column} = ?" if column else "")
                    params = [json.dumps(corrected.to_dict(), ensure_ascii=False), correction.corrected_at.isoformat()]
                    if column:
                        params.append(value)
                    self._connection.execute(f"UPDATE tickets SET {assignments} WHERE ticket_id = ?", (*params, ticket_id))
            except sqlite3.DatabaseError as error:
                raise HistoryStoreError(self.path, f"cannot record the correction: {error}") from error
        return correction

    def corrections(self, ticket_id: str | None = None) -> list[Correction]:
        sql = "SELECT ticket_id, field, old_value, new_value, corrected_by, corrected_at FROM corrections"
        params: tuple = ()
        if ticket_id is not None:
            sql += " WHERE ticket_id = ?"
            params = (ticket_id,)
        with self._lock:
            rows = self._connection.execute(sql + " ORDER BY id", params).fetchall()
        return [Correction(row[0], row[1], json.loads(row[2]), json.loads(row[3]), row[4], parse_time(row[5])) for row in rows]

    def iter_correction_records(self) -> Iterator[dict]:
        """One record per correction, with the call's text and the machine's first answer (for retraining)."""
        first_values: dict[tuple[str, str], Any] = {}
        for correction in self.corrections():
            key = (correction.ticket_id, correction.field)
            first_values.setdefault(key, correction.old_value)
            ticket = self.get(correction.ticket_id)
            yield {
                **correction.to_dict(),
                "machine_value": first_values[key],
                "text": ticket.text,
                "transcript": ticket.transcript,
                "received_at": ticket.received_at.isoformat(),
            }

    def export_corrections(self, out_path: Path | str) -> int:
        """Write the corrections as JSONL (atomically); returns how many."""
        records = list(self.iter_correction_records())
        atomic_write_text(out_path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        return len(records)
