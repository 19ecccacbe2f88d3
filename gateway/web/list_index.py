"""The workbench's own index of the ticket history for the list page (var/web/search.sqlite).

The history (analysis/'s SQLite store, written by the gateway) indexes only received_at; the
workbench opens it read-only and never adds anything to it. A filter or a combination of
filters there walks received_at until it has a page, which is 100-500 ms for a rare combination
at 100,000 tickets. This file keeps a compact copy of what the list filters on - one narrow row
per ticket (no JSON) and the transcript in a table of its own - with an index per filter column
that ends in (received_at, ticket_id), the list's order:

- one filter, or a filter with a date range: a range of one index, exactly a page read;
- a combination: SQLite walks the index of its most selective column (ANALYZE statistics) and
  checks the other columns on the narrow rows (a few thousand rows for the rarest combination);
- text search: one scan of the transcripts (a few MB), then as a filter;
- the ticket page's "later duplicates of this one": an index on duplicate_of (the history has
  none: 0.4-0.8 s a page at 100,000 tickets).

Kept up to date incrementally: tickets added since the last sync (the history's rowids only
grow), and tickets corrected since (the history's corrections table, by id). A ticket a batch
re-run analyses again in place keeps its rowid and has no correction: the list re-checks every
row it shows against the history and re-indexes those that differ (HistoryReader.list), so a
page never shows a ticket that does not match its filters; that such a ticket now matches a
filter it did not is only known after it was shown once or the index is rebuilt (delete the
file; it is rebuilt on the next list, ~2 s for 100,000 tickets).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Iterable

VERSION = 2  # PRAGMA user_version; 0/1: the transcript-only copy of earlier versions (rebuilt)
FILTER_COLUMNS = ("category", "urgency", "district", "department")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    rid INTEGER PRIMARY KEY,            -- the ticket's rowid in the history
    ticket_id TEXT NOT NULL UNIQUE,
    received_at TEXT NOT NULL,
    category TEXT NOT NULL,
    urgency TEXT NOT NULL,
    district TEXT NOT NULL,             -- '' when the history has none
    department TEXT NOT NULL,
    needs_review INTEGER NOT NULL,
    duplicate_of TEXT                   -- NULL when none
);
CREATE TABLE IF NOT EXISTS texts (rid INTEGER PRIMARY KEY, transcript TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS rows_time ON rows (received_at, ticket_id);
CREATE INDEX IF NOT EXISTS rows_category ON rows (category, received_at, ticket_id);
CREATE INDEX IF NOT EXISTS rows_urgency ON rows (urgency, received_at, ticket_id);
CREATE INDEX IF NOT EXISTS rows_district ON rows (district, received_at, ticket_id);
CREATE INDEX IF NOT EXISTS rows_department ON rows (department, received_at, ticket_id);
CREATE INDEX IF NOT EXISTS rows_review ON rows (received_at, ticket_id) WHERE needs_review = 1;
CREATE INDEX IF NOT EXISTS rows_duplicate ON rows (received_at, ticket_id) WHERE duplicate_of IS NOT NULL;
CREATE INDEX IF NOT EXISTS rows_duplicate_of ON rows (duplicate_of, received_at) WHERE duplicate_of IS NOT NULL;
"""

# What the index keeps of a history row, as SQL over the history's tickets table, in the order of
# the columns of `rows` after rid and ticket_id; HistoryReader.list compares a shown row by these.
INDEXED = (
    "received_at", "category", "urgency", "COALESCE(district, '')", "department",
    "COALESCE(json_extract(ticket_json, '$.needs_review'), 0) != 0", "NULLIF(duplicate_of, '')",
)
INDEXED_SQL = ", ".join(INDEXED)
SOURCE_COLUMNS = f"rowid, ticket_id, {INDEXED_SQL}, transcript"
BATCH = 20000


