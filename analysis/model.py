"""The trained ticket model: category and urgency classifiers and the duplicate pair model.

    python -m analysis train        # -> build/analysis/ticket-model-<version>.joblib + ticket_model.joblib (current)

Category and urgency are multinomial logistic regressions over the four views of
analysis/features.py (sentence embedding, character and sound TF-IDF, lexicon), with
probabilities calibrated by temperature scaling on out-of-fold predictions (folds grouped
by duplicate chain). Urgency says `high` when the calibrated P(high) reaches
`high_threshold`, chosen on the out-of-fold predictions so that recall of `high` reaches
TrainOptions.high_recall_target; otherwise the more likely of medium and low, the probability
below high split between them by a second stage over both heads' probabilities (UrgencyStack).
The category of an ASR transcript comes from a second category head with the sound view
weighing more (TrainOptions.heard_category_blocks; the text source is known at analysis time).
The duplicate pair model (analysis/pairs.py) is trained on the same records.

A model file is a joblib pickle of {"format", "sklearn", "model"}; it is only ever read
from the build directory this project writes (pickles run code when loaded).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.atomic import atomic_write_bytes
from analysis.dataset import PROJECT_ROOT
from analysis.errors import AnalysisError
from analysis.features import TextViews, sound_tokens

log = logging.getLogger("analysis.model")

MODEL_FORMAT = 8   # 8: the pair model's repeat-call cue times category agreement; 7: the character, sound and embedding views read without_false_danger(text); 6: a second category head for ASR text (seventh pass); 5: the pair model's repeat-call feature and the urgency second stage
MODEL_DIR = PROJECT_ROOT / "build" / "analysis"
CURRENT_MODEL = MODEL_DIR / "ticket_model.joblib"
TRAIN_COMMAND = "python -m analysis train"
URGENCY_ORDER = ("high", "medium", "low")
TRAIN_THREADS = 2   # the target machine has 2 cores


class ModelFileError(AnalysisError):
    """The model file is missing, unreadable, corrupt or made for another configuration."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"ticket model {path}: {message}; (re)build it with `{TRAIN_COMMAND}`")
        self.path = Path(path)
        self.message = message


class TrainingDataError(AnalysisError):
    """Too few labelled tickets to train on."""


@dataclass(frozen=True)
class TrainOptions:
    category_c: float = 8.0            # inverse L2 strength of the category regression
    urgency_c: float = 4.0
    # Block weights (embedding, lexicon, characters, sounds) per head: the embedding and the
    # TF-IDF rows have unit length, each standardised lexicon column is multiplied by its weight.
    # Fifth pass (docs/analysis.md): with the ASR copies in training the sound block carries more
    # (category characters 1.0 -> 0.7, sounds 2.2 -> 3.0; urgency sounds 1.0 -> 1.5), chosen on CV.
    category_blocks: tuple[float, float, float, float] = (2.0, 0.15, 0.7, 3.0)
    urgency_blocks: tuple[float, float, float, float] = (1.0, 0.08, 1.0, 1.5)
    high_recall_target: float = 0.97   # out-of-fold recall of high the urgency threshold must reach
    max_high_threshold: float = 0.5    # never ask for more than this P(high)
    inner_folds: int = 5
    seed: int = 12345
    max_iter: int = 300
    linear: str = "logistic"           # logistic (LogisticRegression) | svm (LinearSVC); both temperature-calibrated
    tune_medium_ratio: bool = False     # choose decide_urgency's medium/low ratio on the out-of-fold predictions
    asr_augment: bool = True           # also train the heads, and the duplicate model, on the ASR transcripts of the tickets
    # Sixth pass: below the high threshold, medium vs low from a second stage over the urgency
    # head's and the category head's out-of-fold probabilities (the rubric's medium/low line
    # depends on the kind of problem: an outage or unpaid wages is medium even when asked as a question).
    urgency_stack: bool = True
    urgency_stack_c: float = 1.0
    # Seventh pass: the category of an ASR transcript from a second head over the same views, the
    # toneless-syllable view weighing more and the sentence embedding and characters less (what a
    # homophone garbles); None: one head for both. Chosen on CV of the ASR texts (docs/analysis.md).
    heard_category_blocks: tuple[float, float, float, float] | None = (1.5, 0.15, 0.4, 4.5)

    def __post_init__(self) -> None:
        if not 0.5 <= self.high_recall_target <= 1.0:
            raise ValueError("high_recall_target must be within [0.5, 1]")
        if self.inner_folds < 2:
            raise ValueError("inner_folds must be at least 2")
        if self.linear not in ("logistic", "svm"):
            raise ValueError("linear must be 'logistic' or 'svm'")


