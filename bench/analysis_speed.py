"""Latency and memory of ticket analysis: one ticket at a time, embedding included.

    .venv/bin/python -m bench.analysis_speed [--tickets 400] [--json OUT.json] [--profile 25]

Loads the default analyzer (the trained model in build/analysis/, trained first if it is
missing: not timed), warms it up, then analyses the labelled tickets one by one in
received order per writer stream, each stream against its own history store (so the
duplicate search runs against a growing history, as in the daily batch), and reports
p50/p95/max milliseconds per ticket and the peak resident memory of the process.
Targets (issue 10): p95 <= 20 ms on 2 cores, peak RSS < 300 MB.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

P95_TARGET_MS = 20.0
RSS_TARGET_MB = 300.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.analysis_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=int, default=400, help="how many labelled tickets to analyse (default 400)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N functions with the most cumulative time inside analyze() (cProfile; slows the run)")
    args = parser.parse_args(argv)

    from analysis import HistoryStore, default_analyzer
    from analysis.dataset import by_stream, load_labelled

    started = time.perf_counter()
    analyzer = default_analyzer()
    load_s = time.perf_counter() - started
    records = load_labelled()
    streams = by_stream(records)
    chosen = []
    while len(chosen) < min(args.tickets, len(records)):  # round robin over the streams
        for items in streams.values():
            if items:
                chosen.append(items.pop(0))
    for record in chosen[:5]:
        analyzer.analyze(record.text, {"received_at": record.received_at})  # warm-up
    timings = []
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as scratch:
        stores = {}
        for record in chosen:
            store = stores.get(record.stream) or stores.setdefault(record.stream, HistoryStore(Path(scratch) / f"{record.stream}.sqlite"))
            if profiler is not None:
                profiler.enable()
            began = time.perf_counter()
            ticket = analyzer.analyze(record.text, {"ticket_id": record.id, "received_at": record.received_at}, store=store, record=False)
            timings.append((time.perf_counter() - began) * 1000.0)
            if profiler is not None:
                profiler.disable()
            # Recording is the store's work (an SQLite commit), not the analysis: outside the timing.
            store.add(ticket, analyzer.embed(ticket.text))
        for store in stores.values():
            store.close()
    values = np.array(timings)
    result = {
        "tickets": len(values),
        "model_version": analyzer.model_version,
        "load_s": round(load_s, 2),
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p95_ms": round(float(np.percentile(values, 95)), 2),
        "max_ms": round(float(values.max()), 2),
        "mean_ms": round(float(values.mean()), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "targets": {"p95_ms": P95_TARGET_MS, "peak_rss_mb": RSS_TARGET_MB},
    }
    print(f"{result['tickets']} tickets, model {result['model_version']}: p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, "
          f"max {result['max_ms']} ms; peak RSS {result['peak_rss_mb']} MB (targets p95 <= {P95_TARGET_MS:g} ms, RSS < {RSS_TARGET_MB:g} MB)")
    if profiler is not None:
        import pstats

        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