class ListIndex:
    def __init__(self, path: Path, history: Path) -> None:
        self.path = Path(path)
        self.history = Path(history)
        self._lock = threading.Lock()
        self._index: sqlite3.Connection | None = None  # the one writer, used under the lock

    def _open(self) -> sqlite3.Connection:
        if self._index is not None:
            return self._index
        self.path.parent.mkdir(parents=True, exist_ok=True)
        index = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        if index.execute("PRAGMA user_version").fetchone()[0] != VERSION:
            with index:
                for (name,) in index.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'").fetchall():
                    index.execute(f'DROP TABLE "{name}"')
            index.execute("VACUUM")
        index.execute("PRAGMA journal_mode = WAL")  # readers of the list go on while a sync writes
        index.execute("PRAGMA synchronous = NORMAL")  # a copy: a power cut may lose its last sync, which the next one redoes
        index.execute("PRAGMA cache_size = -32768")  # 32 MB: the first build of 100,000 rows and their indexes
        with index:
            index.executescript(_SCHEMA)
            index.execute(f"PRAGMA user_version = {VERSION}")
        self._index = index
        return index

    def close(self) -> None:
        with self._lock:
            if self._index is not None:
                self._index.close()
                self._index = None

    def sync(self) -> None:
        """Add the tickets added and re-copy the tickets corrected since the last sync."""
        with self._lock:
            index = self._open()
            source = sqlite3.connect(f"file:{self.history}?mode=ro", uri=True, timeout=30.0)
            try:
                marks = dict(index.execute("SELECT name, value FROM marks").fetchall())
                last_rid, last_correction = marks.get("rid", 0), marks.get("correction", 0)
                try:
                    newest = source.execute("SELECT COALESCE(MAX(rowid), 0) FROM tickets").fetchone()[0]
                    corrected = source.execute("SELECT id, ticket_id FROM corrections WHERE id > ? ORDER BY id", (last_correction,)).fetchall()
                except sqlite3.OperationalError as error:
                    if "no such table" in str(error):
                        return
                    raise
                if newest < last_rid:  # not the history this index was made from (replaced, or rowids renumbered)
                    with index:
                        index.execute("DELETE FROM rows")
                        index.execute("DELETE FROM texts")
                    last_rid = 0
                building = last_rid == 0 and newest > BATCH
                if building:  # a first build: the indexes are made once at the end (~7x faster than row by row)
                    for (name,) in index.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'rows_%'").fetchall():
                        index.execute(f'DROP INDEX "{name}"')
                added = 0
                try:
                    while True:
                        rows = source.execute(f"SELECT {SOURCE_COLUMNS} FROM tickets WHERE rowid > ? ORDER BY rowid LIMIT {BATCH}", (last_rid,)).fetchall()
                        if not rows:
                            break
                        last_rid = rows[-1][0]
                        added += len(rows)
                        self._store(index, rows, marks={"rid": last_rid}, fresh=building)
                    if corrected:
                        ids = list(dict.fromkeys(ticket_id for _, ticket_id in corrected))
                        self._store(index, self._read(source, ids), marks={"correction": corrected[-1][0]})
                finally:
                    if building:
                        with index:
                            index.executescript(_SCHEMA)
                if added > 1000 and added * 10 > last_rid:  # a large share is new: refresh the planner's statistics
                    index.execute("ANALYZE")
            finally:
                source.close()

    def reindex(self, ticket_ids: Iterable[str]) -> None:
        """Copy these tickets again (the list found them changed in the history)."""
        with self._lock:
            index = self._open()
            source = sqlite3.connect(f"file:{self.history}?mode=ro", uri=True, timeout=30.0)
            try:
                ids = list(ticket_ids)
                rows = self._read(source, ids)
                found = {row[1] for row in rows}
                with index:
                    index.executemany("DELETE FROM texts WHERE rid IN (SELECT rid FROM rows WHERE ticket_id = ?)", [(i,) for i in ids if i not in found])
                    index.executemany("DELETE FROM rows WHERE ticket_id = ?", [(i,) for i in ids if i not in found])
                self._store(index, rows)
            finally:
                source.close()

    @staticmethod
    def _read(source: sqlite3.Connection, ticket_ids: list[str]) -> list[tuple]:
        rows = []
        for start in range(0, len(ticket_ids), 500):
            chunk = ticket_ids[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            rows += source.execute(f"SELECT {SOURCE_COLUMNS} FROM tickets WHERE ticket_id IN ({marks})", chunk).fetchall()
        return rows

    @staticmethod
    def _store(index: sqlite3.Connection, rows: list[tuple], marks: dict[str, int] | None = None, fresh: bool = False) -> None:
        with index:
            if not fresh:  # a ticket id seen under another rowid (a renumbered history) replaces its old row
                index.executemany("DELETE FROM texts WHERE rid IN (SELECT rid FROM rows WHERE ticket_id = ? AND rid != ?)", [(r[1], r[0]) for r in rows])
            index.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [r[:-1] for r in rows])
            index.executemany("INSERT OR REPLACE INTO texts VALUES (?, ?)", [(r[0], r[-1]) for r in rows])
            index.executemany("INSERT OR REPLACE INTO marks VALUES (?, ?)", list((marks or {}).items()))
