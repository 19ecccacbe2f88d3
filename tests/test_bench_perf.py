"""The measuring tools of issue 13 without running a benchmark: the opt-in engine timers, the
session settings the bench tunes (arena, fp16 TensorRT), the bench's CER, spec parsing and profile
arithmetic, the process-tree memory sampler and perf_analyzer's recorded sequences.
No timed assertions: the numbers come from `make bench` / `make perf`, not from tests.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest

from model_repository.engine import profile as engine_profile
from model_repository.engine.session import make_session

ROOT = Path(__file__).resolve().parent.parent
WHISPER_DIR = Path(os.environ.get("ASR_MODEL_DIR", ROOT / "build" / "models" / "whisper-base"))


class Log:
    def __init__(self):
        self.lines = []

    def log_info(self, m):
        self.lines.append(m)

    log_warn = log_error = log_verbose = log_info


def config(**params) -> dict:
    return {"parameters": {k: {"string_value": str(v)} for k, v in params.items()}}


def tiny_graph() -> bytes:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString()


def test_engine_profile_is_off_without_the_directory(monkeypatch):
    monkeypatch.delenv(engine_profile.PROFILE_ENV, raising=False)
    assert engine_profile.profiler("decoder") is None


def test_engine_profile_writes_cumulative_totals(monkeypatch, tmp_path):
    monkeypatch.setenv(engine_profile.PROFILE_ENV, str(tmp_path))
    prof = engine_profile.profiler("decoder")
    prof.add("ort", 0.25)
    prof.add("ort", 0.5, 2)
    prof.count("requests", 7)
    prof.close()
    (path,) = tmp_path.glob("decoder-*.json")
    data = json.loads(path.read_text())
    assert data["seconds"]["ort"] == pytest.approx(0.75)
    assert data["counts"] == {"ort": 3, "requests": 7}


def test_session_arena_follows_the_parameter():
    graph = tiny_graph()
    on = make_session(graph, config(intra_op_threads=1), Log())
    off = make_session(graph, config(intra_op_threads=1, cpu_mem_arena=0), Log())
    assert on.get_session_options().enable_cpu_mem_arena
    assert not off.get_session_options().enable_cpu_mem_arena
    assert not off.get_session_options().enable_mem_pattern
    np.testing.assert_array_equal(off.run(["y"], {"x": np.array([-1, 2], np.float32)})[0], [0, 2])


def test_render_writes_the_thread_arena_and_fp16_settings(tmp_path):
    if not (WHISPER_DIR / "model_info.json").is_file():
        pytest.skip("no exported whisper model (make export)")
    from model_repository.render import render_repository

    out = render_repository(WHISPER_DIR, tmp_path / "default")
    text = (out / "encoder" / "config.pbtxt").read_text() + (out / "decoder" / "config.pbtxt").read_text()
    assert text.count('key: "intra_op_threads" value { string_value: "0" }') == 2  # ORT's default: one per core
    assert 'key: "cpu_mem_arena" value { string_value: "0" }' in (out / "encoder" / "config.pbtxt").read_text()
    assert 'key: "cpu_mem_arena" value { string_value: "1" }' in (out / "decoder" / "config.pbtxt").read_text()
    assert text.count('key: "fp16" value { string_value: "0" }') == 2
    out = render_repository(WHISPER_DIR, tmp_path / "trt", execution_provider="TensorrtExecutionProvider",
                            fp16=True, cpu_mem_arena=False, intra_op_threads=1)
    text = (out / "decoder" / "config.pbtxt").read_text()
    assert 'key: "fp16" value { string_value: "1" }' in text
    assert 'key: "cpu_mem_arena" value { string_value: "0" }' in text
    assert 'key: "intra_op_threads" value { string_value: "1" }' in text
    assert 'key: "execution_provider" value { string_value: "TensorrtExecutionProvider" }' in text


def test_render_writes_the_search_instance_count(tmp_path):
    if not (WHISPER_DIR / "model_info.json").is_file():
        pytest.skip("no exported whisper model (make export)")
    from model_repository.render import RenderError, render_repository

    def count(out):
        text = (out / "search" / "config.pbtxt").read_text()
        return int(text.split("instance_group")[1].split("count:")[1].split()[0])

    assert count(render_repository(WHISPER_DIR, tmp_path / "one", "int8")) == 1
    assert count(render_repository(WHISPER_DIR, tmp_path / "two", "int8", search_instance_count=2)) == 2
    with pytest.raises(RenderError, match="search_instance_count"):
        render_repository(WHISPER_DIR, tmp_path / "none", "int8", search_instance_count=0)


def test_bench_cer_normalises_script_and_numbers():
    from bench.speed import corpus_cer

    refs = ["我们二十多个人都在等钱过年。", "幸福家园五栋的电梯坏了"]
    hyps = ["我們20多個人都在等錢過年", "幸福家園5棟的電梯壞了"]
    assert corpus_cer(hyps, refs, normalised=True) == pytest.approx(0.0)
    assert corpus_cer(hyps, refs, normalised=False) > 30.0
    assert corpus_cer(["abc"], [""], normalised=True) == 0.0  # no reference characters: nothing to score


def test_bench_spec_parsing():
    from bench.speed import parse_spec

    assert parse_spec("int8") == ("ours-int8", "int8", {})
    name, precision, tunables = parse_spec("t1:fp32:intra_op_threads=1,cpu_mem_arena=false,windows=16")
    assert (name, precision) == ("ours-t1", "fp32")
    assert tunables == {"intra_op_threads": 1, "cpu_mem_arena": False, "windows": 16}
    # another export compared in the same run: a path, kept as text
    assert parse_spec("b:int8:model_dir=/tmp/other-export")[2] == {"model_dir": "/tmp/other-export"}


def test_bench_profile_table_per_window_and_per_step():
    from bench.speed import profile_table

    stats = {"encoder": {"requests": 4, "executions": 2, "queue_s": 2.0, "request_compute_s": 8.0,
                         "execution_compute_s": 4.0},
             "decoder": {"requests": 100, "executions": 50, "queue_s": 1.0, "request_compute_s": 4.0,
                         "execution_compute_s": 2.0}}
    prof = {"encoder": {"seconds": {"ort": 3.6}, "counts": {"windows": 4}},
            "decoder": {"seconds": {"execute": 2.0, "ort": 1.2, "init": 0.1, "kv": 0.2, "score": 0.3},
                        "counts": {"ort": 50, "rows": 100, "requests": 100}},
            "gateway": {"seconds": {"encoder": 8.0, "decoder": 10.0}, "counts": {"encoder": 4, "decoder": 100}}}
    t = profile_table(stats, prof)
    assert t["encoder_batch"] == 2.0 and t["window_encoder_ort_ms"] == 900.0
    assert t["window_triton_queue_ms"] == 500.0 and t["window_client_round_trip_ms"] == 2000.0
    assert t["decoder_batch"] == 2.0 and t["decoder_rows_per_ort_call"] == 2.0
    assert t["step_ort_ms"] == 13.0 and t["step_kv_cache_ms"] == 2.0 and t["step_engine_python_ms"] == 5.0
    assert t["step_triton_queue_ms"] == 10.0 and t["step_client_round_trip_ms"] == 100.0
    # outside Triton: 100 ms round trip - 10 ms queue - 40 ms (one execution) = 50 ms
    assert t["step_grpc_and_gateway_ms"] == 50.0


def test_memory_sampler_sums_a_process_tree():
    pytest.importorskip("psutil")
    import subprocess
    import sys

    from bench.machine import MemorySampler

    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        with MemorySampler([os.getpid()], period_s=0.05) as memory:
            for _ in range(100):
                memory.sample()
                if memory.peak_by_process and len(memory.peak_by_process) >= 2 and \
                        max(memory.peak_by_process.values()) > 0 and memory.peak_total > (64 << 20):
                    break
                import time
                time.sleep(0.05)
        summary = memory.summary()
        assert len(summary["peak_by_process_mb"]) >= 2  # this process and its child
        assert summary["peak_total_mb"] >= 64
    finally:
        child.kill()
        child.wait()


def test_memory_sampler_counts_shared_pages_once_in_pss():
    """A process with 64 MB written and a forked child sharing those pages: RSS summed counts them
    twice, PSS summed once."""
    pytest.importorskip("psutil")
    import subprocess
    import sys
    import time

    from bench.machine import MemorySampler

    code = ("import os, time\nx = bytearray(os.urandom(1 << 20) * 64)\nprint('ready', flush=True)\n"
            "os.fork()\ntime.sleep(30)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # the fork
        with MemorySampler([parent.pid], period_s=0.05) as memory:
            memory.sample()
        summary = memory.summary()
        assert len(summary["peak_by_process_mb"]) == 2
        assert summary["peak_total_mb"] >= 128
        assert summary["peak_total_pss_mb"] < 0.75 * summary["peak_total_mb"]
    finally:
        for child in __import__("psutil").Process(parent.pid).children():
            child.kill()
        parent.kill()
        parent.wait()


def test_memory_sampler_keeps_the_cpu_time_of_a_process_that_exited():
    """The gateway's idle decode workers exit mid-run: the CPU they used stays counted (a
    workload's diff of cpu_seconds() came out negative without it)."""
    pytest.importorskip("psutil")
    import subprocess
    import sys
    import time

    from bench.machine import MemorySampler

    code = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\ntime.sleep(0.3)\n"
    with MemorySampler([os.getpid()], period_s=0.05) as memory:
        before = memory.cpu_seconds()
        child = subprocess.Popen([sys.executable, "-c", code])
        child.wait()
        time.sleep(0.1)
        after = memory.cpu_seconds()
    used = sum(after.values()) - sum(before.values())
    assert used >= 0.3, f"the exited child's CPU time was lost: {before} -> {after}"