@dataclass(frozen=True)
class TrainingExample:
    text: str                     # normalised
    category: str | None
    urgency: str | None
    group: str                    # duplicate chain (stream/root): kept in one inner fold
    source: str = "labelled"      # labelled | asr (the ASR transcript of a labelled ticket) | correction


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    def nll(temperature: float) -> float:
        probs = _softmax(logits / temperature)
        return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


@dataclass
class CalibratedHead:
    """A multinomial logistic regression with a temperature; proba() is calibrated."""

    classes: tuple[str, ...]
    estimator: object
    temperature: float = 1.0

    def logits(self, matrix) -> np.ndarray:
        coef = getattr(self.estimator, "coef_", None)
        if coef is not None:  # X @ coef.T + intercept: decision_function without sklearn's per-call validation (~1 ms)
            scores = np.asarray(matrix @ coef.T) + self.estimator.intercept_
            if scores.shape[1] == 1:
                scores = scores[:, 0]
        else:
            scores = self.estimator.decision_function(matrix)
        if scores.ndim == 1:  # two classes
            scores = np.stack([-scores / 2, scores / 2], axis=1)
        # estimator.classes_ may be a subset/order of self.classes: place its columns.
        out = np.full((scores.shape[0], len(self.classes)), -30.0)
        for column, name in enumerate(self.estimator.classes_):
            out[:, self.classes.index(name)] = scores[:, column]
        return out

    def proba(self, matrix) -> np.ndarray:
        return _softmax(self.logits(matrix) / self.temperature)


_ANALYZERS: dict = {}


def tfidf_rows(vectorizer, texts: Sequence[str]):
    """vectorizer.transform(texts) for a fitted TfidfVectorizer with sublinear tf, idf and l2
    norm, computed directly: sklearn validates its input on every call (about 1 ms a ticket)."""
    from scipy import sparse

    if not (getattr(vectorizer, "sublinear_tf", False) and vectorizer.norm == "l2" and vectorizer.use_idf
            and not vectorizer.binary and len(texts) <= 8):
        return vectorizer.transform(texts)
    analyze = _ANALYZERS.get(id(vectorizer))
    if analyze is None or analyze[0] is not vectorizer:
        analyze = _ANALYZERS[id(vectorizer)] = (vectorizer, vectorizer.build_analyzer())
    vocabulary, idf = vectorizer.vocabulary_, vectorizer.idf_
    indptr, indices, data = [0], [], []
    for text in texts:
        counts: dict[int, int] = {}
        for feature in analyze[1](text):
            column = vocabulary.get(feature)
            if column is not None:
                counts[column] = counts.get(column, 0) + 1
        columns = np.fromiter(sorted(counts), dtype=np.int64, count=len(counts))
        values = (np.log(np.array([counts[c] for c in columns], dtype=np.float64)) + 1.0) * idf[columns] if len(columns) else np.zeros(0)
        norm = np.sqrt(np.dot(values, values))
        if norm > 0:
            values = values / norm
        indices.append(columns)
        data.append(values)
        indptr.append(indptr[-1] + len(columns))
    return sparse.csr_matrix(
        (np.concatenate(data).astype(vectorizer.dtype) if data else np.zeros(0, vectorizer.dtype),
         np.concatenate(indices) if indices else np.zeros(0, np.int64), np.array(indptr)),
        shape=(len(texts), len(vocabulary)))


