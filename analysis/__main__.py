"""Command line of the ticket analysis.

    python -m analysis analyze "幸福路12号的路灯坏了三天了" [--received-at 2026-11-16T09:30] [--history-db PATH] [--no-record]
    python -m analysis correct HL-20261116-1a2b3c4d category 环境卫生 --by 王芳 [--history-db PATH]
    python -m analysis export-corrections corrections.jsonl [--history-db PATH]
    python -m analysis report OUT_DIR [--days 7] [--history-db PATH]     # ledger + dashboard from the history
    python -m analysis train [--all] [--history-db PATH]                  # model -> build/analysis/
    python -m analysis eval [--no-cv] [--no-test] [--by-writer] [--no-asr-augment] [--show-errors] [--json OUT]   # 5-fold CV + frozen test
    python -m analysis split                                              # (re)write data/labelled/splits.json

The history database defaults to `store.path` in analysis/config/defaults.yaml.
Exit status: 0 done, 2 bad input or configuration (the message says what).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

from analysis.analyzer import TicketAnalyzer, load_config
from analysis.errors import AnalysisError
from analysis.store import HistoryStore
from analysis.ticket import CORRECTABLE_FIELDS, now, parse_time


def _store(args, config) -> HistoryStore:
    return HistoryStore(args.history_db or config.defaults.store_path, categories=config.taxonomy.names)


def cmd_analyze(args) -> int:
    config = load_config(args.config)
    analyzer = TicketAnalyzer(config)
    metadata = {key: value for key, value in (("received_at", args.received_at), ("ticket_id", args.ticket_id)) if value}
    text = sys.stdin.read() if args.text == "-" else args.text
    if args.no_history:
        ticket = analyzer.analyze(text, metadata)
    else:
        with _store(args, config) as store:
            ticket = analyzer.analyze(text, metadata, store=store, record=not args.no_record)
    print(json.dumps(ticket.to_dict(), ensure_ascii=False, indent=2))
    return 0


def cmd_correct(args) -> int:
    config = load_config(args.config)
    with _store(args, config) as store:
        correction = store.correct(args.ticket_id, args.field, args.value, by=args.by)
    print(json.dumps(correction.to_dict(), ensure_ascii=False))
    return 0


def cmd_export(args) -> int:
    config = load_config(args.config)
    with _store(args, config) as store:
        count = store.export_corrections(args.out)
    print(f"{count} corrections written to {args.out}")
    return 0


def cmd_report(args) -> int:
    from analysis.report import CallRecord, build_dashboard, build_ledger

    config = load_config(args.config)
    end = parse_time(args.until) if args.until else now()
    with _store(args, config) as store:
        tickets = store.tickets_between(end - timedelta(days=args.days), end + timedelta(seconds=1))
    records = [CallRecord(ticket.to_dict(), ticket.metadata.get("file", "")) for ticket in tickets]
    args.out.mkdir(parents=True, exist_ok=True)
    build_ledger(records, args.out / "ledger.xlsx")
    result = build_dashboard(records, args.out, categories=config.taxonomy.names, districts=config.gazetteer.district_names)
    print(f"{len(records)} tickets: {args.out / 'ledger.xlsx'}, {result.html_path}")
    return 0


def cmd_eval(args) -> int:
    if args.data is not None:  # one labelled file, the current model (in-sample for data/eval)
        from analysis.evaluation import print_report, run_evaluation

        report = run_evaluation(args.data, load_config(args.config), rules_only=args.rules_only)
        print_report(report, show_errors=args.show_errors)
        return 0
    from analysis.honest_eval import format_report, run, strip_errors
    from analysis.model import TrainOptions

    options = TrainOptions(asr_augment=False) if args.no_asr_augment else None
    report = run(load_config(args.config), cv=not args.no_cv, test=not args.no_test, options=options,
                 log=lambda line: print(line, file=sys.stderr), by_writer=args.by_writer)
    print(format_report(report, show_errors=args.show_errors))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(strip_errors(report) if not args.show_errors else report, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


def cmd_train(args) -> int:
    import logging

    from analysis.embeddings import load_embedder
    from analysis.model import MODEL_DIR, save_model
    from analysis.training import Trainer, correction_examples, training_records

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config)
    records = training_records(include_test=args.all)
    corrections = [] if args.no_corrections else correction_examples(args.history_db or config.defaults.store_path)
    model = Trainer(config, load_embedder(config.defaults.embedding_model)).train(records, corrections)
    versioned, current = save_model(model, args.out or MODEL_DIR)
    summary = model.summary
    print(f"model {model.version}: {summary['examples']} examples ({summary.get('asr_copies', 0)} ASR copies, {summary['corrections']} from corrections), "
          f"streams {summary['streams']}, trained in {summary['seconds']} s")
    print(f"  inner out-of-fold: {json.dumps(summary['inner_oof'])}, high threshold {model.high_threshold:.4f}")
    if "pairs" in summary:
        print(f"  duplicates: {json.dumps(summary['pairs'])}")
    print(f"  written: {versioned}\n  current: {current}")
    return 0


def cmd_split(args) -> int:
    from analysis.dataset import load_labelled, writer_files
    from analysis.splits import make_split, write_split

    records = load_labelled()
    split = make_split(records)
    path = write_split(split, records, args.out)
    writers = ", ".join(writer_files()) or "none"
    print(f"{path}: {len(split.test)} test, {len(split.folds)} train+dev in {split.n_folds} folds (writer files: {writers})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from analysis.evaluation import DEFAULT_DATA

    parser = argparse.ArgumentParser(prog="python -m analysis", description="12345 hotline ticket analysis")
    parser.add_argument("--config", type=Path, help="configuration directory (default: analysis/config or $HOTLINE_ANALYSIS_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_db(p):
        p.add_argument("--history-db", type=Path, help="SQLite history (default: store.path of defaults.yaml)")
        return p

    p = with_db(sub.add_parser("analyze", help="analyse one transcript and print the ticket as JSON"))
    p.add_argument("text", help="the transcript, or - to read it from standard input")
    p.add_argument("--received-at", help="ISO 8601 time of the call (default: now)")
    p.add_argument("--ticket-id")
    p.add_argument("--no-record", action="store_true", help="compare with the history but do not save the ticket")
    p.add_argument("--no-history", action="store_true", help="do not open the history at all (no duplicate search)")
    p.set_defaults(func=cmd_analyze)

    p = with_db(sub.add_parser("correct", help="correct a field of a ticket (recorded with who and when)"))
    p.add_argument("ticket_id")
    p.add_argument("field", choices=CORRECTABLE_FIELDS)
    p.add_argument("value", help="the new value ('' or none clears duplicate_of)")
    p.add_argument("--by", required=True, help="who corrects it")
    p.set_defaults(func=cmd_correct)

    p = with_db(sub.add_parser("export-corrections", help="write all corrections as JSONL for retraining"))
    p.add_argument("out", type=Path)
    p.set_defaults(func=cmd_export)

    p = with_db(sub.add_parser("report", help="ledger.xlsx and dashboard.html from the history"))
    p.add_argument("out", type=Path)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--until", help="ISO 8601 end of the period (default: now)")
    p.set_defaults(func=cmd_report)

    from analysis.splits import SPLIT_FILE

    p = sub.add_parser("split", help="(re)write the frozen split data/labelled/splits.json (test = writer E)")
    p.add_argument("--out", type=Path, default=SPLIT_FILE)
    p.set_defaults(func=cmd_split)

    p = with_db(sub.add_parser("train", help="train the category/urgency/duplicate models from train+dev and the stored corrections"))
    p.add_argument("--out", type=Path, help="model directory (default build/analysis)")
    p.add_argument("--all", action="store_true", help="also train on the frozen test writer (production model, after evaluation)")
    p.add_argument("--no-corrections", action="store_true", help="ignore the corrections in the history store")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="5-fold cross-validation on train+dev and the frozen test split (and ASR text)")
    p.add_argument("--data", type=Path, default=None, help=f"instead: one labelled file with the current model (e.g. {DEFAULT_DATA.name}; in-sample)")
    p.add_argument("--rules-only", action="store_true", help="with --data: rules only")
    p.add_argument("--no-cv", action="store_true", help="skip the cross-validation")
    p.add_argument("--no-test", action="store_true", help="skip the frozen test split")
    p.add_argument("--by-writer", action="store_true",
                   help="cross-validation folds are the writer streams (leave one writer out) instead of the split's 5 folds")
    p.add_argument("--no-asr-augment", action="store_true",
                   help="train without the ASR copies of the tickets (the second pass; docs/analysis.md compares)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    p.add_argument("--show-errors", action="store_true")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
