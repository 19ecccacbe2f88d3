"""Honest figures: 5-fold cross-validation on train+dev and the frozen test writer.

    python -m analysis eval [--no-cv] [--no-test] [--by-writer] [--show-errors] [--json OUT.json]

- cross-validation: for each fold of data/labelled/splits.json, a model is trained on the
  other four folds (thresholds chosen inside that training, on its own out-of-fold
  predictions) and the fold's tickets are scored; every train+dev ticket is scored once;
  with --by-writer the folds are the writer streams instead (leave one writer out: each
  writer is scored by a model that never saw its wording, as an outside check would be);
- frozen test: a model trained on all of train+dev, scored on writer E (never tuned on);
- ASR: where data/labelled/asr/*.jsonl gives a ticket's ASR transcript, the same tickets
  are analysed from it (and, side by side, from their reference text).

Each writer stream is replayed in received order against its own empty history store, so
duplicates are found the way the daily batch finds them; duplicate links are scored per
stream (precision = right links / links made, recall = right links / expected links; a
link anywhere into the right chain is right).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from analysis.analyzer import TEXT_SOURCE_KEY, AnalysisConfig, TicketAnalyzer
from analysis.dataset import LabelledTicket, by_stream, chain_roots, load_labelled
from analysis.model import URGENCY_ORDER
from analysis.splits import SPLIT_FILE, SplitError, check_split, load_split, make_split
from analysis.store import HistoryStore
from analysis.text import normalize

TARGETS = {"category": 0.92, "urgency": 0.85, "high_recall": 0.95, "district_named": 0.97, "duplicate_f1": 0.9}


def replay(records: Sequence[LabelledTicket], analyzer: TicketAnalyzer, config: AnalysisConfig, *, use_asr: bool = False) -> dict:
    """Analyse every stream in received order against its own fresh history; id -> Ticket."""
    tickets = {}
    with tempfile.TemporaryDirectory() as scratch:
        for stream, items in by_stream(records).items():
            with HistoryStore(Path(scratch) / f"{stream}.sqlite", categories=config.taxonomy.names) as store:
                for record in items:
                    heard = use_asr and record.asr_text is not None
                    metadata = {"ticket_id": record.id, "received_at": record.received_at, TEXT_SOURCE_KEY: "asr" if heard else "written"}
                    tickets[record.id] = analyzer.analyze(record.asr_text if heard else record.text, metadata, store=store)
    return tickets


def named_district(record: LabelledTicket) -> bool:
    """The caller names the labelled district in the reference text."""
    return bool(record.district) and record.district in normalize(record.text)


def predicted_district(ticket, record: LabelledTicket) -> str | None:
    place = ticket.place
    if place.get("district"):
        return place["district"]
    return place.get("district_unknown") if record.unknown_district_labelled else None


def score(records: Sequence[LabelledTicket], tickets: Mapping, all_records: Sequence[LabelledTicket]) -> dict:
    """Per-field figures of `records` (scored) given the tickets; chains come from `all_records`."""
    roots = chain_roots(all_records)
    ids = {record.id for record in records}
    counts: Counter = Counter()
    totals: Counter = Counter()
    confusion = {expected: {got: 0 for got in URGENCY_ORDER} for expected in URGENCY_ORDER}
    errors: dict[str, list] = {"category": [], "urgency": [], "district": [], "duplicate": []}
    per_stream: dict[str, Counter] = {}
    review = 0
    for record in records:
        ticket = tickets[record.id]
        review += bool(ticket.needs_review)
        for field, got in (("category", ticket.category), ("urgency", ticket.urgency), ("department", ticket.department)):
            expected = getattr(record, field)
            if expected is None:
                continue
            totals[field] += 1
            if got == expected:
                counts[field] += 1
            elif field in errors:
                errors[field].append((record.id, expected, got, record.text[:60]))
        if record.urgency in confusion:
            confusion[record.urgency][ticket.urgency] += 1
        district = predicted_district(ticket, record)
        totals["district"] += 1
        counts["district"] += district == record.district
        if named_district(record):
            totals["district_named"] += 1
            if district == record.district:
                counts["district_named"] += 1
            else:
                errors["district"].append((record.id, record.district, district, record.text[:60]))
        # duplicates (and urgency), per stream
        stream = per_stream.setdefault(record.stream, Counter())
        if record.urgency is not None:
            stream["urgency_total"] += 1
            stream["urgency_right"] += ticket.urgency == record.urgency
        expected_link = record.duplicate_of is not None and record.duplicate_of in roots
        got = ticket.duplicate_of
        if expected_link:
            stream["expected"] += 1
        if got:
            stream["predicted"] += 1
            if expected_link and roots.get(got) == roots[record.id]:
                stream["correct"] += 1
            else:
                errors["duplicate"].append((record.id, record.duplicate_of, f"{got} ({ticket.duplicate_reason})", record.text[:60]))
        elif expected_link:
            errors["duplicate"].append((record.id, record.duplicate_of, None, record.text[:60]))
    high = confusion["high"]
    high_total = sum(high.values())

    def prf(counter: Counter) -> dict:
        precision = counter["correct"] / counter["predicted"] if counter["predicted"] else None
        recall = counter["correct"] / counter["expected"] if counter["expected"] else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0 if counter["expected"] else None
        return {"expected": counter["expected"], "predicted": counter["predicted"], "correct": counter["correct"],
                "precision": _round(precision), "recall": _round(recall), "f1": _round(f1)}

    overall = sum(per_stream.values(), Counter())
    return {
        "tickets": len(ids),
        "accuracy": {field: _round(counts[field] / totals[field]) if totals[field] else None
                     for field in ("category", "urgency", "department", "district", "district_named")},
        "counted": {field: totals[field] for field in ("category", "urgency", "department", "district", "district_named")},
        "high_recall": _round(high["high"] / high_total) if high_total else None,
        "urgency_confusion": confusion,
        "needs_review": _round(review / len(ids)) if ids else None,
        "duplicates": {"all": prf(overall), "streams": {stream: prf(counter) for stream, counter in sorted(per_stream.items())}},
        "urgency_per_stream": {stream: _round(counter["urgency_right"] / counter["urgency_total"]) if counter["urgency_total"] else None
                               for stream, counter in sorted(per_stream.items())},
        "errors": errors,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _split(records: Sequence[LabelledTicket], notes: list[str]):
    try:
        split = load_split(SPLIT_FILE)
        problems = check_split(split, records)
    except SplitError as error:
        split, problems = None, [str(error)]
    if problems:
        notes.extend(problems)
        notes.append("using the split computed by rule from the data now (see analysis/splits.py)")
        split = make_split(records)
    return split


def writer_folds(records: Sequence[LabelledTicket]) -> list[frozenset[str]]:
    """Leave-one-writer-out folds: the ids of each stream (writer, or data/eval), streams in name order."""
    streams = by_stream(records)
    return [frozenset(record.id for record in streams[stream]) for stream in sorted(streams)]


def run(config: AnalysisConfig, *, cv: bool = True, test: bool = True, embedder="config", log=print, options=None,
        by_writer: bool = False) -> dict:
    """`options`: the TrainOptions of every model trained here (default: TrainOptions()).
    `by_writer`: cross-validation folds are the writer streams (leave one writer out)."""
    from analysis.embeddings import load_embedder
    from analysis.training import Trainer

    started = time.perf_counter()
    records = load_labelled()
    notes: list[str] = []
    split = _split(records, notes)
    embedder = load_embedder(config.defaults.embedding_model) if embedder == "config" else embedder
    trainer = Trainer(config, embedder) if options is None else Trainer(config, embedder, options)
    cache: dict = {}
    train_dev = [record for record in records if record.id in split.train_dev]
    test_records = [record for record in records if record.id in split.test]
    report: dict = {"notes": notes, "counts": {"train_dev": len(train_dev), "test": len(test_records),
                                                "streams": dict(Counter(record.stream for record in records))}}
    with_asr = [record for record in records if record.asr_text is not None]

    if cv and train_dev:
        tickets: dict = {}
        asr_tickets: dict = {}
        folds = writer_folds(train_dev) if by_writer else [split.fold_ids(fold) for fold in range(split.n_folds)]
        report["cv_folds"] = "by writer" if by_writer else f"{split.n_folds} folds"
        for fold, held in enumerate(folds):
            model = trainer.train([record for record in train_dev if record.id not in held], embeddings=cache)
            analyzer = TicketAnalyzer(config, embedder=embedder, model=model)
            fold_tickets = replay(train_dev, analyzer, config)
            tickets.update({ticket_id: fold_tickets[ticket_id] for ticket_id in held})
            if any(record.id in held for record in with_asr):
                fold_asr = replay(train_dev, analyzer, config, use_asr=True)
                asr_tickets.update({record.id: fold_asr[record.id] for record in with_asr if record.id in held})
            log(f"  fold {fold + 1}/{len(folds)}: {len(held)} tickets scored ({time.perf_counter() - started:.0f} s)")
        report["cv"] = score(train_dev, tickets, train_dev)
        asr_records = [record for record in train_dev if record.id in asr_tickets]
        if asr_records:
            report["cv_asr"] = {"asr": score(asr_records, asr_tickets, train_dev), "reference": score(asr_records, tickets, train_dev)}
    if test and test_records:
        model = trainer.train(train_dev, embeddings=cache)
        analyzer = TicketAnalyzer(config, embedder=embedder, model=model)
        tickets = replay(test_records, analyzer, config)
        report["test"] = score(test_records, tickets, test_records)
        report["model"] = {"version": model.version, "high_threshold": round(model.high_threshold, 4), "summary": model.summary}
        asr_records = [record for record in test_records if record.asr_text is not None]
        if asr_records:
            asr_tickets = replay(test_records, analyzer, config, use_asr=True)
            report["test_asr"] = {"asr": score(asr_records, asr_tickets, test_records), "reference": score(asr_records, tickets, test_records)}
        log(f"  frozen test: {len(test_records)} tickets scored ({time.perf_counter() - started:.0f} s)")
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_report(report: dict, show_errors: bool = False) -> str:
    lines = []
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    counts = report["counts"]
    lines.append(f"labelled tickets: {counts['train_dev']} train+dev, {counts['test']} frozen test; streams {counts['streams']}")
    cv_name = "CV by writer" if report.get("cv_folds") == "by writer" else "5-fold CV"
    columns = [(name, report[key]) for name, key in ((cv_name, "cv"), ("frozen test (E)", "test")) if key in report]
    for name, key in (("CV, ASR text", "cv_asr"), ("test, ASR text", "test_asr")):
        if key in report:
            columns.append((f"{name.split(',')[0]}, same tickets, reference", report[key]["reference"]))
            columns.append((name, report[key]["asr"]))
    if columns:
        lines.append("")
        lines.append("| field | " + " | ".join(name for name, _ in columns) + " | target |")
        lines.append("|---|" + "---|" * (len(columns) + 1))
        rows = (
            ("tickets", lambda r: str(r["tickets"]), ""),
            ("category", lambda r: _percent(r["accuracy"]["category"]), ">= 92%"),
            ("urgency", lambda r: _percent(r["accuracy"]["urgency"]), ">= 85%"),
            ("recall of high", lambda r: _percent(r["high_recall"]), ">= 95%"),
            ("district, named by the caller", lambda r: f"{_percent(r['accuracy']['district_named'])} (n={r['counted']['district_named']})", ">= 97%"),
            ("district, all", lambda r: _percent(r["accuracy"]["district"]), ""),
            ("department", lambda r: _percent(r["accuracy"]["department"]), ""),
            ("duplicates P / R / F1", lambda r: "{precision} / {recall} / {f1}".format(**r["duplicates"]["all"]), "F1 >= 0.9"),
            ("needs_review", lambda r: _percent(r["needs_review"]), ""),
        )
        for label, value, target in rows:
            lines.append(f"| {label} | " + " | ".join(value(result) for _, result in columns) + f" | {target} |")
        for name, result in columns:
            if "ASR" in name or "reference" in name:
                continue
            lines.append("")
            lines.append(f"urgency confusion, {name} (rows: expected, columns: predicted)")
            lines.append("| | high | medium | low |")
            lines.append("|---|---|---|---|")
            for expected in URGENCY_ORDER:
                row = result["urgency_confusion"][expected]
                lines.append(f"| {expected} | " + " | ".join(str(row[got]) for got in URGENCY_ORDER) + " |")
            lines.append("")
            lines.append(f"duplicates per stream, {name}")
            lines.append("| stream | expected | predicted | right | P | R | F1 |")
            lines.append("|---|---|---|---|---|---|---|")
            for stream, figures in result["duplicates"]["streams"].items():
                lines.append(f"| {stream} | {figures['expected']} | {figures['predicted']} | {figures['correct']} | {figures['precision']} | {figures['recall']} | {figures['f1']} |")
    if columns:
        lines.append("")
        for name, result in columns:
            lines.append(f"urgency per stream, {name}: " + ", ".join(f"{stream} {_percent(value)}" for stream, value in result.get("urgency_per_stream", {}).items()))
    if "model" in report:
        model = report["model"]
        lines.append("")
        lines.append(f"test model {model['version']}: high threshold {model['high_threshold']}, trained in {model['summary'].get('seconds')} s")
    lines.append(f"({report['seconds']} s)")
    if show_errors:
        for name, result in columns:
            for field, rows in result["errors"].items():
                if rows:
                    lines.append(f"\n== {name} / {field}: {len(rows)} wrong")
                    lines.extend(f"  {ticket_id} expected {expected} got {got}: {text}" for ticket_id, expected, got, text in rows)
    return "\n".join(lines)


def strip_errors(report: dict) -> dict:
    """The report without the per-ticket error lists (for --json summaries)."""
    def clean(value):
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items() if key != "errors"}
        return value
    return clean(report)