@dataclass
class Featurizer:
    """The fitted part of the views: TF-IDF vocabularies and the lexicon scaler."""

    options: TrainOptions
    char: object = None
    sound: object = None
    lexicon_mean: np.ndarray | None = None
    lexicon_scale: np.ndarray | None = None

    def fit(self, views: Sequence[TextViews]) -> "Featurizer":
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.char = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True, max_features=40000, dtype=np.float32)
        self.char.fit([view.model_text for view in views])
        self.sound = TfidfVectorizer(analyzer=sound_tokens, min_df=2, sublinear_tf=True, max_features=30000, dtype=np.float32)
        self.sound.fit([view.sounds for view in views])
        lexicon = np.stack([view.lexicon for view in views])
        self.lexicon_mean = lexicon.mean(axis=0)
        self.lexicon_scale = np.where(lexicon.std(axis=0) > 1e-6, lexicon.std(axis=0), 1.0)
        return self

    def blocks(self, views: Sequence[TextViews]) -> tuple:
        """(embedding, lexicon, characters, sounds) matrices of the views."""
        lexicon = (np.stack([view.lexicon for view in views]) - self.lexicon_mean) / self.lexicon_scale
        embedding = np.stack([view.embedding for view in views])
        return (
            embedding.astype(np.float32),
            lexicon.astype(np.float32),
            tfidf_rows(self.char, [view.model_text for view in views]),
            tfidf_rows(self.sound, [view.sounds for view in views]),
        )

    @staticmethod
    def combine(blocks: tuple, weights: Sequence[float]):
        from scipy import sparse

        embedding, lexicon, char, sound = blocks
        dense = np.hstack([embedding * weights[0], lexicon * weights[1]]).astype(np.float32)
        return sparse.hstack([char * weights[2], sound * weights[3], sparse.csr_matrix(dense)], format="csr")

    def transform(self, views: Sequence[TextViews], weights: Sequence[float]):
        return self.combine(self.blocks(views), weights)


@dataclass
class UrgencyStack:
    """Second stage of urgency: a multinomial logistic regression over log P(urgency) and
    P(category) of the two heads, fitted on their out-of-fold probabilities. It only splits the
    probability below high between medium and low (P(high) and its threshold stay the head's)."""

    classes: tuple[str, ...]
    categories: tuple[str, ...]        # column order of the category probabilities it reads
    coef: np.ndarray
    intercept: np.ndarray

    @staticmethod
    def inputs(urgency_probs: np.ndarray, category_probs: np.ndarray) -> np.ndarray:
        return np.hstack([np.log(np.clip(urgency_probs, 1e-6, None)), category_probs])

    def proba(self, urgency_probs: np.ndarray, category_probs: np.ndarray) -> np.ndarray:
        return _softmax(self.inputs(urgency_probs, category_probs) @ self.coef.T + self.intercept)

    def split_below_high(self, urgency_probs: np.ndarray, category_probs: np.ndarray) -> np.ndarray:
        """The urgency probabilities with the mass below high split by the second stage's medium:low."""
        stacked = self.proba(urgency_probs, category_probs)
        medium, low = stacked[:, self.classes.index("medium")], stacked[:, self.classes.index("low")]
        rest = urgency_probs[:, 1] + urgency_probs[:, 2]
        share = medium / np.maximum(medium + low, 1e-12)
        return np.stack([urgency_probs[:, 0], rest * share, rest * (1.0 - share)], axis=1)


def fit_urgency_stack(urgency_oof: np.ndarray, category_oof: np.ndarray, labels: Sequence[str], categories: tuple[str, ...], c: float) -> UrgencyStack | None:
    from sklearn.linear_model import LogisticRegression

    if len(set(labels)) < 3:
        return None
    estimator = LogisticRegression(C=c, max_iter=1000).fit(UrgencyStack.inputs(urgency_oof, category_oof), list(labels))
    order = [list(estimator.classes_).index(name) for name in URGENCY_ORDER]
    return UrgencyStack(URGENCY_ORDER, tuple(categories), estimator.coef_[order].astype(np.float64), estimator.intercept_[order].astype(np.float64))


@dataclass
class Prediction:
    category: str
    category_probability: float
    category_probabilities: dict
    urgency: str
    urgency_probabilities: dict
    high_threshold: float


