"""诉求类型: which category a call belongs to.

Two signals, combined per category:
- rules: keywords and phrases (regular expressions) of the taxonomy file. Precise when
  they fire, blind to wordings nobody listed;
- similarity of the call's sentence embedding to the category's example calls. Covers
  new wordings and other languages, but cosines of unrelated Chinese sentences are not
  near zero, so they are rescaled between `embedding_floor` and `embedding_ceiling`.
score = rule_share * min(1, rule points / rule_saturation) + (1 - rule_share) * similarity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.config import ClassificationOptions, compile_patterns, read_yaml, string_list
from analysis.errors import ConfigError
from analysis.evidence import Evidence

EMBEDDING_FLOOR = 0.2     # USE v3 cosine of unrelated Chinese calls sits around 0.1-0.3
EMBEDDING_CEILING = 0.7   # and of two wordings of the same request around 0.6-0.85


@dataclass(frozen=True)
class Category:
    name: str
    keywords: tuple[str, ...]
    phrases: tuple[re.Pattern, ...]
    examples: tuple[str, ...]


@dataclass(frozen=True)
class Taxonomy:
    categories: tuple[Category, ...]
    source: Path

    def __post_init__(self) -> None:
        names = [category.name for category in self.categories]
        if len(set(names)) != len(names):
            raise ConfigError(self.source, f"duplicate category names in {names}")
        if not names:
            raise ConfigError(self.source, "no categories")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(category.name for category in self.categories)

    @classmethod
    def load(cls, path: Path) -> "Taxonomy":
        data = read_yaml(path)
        entries = data.get("categories")
        if not isinstance(entries, list):
            raise ConfigError(path, "categories must be a list")
        categories = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
                raise ConfigError(path, f"categories[{index}] needs a name")
            key = f"categories[{entry['name']}]"
            categories.append(
                Category(
                    name=entry["name"].strip(),
                    keywords=tuple(dict.fromkeys(word.lower() for word in string_list(entry.get("keywords"), path, f"{key}.keywords"))),
                    phrases=compile_patterns(entry.get("phrases"), path, f"{key}.phrases"),
                    examples=string_list(entry.get("examples"), path, f"{key}.examples"),
                )
            )
        return cls(tuple(categories), path)


@dataclass(frozen=True)
class CategoryResult:
    category: str
    confidence: float
    evidence: tuple[Evidence, ...]
    scores: dict = field(default_factory=dict)  # category -> combined score, for review and tuning


def _rule_evidence(category: Category, text: str) -> tuple[float, list[Evidence]]:
    """Rule points and what fired; each keyword or phrase counts once."""
    lowered = text.lower()
    found: list[Evidence] = []
    for keyword in category.keywords:
        offset = lowered.find(keyword)
        if offset >= 0:
            found.append(Evidence(text[offset:offset + len(keyword)], "keyword", offset))
    phrase_hits = []
    for pattern in category.phrases:
        match = pattern.search(text)
        if match:
            phrase_hits.append(Evidence(match.group(0), "phrase", match.start()))
    return len(found), found + phrase_hits


class CategoryClassifier:
    """Classifies normalised transcripts; example embeddings are computed once."""

    def __init__(self, taxonomy: Taxonomy, options: ClassificationOptions, embedder=None) -> None:
        if options.fallback not in taxonomy.names:
            raise ConfigError(taxonomy.source, f"fallback category {options.fallback!r} is not in the taxonomy")
        self.taxonomy = taxonomy
        self.options = options
        self.embedder = embedder
        self._example_vectors: list[np.ndarray] = []
        if embedder is not None:
            all_examples = [example for category in taxonomy.categories for example in category.examples]
            vectors = embedder.encode(all_examples) if all_examples else np.zeros((0, 1), np.float32)
            position = 0
            for category in taxonomy.categories:
                self._example_vectors.append(vectors[position:position + len(category.examples)])
                position += len(category.examples)

    def _similarities(self, embedding: np.ndarray | None) -> list[tuple[float, int]]:
        """Per category: (rescaled top-k mean similarity, index of the closest example)."""
        if embedding is None or self.embedder is None:
            return [(0.0, -1)] * len(self.taxonomy.categories)
        results = []
        for vectors in self._example_vectors:
            if len(vectors) == 0:
                results.append((0.0, -1))
                continue
            cosines = vectors @ embedding
            top = np.sort(cosines)[::-1][: self.options.embedding_top_k]
            scaled = (float(top.mean()) - EMBEDDING_FLOOR) / (EMBEDDING_CEILING - EMBEDDING_FLOOR)
            results.append((min(1.0, max(0.0, scaled)), int(np.argmax(cosines))))
        return results

    def classify(self, text: str, embedding: np.ndarray | None) -> CategoryResult:
        # The analyzer and the model's lexicon features classify the same text in a row.
        key = (text, None if embedding is None else embedding.tobytes())
        last = self.__dict__.get("_last")
        if last is not None and last[0] == key:
            return last[1]
        result = self._classify(text, embedding)
        self._last = (key, result)
        return result

    def _classify(self, text: str, embedding: np.ndarray | None) -> CategoryResult:
        options = self.options
        if not text.strip():
            return CategoryResult(options.fallback, 0.0, ())
        rule_share = options.rule_share if self.embedder is not None and embedding is not None else 1.0
        similarities = self._similarities(embedding)
        scored: list[tuple[float, Category, list[Evidence], int]] = []
        for category, (similarity, closest) in zip(self.taxonomy.categories, similarities):
            keyword_count, evidence = _rule_evidence(category, text)
            phrase_count = len(evidence) - keyword_count
            points = keyword_count * options.keyword_weight + phrase_count * options.phrase_weight
            rules = min(1.0, points / options.rule_saturation)
            scored.append((rule_share * rules + (1.0 - rule_share) * similarity, category, evidence, closest))
        scored.sort(key=lambda item: item[0], reverse=True)
        best_score, best, evidence, closest = scored[0]
        second_score = scored[1][0] if len(scored) > 1 else 0.0
        scores = {category.name: round(score, 4) for score, category, _, _ in scored}
        if best_score < options.min_score:
            return CategoryResult(options.fallback, round(1.0 - best_score, 3) * 0.5, (), scores)
        if not evidence and closest >= 0:
            evidence = [Evidence(best.examples[closest], "example", -1)]
        # Confidence: the winning score, discounted when the runner-up is close.
        margin = min(1.0, (best_score - second_score) / 0.25)
        confidence = min(1.0, best_score) * (0.6 + 0.4 * margin)
        return CategoryResult(best.name, round(confidence, 3), tuple(sorted(evidence, key=lambda e: e.char_offset)), scores)
