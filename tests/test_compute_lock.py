"""One ONNX Runtime run at a time across the stubs of a CPU-only server
(model_repository/engine/compute_lock.py): the lock excludes other processes, sessions made
with it hold it while they run, and render.py turns it on for the CPU provider only."""
from __future__ import annotations

import multiprocessing
import os

import numpy as np

from model_repository.engine import compute_lock as cl
from model_repository.engine.session import make_session
from tests.test_bench_perf import config, tiny_graph
from tests.test_decoder_engine import Log


def _hold(path: str, marker: str, held, release) -> None:
    lock = cl.ComputeLock(path)
    with lock:
        held.set()
        release.wait(30)
        with open(marker, "w") as f:  # written while still holding the lock
            f.write("released")


def test_the_lock_excludes_another_process(tmp_path):
    path, marker = str(tmp_path / "compute.lock"), str(tmp_path / "marker")
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(path, marker, held, release))
    child.start()
    try:
        assert held.wait(60), "the child never took the lock"
        release.set()
        with cl.ComputeLock(path):  # only once the child let go
            assert os.path.exists(marker), "the lock was taken while another process held it"
    finally:
        child.join(30)
    assert child.exitcode == 0


def test_sessions_run_under_the_lock_when_the_config_asks(tmp_path, monkeypatch):
    graph = tiny_graph()  # y = relu(x)
    monkeypatch.setattr(cl, "server_lock_path", lambda: str(tmp_path / "server.lock"))
    locked = make_session(graph, config(compute_lock="1"), Log())
    plain = make_session(graph, config(compute_lock="0"), Log())
    assert isinstance(locked, cl.LockedSession) and not isinstance(plain, cl.LockedSession)
    assert [i.name for i in locked.get_inputs()] == ["x"]  # the session's API is there
    x = np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(locked.run(None, {"x": x})[0], x)

    taken = []
    real = cl.ComputeLock.__enter__

    def enter(lock):
        taken.append(lock.path)
        return real(lock)

    monkeypatch.setattr(cl.ComputeLock, "__enter__", enter)
    locked.run(None, {"x": x})
    plain.run(None, {"x": x})
    assert taken == [str(tmp_path / "server.lock")]  # the locked session only


def test_render_turns_the_lock_on_by_default_for_the_cpu_provider_on_few_cores_only(tmp_path, model_dir,
                                                                                     monkeypatch):
    from model_repository.engine.compute_lock import LOCK_MAX_CORES
    from model_repository.render import render_repository

    fast = {"precision": "fp32", "split_layer_inputs": False}  # graphs hard-linked, not rewritten
    monkeypatch.setattr("os.cpu_count", lambda: LOCK_MAX_CORES)
    cpu = render_repository(model_dir, tmp_path / "cpu", **fast)  # the default
    gpu = render_repository(model_dir, tmp_path / "gpu", execution_provider="CUDAExecutionProvider", **fast)
    off = render_repository(model_dir, tmp_path / "off", cpu_compute_lock=False, **fast)
    monkeypatch.setattr("os.cpu_count", lambda: LOCK_MAX_CORES * 4)
    many = render_repository(model_dir, tmp_path / "many", **fast)
    forced = render_repository(model_dir, tmp_path / "forced", cpu_compute_lock=True, **fast)
    line = 'key: "compute_lock" value { string_value: "%s" }'
    for model in ("encoder", "decoder", "search"):
        assert line % "1" in (cpu / model / "config.pbtxt").read_text()
        assert line % "0" in (gpu / model / "config.pbtxt").read_text()
        assert line % "0" in (off / model / "config.pbtxt").read_text()
        assert line % "0" in (many / model / "config.pbtxt").read_text()
        assert line % "1" in (forced / model / "config.pbtxt").read_text()