@dataclass
class TicketModel:
    version: str
    created_at: str
    options: TrainOptions
    embedding_model: str | None
    lexicon_names: tuple[str, ...]
    featurizer: Featurizer
    category: CalibratedHead
    urgency: CalibratedHead
    high_threshold: float
    pairs: object = None                      # analysis.pairs.PairModel, or None
    summary: dict = field(default_factory=dict)
    medium_ratio: float = 1.0                 # below the high threshold: medium when P(medium) >= ratio * P(low)
    urgency_stack: UrgencyStack | None = None  # sixth pass: medium vs low from both heads (None: the head alone)
    heard_category: CalibratedHead | None = None  # seventh pass: the category head for ASR transcripts (None: one head)

    def predict(self, views: Sequence[TextViews], heard: bool | Sequence[bool] = False) -> list[Prediction]:
        """`heard`: the text is an ASR transcript (one flag for all views, or one per view)."""
        blocks = self.featurizer.blocks(views)
        featurizer = getattr(self.pairs, "featurizer", None)
        if featurizer is not None and featurizer.char is self.featurizer.char and featurizer.sound is self.featurizer.sound:
            featurizer.remember_rows([view.text for view in views], blocks[2], blocks[3])  # the duplicate search reuses these rows
        category_probs = self.category_probabilities(blocks, heard)
        urgency_probs = self.urgency.proba(Featurizer.combine(blocks, self.options.urgency_blocks))
        stack = self.urgency_stack
        if stack is not None and tuple(self.urgency.classes) == URGENCY_ORDER and stack.categories == tuple(self.category.classes):
            urgency_probs = stack.split_below_high(urgency_probs, category_probs)
        return [self._decide(c, u) for c, u in zip(category_probs, urgency_probs)]

    def category_probabilities(self, blocks: tuple, heard: bool | Sequence[bool] = False) -> np.ndarray:
        """P(category) of the views' blocks: the heard head for ASR transcripts where the model has one."""
        flags = np.broadcast_to(np.asarray(heard, dtype=bool), (blocks[0].shape[0],))
        heard_head = self.heard_category
        if heard_head is None or not flags.any():
            return self.category.proba(Featurizer.combine(blocks, self.options.category_blocks))
        heard_probs = heard_head.proba(Featurizer.combine(blocks, self.options.heard_category_blocks))
        if flags.all():
            return heard_probs
        return np.where(flags[:, None], heard_probs, self.category.proba(Featurizer.combine(blocks, self.options.category_blocks)))

    def _decide(self, category_probs: np.ndarray, urgency_probs: np.ndarray) -> Prediction:
        best = int(np.argmax(category_probs))
        urgency = dict(zip(self.urgency.classes, map(float, urgency_probs)))
        return Prediction(
            category=self.category.classes[best],
            category_probability=float(category_probs[best]),
            category_probabilities=dict(zip(self.category.classes, map(float, category_probs))),
            urgency=decide_urgency(urgency, self.high_threshold, self.medium_ratio),
            urgency_probabilities=urgency,
            high_threshold=self.high_threshold,
        )


def decide_urgency(probabilities: dict, high_threshold: float, medium_ratio: float = 1.0) -> str:
    if probabilities.get("high", 0.0) >= high_threshold:
        return "high"
    return "medium" if probabilities.get("medium", 0.0) >= medium_ratio * probabilities.get("low", 0.0) else "low"


MEDIUM_RATIOS = tuple(np.round(np.arange(0.5, 2.001, 0.05), 3))


def choose_medium_ratio(probabilities: np.ndarray, labels: Sequence[str], high_threshold: float) -> float:
    """The medium-vs-low ratio of decide_urgency with the best accuracy on these (out-of-fold)
    predictions, given the high threshold (a cost-sensitive choice: the threshold for high costs
    medium calls, this wins some back). Ties: the ratio nearest 1."""
    labels = np.asarray(labels)
    scored = []
    for ratio in MEDIUM_RATIOS:
        decided = np.array([decide_urgency(dict(zip(URGENCY_ORDER, row)), high_threshold, ratio) for row in probabilities])
        scored.append((round(float(np.mean(decided == labels)), 6), -abs(ratio - 1.0), float(ratio)))
    return max(scored)[2] if scored else 1.0


def choose_high_threshold(p_high: np.ndarray, is_high: np.ndarray, target: float, ceiling: float) -> float:
    """The largest threshold whose recall of high on these (out-of-fold) predictions reaches `target`."""
    positives = np.sort(p_high[is_high])[::-1]
    if len(positives) == 0:
        return ceiling
    needed = int(np.ceil(target * len(positives)))
    threshold = float(positives[max(0, needed - 1)]) - 1e-6
    return float(min(ceiling, max(1e-4, threshold)))


def _fit_head(matrix, labels: Sequence[str], classes: tuple[str, ...], c: float, options: TrainOptions, balanced: bool = False):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    weights = "balanced" if balanced else None
    if options.linear == "svm":
        estimator = LinearSVC(C=c, class_weight=weights, max_iter=2000)
    else:
        estimator = LogisticRegression(C=c, max_iter=options.max_iter, class_weight=weights)
    estimator.fit(matrix, list(labels))
    return CalibratedHead(classes, estimator)


