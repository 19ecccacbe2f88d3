"""`make bench`: speed, accuracy and peak memory of the full path beside faster-whisper (issue 13).

    python -m bench.speed [--model-dir build/models/whisper-base] [--long-minutes 10] [--calls 100]
        [--ours fp32 --ours int8 --ours 'int8-1t:int8:encoder_intra_op_threads=1,decoder_intra_op_threads=1']
        [--peers seq,batched] [--workloads long,calls] [--out bench/results/latest.json]

One run, one machine, same Whisper-base weights (faster-whisper loads the CTranslate2 model.bin
the export assembles under <model-dir>/ct2), beam 5, 2 threads, language zh:

(a) ``long``: one Mandarin recording of >= --long-minutes, joined from data/calls/*.flac,
    data/hotwords/*.flac, the zh sample clips of pytest-audioeval and (to reach the length)
    synthesised labelled calls from $BENCH_LABELLED_AUDIO (default build/bench/labelled_audio,
    made by `make bench-corpus`: the first 25 tickets of writers A-D, writer E's last 40), with
    pauses of 0.8-4 s between them; written to build/bench/long_zh.flac (a build output).
    Ours: one Transcribe RPC of the whole file (the gateway segments it with VAD and decodes
    the windows concurrently). Peer: WhisperModel.transcribe (vad_filter=True) and
    BatchedInferencePipeline(batch_size=8).
(b) ``calls``: >= --calls short calls through the batch job (gateway.clients.cli batch,
    concurrency 4): the labelled calls when present, else data/calls/*.flac repeated under
    different names (said so in the result). Peer: the same files one after another, each with
    WhisperModel.transcribe and with the batched pipeline.

Per run: RTFx (audio seconds / wall seconds), CER raw (the model's own script) and normalised
(traditional -> simplified and numbers through the gateway's ITN, both sides), peak memory:
RSS summed over every process of ours (tritonserver, each backend stub, the gateway and its
decode workers; psutil over the process trees, sampled every 0.2 s) or of the peer process,
and `uptime` load averages (the machine may be shared: only ratios within one run mean much).
Ours runs with ASR_ENGINE_PROFILE_DIR set: the models and the gateway time themselves
(model_repository/engine/profile.py, gateway/asr/profiling.py) and Triton's statistics API
gives queueing and compute; the profile table splits each encoder window and each decoder step.

Writes --out (bench/results/latest.json) with `ratio` = our best RTFx on (a) / faster-whisper
batched RTFx on (a), and prints the tables. Not part of CI (`make test` never runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.machine import MemorySampler, load, machine

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUILD = PROJECT_ROOT / "build" / "bench"
SAMPLE_RATE = 16000
# synthesised readings of labelled tickets (data/labelled/raw), made by `make bench-corpus`
# (tools/synth_labelled.py --ids $(BENCH_CORPUS_IDS)): (b) takes the first --calls of them by name
# (writers A-D), (a) takes what it needs from the end (writer E's) after the committed clips
DEFAULT_LABELLED = BUILD / "labelled_audio"


# --------------------------------------------------------------------------- text and CER
def _strip(text: str) -> str:
    import re

    return re.sub(r"[\s\W_]+", "", text.lower())


def normalise(text: str) -> str:
    """Simplified characters, numbers as the gateway's ITN writes them, no punctuation."""
    import zhconv

    from gateway.asr.itn import normalize as itn

    simplified = zhconv.convert(text, "zh-cn")
    try:
        simplified = itn(simplified)
    except Exception:  # noqa: BLE001 - ITN is a normaliser here, never a reason to fail the bench
        pass
    return _strip(simplified)


def corpus_cer(hypotheses: list[str], references: list[str], normalised: bool) -> float:
    """Character error rate in % over the whole corpus (edits summed / reference characters)."""
    import jiwer

    f = normalise if normalised else _strip
    refs, hyps = [], []
    for h, r in zip(hypotheses, references):
        r = f(r)
        if r:
            refs.append(r)
            hyps.append(f(h))
    return 100.0 * jiwer.cer(refs, hyps) if refs else 0.0