def test_perf_recording_session_writes_sequence_steps():
    from bench.perf import RecordingSession

    class Real:
        def __init__(self):
            self.calls, self.closed = [], False

        async def step(self, ids, parents, top_k, extra):
            self.calls.append((ids, parents, top_k))
            return "out"

        async def close(self):
            self.closed = True

    real = Real()
    enc = np.ones((4, 3), np.float32)
    session = RecordingSession(real, enc, [1, 2], [])

    async def search():
        assert await session.step(np.array([[5, 6, 7]]), None, 6) == "out"
        await session.step(np.array([[8], [9]]), np.array([0, 0]), 6)
        await session.close()

    asyncio.run(search())
    first, second = session.steps
    assert set(first) == {"input_ids", "top_k", "encoder_output", "suppress_ids"}
    assert first["input_ids"]["shape"] == [1, 3] and first["encoder_output"]["shape"] == [4, 3]
    assert np.frombuffer(base64.b64decode(first["encoder_output"]["b64"]), np.float32).tolist() == [1.0] * 12
    assert set(second) == {"input_ids", "top_k", "parent_beams"}
    assert np.frombuffer(base64.b64decode(second["parent_beams"]["b64"]), np.int32).tolist() == [0, 0]
    assert real.closed and len(real.calls) == 2


