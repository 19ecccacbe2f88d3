"""紧急程度: high / medium / low from cue phrases, with the reasons.

Cue groups (urgency.yaml): safety risks (燃气, 漏电, 老人摔倒) lift a call to high on
their own; demands for immediate action (马上, 今天必须), escalation threats (再不修我就
投诉), repeated reports (报修三次, 两周了) and vulnerable people add to a score. The score
is raised for dense calls (many cues in few characters) and compared with the level
thresholds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from analysis.config import URGENCY_LEVELS, compile_patterns, number, read_yaml, string_list
from analysis.danger import HYPOTHETICALS, false_danger_spans, in_spans
from analysis.errors import ConfigError
from analysis.evidence import Evidence


@dataclass(frozen=True)
class CueGroup:
    name: str
    weight: float
    cues: tuple[str, ...]
    patterns: tuple[re.Pattern, ...]
    forces_level: str | None = None

    def __post_init__(self) -> None:
        if self.forces_level is not None and self.forces_level not in URGENCY_LEVELS:
            raise ValueError(f"group {self.name}: forces_level must be one of {URGENCY_LEVELS}")


@dataclass(frozen=True)
class UrgencyRules:
    groups: tuple[CueGroup, ...]
    high_threshold: float
    medium_threshold: float
    density_window_chars: int
    density_bonus: float
    max_hits_per_cue: int
    negations: tuple[str, ...]
    negation_window_chars: int
    source: Path

    def __post_init__(self) -> None:
        if not self.high_threshold > self.medium_threshold > 0:
            raise ConfigError(self.source, "levels: need high > medium > 0")
        if self.density_window_chars < 1 or self.max_hits_per_cue < 1:
            raise ConfigError(self.source, "density_window_chars and max_hits_per_cue must be at least 1")

    @classmethod
    def load(cls, path: Path) -> "UrgencyRules":
        data = read_yaml(path)
        levels = data.get("levels") or {}
        groups = []
        for index, entry in enumerate(data.get("groups") or []):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ConfigError(path, f"groups[{index}] needs a name")
            key = f"groups[{entry['name']}]"
            try:
                groups.append(
                    CueGroup(
                        name=entry["name"],
                        weight=number(entry.get("weight", 1.0), path, f"{key}.weight", low=0),
                        cues=tuple(cue.lower() for cue in string_list(entry.get("cues"), path, f"{key}.cues")),
                        patterns=compile_patterns(entry.get("patterns"), path, f"{key}.patterns"),
                        forces_level=entry.get("forces_level"),
                    )
                )
            except ValueError as error:
                raise ConfigError(path, str(error)) from error
        if not groups:
            raise ConfigError(path, "no cue groups")
        return cls(
            groups=tuple(groups),
            high_threshold=number(levels.get("high", 3.0), path, "levels.high", low=0),
            medium_threshold=number(levels.get("medium", 1.2), path, "levels.medium", low=0),
            density_window_chars=int(number(data.get("density_window_chars", 60), path, "density_window_chars", low=1)),
            density_bonus=number(data.get("density_bonus", 0.5), path, "density_bonus", low=0),
            max_hits_per_cue=int(number(data.get("max_hits_per_cue", 2), path, "max_hits_per_cue", low=1)),
            negations=string_list(data.get("negations"), path, "negations"),
            negation_window_chars=int(number(data.get("negation_window_chars", 2), path, "negation_window_chars", low=0)),
            source=path,
        )


@dataclass(frozen=True)
class UrgencyResult:
    level: str
    score: float
    reasons: tuple[str, ...]
    evidence: tuple[Evidence, ...]


class UrgencyScorer:
    def __init__(self, rules: UrgencyRules) -> None:
        self.rules = rules

    def _negated(self, text: str, offset: int) -> bool:
        """A negation ending at most `negation_window_chars` before the cue (没有燃气味, 没发现漏电),
        or a hypothetical (analysis/danger.py HYPOTHETICALS: 万一着火 is no fire)."""
        gap = self.rules.negation_window_chars
        return any(word in text[max(0, offset - len(word) - gap):offset] for word in (*self.rules.negations, *HYPOTHETICALS))

    def _hits(self, group: CueGroup, text: str, lowered: str) -> list[Evidence]:
        hits: list[Evidence] = []
        false = false_danger_spans(text)   # 打不着火: the cue 着火 inside an everyday phrase
        for cue in group.cues:
            start, count = 0, 0
            while count < self.rules.max_hits_per_cue:
                offset = lowered.find(cue, start)
                if offset < 0:
                    break
                start = offset + len(cue)
                if not self._negated(text, offset) and not in_spans(offset, offset + len(cue), false):
                    hits.append(Evidence(text[offset:offset + len(cue)], "cue", offset))
                    count += 1
        for pattern in group.patterns:
            for count, match in enumerate(pattern.finditer(text)):
                if count >= self.rules.max_hits_per_cue:
                    break
                if not self._negated(text, match.start()) and not in_spans(*match.span(), false):
                    hits.append(Evidence(match.group(0), "cue", match.start()))
        # A pattern and a cue can find the same words (燃气泄漏): count each place once.
        unique: dict[int, Evidence] = {}
        for hit in hits:
            if all(not (hit.char_offset < other.char_offset + len(other.text) and other.char_offset < hit.char_offset + len(hit.text)) for other in unique.values()):
                unique[hit.char_offset] = hit
        return list(unique.values())

    def score(self, text: str) -> UrgencyResult:
        rules = self.rules
        if not text.strip():
            return UrgencyResult("low", 0.0, (), ())
        lowered = text.lower()
        total = 0.0
        forced: str | None = None
        reasons: list[str] = []
        evidence: list[Evidence] = []
        for group in rules.groups:
            hits = self._hits(group, text, lowered)
            if not hits:
                continue
            total += group.weight * len(hits)
            evidence.extend(hits)
            reasons.append(f"{group.name}: {'、'.join(dict.fromkeys(hit.text for hit in hits))}")
            if group.forces_level and (forced is None or URGENCY_LEVELS.index(group.forces_level) < URGENCY_LEVELS.index(forced)):
                forced = group.forces_level
        density = len(evidence) / max(1.0, len(text) / rules.density_window_chars)
        score = total * (1.0 + rules.density_bonus * min(1.0, density))
        level = "high" if score >= rules.high_threshold else "medium" if score >= rules.medium_threshold else "low"
        if forced and URGENCY_LEVELS.index(forced) < URGENCY_LEVELS.index(level):
            level = forced
        if evidence and len(evidence) > 1:
            reasons.append(f"密度: {len(evidence)} 处 / {len(text)} 字")
        return UrgencyResult(level, round(score, 3), tuple(reasons), tuple(sorted(evidence, key=lambda e: e.char_offset)))
