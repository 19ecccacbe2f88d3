"""Cost of decoding in the supervised worker pool against decoding in the gateway process.

    python -m bench.decode_pool [--repeats 5]

Real speech (the zh demo calls joined) encoded as WAV and MP3 of 10 s, 60 s and 10 min; each is
decoded `--repeats` times in-process (a thread, as with --decode-workers 0) and through a
2-worker DecodePool (the gateway's default); prints the medians and the difference per request.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from gateway.asr.audio import SAMPLE_RATE, decode_audio
from gateway.service.decode_pool import DecodeJob, DecodePool, run_job

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DURATIONS_S = (10, 60, 600)
MAX_DURATION_S = 4 * 3600.0
WORKERS = 2


def speech(seconds: float) -> np.ndarray:
    calls = [decode_audio(p.read_bytes()) for p in sorted((PROJECT_ROOT / "data" / "calls").glob("*.flac"))]
    joined = np.concatenate(calls)
    n = int(seconds * SAMPLE_RATE)
    return np.resize(joined, n).astype(np.float32)


def encode(samples: np.ndarray, container: str, codec: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=SAMPLE_RATE, layout="mono")
        for start in range(0, len(samples), 4096):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 4096], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def median_s(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    pool = DecodePool(WORKERS)
    pool.warm_up()
    loop = asyncio.new_event_loop()
    try:
        print(f"{'input':<14} {'in-process':>11} {'worker':>9} {'added':>9}")
        for container, codec in (("wav", "pcm_s16le"), ("mp3", "libmp3lame")):
            for seconds in DURATIONS_S:
                job = DecodeJob(encode(speech(seconds), container, codec), keep_channels=False, max_duration_s=MAX_DURATION_S)
                local = median_s(lambda: run_job(job), args.repeats)
                pooled = median_s(lambda: loop.run_until_complete(pool.decode(job)), args.repeats)
                print(f"{container.upper()} {seconds:>5} s   {local * 1e3:>8.0f} ms {pooled * 1e3:>6.0f} ms "
                      f"{(pooled - local) * 1e3:>+6.0f} ms")
    finally:
        loop.close()
        pool.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
