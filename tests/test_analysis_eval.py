"""The labelled hotline set and the accuracy the analysis reaches on it."""

from __future__ import annotations

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


def test_legacy_single_file_evaluation_still_runs():
    # data/eval is part of train+dev now: these are in-sample figures, a smoke test only.
    # The honest figures (5-fold CV, frozen test writer E) come from `python -m analysis eval`.
    report = run_evaluation(DEFAULT_DATA, load_config())
    accuracy = report["accuracy"]
    assert accuracy["category"] >= 0.9 and accuracy["district"] >= 0.97
    assert report["duplicates"]["recall"] >= 0.7


def _labelled(ticket_id, stream="A", duplicate_of=None, district=None, text="", urgency="medium", category="其他"):
    from analysis.dataset import LabelledTicket

    return LabelledTicket(ticket_id, stream, f"2027-01-01T0{int(ticket_id[-1])}:00:00", text, category, urgency, district, None, duplicate_of)


def _ticket(category="其他", urgency="medium", district=None, unknown=None, duplicate_of=None):
    from types import SimpleNamespace

    return SimpleNamespace(category=category, urgency=urgency, department=None, needs_review=False,
                           place={"district": district, "district_unknown": unknown}, duplicate_of=duplicate_of, duplicate_reason="")


def test_score_counts_links_into_the_right_chain_per_stream():
    from analysis.honest_eval import score

    records = [
        _labelled("A1", district="东城区", text="我在东城区"),
        _labelled("A2", duplicate_of="A1"),
        _labelled("A3", duplicate_of="A2", urgency="high"),   # a repeat of a repeat: A1 or A2 are both right
        _labelled("A4"),
        _labelled("B1", stream="B"),
        _labelled("B2", stream="B", duplicate_of="B1"),
    ]
    tickets = {
        "A1": _ticket(unknown="东城区"),
        "A2": _ticket(duplicate_of="A1"),
        "A3": _ticket(duplicate_of="A1", urgency="medium"),
        "A4": _ticket(duplicate_of="A2"),                        # a link where none is expected
        "B1": _ticket(),
        "B2": _ticket(),                                        # a missed link
    }
    result = score(records, tickets, records)
    assert result["duplicates"]["streams"]["A"] == {"expected": 2, "predicted": 3, "correct": 2, "precision": 0.6667, "recall": 1.0, "f1": 0.8}
    assert result["duplicates"]["streams"]["B"]["recall"] == 0.0
    assert result["duplicates"]["all"]["correct"] == 2 and result["duplicates"]["all"]["expected"] == 3
    assert result["accuracy"]["district_named"] == 1.0 and result["counted"]["district_named"] == 1
    assert result["urgency_confusion"]["high"]["medium"] == 1 and result["high_recall"] == 0.0
    # urgency per stream: A3 (high, said medium) is the one urgency error, in stream A
    assert result["urgency_per_stream"] == {"A": 0.75, "B": 1.0}


def test_leave_one_writer_out_folds_are_the_streams():
    from analysis.honest_eval import format_report, score, writer_folds

    records = [_labelled("A1"), _labelled("A2"), _labelled("B1", stream="B"), _labelled("E1", stream="eval")]
    folds = writer_folds(records)
    assert folds == [frozenset({"A1", "A2"}), frozenset({"B1"}), frozenset({"E1"})]
    assert set().union(*folds) == {record.id for record in records}   # every ticket held out exactly once
    tickets = {record.id: _ticket() for record in records}
    report = {"notes": [], "counts": {"train_dev": 4, "test": 0, "streams": {}}, "cv": score(records, tickets, records),
              "cv_folds": "by writer", "seconds": 0}
    text = format_report(report)
    assert "| field | CV by writer |" in text and "urgency per stream, CV by writer: A 100.0%, B 100.0%, eval 100.0%" in text


def test_replaying_a_stream_of_the_frozen_test_writer():
    from analysis import default_analyzer
    from analysis.dataset import load_labelled
    from analysis.honest_eval import format_report, replay, score

    analyzer = default_analyzer()
    records = [record for record in load_labelled() if record.stream == "E"][:40]
    tickets = replay(records, analyzer, analyzer.config)
    result = score(records, tickets, records)
    assert result["tickets"] == 40 and result["accuracy"]["category"] >= 0.6
    text = format_report({"notes": [], "counts": {"train_dev": 0, "test": 40, "streams": {"E": 40}}, "test": result, "seconds": 0})
    assert "| category |" in text and "urgency confusion" in text
