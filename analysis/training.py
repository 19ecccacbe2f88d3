"""Training the ticket model from the labelled tickets and the corrections people made.

    python -m analysis train [--history-db PATH] [--all]     # train+dev of the split (+ corrections)

Train+dev only: the frozen test writer (analysis/splits.py) is never trained on unless
--all says so (for a production model once the figures are taken). Corrections from the
history store (`python -m analysis correct`) are training examples for the field that was
corrected: a category correction teaches the category model, an urgency correction the
urgency model; the ticket's normalised text is the input.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.dataset import LabelledTicket, by_stream, chain_roots
from analysis.features import LexiconFeatures, ViewBuilder
from analysis.model import TicketModel, TrainingExample, TrainOptions, train_model
from analysis.pairs import HEARD_STREAM_SUFFIX, PairFeaturizer, PairSide, train_pair_model
from analysis.places import PlaceExtractor
from analysis.taxonomy import CategoryClassifier
from analysis.text import normalize
from analysis.ticket import parse_time
from analysis.urgency import UrgencyScorer

log = logging.getLogger("analysis.training")


def build_views(config, embedder):
    """The ViewBuilder for a configuration and an embedder (None: zero embeddings)."""
    classifier = CategoryClassifier(config.taxonomy, config.defaults.classification, embedder)
    lexicon = LexiconFeatures(config.taxonomy, classifier, UrgencyScorer(config.urgency))
    return ViewBuilder(lexicon, embedder)


def correction_examples(store_path: Path | str) -> list[TrainingExample]:
    """One example per corrected ticket, carrying the corrected category and/or urgency."""
    from analysis.store import HistoryStore

    path = Path(store_path)
    if not path.is_file():
        return []
    examples = []
    with HistoryStore(path) as store:
        latest: dict[str, dict] = {}
        for correction in store.corrections():
            if correction.field in ("category", "urgency"):
                latest.setdefault(correction.ticket_id, {})[correction.field] = correction.new_value
        for ticket_id, fields in latest.items():
            ticket = store.get(ticket_id)
            examples.append(TrainingExample(ticket.text, fields.get("category"), fields.get("urgency"), f"correction/{ticket_id}", "correction"))
    return examples


@dataclass
class Trainer:
    config: object
    embedder: object
    options: TrainOptions = TrainOptions()

    def __post_init__(self) -> None:
        self.views = build_views(self.config, self.embedder)
        self.places = PlaceExtractor(self.config.gazetteer)

    def train(self, records: Sequence[LabelledTicket], corrections: Sequence[TrainingExample] = (), embeddings: dict | None = None) -> TicketModel:
        """`embeddings`: text -> vector cache (evaluation reuses it across folds)."""
        started = time.perf_counter()
        roots = chain_roots(records)
        examples = [
            TrainingExample(normalize(record.text), record.category, record.urgency, f"{record.stream}/{roots[record.id]}")
            for record in records
        ]
        if self.options.asr_augment:  # same group as its reference text: never split across inner folds
            examples += [
                TrainingExample(normalize(record.asr_text), record.category, record.urgency, f"{record.stream}/{roots[record.id]}", "asr")
                for record in records if record.asr_text
            ]
        examples += list(corrections)
        texts = [example.text for example in examples]
        vectors = self.embed(texts, embeddings)
        views = self.views.build(texts, vectors)
        log.info("features of %d tickets in %.1f s", len(examples), time.perf_counter() - started)
        taxonomy = self.config.taxonomy
        keywords = [word for category in taxonomy.categories for word in category.keywords]

        asr_view = {}  # record index -> index of the view of its ASR transcript
        if self.options.asr_augment:
            asr_view = {index: len(records) + k for k, index in enumerate(i for i, record in enumerate(records) if record.asr_text)}
        heard_views = set(asr_view.values())

        def pair_training(oof_by_index: dict, model: TicketModel):
            streams: dict[str, list[PairSide]] = {}

            def side(record: LabelledTicket, view_index: int) -> PairSide:
                place = self.places.extract(views[view_index].text)
                probabilities = oof_by_index.get(view_index)
                category_probs = dict(zip(model.category.classes, map(float, probabilities))) if probabilities is not None else {}
                predicted = max(category_probs, key=category_probs.get) if category_probs else record.category
                return PairSide(record.id, parse_time(record.received_at), views[view_index].embedding, views[view_index].text, predicted,
                                place.district, place.address_key, place.place_keys, category_probs, heard=view_index in heard_views)

            for index, record in enumerate(records):
                streams.setdefault(record.stream, []).append(side(record, index))
            if asr_view:
                # The same streams as heard: each ticket by its ASR transcript where it has one, so
                # the link threshold also fits what the ASR makes of two reports of one problem.
                for index, record in enumerate(records):
                    streams.setdefault(f"{record.stream}{HEARD_STREAM_SUFFIX}", []).append(side(record, asr_view.get(index, index)))
            return train_pair_model(streams, roots, PairFeaturizer(model.featurizer.char, keywords, model.featurizer.sound))

        model = train_model(
            examples, views,
            categories=taxonomy.names,
            embedding_model=getattr(self.embedder, "name", None),
            lexicon_names=self.views.lexicon.names(),
            options=self.options,
            pair_training=pair_training,
        )
        model.summary["streams"] = {stream: len(items) for stream, items in by_stream(records).items()}
        return model

    def embed(self, texts: Sequence[str], cache: dict | None = None) -> np.ndarray:
        if cache is None:
            return self.views.embed(texts)
        missing = [text for text in dict.fromkeys(texts) if text not in cache]
        if missing:
            for text, vector in zip(missing, self.views.embed(missing)):
                cache[text] = vector
        return np.stack([cache[text] for text in texts]) if texts else np.zeros((0, self.views.dim), np.float32)


def training_records(include_test: bool = False) -> list[LabelledTicket]:
    """The labelled tickets of train+dev (by the frozen split's rule), or all of them."""
    from analysis.dataset import load_labelled
    from analysis.splits import TEST_STREAMS

    records = load_labelled()
    return records if include_test else [record for record in records if record.stream not in TEST_STREAMS]