def test_perf_recording_client_writes_search_requests():
    from bench.perf import RecordingClient

    class Real:
        async def has_search(self, hotwords=False):
            return not hotwords

        async def search(self, encoder_output, options, **ids):
            return ("result", ids)

    recorder = RecordingClient(Real())
    enc = np.full((2, 3), 0.5, np.float32)

    async def run():
        assert await recorder.has_search() and not await recorder.has_search(hotwords=True)
        return await recorder.search(enc, {"prompt": [1, 2], "beam_size": 5}, request_id="w1-search")

    assert asyncio.run(run()) == ("result", {"request_id": "w1-search"})
    (request,) = recorder.searches
    # perf_analyzer input: encoder_output as base64 with its shape, options as one JSON string
    assert request["encoder_output"]["shape"] == [2, 3]
    assert np.frombuffer(base64.b64decode(request["encoder_output"]["b64"]), np.float32).tolist() == [0.5] * 6
    assert [json.loads(o) for o in request["options"]] == [{"prompt": [1, 2], "beam_size": 5}]


def test_step_profile_feeds_every_input_of_the_per_layer_step_graph():
    from types import SimpleNamespace

    from bench.step_profile import _feeds

    names = ["input_ids", "past_length", "past_k.0", "past_v.0", "cross_k.0", "cross_v.0"]
    session = SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name=n, shape=None) for n in names])
    info = {"n_heads": 2, "head_dim": 4, "n_audio_ctx": 6, "timestamp_begin": 9}
    feeds = _feeds(session, info, windows=3, beams=5, past=7, rng=np.random.default_rng(0))
    assert {k: v.shape for k, v in feeds.items()} == {
        "input_ids": (3, 5, 1), "past_length": (3,), "past_k.0": (3, 5, 2, 7, 4), "past_v.0": (3, 5, 2, 7, 4),
        "cross_k.0": (3, 2, 6, 4), "cross_v.0": (3, 2, 6, 4)}
    assert feeds["past_length"].tolist() == [7, 7, 7] and feeds["cross_k.0"].dtype == np.float32
    with pytest.raises(SystemExit, match="not known"):
        _feeds(SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name="mystery", shape=[1])]), info, 1, 5, 7,
               np.random.default_rng(0))
    # the int8 variant's 8-bit cross inputs (export/cross_int8.py), typed and shaped from the graph
    eight_bit = [SimpleNamespace(name="cross_k.0", shape=["N", 2, 4, "S"], type="tensor(uint8)"),
                 SimpleNamespace(name="cross_k_scale.0", shape=["N", 2, 1, "S"], type="tensor(float)"),
                 SimpleNamespace(name="cross_v.0", shape=["N", 2, "S", 4], type="tensor(uint8)"),
                 SimpleNamespace(name="cross_v_scale.0", shape=["N", 2, 1, 4], type="tensor(float)")]
    feeds = _feeds(SimpleNamespace(get_inputs=lambda: eight_bit), info, 3, 5, 7, np.random.default_rng(0))
    assert {k: (v.shape, v.dtype) for k, v in feeds.items()} == {
        "cross_k.0": ((3, 2, 4, 6), np.uint8), "cross_k_scale.0": ((3, 2, 1, 6), np.float32),
        "cross_v.0": ((3, 2, 6, 4), np.uint8), "cross_v_scale.0": ((3, 2, 1, 4), np.float32)}


