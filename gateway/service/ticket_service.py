"""Ticket analysis behind the gRPC API: AnalyzeTicket, CorrectTicket and Transcribe(analyze=true).

The analyzer (taxonomy, embeddings) and the SQLite history are opened once per gateway
process; analysis is CPU work, so it runs in a worker thread, never on the event loop.

This is the gateway that owns the history. Replicated gateways started with ``--ticket-service``
forward to it instead (gateway/service/remote_tickets.py); for them two things are honoured here:

- a correction from a key named in ``--ticket-forwarders`` is recorded as the caller that gateway
  names in x-on-behalf-of (``wangfang via workbench``, as if it had come here directly), not as
  ``<that> via <forwarder key>``; the audit line adds ``forwarded_by``;
- the metadata key ``SEGMENTS_KEY`` carries Transcribe's segments (JSON), which the proto's
  AnalyzeTicketRequest has no field for: taken out of the metadata and analysed as segments.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

from google.protobuf.struct_pb2 import Struct

from gateway.protocol import asr_pb2
from gateway.service.auth import current_identity

# Every correction, one JSON line; the server sends this logger to --audit-log.
audit = logging.getLogger("gateway.audit")
MAX_TICKET_ID_CHARS = 128
UNKNOWN_TICKET = "no such ticket"  # one message for unknown and not-visible ids
SEGMENTS_KEY = "gateway.segments"  # ticket metadata: Transcribe's segments as JSON (forwarded analysis)
MAX_SEGMENTS_BYTES = 4 * 1024 * 1024


class TicketServiceError(ValueError):
    """A client error in an analysis request (maps to INVALID_ARGUMENT)."""


class TicketNotFound(LookupError):
    """CorrectTicket named a ticket the history does not hold (maps to NOT_FOUND)."""


class TicketExists(ValueError):
    """record=true for a ticket id the history already holds (maps to ALREADY_EXISTS): never overwritten."""


class _NoOverwriteStore:
    """The history store as the analyzer sees it when recording: ``add`` refuses an existing id.

    The check and the insert happen under one lock, so two requests with one id cannot both
    record; everything else is the real store's.
    """

    def __init__(self, store, lock: threading.Lock) -> None:
        self._store = store
        self._lock = lock

    def add(self, ticket, embedding) -> None:
        with self._lock:
            if ticket.ticket_id in self._store:
                raise TicketExists(
                    f"ticket {ticket.ticket_id[:64]!r} already exists; record=true never replaces a ticket "
                    "(use CorrectTicket, or another ticket_id)"
                )
            self._store.add(ticket, embedding)

    def __getattr__(self, name):
        return getattr(self._store, name)


def ticket_to_pb(ticket) -> asr_pb2.Ticket:
    record = ticket.to_dict()
    place = record.get("place") or {}
    details = Struct()
    details.update(json.loads(json.dumps(record, ensure_ascii=False, default=str)))
    return asr_pb2.Ticket(
        ticket_id=ticket.ticket_id,
        received_at=str(record.get("received_at", "")),
        category=ticket.category,
        category_confidence=float(ticket.category_confidence),
        category_evidence=[str(e.get("text", "")) for e in ticket.category_evidence],
        urgency=ticket.urgency,
        urgency_reasons=list(ticket.urgency_reasons),
        district=place.get("district") or "",
        street=place.get("street") or "",
        address=place.get("address") or "",
        department=ticket.department or "",
        department_reason=ticket.department_reason or "",
        duplicate_of=ticket.duplicate_of or "",
        duplicate_score=float(ticket.duplicate_score or 0.0),
        summary=ticket.summary or "",
        flags=list(ticket.flags),
        machine_generated=bool(ticket.machine_generated),
        details=details,
    )


def _is_time(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def segments_from_metadata(metadata: dict) -> list[dict] | None:
    """Take SEGMENTS_KEY out of ``metadata``: the segments it holds, or None when absent."""
    carried = metadata.pop(SEGMENTS_KEY, None)
    if carried is None:
        return None
    problem = f"metadata {SEGMENTS_KEY} must be a JSON list of {{start_s, end_s, text}}"
    if not isinstance(carried, str):
        raise TicketServiceError(problem)
    if len(carried.encode("utf-8")) > MAX_SEGMENTS_BYTES:
        raise TicketServiceError(f"metadata {SEGMENTS_KEY} is over {MAX_SEGMENTS_BYTES} bytes")
    try:
        segments = json.loads(carried)
    except ValueError:
        raise TicketServiceError(problem) from None
    if not isinstance(segments, list):
        raise TicketServiceError(problem)
    for segment in segments:
        if not (
            isinstance(segment, dict) and isinstance(segment.get("text"), str)
            and all(_is_time(segment.get(key)) for key in ("start_s", "end_s"))
        ):
            raise TicketServiceError(problem)
    return [{"start_s": float(s["start_s"]), "end_s": float(s["end_s"]), "text": s["text"]} for s in segments]


class TicketService:
    """Lazily opened analyzer + history store, shared by all requests of one gateway.

    ``forwarders``: API-key names of gateways that forward tickets here (``--ticket-forwarders``).
    ``preload_analyzer``: warm_up loads the analyzer too (its embedding model: about 220 MB and
    4 s); otherwise the first analysis loads it (CorrectTicket needs only the history).
    """

    def __init__(
        self, history_db: Path | None = None, config_dir: Path | None = None, forwarders: Iterable[str] = (),
        preload_analyzer: bool = True,
    ) -> None:
        self._history_db = history_db
        self._config_dir = config_dir
        self._forwarders = frozenset(forwarders)
        self.preload_analyzer = preload_analyzer
        self._lock = threading.Lock()
        self._config = None
        self._analyzer = None
        self._store = None
        self._record_lock = threading.Lock()

    def _open_store(self):
        with self._lock:
            if self._store is None:
                from analysis.analyzer import load_config
                from analysis.store import HistoryStore

                config = load_config(self._config_dir)
                path = self._history_db or Path(config.defaults.store_path)
                self._store = HistoryStore(path, categories=config.taxonomy.names)
                self._config = config
        return self._store

    def _open(self):
        store = self._open_store()
        with self._lock:
            if self._analyzer is None:
                from analysis.analyzer import TicketAnalyzer

                self._analyzer = TicketAnalyzer(self._config)
        return self._analyzer, store

    @property
    def analyzer_loaded(self) -> bool:
        return self._analyzer is not None

    def warm_up(self) -> None:
        """Open the taxonomy and history now rather than on the first request, and load the
        embedding model too when ``preload_analyzer``."""
        if self.preload_analyzer:
            self._open()
        else:
            self._open_store()

    def analyze_sync(self, text: str, metadata: Mapping[str, Any], *, segments: Iterable[Mapping] | None = None, record: bool = False):
        from analysis.errors import AnalysisError, HistoryStoreError

        metadata = dict(metadata)
        carried = segments_from_metadata(metadata)
        if segments is None:
            segments = carried
        analyzer, store = self._open()
        if record:
            store = _NoOverwriteStore(store, self._record_lock)
        try:
            return analyzer.analyze(text, dict(metadata), segments=segments, store=store, record=record)
        except HistoryStoreError:
            raise
        except AnalysisError as error:
            raise TicketServiceError(str(error)) from error

    async def analyze(self, text: str, metadata: Mapping[str, Any], *, segments=None, record: bool = False) -> asr_pb2.Ticket:
        ticket = await asyncio.to_thread(self.analyze_sync, text, metadata, segments=segments, record=record)
        return ticket_to_pb(ticket)

    def author(self, by: str) -> tuple[str, str | None]:
        """(who the correction is recorded as, the forwarding key or None). A key in --ticket-forwarders
        is a gateway passing on its caller's identity, already authenticated there: recorded as is
        (none named: an empty author, refused like a missing corrected_by)."""
        identity = current_identity.get()
        if identity is not None and identity.key_name in self._forwarders:
            return identity.on_behalf_of or "", identity.key_name
        return by, None

    def correct_sync(
        self, ticket_id: str, field: str, value: str, by: str, forwarded_by: str | None = None
    ) -> asr_pb2.CorrectTicketResponse:
        from analysis.errors import CorrectionError, TicketNotFoundError

        store = self._open_store()
        # An unknown id and an id the caller may not see get the same answer, checked before
        # the field and value, so the status never tells which ids exist.
        if not ticket_id or len(ticket_id) > MAX_TICKET_ID_CHARS or ticket_id not in store:
            raise TicketNotFound(UNKNOWN_TICKET)
        try:
            correction = store.correct(ticket_id, field, value, by)
        except TicketNotFoundError as error:
            raise TicketNotFound(UNKNOWN_TICKET) from error
        except CorrectionError as error:
            raise TicketServiceError(str(error)) from error
        audit.info(
            json.dumps(
                {
                    "event": "ticket_correction", "ticket_id": correction.ticket_id, "field": correction.field,
                    "old_value": correction.old_value, "new_value": correction.new_value,
                    "corrected_by": correction.corrected_by, "corrected_at": correction.corrected_at.isoformat(),
                    **({"forwarded_by": forwarded_by} if forwarded_by else {}),
                },
                ensure_ascii=False, default=str,
            )
        )
        return asr_pb2.CorrectTicketResponse(
            ticket_id=correction.ticket_id,
            field=correction.field,
            old_value=json.dumps(correction.old_value, ensure_ascii=False),
            new_value=json.dumps(correction.new_value, ensure_ascii=False),
            corrected_by=correction.corrected_by,
            corrected_at=correction.corrected_at.isoformat(),
        )

    async def correct(self, ticket_id: str, field: str, value: str, by: str) -> asr_pb2.CorrectTicketResponse:
        by, forwarded_by = self.author(by)
        return await asyncio.to_thread(self.correct_sync, ticket_id, field, value, by, forwarded_by)