def _inner_folds(examples: Sequence[TrainingExample], labels: Sequence[str], options: TrainOptions) -> list[tuple[np.ndarray, np.ndarray]]:
    from collections import Counter

    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    groups = [example.group for example in examples]
    counts = Counter(labels)
    folds = min(options.inner_folds, len(set(groups)))
    if min(counts.values()) >= folds:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=options.seed)
        return list(splitter.split(np.zeros(len(labels)), list(labels), groups))
    return list(GroupKFold(n_splits=folds).split(np.zeros(len(labels)), list(labels), groups))


def train_head(views, examples, field_name: str, classes: tuple[str, ...], c: float, options: TrainOptions, featurizer: Featurizer,
               balanced: bool = False, weights: Sequence[float] = (1.0, 0.15, 1.0, 0.7)):
    """Fit on the examples that have this label; out-of-fold probabilities calibrate it.

    Returns (head, out-of-fold probabilities, labels, indices of the examples used)."""
    used = [index for index, example in enumerate(examples) if getattr(example, field_name) in classes]
    labels = [getattr(examples[index], field_name) for index in used]
    matrix = featurizer.transform([views[index] for index in used], weights)
    oof_logits = np.zeros((len(used), len(classes)))
    folds = _inner_folds([examples[index] for index in used], labels, options)

    def fit_fold(train_index):
        return _fit_head(matrix[train_index], [labels[i] for i in train_index], classes, c, options, balanced)

    # The inner folds run on TRAIN_THREADS threads (scipy's L-BFGS releases the GIL for most of its work).
    from joblib import Parallel, delayed

    heads = Parallel(n_jobs=TRAIN_THREADS, prefer="threads")(delayed(fit_fold)(train_index) for train_index, _ in folds)
    for head, (_, test_index) in zip(heads, folds):
        oof_logits[test_index] = head.logits(matrix[test_index])
    label_index = np.array([classes.index(label) for label in labels])
    temperature = fit_temperature(oof_logits, label_index)
    head = _fit_head(matrix, labels, classes, c, options, balanced)
    head.temperature = temperature
    return head, _softmax(oof_logits / temperature), labels, used


def _version(examples: Sequence[TrainingExample], options: TrainOptions, moment: datetime) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(f"{example.text}\t{example.category}\t{example.urgency}\n".encode("utf-8"))
    digest.update(repr(asdict(options)).encode("utf-8"))
    return f"{moment:%Y%m%d.%H%M%S}-{digest.hexdigest()[:8]}"


