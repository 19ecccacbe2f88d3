"""The frozen split of the labelled tickets: train+dev with 5 folds, and a test set never tuned on.

The split is defined by rule, so it can be written again from the data at any time and
comes out the same:
- test: every ticket of writer E (TEST_STREAMS), a writer the models never see in training;
- train+dev: the other writers and data/eval, assigned to N_FOLDS folds with
  StratifiedGroupKFold (seed SPLIT_SEED): a duplicate chain stays in one fold, and each
  fold gets about the same share of every category.

    python -m analysis split            # (re)writes data/labelled/splits.json
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from analysis.atomic import atomic_write_text
from analysis.dataset import LABELLED_DIR, LabelledTicket, chain_roots
from analysis.errors import AnalysisError

SPLIT_FILE = LABELLED_DIR / "splits.json"
TEST_STREAMS = ("E",)
N_FOLDS = 5
SPLIT_SEED = 12345
SPLIT_FORMAT = 1


class SplitError(AnalysisError):
    """splits.json is missing, malformed, or does not cover the labelled tickets."""


@dataclass(frozen=True)
class Split:
    test: frozenset[str]
    folds: Mapping[str, int]          # train+dev id -> fold 0..n_folds-1
    n_folds: int = N_FOLDS
    seed: int = SPLIT_SEED

    @property
    def train_dev(self) -> frozenset[str]:
        return frozenset(self.folds)

    def fold_ids(self, fold: int) -> frozenset[str]:
        return frozenset(ticket_id for ticket_id, assigned in self.folds.items() if assigned == fold)

    def to_json(self, records: Sequence[LabelledTicket]) -> dict:
        by_id = {record.id: record for record in records}
        per_fold = Counter(self.folds.values())
        return {
            "format": SPLIT_FORMAT,
            "rule": f"test = every ticket of writer(s) {', '.join(TEST_STREAMS)}; train+dev = all other labelled tickets "
                    f"(writers and data/eval), {self.n_folds} folds by StratifiedGroupKFold(shuffle, seed {self.seed}), "
                    "groups = duplicate chains, strata = category",
            "seed": self.seed,
            "n_folds": self.n_folds,
            "counts": {
                "test": len(self.test),
                "train_dev": len(self.folds),
                "per_fold": {str(fold): per_fold[fold] for fold in range(self.n_folds)},
                "per_stream": dict(sorted(Counter(by_id[i].stream for i in (*self.test, *self.folds) if i in by_id).items())),
            },
            "test": sorted(self.test),
            "folds": {ticket_id: self.folds[ticket_id] for ticket_id in sorted(self.folds)},
        }


def make_split(records: Sequence[LabelledTicket], *, n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> Split:
    """The split of `records` by the rule above (deterministic for the same records)."""
    from sklearn.model_selection import StratifiedGroupKFold

    ordered = sorted(records, key=lambda record: (record.stream, record.received_at, record.id))
    test = frozenset(record.id for record in ordered if record.stream in TEST_STREAMS)
    pool = [record for record in ordered if record.id not in test]
    if len(pool) < n_folds:
        return Split(test, {record.id: index % n_folds for index, record in enumerate(pool)}, n_folds, seed)
    roots = chain_roots(pool)
    groups = [f"{record.stream}/{roots[record.id]}" for record in pool]
    labels = [record.category or "?" for record in pool]
    # Categories with fewer members than folds cannot be stratified: pool them.
    counts = Counter(labels)
    strata = [label if counts[label] >= n_folds else "_rare" for label in labels]
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds: dict[str, int] = {}
    for fold, (_, held_out) in enumerate(splitter.split(pool, strata, groups)):
        for index in held_out:
            folds[pool[index].id] = fold
    return Split(test, folds, n_folds, seed)


def write_split(split: Split, records: Sequence[LabelledTicket], path: Path = SPLIT_FILE) -> Path:
    atomic_write_text(path, json.dumps(split.to_json(records), ensure_ascii=False, indent=1) + "\n")
    return path


def load_split(path: Path = SPLIT_FILE) -> Split:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise SplitError(f"{path} does not exist; write it with `python -m analysis split`") from error
    except (OSError, json.JSONDecodeError) as error:
        raise SplitError(f"{path}: unreadable ({error}); write it again with `python -m analysis split`") from error
    try:
        if data["format"] != SPLIT_FORMAT:
            raise SplitError(f"{path}: format {data['format']} (expected {SPLIT_FORMAT})")
        folds = {str(key): int(value) for key, value in data["folds"].items()}
        split = Split(frozenset(map(str, data["test"])), folds, int(data["n_folds"]), int(data["seed"]))
    except (KeyError, TypeError, ValueError) as error:
        raise SplitError(f"{path}: malformed ({error!r}); write it again with `python -m analysis split`") from error
    overlap = split.test & split.train_dev
    if overlap:
        raise SplitError(f"{path}: {len(overlap)} ids both in test and train+dev, e.g. {sorted(overlap)[:3]}")
    return split


def check_split(split: Split, records: Sequence[LabelledTicket]) -> list[str]:
    """Problems between the split and the data now (empty when it covers every ticket by the rule)."""
    problems = []
    ids = {record.id for record in records}
    unassigned = ids - split.test - split.train_dev
    if unassigned:
        problems.append(f"{len(unassigned)} labelled tickets are not in the split (e.g. {sorted(unassigned)[:3]}): "
                        "run `python -m analysis split` once the files are complete")
    wrong = [record.id for record in records if (record.stream in TEST_STREAMS) != (record.id in split.test)]
    if wrong:
        problems.append(f"{len(wrong)} tickets on the wrong side of the test rule (e.g. {wrong[:3]})")
    return problems
