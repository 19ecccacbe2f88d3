"""The ticket: everything the analysis says about one call (analysis.analyzer.analyze_ticket makes it).

    from analysis import analyze_ticket
    ticket = analyze_ticket("幸福路12号的路灯坏了三天了", {"received_at": "2026-11-16T09:30:00"})
    ticket.to_dict()   # JSON-ready; `machine_generated` tells staff to check, not retype

With `store=HistoryStore(...)` the ticket is compared with the history (duplicates) and
recorded in it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from analysis.errors import AnalysisError

ANALYZER_VERSION = "2"

# Fields staff may correct (store.correct) and what the ledger shows.
CORRECTABLE_FIELDS = ("category", "urgency", "department", "duplicate_of", "summary", "district", "address")


class TicketMetadataError(AnalysisError):
    """Caller-supplied metadata (received_at, ticket_id) is malformed."""


def parse_time(value: Any, what: str = "received_at") -> datetime:
    """ISO 8601 text or a datetime -> naive local datetime (the hotline's wall clock)."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str) and value.strip():
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError as error:
            raise TicketMetadataError(f"{what}: not an ISO 8601 time: {value!r}") from error
    else:
        raise TicketMetadataError(f"{what}: expected an ISO 8601 time, got {value!r}")
    if moment.tzinfo is not None:
        moment = moment.astimezone().replace(tzinfo=None)
    return moment.replace(microsecond=0)


def make_ticket_id(received_at: datetime, content: str) -> str:
    """HL-YYYYMMDD-xxxxxxxx: readable by staff, stable for the same call content."""
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()[:8]
    return f"HL-{received_at:%Y%m%d}-{digest}"


@dataclass(frozen=True)
class Ticket:
    ticket_id: str
    received_at: datetime
    transcript: str                  # as the ASR (or the caller of analyze_ticket) wrote it
    text: str                        # normalised: simplified Chinese, digits; offsets refer to it
    category: str
    category_confidence: float
    category_evidence: tuple[dict, ...]
    urgency: str
    urgency_score: float
    urgency_reasons: tuple[str, ...]
    urgency_evidence: tuple[dict, ...]
    place: Mapping[str, Any]
    department: str
    department_reason: str
    summary: str
    duplicate_of: str | None = None
    duplicate_score: float | None = None
    duplicate_reason: str | None = None
    flags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    embedding_model: str | None = None
    corrected_fields: tuple[str, ...] = ()
    machine_generated: bool = True
    analyzer_version: str = ANALYZER_VERSION
    model_version: str | None = None          # the trained model (build/analysis/); None: rules only
    needs_review: bool = False                # a person should check the fields, see review_reasons
    review_reasons: tuple[str, ...] = ()
    urgency_probabilities: Mapping[str, float] = field(default_factory=dict)

    @property
    def district(self) -> str | None:
        return self.place.get("district")

    @property
    def address(self) -> str | None:
        return self.place.get("address")

    def key_phrases(self, limit: int = 8) -> list[dict]:
        """Category and urgency evidence in call order, each with its time in the recording.

        Overlapping finds (电梯, 电梯又坏, 又坏) keep the longest, so a reviewer sees each
        place in the call once."""
        kept: list[dict] = []
        for item in sorted((*self.category_evidence, *self.urgency_evidence), key=lambda e: (e["char_offset"], -len(e["text"]))):
            if item["char_offset"] < 0:
                continue
            if kept and item["char_offset"] < kept[-1]["char_offset"] + len(kept[-1]["text"]):
                if len(item["text"]) > len(kept[-1]["text"]):
                    kept[-1] = item
                continue
            if any(other["text"] == item["text"] for other in kept):
                continue
            kept.append(item)
        return kept[:limit]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["received_at"] = self.received_at.isoformat()
        data["place"] = dict(self.place)
        data["metadata"] = dict(self.metadata)
        data["urgency_probabilities"] = dict(self.urgency_probabilities)
        for key in ("category_evidence", "urgency_evidence", "urgency_reasons", "flags", "corrected_fields", "review_reasons"):
            data[key] = list(data[key])
        data["key_phrases"] = self.key_phrases()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Ticket":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["received_at"] = parse_time(values["received_at"])
        for key in ("category_evidence", "urgency_evidence"):
            values[key] = tuple(values.get(key) or ())
        for key in ("urgency_reasons", "flags", "corrected_fields", "review_reasons"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)

    def with_correction(self, field_name: str, value: Any) -> "Ticket":
        """A copy with one field set by a person (district/address live inside `place`)."""
        corrected = tuple(dict.fromkeys((*self.corrected_fields, field_name)))
        if field_name in ("district", "address"):
            return dataclasses.replace(self, place={**self.place, field_name: value}, corrected_fields=corrected)
        return dataclasses.replace(self, **{field_name: value, "corrected_fields": corrected})

def now() -> datetime:
    return datetime.now(timezone.utc).astimezone().replace(tzinfo=None, microsecond=0)