def train_model(
    examples: Sequence[TrainingExample],
    views: Sequence[TextViews],
    *,
    categories: tuple[str, ...],
    embedding_model: str | None,
    lexicon_names: Sequence[str],
    options: TrainOptions = TrainOptions(),
    pair_training=None,
) -> TicketModel:
    """Fit the heads on `examples` (their views precomputed). `pair_training`: a callable
    (oof category probabilities by example index) -> PairModel, or None for no duplicate model."""
    started = time.perf_counter()
    if len(examples) < 20:
        raise TrainingDataError(f"{len(examples)} labelled tickets: too few to train on (need at least 20)")
    featurizer = Featurizer(options).fit(views)
    category, category_oof, category_labels, category_used = train_head(
        views, examples, "category", categories, options.category_c, options, featurizer, weights=options.category_blocks)
    heard_category = None
    heard_rows = np.array([examples[index].source == "asr" for index in category_used], dtype=bool)
    if options.heard_category_blocks is not None and heard_rows.any():
        # Trained on every example (written and heard) with the heard weights; its out-of-fold
        # probabilities replace the first head's for the ASR copies, so the urgency second stage
        # and the duplicate model learn from what they will get at analysis time.
        heard_category, heard_oof, _, _ = train_head(
            views, examples, "category", categories, options.category_c, options, featurizer, weights=options.heard_category_blocks)
        category_oof = np.where(heard_rows[:, None], heard_oof, category_oof)
    urgency, urgency_oof, urgency_labels, urgency_used = train_head(
        views, examples, "urgency", URGENCY_ORDER, options.urgency_c, options, featurizer, balanced=True, weights=options.urgency_blocks)
    is_high = np.array([label == "high" for label in urgency_labels])
    p_high = urgency_oof[:, URGENCY_ORDER.index("high")]
    # The threshold is chosen on the written tickets (and corrections), not on their ASR copies:
    # those teach the head how danger sounds when misheard, the recall target stays one target.
    chosen_on = np.array([examples[index].source != "asr" for index in urgency_used])
    threshold = choose_high_threshold(p_high[chosen_on], is_high[chosen_on], options.high_recall_target, options.max_high_threshold)
    stack = None
    if options.urgency_stack:  # on the examples that have both labels (a correction may carry one)
        category_row = {index: row for row, index in enumerate(category_used)}
        both = [row for row, index in enumerate(urgency_used) if index in category_row]
        stack = fit_urgency_stack(urgency_oof[both], category_oof[[category_row[urgency_used[row]] for row in both]],
                                  [urgency_labels[row] for row in both], categories, options.urgency_stack_c)
    medium_ratio = choose_medium_ratio(urgency_oof, urgency_labels, threshold) if options.tune_medium_ratio else 1.0
    oof_urgency = [decide_urgency(dict(zip(URGENCY_ORDER, row)), threshold, medium_ratio) for row in urgency_oof]
    oof_category = [categories[int(np.argmax(row))] for row in category_oof]
    moment = datetime.now().replace(microsecond=0)
    summary = {
        "examples": len(examples),
        "corrections": sum(1 for example in examples if example.source == "correction"),
        "asr_copies": sum(1 for example in examples if example.source == "asr"),
        "inner_oof": {
            "category_accuracy": round(float(np.mean([a == b for a, b in zip(oof_category, category_labels)])), 4),
            **({"category_accuracy_asr": round(float(np.mean([a == b for a, b, h in zip(oof_category, category_labels, heard_rows) if h])), 4)}
               if heard_rows.any() else {}),
            "urgency_accuracy": round(float(np.mean([a == b for a, b in zip(oof_urgency, urgency_labels)])), 4),
            "high_recall": round(float(np.mean([u == "high" for u, high in zip(oof_urgency, is_high) if high])) if is_high.any() else 0.0, 4),
        },
        "temperatures": {"category": round(category.temperature, 3), "urgency": round(urgency.temperature, 3),
                         **({"heard_category": round(heard_category.temperature, 3)} if heard_category is not None else {})},
        "medium_ratio": medium_ratio,
        "urgency_stack": stack is not None,
    }
    model = TicketModel(
        version=_version(examples, options, moment),
        created_at=moment.isoformat(),
        options=options,
        embedding_model=embedding_model,
        lexicon_names=tuple(lexicon_names),
        featurizer=featurizer,
        category=category,
        urgency=urgency,
        high_threshold=threshold,
        medium_ratio=medium_ratio,
        urgency_stack=stack,
        heard_category=heard_category,
    )
    if pair_training is not None:
        oof_by_index = {index: row for index, row in zip(category_used, category_oof)}
        model.pairs = pair_training(oof_by_index, model)
        summary["pairs"] = getattr(model.pairs, "summary", {})
    summary["seconds"] = round(time.perf_counter() - started, 1)
    model.summary = summary
    return model


def save_model(model: TicketModel, directory: Path = MODEL_DIR) -> tuple[Path, Path]:
    """Writes ticket-model-<version>.joblib and replaces ticket_model.joblib (the current one)."""
    import io

    import joblib
    import sklearn

    buffer = io.BytesIO()
    joblib.dump({"format": MODEL_FORMAT, "sklearn": sklearn.__version__, "model": model}, buffer, compress=3)
    data = buffer.getvalue()
    versioned = directory / f"ticket-model-{model.version}.joblib"
    current = directory / CURRENT_MODEL.name
    atomic_write_bytes(versioned, data)
    atomic_write_bytes(current, data)
    return versioned, current


def load_model(path: Path | str = CURRENT_MODEL) -> TicketModel:
    """The model in `path`; ModelFileError (naming the file and the train command) if it is not one."""
    import joblib
    import sklearn

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "does not exist")
    try:
        data = joblib.load(path)
    except Exception as error:  # a damaged pickle raises anything from EOFError to UnpicklingError
        raise ModelFileError(path, f"cannot be read, the file is damaged or not a model ({type(error).__name__}: {error})") from error
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT or not isinstance(data.get("model"), TicketModel):
        raise ModelFileError(path, f"not a ticket model of format {MODEL_FORMAT}")
    if data.get("sklearn") != sklearn.__version__:
        raise ModelFileError(path, f"written with scikit-learn {data.get('sklearn')}, this is {sklearn.__version__}")
    return data["model"]
