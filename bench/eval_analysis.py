"""Accuracy of the ticket analysis on the labelled hotline set, per field.

    PYTHONPATH=. .venv/bin/python -m bench.eval_analysis [--data data/eval/hotline_tickets.jsonl]
        [--show-errors] [--json OUT.json] [--rules-only] [--duplicate-threshold 0.85]

Prints accuracy of category, urgency, department, district and duplicate links, and the
precision/recall of duplicate detection (see analysis/evaluation.py for how).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from analysis.analyzer import load_config
from analysis.evaluation import DEFAULT_DATA, print_report, run_evaluation


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--config", type=Path, help="analysis config directory (default: analysis/config)")
    parser.add_argument("--rules-only", action="store_true", help="no sentence embeddings (and so no duplicate search)")
    parser.add_argument("--duplicate-threshold", type=float, help="override duplicates.threshold")
    parser.add_argument("--show-errors", action="store_true")
    parser.add_argument("--json", type=Path, help="write the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = run_evaluation(args.data, load_config(args.config), rules_only=args.rules_only, duplicate_threshold=args.duplicate_threshold)
    print_report(report, show_errors=args.show_errors)
    if args.json:
        args.json.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_analysis", description=__doc__.split("\n\n")[0])
    add_eval_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
