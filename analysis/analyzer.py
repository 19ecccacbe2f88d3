"""TicketAnalyzer: the configured pipeline from transcript to Ticket.

    text -> normalise -> embedding -> category -> urgency -> place -> department
         -> duplicate search in the history -> summary -> Ticket

Configuration (analysis/config/*.yaml, or the directory in $HOTLINE_ANALYSIS_CONFIG) is
loaded and cross-checked once; the embedding model loads once per process.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from analysis.config import Defaults, config_dir, load_defaults
from analysis.departments import ResponsibilityMatrix
from analysis.duplicates import DuplicateFinder, issue_keys_of
from analysis.embeddings import Embedder, load_embedder
from analysis.evidence import Evidence
from analysis.places import Gazetteer, PlaceExtractor
from analysis.summary import summarize
from analysis.taxonomy import CategoryClassifier, Taxonomy
from analysis.text import NormalizedTranscript, cjk_ratio, normalize_segments, normalize_transcript
from analysis.ticket import Ticket, make_ticket_id, now, parse_time
from analysis.urgency import UrgencyRules, UrgencyScorer

# Below this share of CJK letters a call is flagged as not Chinese; rules written for
# Chinese then say little and the (multilingual) embedding carries the category.
NON_CHINESE_CJK_RATIO = 0.3
MIXED_LANGUAGE_CJK_RATIO = 0.8
LOW_CONFIDENCE = 0.4


@dataclass(frozen=True)
class AnalysisConfig:
    taxonomy: Taxonomy
    urgency: UrgencyRules
    gazetteer: Gazetteer
    matrix: ResponsibilityMatrix
    defaults: Defaults
    directory: Path

    def __post_init__(self) -> None:
        self.matrix.validate_against(self.taxonomy.names, self.gazetteer.district_names)


def load_config(directory: Path | str | None = None) -> AnalysisConfig:
    root = config_dir(directory)
    return AnalysisConfig(
        taxonomy=Taxonomy.load(root / "taxonomy.yaml"),
        urgency=UrgencyRules.load(root / "urgency.yaml"),
        gazetteer=Gazetteer.load(root / "gazetteer.yaml"),
        matrix=ResponsibilityMatrix.load(root / "departments.yaml"),
        defaults=load_defaults(root / "defaults.yaml"),
        directory=root,
    )


class TicketAnalyzer:
    """Thread-safe for analyse calls (the history store serialises its own writes)."""

    def __init__(self, config: AnalysisConfig, embedder: Embedder | None | str = "config") -> None:
        self.config = config
        # "config": the model named in defaults.yaml; None: rules only (no embeddings, no duplicates).
        self.embedder = load_embedder(config.defaults.embedding_model) if embedder == "config" else embedder
        self.classifier = CategoryClassifier(config.taxonomy, config.defaults.classification, self.embedder)
        self.urgency = UrgencyScorer(config.urgency)
        self.places = PlaceExtractor(config.gazetteer)
        self.duplicates = DuplicateFinder(config.defaults.duplicates)
        self._lock = threading.Lock()

    @property
    def embedding_model(self) -> str | None:
        return getattr(self.embedder, "name", None)

    def embed(self, text: str) -> np.ndarray | None:
        if self.embedder is None or not text.strip():
            return None
        with self._lock:  # numpy models are not guaranteed re-entrant
            return self.embedder.encode([text])[0]

    def _normalise(self, text: str | None, segments: Iterable[Mapping] | None) -> NormalizedTranscript:
        max_chars = self.config.defaults.text.max_chars
        if segments is not None:
            segments = list(segments)
            if segments:
                return normalize_segments(segments, max_chars)
        return normalize_transcript(text or "", max_chars)

    def analyze(
        self,
        text: str | None,
        metadata: Mapping[str, Any],
        *,
        segments: Iterable[Mapping] | None = None,
        store=None,
        record: bool = True,
    ) -> Ticket:
        transcript = self._normalise(text, segments)
        normalized = transcript.text
        received_at = parse_time(metadata["received_at"]) if metadata.get("received_at") else now()
        ticket_id = str(metadata.get("ticket_id") or make_ticket_id(received_at, transcript.original))

        flags = []
        if not normalized.strip():
            flags.append("empty_transcript")
        else:
            ratio = cjk_ratio(normalized)
            if ratio < NON_CHINESE_CJK_RATIO:
                flags.append("not_chinese")
            elif ratio < MIXED_LANGUAGE_CJK_RATIO:
                flags.append("mixed_language")
        if transcript.truncated:
            flags.append("truncated")

        embedding = self.embed(normalized)
        category = self.classifier.classify(normalized, embedding)
        urgency = self.urgency.score(normalized)
        place = self.places.extract(normalized)
        if place.heard_as:
            flags.append("place_by_sound")
        if place.district_unknown:
            flags.append("district_unknown")
        elif place.district is None and normalized.strip():
            flags.append("district_missing")
        if normalized.strip() and category.confidence < LOW_CONFIDENCE:
            flags.append("low_confidence")
        department, department_reason = self.config.matrix.assign(category.category, place.district, normalized)

        duplicate = None
        if store is not None and embedding is not None:
            history = store.candidates(
                self.embedding_model, received_before=received_at, window_days=self.config.defaults.duplicates.window_days
            )
            duplicate = self.duplicates.find(
                embedding,
                category=category.category,
                place=place,
                issue_keys=issue_keys_of([item.to_dict() for item in category.evidence]),
                received_at=received_at,
                history=history,
                exclude_ids=(ticket_id,),
            )

        place_label = place.address or place.compound or place.landmark or place.community or place.street or place.road
        if place.district and place_label and place.district not in place_label:
            place_label = f"{place.district}{place_label}"
        # The summary reads the place names as the gazetteer writes them (same offsets).
        repaired, _ = self.places.repair_by_sound(normalized) if place.heard_as else (normalized, ())
        summary = summarize(
            repaired,
            (*category.evidence, *urgency.evidence),
            place_label or place.district,
            self.config.defaults.text.summary_max_chars,
        )

        def timed(items: Iterable[Evidence]) -> tuple[dict, ...]:
            return tuple(item.at_time(transcript.time_at(item.char_offset) if item.char_offset >= 0 else None).to_dict() for item in items)

        ticket = Ticket(
            ticket_id=ticket_id,
            received_at=received_at,
            transcript=transcript.original,
            text=normalized,
            category=category.category,
            category_confidence=category.confidence,
            category_evidence=timed(category.evidence),
            urgency=urgency.level,
            urgency_score=urgency.score,
            urgency_reasons=urgency.reasons,
            urgency_evidence=timed(urgency.evidence),
            place=place.to_dict(),
            department=department,
            department_reason=department_reason,
            summary=summary,
            duplicate_of=duplicate.ticket_id if duplicate else None,
            duplicate_score=duplicate.score if duplicate else None,
            duplicate_reason=duplicate.reason if duplicate else None,
            flags=tuple(flags),
            metadata={key: value for key, value in metadata.items() if key not in ("ticket_id", "received_at")},
            embedding_model=self.embedding_model if embedding is not None else None,
        )
        if store is not None and record:
            store.add(ticket, embedding)
        return ticket


@functools.lru_cache(maxsize=1)
def default_analyzer() -> TicketAnalyzer:
    """The analyzer for the packaged (or $HOTLINE_ANALYSIS_CONFIG) configuration, built once."""
    return TicketAnalyzer(load_config())
