"""TicketAnalyzer: the configured pipeline from transcript to Ticket.

    text -> normalise -> embedding -> category -> urgency -> place -> department
         -> duplicate search in the history -> summary -> Ticket

Configuration (analysis/config/*.yaml, or the directory in $HOTLINE_ANALYSIS_CONFIG) is
loaded and cross-checked once; the embedding model loads once per process.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from analysis.config import Defaults, config_dir, load_defaults
from analysis.danger import find_danger
from analysis.departments import ResponsibilityMatrix
from analysis.duplicates import DuplicateFinder, issue_keys_of
from analysis.errors import AnalysisError
from analysis.embeddings import Embedder, load_embedder
from analysis.evidence import Evidence
from analysis.features import LexiconFeatures, ViewBuilder
from analysis.model import CURRENT_MODEL, ModelFileError, TicketModel
from analysis.pairs import PairSide, prefilter
from analysis.places import Gazetteer, PlaceExtractor
from analysis.summary import summarize
from analysis.taxonomy import CategoryClassifier, Taxonomy, _rule_evidence
from analysis.text import NormalizedTranscript, cjk_ratio, normalize, normalize_segments, normalize_transcript
from analysis.ticket import Ticket, make_ticket_id, now, parse_time
from analysis.urgency import UrgencyRules, UrgencyScorer

# Below this share of CJK letters a call is flagged as not Chinese; rules written for
# Chinese then say little and the (multilingual) embedding carries the category.
NON_CHINESE_CJK_RATIO = 0.3
MIXED_LANGUAGE_CJK_RATIO = 0.8
LOW_CONFIDENCE = 0.4
# Below this calibrated probability of the chosen category a ticket needs review.
REVIEW_CATEGORY_PROBABILITY = 0.6
# P(high) at or above this share of the high threshold, but below it: "close to high", review.
REVIEW_HIGH_SHARE = 0.5
# Metadata key saying where the text comes from: "asr" (a transcript) or "written".
TEXT_SOURCE_KEY = "text_source"
# Where the trained model lives: $HOTLINE_ANALYSIS_MODEL, else build/analysis/ticket_model.joblib.
MODEL_PATH_ENV = "HOTLINE_ANALYSIS_MODEL"

log = logging.getLogger("analysis")


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

    def __init__(self, config: AnalysisConfig, embedder: Embedder | None | str = "config", model: TicketModel | Path | str | None = "default") -> None:
        """embedder: "config" (the model named in defaults.yaml) or an Embedder, or None (rules only).

        model: "default" ($HOTLINE_ANALYSIS_MODEL or build/analysis/ticket_model.joblib; when
        that file does not exist it is trained once from the labelled data, see
        default_model); a path (must be a valid model: ModelFileError otherwise); a
        TicketModel; or None (rules only, every ticket marked needs_review)."""
        self.config = config
        self.embedder = load_embedder(config.defaults.embedding_model) if embedder == "config" else embedder
        self.classifier = CategoryClassifier(config.taxonomy, config.defaults.classification, self.embedder)
        self.urgency = UrgencyScorer(config.urgency)
        self.places = PlaceExtractor(config.gazetteer)
        self.duplicates = DuplicateFinder(config.defaults.duplicates)
        self.views = ViewBuilder(LexiconFeatures(config.taxonomy, self.classifier, self.urgency), self.embedder)
        self._lock = threading.Lock()
        self.model: TicketModel | None = None
        self.model_note = "no trained model: rules only"
        # Only an analyzer with the configured embedder may train the shared default model.
        self._may_train = embedder == "config"
        self._attach_model(model)

    def _attach_model(self, model) -> None:
        if model is None:
            return
        if model == "default":
            path = Path(os.environ.get(MODEL_PATH_ENV) or CURRENT_MODEL)
            candidate = default_model(path, self.config, self.embedder, may_train=self._may_train)
            if candidate is None:
                self.model_note = f"no trained model at {path} and no labelled data to train one: rules only"
                return
            problem = self._incompatibility(candidate)
            if problem:
                log.warning("ticket model %s not used (%s); rules only until `python -m analysis train`", path, problem)
                self.model_note = f"model {candidate.version} not used: {problem}"
                return
            self.model = candidate
            self.model_note = f"model {candidate.version} from {path}"
            return
        if isinstance(model, (str, Path)):
            from analysis.model import load_model

            path, model = Path(model), load_model(model)
        else:
            path = Path(f"<{getattr(model, 'version', 'model')}>")
        problem = self._incompatibility(model)
        if problem:
            raise ModelFileError(path, problem)
        self.model = model
        self.model_note = f"model {model.version} from {path}"

    def _incompatibility(self, model: TicketModel) -> str | None:
        if model.embedding_model != self.embedding_model:
            return f"trained with embeddings {model.embedding_model!r}, the analyzer uses {self.embedding_model!r}"
        if tuple(model.lexicon_names) != tuple(self.views.lexicon.names()):
            return "trained with another taxonomy or urgency configuration"
        if set(model.category.classes) != set(self.config.taxonomy.names):
            return "trained for other categories than taxonomy.yaml's"
        return None

    @property
    def model_version(self) -> str | None:
        return self.model.version if self.model is not None else None

    @property
    def embedding_model(self) -> str | None:
        return getattr(self.embedder, "name", None)

    def _pair_duplicate(self, ticket_id, received_at, normalized, embedding, place, prediction, history, heard) -> DuplicateDecision | None:
        pairs = self.model.pairs
        if len(history.ticket_ids) == 0 or history.vectors.shape[1] != embedding.shape[0]:
            return None
        earliest = received_at.timestamp() - pairs.window_days * 86400
        eligible = [index for index, (other, when) in enumerate(zip(history.ticket_ids, history.received_at))
                    if other != ticket_id and when <= received_at and when.timestamp() >= earliest]
        if not eligible:
            return None
        new = PairSide(ticket_id, received_at, embedding, normalized, prediction.category, place.district,
                       place.address_key, place.place_keys, prediction.category_probabilities, heard=heard)
        light = [PairSide(history.ticket_ids[i], history.received_at[i], history.vectors[i], "", history.categories[i],
                          None, history.address_keys[i], tuple(history.place_keys[i])) for i in eligible]
        chosen = [eligible[i] for i in prefilter(new, light, history.vectors[eligible])]
        link = pairs.best_link(new, [_pair_side_from_history(history, index) for index in chosen])
        return DuplicateDecision(link.ticket_id, link.probability, link.reason) if link else None

    def embed(self, text: str) -> np.ndarray | None:
        if self.embedder is None or not text.strip():
            return None
        with self._lock:  # numpy models are not guaranteed re-entrant
            return self.views.embed([text])[0]   # what the model's views read (without_false_danger)

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
        segments = list(segments) if segments is not None else None
        heard = text_is_heard(metadata, segments)
        transcript = self._normalise(text, segments)
        normalized = transcript.text
        received_at = parse_time(metadata["received_at"]) if metadata.get("received_at") else now()
        ticket_id = str(metadata.get("ticket_id") or make_ticket_id(received_at, transcript.original))

        flags = []
        review: list[str] = []
        letters = any(ch.isalpha() for ch in normalized)
        if not normalized.strip():
            flags.append("empty_transcript")
            review.append("转写为空")
        elif not letters:
            flags.append("no_words")
            review.append("没有文字（只有符号、数字或表情）")
        else:
            ratio = cjk_ratio(normalized)
            if ratio < NON_CHINESE_CJK_RATIO:
                flags.append("not_chinese")
                review.append("非中文来电")
            elif ratio < MIXED_LANGUAGE_CJK_RATIO:
                flags.append("mixed_language")
        if transcript.truncated:
            flags.append("truncated")
            review.append("文本过长已截断")
        unusable = bool({"empty_transcript", "no_words", "not_chinese"} & set(flags))

        embedding = self.embed(normalized) if letters else None
        category = self.classifier.classify(normalized, embedding)
        urgency = self.urgency.score(normalized)
        danger = find_danger(normalized) if letters else []
        place = self.places.extract(normalized)
        if place.heard_as:
            flags.append("place_by_sound")
            review.append(f"地名按读音纠正：{'、'.join(place.heard_as)}")
        if place.district_unknown:
            flags.append("district_unknown")
            review.append(f"区县不在本市：{place.district_unknown}")
        elif place.district is None and normalized.strip():
            flags.append("district_missing")

        category_name, category_confidence, category_evidence = category.category, category.confidence, category.evidence
        urgency_level, urgency_score = urgency.level, urgency.score
        urgency_reasons = list(urgency.reasons) + [f"危险描述: {hit.kind}（{hit.evidence.text}）" for hit in danger]
        urgency_evidence = (*urgency.evidence, *(hit.evidence for hit in danger))
        urgency_probabilities: dict = {}
        prediction = None
        if self.model is not None and letters:
            view = self.views.build([normalized], (embedding if embedding is not None else np.zeros(self.views.dim, np.float32))[None, :])[0]
            prediction = self.model.predict([view], heard=heard)[0]  # an ASR transcript: the heard category head
            category_name, category_confidence = prediction.category, round(prediction.category_probability, 3)
            chosen = next(item for item in self.config.taxonomy.categories if item.name == category_name)
            _, found = _rule_evidence(chosen, normalized)
            category_evidence = tuple(sorted(found, key=lambda e: e.char_offset))
            urgency_probabilities = {level: round(value, 3) for level, value in prediction.urgency_probabilities.items()}
            urgency_level = prediction.urgency
            urgency_score = urgency_probabilities.get("high", 0.0)
            urgency_reasons.append(f"模型: 高 {urgency_probabilities.get('high', 0):.2f}（阈值 {prediction.high_threshold:.2f}）、"
                                   f"中 {urgency_probabilities.get('medium', 0):.2f}、低 {urgency_probabilities.get('low', 0):.2f}")
            if category_confidence < REVIEW_CATEGORY_PROBABILITY and not unusable:
                ranked = sorted(prediction.category_probabilities.items(), key=lambda item: -item[1])
                review.append(f"类型不确定：{ranked[0][0]} {ranked[0][1]:.2f}，{ranked[1][0]} {ranked[1][1]:.2f}")
            p_high = urgency_probabilities.get("high", 0.0)
            if urgency_level != "high" and p_high >= REVIEW_HIGH_SHARE * prediction.high_threshold:
                review.append(f"可能高紧急：P(高) {p_high:.2f}，阈值 {prediction.high_threshold:.2f}")
        elif letters and not unusable:
            review.append("无训练模型，按规则判断")
            if category.confidence < LOW_CONFIDENCE:
                review.append(f"类型置信度低：{category.confidence:.2f}")
        if unusable:
            fallback = self.config.defaults.classification.fallback
            if category_name != fallback and letters:
                review.append(f"模型猜测类型：{category_name} {category_confidence:.2f}")
            category_name, category_evidence, category_confidence = fallback, (), 0.0
        if normalized.strip() and category_confidence < LOW_CONFIDENCE:
            flags.append("low_confidence")
        department, department_reason = self.config.matrix.assign(category_name, place.district, normalized, heard=heard)

        duplicate = None
        if store is not None and embedding is not None:
            history = store.candidates(
                self.embedding_model, received_before=received_at, window_days=self.config.defaults.duplicates.window_days
            )
            if self.model is not None and self.model.pairs is not None and prediction is not None:
                duplicate = self._pair_duplicate(ticket_id, received_at, normalized, embedding, place, prediction, history, heard)
            else:
                duplicate = self.duplicates.find(
                    embedding,
                    category=category_name,
                    place=place,
                    issue_keys=issue_keys_of([item.to_dict() for item in category_evidence]),
                    received_at=received_at,
                    history=history,
                    exclude_ids=(ticket_id,),
                )

        if duplicate is not None and urgency_level == "low":
            # RUBRIC.md: a problem already reported before without result is at least medium.
            urgency_level = "medium"
            urgency_reasons.append(f"重复来电（同 {duplicate.ticket_id}）：低 -> 中")

        place_label = place.address or place.compound or place.landmark or place.community or place.street or place.road
        if place.district and place_label and place.district not in place_label:
            place_label = f"{place.district}{place_label}"
        # The summary reads the place names as the gazetteer writes them (same offsets).
        repaired, _ = self.places.repair_by_sound(normalized) if place.heard_as else (normalized, ())
        summary = summarize(
            repaired,
            (*category_evidence, *urgency_evidence),
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
            category=category_name,
            category_confidence=category_confidence,
            category_evidence=timed(category_evidence),
            urgency=urgency_level,
            urgency_score=urgency_score,
            urgency_reasons=tuple(urgency_reasons),
            urgency_evidence=timed(sorted(urgency_evidence, key=lambda e: e.char_offset)),
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
            model_version=self.model_version,
            needs_review=bool(review),
            review_reasons=tuple(dict.fromkeys(review)),
            urgency_probabilities=urgency_probabilities,
        )
        if store is not None and record:
            store.add(ticket, embedding)
        return ticket


def text_is_heard(metadata: Mapping[str, Any], segments) -> bool:
    """The call's text is an ASR transcript: metadata `text_source` "asr" or "written" says so;
    without it, a transcript given as timed segments (the gateway's Transcribe, the batch) is."""
    source = str(metadata.get(TEXT_SOURCE_KEY) or "").strip().lower()
    if source in ("asr", "written"):
        return source == "asr"
    return bool(segments)


@dataclass(frozen=True)
class DuplicateDecision:
    ticket_id: str
    score: float
    reason: str


@functools.lru_cache(maxsize=8192)
def _normalized(text: str) -> str:
    """normalize() of a history transcript: the same earlier tickets are candidates again and again."""
    return normalize(text)


def _pair_side_from_history(history, index: int) -> PairSide:
    return PairSide(
        ticket_id=history.ticket_ids[index],
        received_at=history.received_at[index],
        embedding=history.vectors[index],
        text=_normalized(history.transcripts[index]) if history.transcripts else "",
        category=history.categories[index],
        district=history.districts[index] if history.districts else None,
        address_key=history.address_keys[index],
        place_keys=tuple(history.place_keys[index]),
    )


_MODEL_LOCK = threading.Lock()


def default_model(path: Path, config: AnalysisConfig, embedder, *, may_train: bool = True) -> TicketModel | None:
    """The model at `path`; when there is none, one trained now from the labelled data.

    A fresh clone has no build/ directory: rather than refusing to work, the first
    analyzer trains the model from data/ (train+dev, about a minute on 2 cores), saves it
    there and logs it. A file that exists but is damaged is an error (ModelFileError): it is
    never replaced silently. Without labelled data, or for an analyzer given another embedder
    than the configured one (it must not write the shared model): None (rules only, tickets
    marked needs_review)."""
    from analysis.model import load_model, save_model

    with _MODEL_LOCK:
        if path.exists():
            return load_model(path)
        if not may_train:  # another embedder than the configured one: never write the shared model
            return None
        from analysis.training import Trainer, training_records

        try:
            records = training_records()
        except AnalysisError as error:
            log.warning("no ticket model at %s and the labelled data cannot be read (%s): rules only", path, error)
            return None
        if len(records) < 20:
            return None
        log.warning("no ticket model at %s: training one now from %d labelled tickets (run `python -m analysis train` to do it ahead)", path, len(records))
        model = Trainer(config, embedder).train(records)
        save_model(model, path.parent)
        if path.name != CURRENT_MODEL.name:
            from analysis.atomic import atomic_write_bytes

            atomic_write_bytes(path, (path.parent / CURRENT_MODEL.name).read_bytes())
        log.warning("ticket model %s trained in %s s and saved to %s", model.version, model.summary.get("seconds"), path)
        return model


@functools.lru_cache(maxsize=1)
def default_analyzer() -> TicketAnalyzer:
    """The analyzer for the packaged (or $HOTLINE_ANALYSIS_CONFIG) configuration, built once."""
    return TicketAnalyzer(load_config())


def analyze_ticket(
    text: str | None,
    metadata: Mapping[str, Any] | None = None,
    *,
    segments: Iterable[Mapping] | None = None,
    analyzer=None,
    store=None,
    record: bool = True,
) -> Ticket:
    """Analyse one call. `text` or `segments` ({start_s, end_s, text} as the gateway returns them).

    metadata: optional received_at (ISO 8601; default now), ticket_id, text_source ("asr" or
    "written"; default: "asr" when segments are given, see text_is_heard), and anything else
    (file, caller, audio_sha256), kept in ticket.metadata. With a HistoryStore, the ticket
    is checked for duplicates against it and, when `record`, saved in it.
    """
    analyzer = analyzer or default_analyzer()
    return analyzer.analyze(text, metadata or {}, segments=segments, store=store, record=record)

