"""Accuracy of the analysis on a labelled set (data/eval/hotline_tickets.jsonl), per field.

Tickets are analysed in the order they were received, against a fresh history store,
so duplicate links are found the way the daily batch finds them. Fields: category,
urgency, department, district (None = no district expected), duplicate (is it one, and
does it point into the right chain of reports: a repeat of a repeat may name either).
Used by `python -m analysis eval` and `python -m bench.eval_analysis`.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from analysis.analyzer import AnalysisConfig, TicketAnalyzer
from analysis.errors import AnalysisError
from analysis.store import HistoryStore

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "eval" / "hotline_tickets.jsonl"
FIELDS = ("category", "urgency", "department", "district")


class EvalDataError(AnalysisError):
    pass


def load_examples(path: Path) -> list[dict]:
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            item["expected"]["category"]  # every line needs the labels
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise EvalDataError(f"{path}:{number}: not a labelled ticket ({error})") from error
        examples.append(item)
    return sorted(examples, key=lambda item: item["received_at"])


def chain_roots(examples: list[dict]) -> dict[str, str]:
    """Ticket id -> the first report of its chain (itself when it is not a duplicate)."""
    parent = {item["id"]: item["expected"].get("duplicate_of") for item in examples}
    roots = {}
    for ticket_id in parent:
        root = ticket_id
        while parent.get(root):
            root = parent[root]
        roots[ticket_id] = root
    return roots


def evaluate(examples: list[dict], analyzer: TicketAnalyzer, store: HistoryStore) -> dict:
    predictions = {}
    started = time.perf_counter()
    for item in examples:
        ticket = analyzer.analyze(item["text"], {"ticket_id": item["id"], "received_at": item["received_at"]}, store=store)
        predictions[item["id"]] = ticket
    elapsed = time.perf_counter() - started

    roots = chain_roots(examples)
    correct = Counter()
    errors: dict[str, list] = {field: [] for field in (*FIELDS, "duplicate")}
    tp = fp = fn = linked_right = 0
    for item in examples:
        ticket, expected = predictions[item["id"]], item["expected"]
        got = {"category": ticket.category, "urgency": ticket.urgency, "department": ticket.department, "district": ticket.district}
        for field in FIELDS:
            if got[field] == expected.get(field):
                correct[field] += 1
            else:
                errors[field].append((item["id"], expected.get(field), got[field], item["text"]))
        expected_dup, got_dup = expected.get("duplicate_of"), ticket.duplicate_of
        if expected_dup and got_dup:
            tp += 1
            if roots.get(got_dup) == roots[item["id"]]:
                linked_right += 1
            else:
                errors["duplicate"].append((item["id"], expected_dup, got_dup, item["text"]))
        elif got_dup:
            fp += 1
            errors["duplicate"].append((item["id"], None, f"{got_dup} ({ticket.duplicate_reason})", item["text"]))
        elif expected_dup:
            fn += 1
            errors["duplicate"].append((item["id"], expected_dup, None, item["text"]))
        if bool(expected_dup) == bool(got_dup) and (not got_dup or roots.get(got_dup) == roots[item["id"]]):
            correct["duplicate"] += 1
    total = len(examples)
    return {
        "tickets": total,
        "seconds": round(elapsed, 2),
        "accuracy": {field: round(correct[field] / total, 4) for field in (*FIELDS, "duplicate")},
        "duplicates": {
            "expected": tp + fn,
            "found": tp + fp,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
            "right_chain": linked_right,
        },
        "errors": errors,
    }



def run_evaluation(data: Path, config: AnalysisConfig, *, rules_only: bool = False, duplicate_threshold: float | None = None) -> dict:
    if duplicate_threshold is not None:
        defaults = dataclasses.replace(
            config.defaults, duplicates=dataclasses.replace(config.defaults.duplicates, threshold=duplicate_threshold)
        )
        config = dataclasses.replace(config, defaults=defaults)
    analyzer = TicketAnalyzer(config, embedder=None if rules_only else "config")
    examples = load_examples(data)
    with tempfile.TemporaryDirectory() as scratch:
        with HistoryStore(Path(scratch) / "history.sqlite", categories=config.taxonomy.names) as store:
            report = evaluate(examples, analyzer, store)
    report["embedding_model"] = analyzer.embedding_model
    return report


def print_report(report: dict, show_errors: bool = False) -> None:
    model = report.get("embedding_model")
    print(f"{report['tickets']} labelled tickets, analysed in {report['seconds']} s ({'rules + ' + model if model else 'rules only'})")
    for field, value in report["accuracy"].items():
        print(f"  {field:<11} {value:6.1%}")
    dup = report["duplicates"]
    print(f"  duplicates: {dup['expected']} expected, {dup['found']} found, precision {dup['precision']}, "
          f"recall {dup['recall']}, {dup['right_chain']} linked into the right chain")
    if show_errors:
        for field, rows in report["errors"].items():
            if rows:
                print(f"\n== {field}: {len(rows)} wrong")
                for ticket_id, expected, got, text in rows:
                    print(f"  {ticket_id} expected {expected} got {got}: {text[:50]}")
