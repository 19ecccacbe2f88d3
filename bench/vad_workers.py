"""Silero VAD of one long recording on the calling thread alone against its blocks shared between
threads (gateway/asr/vad.py VAD_WORKERS), in one process on the same audio.

    python -m bench.vad_workers [--seconds 600] [--repeats 5] [--out bench/results/vad_workers.json]

Real speech (the zh demo calls of data/calls joined and repeated to --seconds); prints the median
seconds per recording for 1 .. --max-workers threads, the ratio to one thread, and checks that
every variant gives the same probabilities.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bench.decode_pool import speech
from gateway.asr.vad import VAD_WORKERS, SileroVad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-workers", type=int, default=max(VAD_WORKERS, 2))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    audio = speech(args.seconds)
    reference = SileroVad(workers=1).speech_probs(audio)
    rows = []
    # interleaved: each round times every variant once, so a change in the host's speed hits all
    vads = {n: SileroVad(workers=n) for n in range(1, args.max_workers + 1)}
    times = {n: [] for n in vads}
    for _ in range(args.repeats):
        for n, vad in vads.items():
            started = time.perf_counter()
            vad.speech_probs(audio)
            times[n].append(time.perf_counter() - started)
    for n, vad in vads.items():
        same = bool(np.array_equal(vad.speech_probs(audio), reference))
        median = sorted(times[n])[len(times[n]) // 2]
        rows.append({"workers": n, "median_s": round(median, 3), "times_s": [round(t, 3) for t in times[n]],
                     "speed_vs_one": round(sorted(times[1])[len(times[1]) // 2] / median, 2), "identical": same})
        print(f"workers {n}: {median:.3f} s per {args.seconds:g} s recording "
              f"({rows[-1]['speed_vs_one']}x one thread), probabilities identical: {same}")
    if args.out is not None:
        result = {"bench": "vad_workers", "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count(),
                  "seconds": args.seconds, "repeats": args.repeats, "default_workers": VAD_WORKERS, "rows": rows}
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"written {args.out}")
    return 0 if all(row["identical"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
