"""What keeps the stack's memory down (issue 13, README Performance): the settings render.py
writes, the decoder step graph deployed split per layer and loaded from its file, decoder_init
without the CPU arena, the gateway's analyzer loaded only when asked, and a decoder worker that
imports only what a decode needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _param(config_text: str, key: str) -> str:
    marker = f'key: "{key}" value {{ string_value: "'
    start = config_text.index(marker) + len(marker)
    return config_text[start:config_text.index('"', start)]


@pytest.fixture(scope="module")
def rendered(model_dir, tmp_path_factory):
    from model_repository.render import render_repository

    return render_repository(model_dir, tmp_path_factory.mktemp("repository"), "fp32")


def test_render_writes_the_memory_settings(rendered, model_dir, tmp_path):
    from model_repository.render import render_repository

    encoder = (rendered / "encoder" / "config.pbtxt").read_text(encoding="utf-8")
    decoder = (rendered / "decoder" / "config.pbtxt").read_text(encoding="utf-8")
    assert _param(encoder, "run_batch_size") == "1"  # CPU: one window per ONNX Runtime run
    assert "max_batch_size: 8" in encoder  # ... while Triton still batches the requests
    assert _param(decoder, "init_cpu_mem_arena") == "0"
    assert _param(decoder, "cpu_mem_arena") == "1"
    assert _param(decoder, "buffer_pool_mb") == "64"
    gpu = render_repository(model_dir, tmp_path / "trt", "fp32", execution_provider="TensorrtExecutionProvider",
                            split_layer_inputs=False)
    assert _param((gpu / "encoder" / "config.pbtxt").read_text(encoding="utf-8"), "run_batch_size") == "8"


def test_the_step_graph_is_deployed_split_per_layer_and_rerendering_keeps_it(rendered, model_dir, tmp_path):
    import onnx

    from model_repository.render import render_repository

    source = model_dir / "onnx" / "fp32" / "decoder_step.onnx"
    deployed = rendered / "decoder" / "1" / "decoder_step.onnx"
    assert not os.path.samefile(source, deployed)  # a file of its own, never written through a link
    inputs = {i.name for i in onnx.load(str(deployed), load_external_data=False).graph.input}
    assert {"cross_k.0", "cross_v.0", "past_k.0", "past_v.0"} <= inputs and "cross_k" not in inputs
    assert (rendered / "decoder" / "1" / "decoder_step.onnx.split.json").is_file()
    before = deployed.stat().st_mtime_ns
    render_repository(model_dir, rendered, "fp32")
    assert deployed.stat().st_mtime_ns == before  # same source: nothing written
    plain = render_repository(model_dir, tmp_path / "plain", "fp32", split_layer_inputs=False)
    assert os.path.samefile(source, plain / "decoder" / "1" / "decoder_step.onnx")  # linked as before
    assert not (plain / "decoder" / "1" / "decoder_step.onnx.split.json").exists()


def test_the_engine_loads_the_split_graph_from_its_file_and_init_without_arena(rendered):
    from model_repository.engine.decoder import DecoderEngine
    from tests.test_decoder_engine import Log

    text = (rendered / "decoder" / "config.pbtxt").read_text(encoding="utf-8")
    params = {k: _param(text, k) for k in ("family", "cpu_mem_arena", "init_cpu_mem_arena", "buffer_pool_mb",
                                          "split_layer_inputs")}
    config = {"parameters": {k: {"string_value": v} for k, v in {**params, "warmup": "0"}.items()}}
    log = Log()
    engine = DecoderEngine(str(rendered / "decoder" / "1"), config, log)
    try:
        runner = engine.runner
        assert set(runner.split) == {"past_k", "past_v", "cross_k", "cross_v"} and len(set(runner.split.values())) == 1
        assert runner.cross_views
        assert runner.step_session.get_session_options().enable_cpu_mem_arena
        assert not runner.init_session.get_session_options().enable_cpu_mem_arena
        assert engine.pool.max_bytes == 64 << 20
        assert not any("stacked" in message or "missing" in message for _, message in log.lines)
    finally:
        engine.close()


def test_the_int8_repository_feeds_its_8bit_cross_tensors_per_layer_as_views(model_dir, tmp_path):
    from model_repository.engine.decoder import DecoderEngine
    from model_repository.render import render_repository
    from tests.test_decoder_engine import Log, encoder_output, new_step, run

    repo = render_repository(model_dir, tmp_path / "int8", "int8")
    text = (repo / "decoder" / "config.pbtxt").read_text(encoding="utf-8")
    params = {k: _param(text, k) for k in ("family", "split_layer_inputs")}
    config = {"parameters": {k: {"string_value": v} for k, v in {**params, "warmup": "0"}.items()}}
    engine = DecoderEngine(str(repo / "decoder" / "1"), config, Log())
    try:
        runner = engine.runner
        assert set(runner.split) == {"past_k", "past_v", "cross_k", "cross_v", "cross_k_scale", "cross_v_scale"}
        assert runner.cross_views and runner.cross_inputs == {"cross_k", "cross_v", "cross_k_scale", "cross_v_scale"}
        prefix = [[50258, 50260, 50359, 50363]]
        steps = run(engine, *[new_step(engine, 1 + i, prefix, start=True, encoder_output=encoder_output(i))
                              for i in range(2)])
        assert [s.error for s in steps] == [None, None]
        assert engine.table.cross.arrays["cross_k"].dtype == np.uint8  # a quarter of the float bytes
        steps = run(engine, *[new_step(engine, 1 + i, [[int(s.output.topk_ids[0, 0, 0])]]) for i, s in enumerate(steps)])
        assert [s.error for s in steps] == [None, None] and all(np.isfinite(s.output.topk_logprobs).all() for s in steps)
    finally:
        engine.close()


class _FakeAnalyzer:
    loaded = 0

    def __init__(self, config) -> None:
        type(self).loaded += 1


def test_the_gateway_loads_the_analyzer_only_when_asked(tmp_path, monkeypatch):
    import analysis.analyzer

    from gateway.service.ticket_service import TicketNotFound, TicketService

    monkeypatch.setattr(analysis.analyzer, "TicketAnalyzer", _FakeAnalyzer)
    lazy = TicketService(tmp_path / "lazy.sqlite", preload_analyzer=False)
    lazy.warm_up()
    assert not lazy.analyzer_loaded and (tmp_path / "lazy.sqlite").exists()  # the history opens at start
    with pytest.raises(TicketNotFound):
        lazy.correct_sync("HL-none", "category", "其他", "tester")  # corrections need no analyzer
    assert not lazy.analyzer_loaded and _FakeAnalyzer.loaded == 0
    lazy._open()  # the first analysis
    assert lazy.analyzer_loaded and _FakeAnalyzer.loaded == 1
    eager = TicketService(tmp_path / "eager.sqlite", preload_analyzer=True)
    eager.warm_up()
    assert eager.analyzer_loaded and _FakeAnalyzer.loaded == 2


def test_the_gateway_loads_the_analyzer_lazily_by_default(model_dir):
    """README: the analyzer loads at the first analysis unless --preload-analysis."""
    from gateway.service.server import GatewayConfig

    assert GatewayConfig(model_dir=model_dir).preload_analysis is False


def test_decoder_workers_import_neither_asyncio_nor_the_metrics():
    code = ("import sys; import gateway.service.decode_worker; "
            "print(sorted(m for m in ('asyncio', 'prometheus_client', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "[]"


def test_heap_settings_reach_glibc_only_when_asked():
    """engine/heap.py configure_heap: nothing by default; a threshold and an arena cap are set
    through mallopt (in a child process: it changes the process's allocator)."""
    code = (
        "import sys; sys.path.insert(0, 'model_repository')\n"
        "from engine.heap import configure_heap\n"
        "print(configure_heap(0, 0)); print(configure_heap(16 << 20, 2))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.splitlines() == ["[]", "['mmap threshold 16 MB', '2 malloc arenas']"]


def test_render_writes_the_heap_settings(model_dir, tmp_path):
    from model_repository.render import RenderError, render_repository

    # values other than the defaults (threshold 0, 2 arenas), so the test sees them pass through
    repo = render_repository(model_dir, tmp_path / "heap", "int8", heap_mmap_threshold_mb=16, heap_arena_max=3,
                             search_cancel_poll_ms=50, search_heap_trim_ms=700)
    for model in ("decoder", "search"):
        text = (repo / model / "config.pbtxt").read_text(encoding="utf-8")
        assert (_param(text, "heap_mmap_threshold_mb"), _param(text, "heap_arena_max")) == ("16", "3")
    search = (repo / "search" / "config.pbtxt").read_text(encoding="utf-8")
    assert (_param(search, "cancel_poll_ms"), _param(search, "heap_trim_ms")) == ("50", "700")
    for key in ("search_cancel_poll_ms", "search_heap_trim_ms"):
        with pytest.raises(RenderError, match=key):
            render_repository(model_dir, tmp_path / "bad", "int8", **{key: -1})


def test_the_gateway_caps_its_malloc_arenas_unless_told_not_to():
    """gateway/service/heap.py: mallopt(M_ARENA_MAX) takes a cap, 0 leaves glibc's default (in a
    child process: it changes the process's allocator)."""
    code = "from gateway.service.heap import cap_malloc_arenas as cap; print(cap(0), cap(2))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.split() == ["False", "True"]