# --------------------------------------------------------------------------- corpora
def _load(path: Path) -> np.ndarray:
    from gateway.asr.audio import decode_audio

    return decode_audio(path.read_bytes())


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def labelled_references() -> dict[str, dict]:
    """{ticket id: record} of data/labelled/raw/*.jsonl (text and received_at)."""
    refs = {}
    for path in sorted((PROJECT_ROOT / "data" / "labelled" / "raw").glob("*.jsonl")):
        for rec in _jsonl(path):
            refs[rec["id"]] = rec
    return refs


def labelled_audio() -> list[tuple[Path, dict]]:
    """(flac, record) of every synthesised labelled call that has a reference."""
    root = Path(os.environ.get("BENCH_LABELLED_AUDIO", DEFAULT_LABELLED))
    if not root.is_dir():
        return []
    refs = labelled_references()
    return [(p, refs[p.stem]) for p in sorted(root.glob("*.flac")) if p.stem in refs]


def committed_clips() -> list[tuple[Path, str]]:
    """(audio, reference) of the committed Mandarin clips: data/calls, data/hotwords, zh samples."""
    clips = []
    for sub in ("calls", "hotwords"):
        folder = PROJECT_ROOT / "data" / sub
        for rec in _jsonl(folder / "manifest.jsonl"):
            path = folder / (rec.get("file") or rec.get("audio"))
            if path.is_file():
                clips.append((path, rec["text"]))
    try:
        from tests.conftest import sample_clips

        clips += [(c.path, c.reference_text) for c in sample_clips() if c.language == "zh"]
    except Exception:  # noqa: BLE001 - pytest-audioeval missing: the other clips suffice
        pass
    return clips


def build_long(minutes: float, out_dir: Path) -> dict:
    """The joined recording (>= minutes) and its reference; reused when already built."""
    import soundfile as sf

    out_dir.mkdir(parents=True, exist_ok=True)
    audio_path = out_dir / f"long_zh_{minutes:g}min.flac"
    meta_path = audio_path.with_suffix(".json")
    clips = committed_clips()
    extra = list(reversed(labelled_audio()))  # from the end: (b) takes the labelled calls from the start
    queue = [(p, t) for p, t in clips] + [(p, rec["text"]) for p, rec in extra]
    if not queue:
        raise SystemExit("no Mandarin clips found (data/calls, data/hotwords)")
    candidates = [str(p) for p, _ in queue]
    if audio_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("candidates") == candidates:  # built from the same clips: reused
            return meta
    rng = random.Random(13)
    parts, refs, sources, total = [], [], [], 0.0
    i = 0
    while total < minutes * 60:
        path, text = queue[i % len(queue)]
        i += 1
        audio = _load(path)
        pause = np.random.default_rng(i).normal(0, 1e-4, int(rng.uniform(0.8, 4.0) * SAMPLE_RATE)).astype(np.float32)
        parts += [audio, pause]
        refs.append(text)
        sources.append(path.name)
        total += (audio.size + pause.size) / SAMPLE_RATE
    sf.write(audio_path, np.concatenate(parts), SAMPLE_RATE, format="FLAC")
    meta = {"path": str(audio_path), "seconds": round(total, 2), "clips": len(refs), "references": refs,
            "sources": sources, "repeated": i > len(queue), "candidates": candidates}
    meta_path.write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    return meta


def build_calls(n: int, out_dir: Path) -> dict:
    """A folder of >= n short calls with a manifest (the batch job's input) and references."""
    import soundfile as sf

    folder = out_dir / f"calls_{n}"
    meta_path = out_dir / f"calls_{n}.json"
    labelled = labelled_audio()
    sources = [str(p) for p, _ in labelled[:n]] if len(labelled) >= n else ["data/calls"]
    if folder.is_dir() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("sources") == sources:  # built from the same calls: reused
            return meta
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items, note = [], ""
    if len(labelled) >= n:
        for path, rec in labelled[:n]:
            items.append((path, rec["text"], rec.get("received_at"), path.name))
        note = f"synthesised labelled calls from {labelled[0][0].parent} (first {n}: {labelled[0][0].stem} .. {labelled[n - 1][0].stem})"
    else:
        base = [(PROJECT_ROOT / "data" / "calls" / r["file"], r["text"], r.get("received_at"))
                for r in _jsonl(PROJECT_ROOT / "data" / "calls" / "manifest.jsonl")]
        for j in range(n):
            path, text, received = base[j % len(base)]
            items.append((path, text, received, f"r{j // len(base)}_{path.name}"))
        note = f"data/calls/*.flac ({len(base)} files) repeated under different names to {n} calls"
    manifest, refs, seconds = [], {}, 0.0
    for j, (path, text, received, name) in enumerate(items):
        dst = folder / name
        if not dst.exists():
            os.symlink(path.resolve(), dst)
        seconds += sf.info(str(path)).duration
        manifest.append({"file": name, "received_at": received or f"2026-12-01T{8 + j // 60:02d}:{j % 60:02d}:00"})
        refs[name] = text
    (folder / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest), encoding="utf-8")
    meta = {"folder": str(folder), "files": len(items), "seconds": round(seconds, 2), "references": refs, "note": note,
            "sources": sources}
    meta_path.write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    return meta


