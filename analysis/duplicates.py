"""重复工单: is this call about a problem an earlier ticket already reported?

The call's sentence embedding is compared with the history's (same embedding model,
received within `window_days` before it, same category unless configured otherwise).
Two wordings of one complaint score only about 0.5-0.85 with USE v3, so a shared address
adds `same_address_boost` (or `same_place_boost` for the same compound, community or
road), and at a shared place the same taxonomy keywords (路灯, 井盖) add
`shared_keyword_boost`: a duplicate is a combined score at or above `threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

import numpy as np

from analysis.config import DuplicateOptions
from analysis.places import Place


@dataclass(frozen=True)
class HistoryCandidates:
    """Earlier tickets as parallel columns; `vectors` rows are unit length."""

    ticket_ids: tuple[str, ...]
    received_at: tuple[datetime, ...]
    categories: tuple[str, ...]
    address_keys: tuple[str | None, ...]
    place_keys: tuple[tuple[str, ...], ...]
    issue_keys: tuple[tuple[str, ...], ...]
    vectors: np.ndarray
    districts: tuple[str | None, ...] = ()    # optional columns (the pair model uses them)
    transcripts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        count = len(self.ticket_ids)
        if not (len(self.received_at) == len(self.categories) == len(self.address_keys) == len(self.place_keys) == len(self.issue_keys) == count == len(self.vectors)):
            raise ValueError("history candidate columns differ in length")
        if (self.districts and len(self.districts) != count) or (self.transcripts and len(self.transcripts) != count):
            raise ValueError("history candidate columns differ in length")

    @classmethod
    def empty(cls, dim: int = 512) -> "HistoryCandidates":
        return cls((), (), (), (), (), (), np.zeros((0, dim), np.float32))


def place_keys_of(place: Mapping[str, Any]) -> tuple[str, ...]:
    """The compound, community, road and landmark of a ticket's place: coarser than its address."""
    return tuple(place[key] for key in ("compound", "community", "road", "landmark") if place.get(key))


def issue_keys_of(category_evidence: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The taxonomy keywords a call used (路灯, 井盖): two calls about one problem share some."""
    return tuple(sorted({item["text"].lower() for item in category_evidence if item.get("kind") == "keyword"}))


@dataclass(frozen=True)
class DuplicateMatch:
    ticket_id: str
    score: float
    cosine: float
    reason: str


class DuplicateFinder:
    def __init__(self, options: DuplicateOptions) -> None:
        self.options = options

    def find(
        self,
        embedding: np.ndarray,
        *,
        category: str,
        place: Place,
        issue_keys: Sequence[str],
        received_at: datetime,
        history: HistoryCandidates,
        exclude_ids: Sequence[str] = (),
    ) -> DuplicateMatch | None:
        options = self.options
        if len(history.ticket_ids) == 0 or embedding is None:
            return None
        if history.vectors.shape[1] != embedding.shape[0]:
            return None  # another embedding model wrote these: cosines would be meaningless
        earliest = received_at - timedelta(days=options.window_days)
        eligible = np.array(
            [
                earliest <= when <= received_at
                and ticket_id not in exclude_ids
                and (not options.same_category_required or other == category)
                for ticket_id, when, other in zip(history.ticket_ids, history.received_at, history.categories)
            ],
            dtype=bool,
        )
        if not eligible.any():
            return None
        cosines = history.vectors @ embedding
        boosts = np.zeros(len(cosines), dtype=np.float32)
        reasons = [""] * len(cosines)
        place_keys, issues = set(place.place_keys), set(issue_keys)
        for index, (address_key, other_places, other_issues) in enumerate(zip(history.address_keys, history.place_keys, history.issue_keys)):
            notes = []
            if place.address_key and address_key == place.address_key:
                boosts[index] += options.same_address_boost
                notes.append(f"同一地址（{address_key}）")
            elif place_keys & set(other_places):
                boosts[index] += options.same_place_boost
                notes.append(f"同一地点（{'、'.join(sorted(place_keys & set(other_places)))}）")
            if notes and issues & set(other_issues):
                # Shared problem words only count at a shared place: 路灯 is everywhere.
                boosts[index] += options.shared_keyword_boost
                notes.append(f"同一问题（{'、'.join(sorted(issues & set(other_issues)))}）")
            reasons[index] = " + ".join(notes)
        combined = np.where(eligible, cosines + boosts, -np.inf)
        best = int(np.argmax(combined))
        if combined[best] < options.threshold:
            return None
        reason = f"语义相似度 {cosines[best]:.2f}" + (f" + {reasons[best]}" if reasons[best] else "")
        return DuplicateMatch(history.ticket_ids[best], round(float(combined[best]), 3), round(float(cosines[best]), 3), reason)