def test_bench_corpus_ids_and_calls_rebuilt_when_the_labelled_audio_changes(tmp_path, monkeypatch):
    import importlib.util

    import soundfile as sf

    import bench.speed as speed

    spec = importlib.util.spec_from_file_location("synth_labelled", ROOT / "tools" / "synth_labelled.py")
    synth = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    spec.loader.exec_module(synth)
    assert synth.parse_ids("A001-A003,E220") == ["A001", "A002", "A003", "E220"]
    with pytest.raises(SystemExit, match="bad id range"):
        synth.parse_ids("A001-B003")
    assert [row["id"] for row in synth.by_ids(["B002", "A001"])] == ["B002", "A001"]

    audio = tmp_path / "labelled"
    audio.mkdir()
    tone = (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    for ticket_id in ("A001", "A002", "A003"):
        sf.write(audio / f"{ticket_id}.flac", tone, 16000)
    monkeypatch.setenv("BENCH_LABELLED_AUDIO", str(audio))
    first = speed.build_calls(2, tmp_path)
    assert sorted(first["references"]) == ["A001.flac", "A002.flac"] and "A001 .. A002" in first["note"]
    marker = tmp_path / "calls_2" / "marker"
    marker.touch()
    assert speed.build_calls(2, tmp_path) == first and marker.exists()  # the same calls: the folder reused
    (audio / "A001.flac").unlink()
    again = speed.build_calls(2, tmp_path)
    assert sorted(again["references"]) == ["A002.flac", "A003.flac"]
    # rebuilt from scratch: nothing of the old folder is left (the marker, the old A001 link)
    assert sorted(p.name for p in (tmp_path / "calls_2").iterdir()) == ["A002.flac", "A003.flac", "manifest.jsonl"]