# --------------------------------------------------------------------------- profile
def _read_profiles(directory: Path) -> dict:
    """{role: {"seconds": {...}, "counts": {...}}} summed over the files of each role."""
    found: dict = {}
    for path in directory.glob("*.json"):
        role = path.stem.rsplit("-", 1)[0]
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        slot = found.setdefault(role, {"seconds": {}, "counts": {}})
        for kind in ("seconds", "counts"):
            for k, v in data.get(kind, {}).items():
                slot[kind][k] = slot[kind].get(k, 0) + v
    return found


def _diff_profiles(after: dict, before: dict) -> dict:
    out = {}
    for role, data in after.items():
        b = before.get(role, {"seconds": {}, "counts": {}})
        out[role] = {kind: {k: v - b[kind].get(k, 0) for k, v in data[kind].items()} for kind in ("seconds", "counts")}
    return out


def _triton_stats(url: str) -> dict:
    """{model: {"requests", "executions", "queue_s", "compute_s" (per execution, summed), ...}}."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    out = {}
    for m in stats.get("model_stats", []):
        inf = m.get("inference_stats", {})
        ns = lambda key: int(inf.get(key, {}).get("ns", 0))  # noqa: E731
        batch = m.get("batch_stats", [])
        exec_ns = {k: sum(int(b.get(k, {}).get("ns", 0)) for b in batch) for k in ("compute_input", "compute_infer", "compute_output")}
        out[m["name"]] = {
            "requests": int(inf.get("success", {}).get("count", 0)),
            "executions": int(m.get("execution_count", 0)),
            "queue_s": ns("queue") / 1e9,
            "request_compute_s": (ns("compute_input") + ns("compute_infer") + ns("compute_output")) / 1e9,
            "execution_compute_s": sum(exec_ns.values()) / 1e9,
        }
    return out


def _diff_stats(after: dict, before: dict) -> dict:
    return {m: {k: v - before.get(m, {}).get(k, 0) for k, v in s.items()} for m, s in after.items()}


def profile_table(stats: dict, prof: dict) -> dict:
    """Milliseconds per encoder window and per decoder step (one step of one window, all its
    beams) from the Triton statistics and the opt-in timers. Steps run either in the `decoder`
    model (stepwise search in the gateway: one Triton request per step) or inside the `search`
    model (whole windows; its rounds are the decoder calls)."""
    ms = lambda s, n: round(1e3 * s / n, 2) if n else None  # noqa: E731
    enc, dec, srch = stats.get("encoder", {}), stats.get("decoder", {}), stats.get("search", {})
    pe, pg = prof.get("encoder", {}), prof.get("gateway", {})
    in_server = prof.get("search", {}).get("counts", {}).get("requests", 0) > 0
    pd = prof.get("search" if in_server else "decoder", {})
    es, ec = pe.get("seconds", {}), pe.get("counts", {})
    ds, dc = pd.get("seconds", {}), pd.get("counts", {})
    gs, gc = pg.get("seconds", {}), pg.get("counts", {})
    windows = ec.get("windows", 0) or enc.get("requests", 0)
    if in_server:
        steps, executions = dc.get("requests", 0), dc.get("execute", 0)
    else:
        steps, executions = dec.get("requests", 0) or dc.get("requests", 0), dec.get("executions", 0)
    table = {
        "search": "in Triton (search model)" if in_server else "gateway (decoder model, one request per step)",
        "windows": windows,
        "encoder_batch": round(enc.get("requests", 0) / enc["executions"], 2) if enc.get("executions") else None,
        "window_encoder_ort_ms": ms(es.get("ort", 0), windows),
        "window_triton_queue_ms": ms(enc.get("queue_s", 0), enc.get("requests", 0)),
        "window_client_round_trip_ms": ms(gs.get("encoder", 0), gc.get("encoder", 0)),
        "decoder_steps": steps,
        "decoder_executions": executions,
        "decoder_batch": round(steps / executions, 2) if executions else None,
        "decoder_rows_per_ort_call": round(dc.get("rows", 0) / dc["ort"], 2) if dc.get("ort") else None,
    }
    # per step: the server's execution time shared among the steps it ran
    exec_s = ds.get("execute", 0)
    ort_s = ds.get("ort", 0) + ds.get("init", 0)
    kv_s = ds.get("kv", 0)
    python_s = max(0.0, exec_s - ort_s - kv_s)
    table.update({
        "step_ort_ms": ms(ort_s, steps),
        "step_kv_cache_ms": ms(kv_s, steps),
        "step_engine_python_ms": ms(python_s, steps),
        "step_score_topk_ms": ms(ds.get("score", 0), steps),
    })
    if in_server:
        table.update({
            "step_search_python_ms": ms(ds.get("search_python", 0), steps),
            "window_search_round_trip_ms": ms(gs.get("search", 0), gc.get("search", 0)),
            # steps of all windows per decoder round a window's steps ran in (1: alone)
            "window_mean_round_steps": round(gs["search_round_steps"] / gc["search_round_steps"], 2)
            if gc.get("search_round_steps") else None,
            "window_search_queue_ms": ms(srch.get("queue_s", 0), srch.get("requests", 0)),
        })
        return table
    table.update({
        "step_triton_execute_ms": ms(dec.get("execution_compute_s", 0), steps),
        "step_triton_queue_ms": ms(dec.get("queue_s", 0), steps),
    })
    client_n = gc.get("decoder", 0)
    if client_n and steps and dec.get("executions"):
        rtt = gs.get("decoder", 0) / client_n
        # what a step waits for outside Triton: its queueing and the execution it ran in (one batch's
        # wall time) taken away from the client's round trip leave gRPC, (de)serialisation and the
        # gateway's event loop
        server = dec.get("queue_s", 0) / steps + dec.get("execution_compute_s", 0) / dec["executions"]
        table["step_client_round_trip_ms"] = round(1e3 * rtt, 2)
        table["step_grpc_and_gateway_ms"] = round(1e3 * max(0.0, rtt - server), 2)
    return table


def cpu_used(after: dict, before: dict, wall_s: float) -> dict:
    """CPU seconds each kind of process used during a workload, their total, and the cores that
    total kept busy on average (2.0 = both cores of this machine all the time)."""
    used = {k: round(v - before.get(k, 0.0), 2) for k, v in sorted(after.items())}
    total = sum(used.values())
    return {"by_process": used, "total": round(total, 2), "cores_busy": round(total / wall_s, 2) if wall_s else None}


# --------------------------------------------------------------------------- ours
def parse_spec(spec: str) -> tuple[str, str, dict]:
    """'name:precision:key=value,key=value' | 'precision' -> (name, precision, tunables); the keys
    `windows` (the gateway's --max-concurrent-windows), `stepwise` (its --stepwise-only),
    `gateway_encode` (its --encode-in-gateway), `decode_workers` (its --decode-workers),
    `decode_worker_idle_s` (its --decode-worker-idle-s),
    `hotword_dir` (its --hotword-dir, relative to the project), `model_dir` (another export, to
    compare two exports in one run) and `workloads` are run_ours's, every other key a render tunable."""
    from model_repository.render import _parse_value

    parts = spec.split(":")
    if len(parts) == 1:
        return f"ours-{parts[0]}", parts[0], {}
    name, precision = parts[0], parts[1]
    tunables = {}
    for item in ":".join(parts[2:]).split(","):
        if item.strip():
            key, value = item.split("=", 1)
            tunables[key.strip()] = _parse_value(value)
    return f"ours-{name}", precision, tunables


def run_ours(spec: str, args, long_meta: dict | None, calls_meta: dict | None, work: Path) -> dict:
    import grpc

    from gateway.launch.local import GatewayProcess
    from gateway.launch.triton_process import TritonProcess
    from gateway.protocol import asr_pb2, asr_pb2_grpc
    from model_repository.render import render_repository

    name, precision, tunables = parse_spec(spec)
    windows = int(tunables.pop("windows", args.windows))  # the gateway's --max-concurrent-windows
    only = tunables.pop("workloads", None)  # e.g. workloads=long: this configuration runs (a) only
    stepwise = bool(tunables.pop("stepwise", False))  # the gateway's --stepwise-only (no search model use)
    gateway_args = ["--encode-in-gateway"] if tunables.pop("gateway_encode", False) else []
    for key, flag in (("decode_workers", "--decode-workers"), ("decode_worker_idle_s", "--decode-worker-idle-s")):
        if key in tunables:
            gateway_args += [flag, str(tunables.pop(key))]
    hotword_dir = tunables.pop("hotword_dir", None)  # server-side hotword lists: every window biased
    model_dir = Path(str(tunables.pop("model_dir", args.model_dir))).resolve()
    if only:
        long_meta = long_meta if "long" in str(only) else None
        calls_meta = calls_meta if "calls" in str(only) else None
    repo = work / f"repo-{name}"
    prof_dir = work / f"profile-{name}"
    prof_dir.mkdir(parents=True, exist_ok=True)
    render_repository(model_dir, repo, precision=precision, **tunables)
    result = {"engine": name, "precision": precision, "tunables": tunables, "gateway_windows": windows,
              "gateway_args": gateway_args,
              "model_dir": str(model_dir),
              "search": "gateway, one Triton step per token" if stepwise else "in Triton (model search)",
              "hotword_dir": hotword_dir,
              "load_start": load()}
    os.environ["ASR_ENGINE_PROFILE_DIR"] = str(prof_dir)  # the gateway child inherits it
    try:
        with TritonProcess(repo, log_path=work / f"triton-{name}.log", startup_timeout_s=600,
                           env={"ASR_ENGINE_PROFILE_DIR": str(prof_dir)}) as triton, \
                _started(GatewayProcess(model_dir, triton.grpc_url, log_path=work / f"gateway-{name}.log",
                                        extra_args=["--max-concurrent-windows", str(windows)]
                                        + (["--stepwise-only"] if stepwise else []) + gateway_args
                                        + (["--hotword-dir", str(PROJECT_ROOT / hotword_dir)] if hotword_dir else []))) \
                as gateway, \
                MemorySampler([triton.pid, gateway.process.pid]) as memory:
            with grpc.insecure_channel(gateway.address, options=[("grpc.max_send_message_length", 1 << 30),
                                                                 ("grpc.max_receive_message_length", 1 << 30)]) as channel:
                stub = asr_pb2_grpc.AsrStub(channel)
                warm = committed_clips()[0][0].read_bytes()
                stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=warm, language=args.language,
                                                          beam_size=args.beam_size), timeout=600)
                if long_meta:
                    before = (_triton_stats(triton.grpc_url), _read_profiles(prof_dir))
                    cpu_before = memory.cpu_seconds()
                    data = Path(long_meta["path"]).read_bytes()
                    t0 = time.perf_counter()
                    response = stub.Transcribe(asr_pb2.TranscribeRequest(
                        audio_content=data, language=args.language, beam_size=args.beam_size), timeout=7200)
                    wall = time.perf_counter() - t0
                    cpu = cpu_used(memory.cpu_seconds(), cpu_before, wall)
                    time.sleep(2 * 0.5 + 0.2)  # let the profile files catch up
                    after = (_triton_stats(triton.grpc_url), _read_profiles(prof_dir))
                    raw = response.model_text or response.text
                    result["long"] = _scores(long_meta["seconds"], wall, [raw], [" ".join(long_meta["references"])])
                    result["long"]["profile"] = profile_table(_diff_stats(after[0], before[0]),
                                                              _diff_profiles(after[1], before[1]))
                    result["long"]["cpu_s"] = cpu
                    result["long"]["text_head"] = response.text[:200]
                    print(f"  {name} long: RTFx {result['long']['rtfx']}", flush=True)
            if calls_meta:
                before = (_triton_stats(triton.grpc_url), _read_profiles(prof_dir))
                cpu_before = memory.cpu_seconds()
                out = work / f"batch-{name}"
                cmd = [sys.executable, "-m", "gateway.clients.cli", "batch", calls_meta["folder"], "--out", str(out),
                       "--server", gateway.address, "--concurrency", str(args.concurrency), "--language", args.language,
                       "--beam-size", str(args.beam_size), "--no-progress", "--history-db", str(work / f"hist-{name}.db")]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True,
                                      env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
                job_wall = time.perf_counter() - t0
                cpu = cpu_used(memory.cpu_seconds(), cpu_before, job_wall)
                time.sleep(1.2)
                after = (_triton_stats(triton.grpc_url), _read_profiles(prof_dir))
                summary_path = out / "batch_summary.json"
                if not summary_path.is_file():
                    raise RuntimeError(f"batch job failed ({proc.returncode}): {proc.stderr[-2000:]}")
                summary = json.loads(summary_path.read_text(encoding="utf-8"))
                hyps, refs = [], []
                for fname, ref in calls_meta["references"].items():
                    path = out / (Path(fname).stem + ".json")
                    rec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
                    tr = rec.get("transcript", rec)
                    hyps.append(tr.get("model_text") or tr.get("text", "") if isinstance(tr, dict) else "")
                    refs.append(ref)
                wall = float(summary.get("wall_seconds") or job_wall)
                result["calls"] = _scores(calls_meta["seconds"], wall, hyps, refs)
                result["calls"].update({"batch_job_wall_s": round(job_wall, 2), "failed": summary.get("failed"),
                                        "concurrency": args.concurrency, "cpu_s": cpu})
                result["calls"]["profile"] = profile_table(_diff_stats(after[0], before[0]),
                                                           _diff_profiles(after[1], before[1]))
                print(f"  {name} calls: RTFx {result['calls']['rtfx']}", flush=True)
        result["memory"] = memory.summary()
    finally:
        os.environ.pop("ASR_ENGINE_PROFILE_DIR", None)
    result["load_end"] = load()
    return result


