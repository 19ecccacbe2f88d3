"""`make perf`: perf_analyzer against the encoder, the stateful decoder and the search model (issue 13, item 5).

    python -m bench.perf [--model-dir build/models/whisper-base] [--precision fp32]
        [--perf-analyzer build/perf-venv/bin/perf_analyzer] [--out bench/results/perf.json]

perf_analyzer is the real binary of the tritonclient==2.50.0 wheel, installed into its own
virtual environment (build/perf-venv, tools/setup_perf.sh) with Debian's libb64-0d and
libcudart.so.12 from nvidia-cuda-runtime-cu12 on LD_LIBRARY_PATH (shared/DESIGN.md section 4).

Realistic input data, recorded here first:
- encoder: log-mel features of Mandarin clips (data/calls), one 30 s window each;
- decoder: the steps of real beam searches (beam 5, zh) over those windows: this module runs the
  gateway's own beam search against the served models through a session that records every
  step (START with the prompt, encoder_output, suppress ids and top_k; then [K, 1] token ids
  with parent_beams), and writes them as perf_analyzer sequence streams (one stream per window;
  perf_analyzer sends START on the first step and END on the last);
- search: the same windows' requests to the `search` model (encoder output and the JSON search
  options the gateway sends), recorded from a second decode of each window.

Then perf_analyzer runs the encoder at concurrency 1..N, the decoder in sequence mode at 1..M
concurrent sequences and the search model (decoupled: gRPC streaming, one response per window)
at 1..W windows in flight, and the throughput (inferences/s) and latencies (avg, p50, p90, p99)
go to bench/results/perf.json with Triton's server-side counts (batching shown by
inference_count > execution_count; for the search, windows per decoder call come from its own
rounds, which perf_analyzer does not see).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PERF_VENV = PROJECT_ROOT / "build" / "perf-venv"
MODELS = ("encoder", "decoder", "search")


def cuda_runtime_lib(venv: Path) -> str:
    found = sorted(venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    return str(found[0]) if found else ""


def _b64(array: np.ndarray) -> dict:
    return {"b64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii"), "shape": list(array.shape)}


class RecordingSession:
    """A DecoderSession that forwards to the real one and records every step as perf_analyzer input."""

    def __init__(self, real, encoder_output: np.ndarray, suppress_ids, begin_suppress_ids) -> None:
        self.real = real
        self.steps: list[dict] = []
        self._first = {"encoder_output": _b64(np.ascontiguousarray(encoder_output, dtype=np.float32))}
        if suppress_ids:
            self._first["suppress_ids"] = _b64(np.array(suppress_ids, dtype=np.int32))
        if begin_suppress_ids:
            self._first["begin_suppress_ids"] = _b64(np.array(begin_suppress_ids, dtype=np.int32))

    async def step(self, input_ids, parent_beams, top_k, extra_ids=None):
        step = {"input_ids": _b64(np.ascontiguousarray(input_ids, dtype=np.int64)),
                "top_k": _b64(np.array([top_k], dtype=np.int32))}
        if not self.steps:
            step.update(self._first)
        elif parent_beams is not None:
            step["parent_beams"] = _b64(np.ascontiguousarray(parent_beams, dtype=np.int32))
        self.steps.append(step)
        return await self.real.step(input_ids, parent_beams, top_k, extra_ids)

    async def close(self) -> None:
        await self.real.close()


class RecordingClient:
    def __init__(self, client) -> None:
        self.client = client
        self.sessions: list[RecordingSession] = []
        self.searches: list[dict] = []  # perf_analyzer input of each `search` request

    async def has_search(self, hotwords: bool = False, features: bool = False) -> bool:
        # perf_analyzer replays recorded encoder outputs: never the features path
        return not features and await self.client.has_search(hotwords)

    async def search(self, encoder_output, options: dict, **ids):
        self.searches.append({"encoder_output": _b64(np.ascontiguousarray(encoder_output, dtype=np.float32)),
                              "options": [json.dumps(options)]})
        return await self.client.search(encoder_output, options, **ids)

    async def encode(self, features):
        return await self.client.encode(features)

    async def deployed_model(self):
        return await self.client.deployed_model()

    def decoder_session(self, encoder_output, *, suppress_ids=None, begin_suppress_ids=None, timestamp_rules=None):
        real = self.client.decoder_session(encoder_output, suppress_ids=suppress_ids,
                                           begin_suppress_ids=begin_suppress_ids, timestamp_rules=timestamp_rules)
        session = RecordingSession(real, encoder_output, suppress_ids, begin_suppress_ids)
        self.sessions.append(session)
        return session


async def record(url: str, model_dir: Path, windows: list[np.ndarray], beam_size: int) -> tuple[list, list, list]:
    """(encoder data, decoder streams, search requests) from real decodes of `windows` through
    the served models (each window decoded stepwise, then by the search model)."""
    from gateway.asr.families import load_family
    from gateway.asr.features import log_mel_spectrogram
    from gateway.asr.triton_client import TritonAsrClient
    from gateway.asr.window_decoder import TritonWindowDecoder, WindowOptions

    family = load_family(model_dir)
    client = TritonAsrClient(url)
    recorder = RecordingClient(client)
    decoder = TritonWindowDecoder(recorder, family, server_search=False)  # records the decoder steps
    searcher = TritonWindowDecoder(recorder, family, server_search=True)  # records the search requests
    options = WindowOptions(language="zh", task="transcribe", beam_size=beam_size, timestamps=False, scorer=None,
                            max_biased_logprob=0.0)
    encoder_data = []
    try:
        for audio in windows:
            encoder_data.append({"input_features": _b64(log_mel_spectrogram(audio, n_mels=family.n_mels))})
            stepwise = await decoder.decode_window(audio, options)
            searched = await searcher.decode_window(audio, options)
            if searched.result.tokens != stepwise.result.tokens:
                print("note: the search model's tokens differ from the stepwise search's for a window "
                      "(int8 results depend slightly on the batch)", flush=True)
    finally:
        await client.close()
    if not recorder.searches:
        raise SystemExit("the server does not serve the `search` model (render with search_model on)")
    return encoder_data, [s.steps for s in recorder.sessions], recorder.searches


def windows_from_calls(n: int) -> list[np.ndarray]:
    """n windows of up to 30 s joined from data/calls (pauses between calls)."""
    from gateway.asr.audio import decode_audio

    files = sorted((PROJECT_ROOT / "data" / "calls").glob("*.flac"))
    out, current = [], []
    for path in files:
        current += [decode_audio(path.read_bytes()), np.zeros(8000, np.float32)]
        if sum(a.size for a in current) > 25 * 16000:
            out.append(np.concatenate(current)[: 30 * 16000])
            current = []
            if len(out) == n:
                break
    return out or [np.concatenate(current)[: 30 * 16000]]


def run_perf_analyzer(binary: str, env: dict, model: str, url: str, data: Path, sweep: str, extra: list[str],
                      work: Path, timeout_s: float) -> dict:
    report = work / f"{model}.csv"
    cmd = [binary, "-m", model, "-i", "grpc", "-u", url, "--input-data", str(data), "--concurrency-range", sweep,
           "--measurement-mode", "count_windows", "--stability-percentage", "50", "--max-trials", "4",
           "-f", str(report),
           *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    result = {"command": " ".join(cmd), "exit_code": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
              "output_tail": (proc.stdout + proc.stderr)[-3000:]}
    if report.is_file():
        with report.open(newline="") as f:
            rows = list(csv.DictReader(f))
        result["levels"] = [{
            "concurrency": int(r["Concurrency"]),
            "throughput_infer_per_s": float(r["Inferences/Second"]),
            "latency_avg_ms": round(_avg_us(r) / 1e3, 2),
            "latency_p50_ms": round(float(r.get("p50 latency", 0)) / 1e3, 2),
            "latency_p90_ms": round(float(r.get("p90 latency", 0)) / 1e3, 2),
            "latency_p99_ms": round(float(r.get("p99 latency", 0)) / 1e3, 2),
            "server_queue_ms": round(float(r.get("Server Queue", 0)) / 1e3, 2),
            "server_compute_ms": round(sum(float(r.get(k, 0)) for k in ("Server Compute Input", "Server Compute Infer",
                                                                        "Server Compute Output")) / 1e3, 2),
        } for r in rows]
    return result


def _avg_us(row: dict) -> float:
    if row.get("Avg latency"):
        return float(row["Avg latency"])
    keys = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input", "Server Compute Infer",
            "Server Compute Output", "Client Recv")
    return sum(float(row.get(k, 0) or 0) for k in keys)


def main(argv: list[str] | None = None) -> int:
    from gateway.launch.triton_process import TritonProcess
    from model_repository.render import render_repository

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=PROJECT_ROOT / "build" / "models" / "whisper-base")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--execution-provider", default="CPUExecutionProvider")
    parser.add_argument("--perf-analyzer", default=str(PERF_VENV / "bin" / "perf_analyzer"))
    parser.add_argument("--windows", type=int, default=3, help="recorded windows (decoder streams)")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--encoder-sweep", default="1:2:1", help="perf_analyzer --concurrency-range of the encoder")
    parser.add_argument("--decoder-sweep", default="1:4:3", help="concurrent sequences of the decoder")
    parser.add_argument("--search-sweep", default="1:4:3", help="windows in flight at the search model")
    parser.add_argument("--encoder-requests", type=int, default=6, help="requests per measurement window (encoder)")
    parser.add_argument("--decoder-requests", type=int, default=200, help="requests per measurement window (decoder)")
    parser.add_argument("--search-requests", type=int, default=6, help="requests per measurement window (search)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per perf_analyzer run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="render tunables")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "perf.json")
    args = parser.parse_args(argv)

    binary = args.perf_analyzer
    if not Path(binary).is_file():
        raise SystemExit(f"{binary} not found: run tools/setup_perf.sh (make perf does)")
    env = dict(os.environ)
    cudart = cuda_runtime_lib(PERF_VENV)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [cudart, env.get("LD_LIBRARY_PATH")]))
    from model_repository.render import _parse_value

    tunables = {k: _parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.execution_provider:
        tunables["execution_provider"] = args.execution_provider
    report = {"bench": "bench.perf", "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "precision": args.precision,
              "execution_provider": args.execution_provider, "tunables": tunables,
              "load_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
        work = Path(tmp)
        repo = render_repository(args.model_dir.resolve(), work / "repo", precision=args.precision, **tunables)
        with TritonProcess(repo, log_path=work / "triton.log") as triton:
            encoder_data, streams, searches = asyncio.run(record(triton.grpc_url, args.model_dir.resolve(),
                                                                 windows_from_calls(args.windows), args.beam_size))
            (work / "encoder.json").write_text(json.dumps({"data": encoder_data}), encoding="utf-8")
            (work / "decoder.json").write_text(json.dumps({"data": streams}), encoding="utf-8")
            (work / "search.json").write_text(json.dumps({"data": searches}), encoding="utf-8")
            report["input_data"] = {"encoder_windows": len(encoder_data), "decoder_streams": len(streams),
                                    "decoder_steps_per_stream": [len(s) for s in streams],
                                    "search_windows": len(searches)}
            print(f"recorded {len(encoder_data)} windows, decoder streams of {[len(s) for s in streams]} steps", flush=True)
            from bench.speed import _diff_stats, _triton_stats

            before = _triton_stats(triton.grpc_url)
            report["encoder"] = run_perf_analyzer(
                binary, env, "encoder", triton.grpc_url, work / "encoder.json", args.encoder_sweep,
                ["--measurement-request-count", str(args.encoder_requests)], work, args.timeout)
            mid = _triton_stats(triton.grpc_url)
            report["decoder"] = run_perf_analyzer(
                binary, env, "decoder", triton.grpc_url, work / "decoder.json", args.decoder_sweep,
                ["--measurement-request-count", str(args.decoder_requests), "--serial-sequences"],
                work, args.timeout)
            after = _triton_stats(triton.grpc_url)
            # decoupled: one gRPC stream per client thread, one response per window
            report["search"] = run_perf_analyzer(
                binary, env, "search", triton.grpc_url, work / "search.json", args.search_sweep,
                ["--measurement-request-count", str(args.search_requests), "--streaming"], work, args.timeout)
            last = _triton_stats(triton.grpc_url)
            report["server_stats"] = {"encoder": _diff_stats(mid, before).get("encoder"),
                                      "decoder": _diff_stats(after, mid).get("decoder"),
                                      "search": _diff_stats(last, after).get("search")}
    report["load_end_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    for model in MODELS:
        r = report[model]
        print(f"{model}: exit {r['exit_code']} in {r['seconds']} s")
        for lvl in r.get("levels", []):
            print(f"  concurrency {lvl['concurrency']}: {lvl['throughput_infer_per_s']:.2f} infer/s, "
                  f"avg {lvl['latency_avg_ms']} ms, p99 {lvl['latency_p99_ms']} ms")
        if r["exit_code"]:
            print(r["output_tail"])
    print(f"written {args.out}")
    return 0 if all(report[m]["exit_code"] == 0 for m in MODELS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
