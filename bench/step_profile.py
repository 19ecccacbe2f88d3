"""ONNX Runtime's operator profile of one decoder step at several windows per call, and of one
encoder window (issue 13).

    python -m bench.step_profile [--model-dir build/models/whisper-base] [--precision int8]
        [--windows 1 4] [--beams 5] [--past 100] [--runs 20] [--encoder-runs 3]
        [--out bench/results/step_profile.json]

The step graph as the search model runs it (render.py's per-layer decoder_step.onnx, rendered
into a temporary repository), ORT's default threads, random cached K/V of ``--past`` positions
and random cross K/V of the encoder's length. Per windows-per-call: milliseconds per call and
per window, and the share of each operator type (kernel time from ORT's profiler). What it
shows on a 2-core CPU: the cross-attention products over each window's own cross K/V (MatMul and
FusedMatMul in fp32, MatMulInteger over the 8-bit K/V of the int8 export) grow with the windows
while the shared weights' matmuls (DynamicQuantizeMatMul in int8) barely do, so batching windows
saves little.

The encoder as the encoder model runs it (one window per run on a CPU, render.py's
encoder_run_batch_size), on one 30 s window of random log-mel features: its operators do not
depend on the values.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _cross_feed(node, windows: int, heads: int, frames: int, head_dim: int, rng) -> np.ndarray:
    """A per-layer cross input: f32 [N, H, S, dh], or the 8-bit variant's uint8 K [N, H, dh, S]
    / V [N, H, S, dh] and their scales [N, H, 1, S|dh] (export/cross_int8.py), from its shape."""
    shape = getattr(node, "shape", None) or ["N", heads, "S", head_dim]
    dims = [windows] + [frames if d == "S" or not isinstance(d, int) else d for d in shape[1:]]
    if "uint8" in str(getattr(node, "type", "")):
        return rng.integers(0, 256, dims, dtype=np.uint8)
    if "_scale" in node.name:
        return np.full(dims, 0.01, np.float32)
    return (0.1 * rng.standard_normal(dims)).astype(np.float32)


def _feeds(session, info: dict, windows: int, beams: int, past: int, rng) -> dict:
    """Random inputs for every input of the step graph (per-layer past_*.i / cross_*.i)."""
    heads, head_dim, frames = int(info["n_heads"]), int(info["head_dim"]), int(info["n_audio_ctx"])
    feeds = {}
    for node in session.get_inputs():
        name = node.name
        if name == "input_ids":
            feeds[name] = np.full((windows, beams, 1), int(info.get("timestamp_begin", 0)), np.int64)
        elif name == "past_length":
            feeds[name] = np.full((windows,), past, np.int64)
        elif name.startswith("past_"):
            feeds[name] = (0.1 * rng.standard_normal((windows, beams, heads, past, head_dim))).astype(np.float32)
        elif name.startswith("cross_"):
            feeds[name] = _cross_feed(node, windows, heads, frames, head_dim, rng)
        else:
            raise SystemExit(f"decoder_step input {name!r} {node.shape}: not known to this profile")
    return feeds


def _profiled_runs(graph: Path, feeds_of, runs: int, prefix: Path) -> tuple[float, collections.Counter]:
    """(wall ms per run, kernel microseconds by operator type) of `runs` runs after 3 warm-ups
    (whose kernels count too: the same shapes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    feeds = feeds_of(session)
    for _ in range(3):
        session.run(None, feeds)
    started = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    wall_ms = 1e3 * (time.perf_counter() - started) / runs
    events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    by_op = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"].get("op_name", "?")] += event["dur"]
    return wall_ms, by_op


def _shares(by_op: collections.Counter) -> dict:
    total = sum(by_op.values()) or 1
    return {op: round(dur / total, 3) for op, dur in by_op.most_common(8)}


def profile_step(graph: Path, info: dict, windows: int, beams: int, past: int, runs: int, work: Path) -> dict:
    rng = np.random.default_rng(windows)
    wall_ms, by_op = _profiled_runs(graph, lambda s: _feeds(s, info, windows, beams, past, rng), runs,
                                    work / f"step-{windows}")
    return {"windows": windows, "call_ms": round(wall_ms, 2), "per_window_ms": round(wall_ms / windows, 2),
            "op_share": _shares(by_op)}


def profile_encoder(graph: Path, info: dict, runs: int, work: Path) -> dict:
    features = np.random.default_rng(0).standard_normal((1, int(info["n_mels"]), int(info["n_frames"])), np.float32)
    wall_ms, by_op = _profiled_runs(graph, lambda s: {s.get_inputs()[0].name: features},
                                    runs, work / "encoder")
    return {"windows": 1, "call_ms": round(wall_ms, 2), "op_share": _shares(by_op)}


def main(argv: list[str] | None = None) -> int:
    from model_repository.render import render_repository

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=PROJECT_ROOT / "build" / "models" / "whisper-base")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--past", type=int, default=100, help="cached positions")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--encoder-runs", type=int, default=3, help="encoder windows (0: no encoder profile)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    info = json.loads((args.model_dir / "model_info.json").read_text(encoding="utf-8"))
    report = {"bench": "bench.step_profile", "precision": args.precision, "beams": args.beams, "past": args.past,
              "runs": args.runs, "levels": [], "encoder": None}
    with tempfile.TemporaryDirectory(prefix="step-profile-") as tmp:
        work = Path(tmp)
        repo = render_repository(args.model_dir.resolve(), work / "repo", precision=args.precision)
        graph = repo / "search" / "1" / "decoder_step.onnx"
        for windows in args.windows:
            level = profile_step(graph, info, windows, args.beams, args.past, args.runs, work)
            report["levels"].append(level)
            shares = ", ".join(f"{op} {100 * share:.0f}%" for op, share in level["op_share"].items())
            print(f"{windows} window(s) per call: {level['call_ms']} ms per call, {level['per_window_ms']} ms per "
                  f"window; kernel time: {shares}", flush=True)
        if args.encoder_runs > 0:
            report["encoder"] = profile_encoder(repo / "encoder" / "1" / "encoder.onnx", info, args.encoder_runs, work)
            shares = ", ".join(f"{op} {100 * share:.0f}%" for op, share in report["encoder"]["op_share"].items())
            print(f"encoder, 1 window per run: {report['encoder']['call_ms']} ms; kernel time: {shares}", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
        print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