class _started:
    """A GatewayProcess started with a long timeout (a loaded machine takes a while), stopped on exit."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway

    def __enter__(self):
        return self.gateway.start(timeout_s=300)

    def __exit__(self, *exc) -> None:
        self.gateway.stop()


def _scores(seconds: float, wall: float, hyps: list[str], refs: list[str]) -> dict:
    return {"audio_s": round(seconds, 2), "wall_s": round(wall, 2), "rtfx": round(seconds / wall, 2),
            "cer_raw": round(corpus_cer(hyps, refs, False), 2), "cer_norm": round(corpus_cer(hyps, refs, True), 2)}


# --------------------------------------------------------------------------- faster-whisper
def peer_run(spec_path: str) -> int:
    """Child process: faster-whisper over one workload; writes the result JSON next to the spec."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel, decode_audio

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    model = WhisperModel(spec["ct2"], device="cpu", compute_type=spec["compute_type"], cpu_threads=spec["threads"])
    batched = BatchedInferencePipeline(model) if spec["mode"] == "batched" else None
    kw = dict(language=spec["language"], beam_size=spec["beam_size"], condition_on_previous_text=False)

    def transcribe(path: str) -> str:
        audio = decode_audio(path)
        if batched is not None:  # its own defaults: VAD chunks, no timestamp tokens
            segments, _ = batched.transcribe(audio, batch_size=spec["batch_size"], without_timestamps=True, **kw)
        else:
            # sequential with VAD, with timestamp tokens (its default): without them a 30 s window
            # of several utterances often ends at the first EOT and the rest of the window is lost
            # (CER 62% on (a) in a first run), which is no fair comparison
            segments, _ = model.transcribe(audio, vad_filter=True, **kw)
        return "".join(s.text for s in segments).strip()

    transcribe(spec["warmup"])
    t0 = time.perf_counter()
    texts = [transcribe(p) for p in spec["files"]]
    wall = time.perf_counter() - t0
    Path(spec["result"]).write_text(json.dumps({"wall_s": wall, "texts": texts}, ensure_ascii=False), encoding="utf-8")
    return 0


