"""The labelled data and its frozen split: writer E is the test set and is never trained on."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from analysis import load_config
from analysis.dataset import (
    EVAL_PREFIX,
    DatasetError,
    chain_roots,
    load_labelled,
    load_writer_file,
)
from analysis.splits import SPLIT_FILE, TEST_STREAMS, check_split, load_split, make_split
from analysis.training import training_records


@pytest.fixture(scope="module")
def records():
    return load_labelled()


@pytest.fixture(scope="module")
def split():
    return load_split(SPLIT_FILE)


def test_all_sources_load_as_one_record_type(records):
    streams = Counter(record.stream for record in records)
    assert streams["eval"] >= 200
    assert all(record.id.startswith(EVAL_PREFIX) for record in records if record.stream == "eval")
    assert all(record.id.startswith(record.stream) for record in records if record.stream != "eval")
    names = set(load_config().taxonomy.names)
    assert {record.category for record in records} <= names
    assert {record.urgency for record in records} == {"high", "medium", "low"}
    ids = {record.id: record for record in records}
    for record in records:
        if record.duplicate_of:
            earlier = ids[record.duplicate_of]
            assert earlier.stream == record.stream and earlier.received_at <= record.received_at, record.id


def test_test_ids_are_never_in_train_dev(records, split):
    assert split.test.isdisjoint(split.train_dev)
    assert not check_split(split, records), check_split(split, records)
    by_id = {record.id: record for record in records}
    assert all(by_id[ticket_id].stream in TEST_STREAMS for ticket_id in split.test if ticket_id in by_id)
    trained = {record.id for record in training_records()}
    assert trained.isdisjoint(split.test)
    assert trained == split.train_dev & set(by_id)


def test_split_is_grouped_by_duplicate_chain_and_reproducible(records, split):
    pool = [record for record in records if record.id in split.train_dev]
    roots = chain_roots(pool)
    folds_of_chain: dict[str, set] = {}
    for record in pool:
        folds_of_chain.setdefault(f"{record.stream}/{roots[record.id]}", set()).add(split.folds[record.id])
    assert all(len(folds) == 1 for folds in folds_of_chain.values())
    assert sorted(Counter(split.folds.values())) == list(range(split.n_folds))
    again = make_split(records)
    assert again.test == split.test and dict(again.folds) == dict(split.folds)


def test_split_file_is_readable_json():
    data = json.loads(SPLIT_FILE.read_text(encoding="utf-8"))
    assert data["counts"]["test"] == len(data["test"]) and "writer" in data["rule"]


def test_a_malformed_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "writer_Z.jsonl"
    path.write_text('{"id": "Z001", "writer": "Z", "received_at": "2027-01-01T08:00:00", "text": "x", "labels": {"urgency": "urgent"}}\n{}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"writer_Z.jsonl:1: urgency"):
        load_writer_file(path, "Z")
