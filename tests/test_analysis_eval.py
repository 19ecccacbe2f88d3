"""The labelled hotline set and the accuracy the analysis reaches on it."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from analysis import load_config
from analysis.evaluation import DEFAULT_DATA, load_examples, run_evaluation


@pytest.fixture(scope="module")
def examples():
    return load_examples(DEFAULT_DATA)


def test_labelled_set_is_large_and_consistent(examples):
    config = load_config()
    assert len(examples) >= 200
    ids = [item["id"] for item in examples]
    assert len(set(ids)) == len(ids)
    categories = Counter(item["expected"]["category"] for item in examples)
    assert set(categories) <= set(config.taxonomy.names) and len(categories) == len(config.taxonomy.names)
    assert min(categories.values()) >= 8
    assert {item["expected"]["urgency"] for item in examples} == {"high", "medium", "low"}
    received = {item["id"]: item["received_at"] for item in examples}
    duplicates = [item for item in examples if item["expected"]["duplicate_of"]]
    assert len(duplicates) >= 20
    for item in duplicates:
        assert received[item["expected"]["duplicate_of"]] < item["received_at"], item["id"]
    for item in examples:
        district = item["expected"]["district"]
        assert district is None or district in config.gazetteer.district_names


def test_accuracy_per_field_stays_at_the_measured_level():
    report = run_evaluation(DEFAULT_DATA, load_config())
    accuracy = report["accuracy"]
    # Measured: category 0.97, urgency 0.82, department 0.97, district 1.0, duplicate 0.98.
    assert accuracy["category"] >= 0.93, json.dumps(report["errors"]["category"], ensure_ascii=False)
    assert accuracy["urgency"] >= 0.78
    assert accuracy["department"] >= 0.93
    assert accuracy["district"] >= 0.97
    assert accuracy["duplicate"] >= 0.95
    assert report["duplicates"]["precision"] >= 0.95 and report["duplicates"]["recall"] >= 0.7