def run_peer(mode: str, args, long_meta, calls_meta, work: Path) -> dict:
    name = f"faster-whisper-{mode}"
    result = {"engine": name, "compute_type": args.peer_compute_type, "load_start": load()}
    peaks = {}
    for workload, meta in (("long", long_meta), ("calls", calls_meta)):
        if not meta:
            continue
        if workload == "long":
            files, refs = [meta["path"]], [" ".join(meta["references"])]
        else:
            files = [str(Path(meta["folder"]) / f) for f in meta["references"]]
            refs = list(meta["references"].values())
        spec = {"ct2": str(args.model_dir / "ct2"), "compute_type": args.peer_compute_type, "threads": args.threads,
                "mode": mode, "batch_size": 8, "language": args.language, "beam_size": args.beam_size,
                "files": files, "warmup": str(committed_clips()[0][0]),
                "result": str(work / f"{name}-{workload}.result.json")}
        spec_path = work / f"{name}-{workload}.spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-m", "bench.speed", "--peer-run", str(spec_path)], cwd=PROJECT_ROOT,
                                env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
        with MemorySampler([proc.pid]) as memory:
            code = proc.wait()
        if code != 0:
            raise RuntimeError(f"{name} {workload} failed with exit code {code}")
        out = json.loads(Path(spec["result"]).read_text(encoding="utf-8"))
        secs = meta["seconds"]
        result[workload] = _scores(secs, out["wall_s"], out["texts"] if workload == "calls" else [" ".join(out["texts"])], refs)
        result[workload]["text_head"] = out["texts"][0][:200] if out["texts"] else ""
        peaks[workload] = memory.summary()
        print(f"  {name} {workload}: RTFx {result[workload]['rtfx']}", flush=True)
    result["memory"] = max(peaks.values(), key=lambda m: m["peak_total_mb"]) if peaks else {}
    result["memory_by_workload"] = peaks
    result["load_end"] = load()
    return result


# --------------------------------------------------------------------------- report
def print_tables(report: dict) -> None:
    runs = report["runs"]
    for workload in ("long", "calls"):
        rows = [r for r in runs if workload in r]
        if not rows:
            continue
        print(f"\n({'a' if workload == 'long' else 'b'}) {workload}: {report['corpus'][workload]['seconds']:.0f} s of audio")
        print("| engine | RTFx | CER raw % | CER norm % | peak memory MB (RSS / PSS) |")
        print("|---|---|---|---|---|")
        for r in rows:
            w = r[workload]
            print(f"| {r['engine']} | {w['rtfx']} | {w['cer_raw']} | {w['cer_norm']} | "
                  f"{r['memory'].get('peak_total_mb')} / {r['memory'].get('peak_total_pss_mb')} |")
    profiled = [(r["engine"], w, r[w]["profile"]) for r in runs for w in ("long", "calls") if "profile" in r.get(w, {})]
    if profiled:
        keys = list(dict.fromkeys(k for _, _, p in profiled for k in p))
        print("\nprofile (ms per encoder window / per decoder step)")
        print("| metric | " + " | ".join(f"{e} {w}" for e, w, _ in profiled) + " |")
        print("|---|" + "---|" * len(profiled))
        for k in keys:
            print(f"| {k} | " + " | ".join(str(p.get(k)) for _, _, p in profiled) + " |")
    print(f"\nratio (our best RTFx on (a) / faster-whisper batched on (a)): {report.get('ratio')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=PROJECT_ROOT / "build" / "models" / "whisper-base")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="faster-whisper cpu_threads")
    parser.add_argument("--language", default="zh")
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4, help="batch job concurrency")
    parser.add_argument("--windows", type=int, default=4, help="gateway --max-concurrent-windows (its default)")
    parser.add_argument("--ours", action="append", default=None,
                        help="precision, or name:precision:key=value,... (render tunables); repeatable "
                             "(default: fp32 and int8)")
    parser.add_argument("--peers", default="seq,batched", help="faster-whisper modes: seq, batched ('' = none)")
    parser.add_argument("--peer-compute-type", default="int8")
    parser.add_argument("--workloads", default="long,calls")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--peer-run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_run:
        return peer_run(args.peer_run)
    args.model_dir = args.model_dir.resolve()
    ours = [o for o in (args.ours or ["fp32", "int8"]) if o != "none"]
    workloads = {w.strip() for w in args.workloads.split(",") if w.strip()}
    long_meta = build_long(args.long_minutes, BUILD) if "long" in workloads else None
    calls_meta = build_calls(args.calls, BUILD) if "calls" in workloads else None
    report = {"bench": "bench.speed", "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
              "settings": {"beam_size": args.beam_size, "threads": args.threads, "language": args.language,
                           "peer": f"faster-whisper 1.2.1 {args.peer_compute_type}, same weights ({args.model_dir / 'ct2'})",
                           "concurrency": args.concurrency, "gateway_windows": args.windows},
              "corpus": {}, "runs": [], "load_start": load()}
    if long_meta:
        report["corpus"]["long"] = {**{k: long_meta[k] for k in ("path", "seconds", "clips", "repeated")},
                                    "sources": long_meta.get("sources")}
    if calls_meta:
        report["corpus"]["calls"] = {k: calls_meta[k] for k in ("folder", "files", "seconds", "note")}
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        work = Path(tmp)
        for spec in ours:
            print(f"ours {spec} ...", flush=True)
            try:
                report["runs"].append(run_ours(spec, args, long_meta, calls_meta, work))
            except Exception as error:  # noqa: BLE001 - one failed configuration does not void the run
                print(f"  FAILED: {error!r}", flush=True)
                report.setdefault("failed", []).append({"engine": spec, "error": repr(error)[:2000]})
        for mode in [m.strip() for m in args.peers.split(",") if m.strip()]:
            print(f"faster-whisper {mode} ...", flush=True)
            try:
                report["runs"].append(run_peer(mode, args, long_meta, calls_meta, work))
            except Exception as error:  # noqa: BLE001
                print(f"  FAILED: {error!r}", flush=True)
                report.setdefault("failed", []).append({"engine": f"faster-whisper-{mode}", "error": repr(error)[:2000]})
    report["load_end"] = load()
    _ratios(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print_tables(report)
    print(f"\nwritten {args.out}")
    return 0


def _ratios(report: dict) -> None:
    runs = report["runs"]
    ours = [r for r in runs if r["engine"].startswith("ours-")]
    peer = {r["engine"]: r for r in runs if r["engine"].startswith("faster-whisper-")}
    best_long = max((r for r in ours if "long" in r), key=lambda r: r["long"]["rtfx"], default=None)
    fw_b, fw_s = peer.get("faster-whisper-batched"), peer.get("faster-whisper-seq")
    if best_long and fw_b and "long" in fw_b:
        report["ratio"] = round(best_long["long"]["rtfx"] / fw_b["long"]["rtfx"], 3)
        report["ratio_engine"] = best_long["engine"]
    best_calls = max((r for r in ours if "calls" in r), key=lambda r: r["calls"]["rtfx"], default=None)
    if best_calls and fw_s and "calls" in fw_s:
        report["ratio_calls_vs_sequential"] = round(best_calls["calls"]["rtfx"] / fw_s["calls"]["rtfx"], 3)
    # summed RSS, and PSS (machine.py MemorySampler: shared pages counted once over our processes)
    for field, key in (("peak_total_mb", "memory_ratio"), ("peak_total_pss_mb", "memory_ratio_pss")):
        mems = [r["memory"].get(field) for r in ours if r.get("memory")]
        pmems = [r["memory"].get(field) for r in peer.values() if r.get("memory")]
        if mems and pmems and all(mems) and all(pmems):
            report[key] = round(min(mems) / max(pmems), 3)
    by = {r["engine"]: r for r in ours}
    if "ours-fp32" in by and "ours-int8" in by:
        for w in ("long", "calls"):
            if w in by["ours-fp32"] and w in by["ours-int8"]:
                report[f"int8_vs_fp32_{w}"] = {
                    "rtfx_ratio": round(by["ours-int8"][w]["rtfx"] / by["ours-fp32"][w]["rtfx"], 3),
                    "cer_norm_delta": round(by["ours-int8"][w]["cer_norm"] - by["ours-fp32"][w]["cer_norm"], 2)}


if __name__ == "__main__":
    raise SystemExit(main())
