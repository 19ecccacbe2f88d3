"""Triton Python-backend model `decoder`: stateful decoder (docs/INTERFACES.md).

A thin adapter: Triton requests -> engine Steps -> Triton responses. Everything else (sequence
state, KV caches, batching plan, logit rules, top-k, the per-family step runners) is the
Triton-free engine package (model_repository/engine/, deployed by render.py next to this file;
see engine/decoder.py). The sequence batcher (`oldest` strategy) hands execute() steps of
several sequences at once; the engine runs them together.

The backend stub runs Python in isolated mode (PYTHONPATH is ignored): the engine is found next
to this file (or, in the source tree, in model_repository/), and the directory holding numpy
(< 2) and onnxruntime comes from the `pylib_dir` parameter of config.pbtxt, else from the
ASR_TRITON_PYLIB environment variable (engine/bootstrap.py).
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _root in (_HERE, os.path.dirname(os.path.dirname(_HERE))):  # deployed, source tree
    if os.path.isfile(os.path.join(_root, "engine", "__init__.py")):
        if _root not in sys.path:
            sys.path.insert(0, _root)
        break

from engine.bootstrap import add_pylib, numpy_warning  # noqa: E402

_PYLIB = add_pylib(os.path.join(os.path.dirname(_HERE), "config.pbtxt"))

import json  # noqa: E402
import time  # noqa: E402

import triton_python_backend_utils as pb_utils  # noqa: E402
from engine.responses import error_response  # noqa: E402
from engine.config import enabled  # noqa: E402
from engine.decoder import DecoderEngine  # noqa: E402
from engine.heap import release_free_heap  # noqa: E402
from engine.state import Step  # noqa: E402
from engine.step_input import INPUT_NAMES  # noqa: E402

START_FLAG, END_FLAG = 1, 2  # request.flags() bits when START/END come as flags, not tensors


def _flag(request, name: str, bit: int) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is not None:
        value = tensor.as_numpy()
        return bool(value.size and value.reshape(-1)[0])
    flags = getattr(request, "flags", None)
    return bool(flags() & bit) if callable(flags) else False


def _inputs(request) -> dict:
    """{name: numpy array} of the inputs the request carries."""
    found = {}
    for name in INPUT_NAMES:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            found[name] = tensor.as_numpy()
    return found


def _error_response(message: str, code: str):
    return error_response(pb_utils, message, code)


def _response(step):
    if step.error is not None:
        return _error_response(f"decoder: {step.error}", step.code)
    out = step.output
    return pb_utils.InferenceResponse([
        pb_utils.Tensor("topk_logprobs", out.topk_logprobs),
        pb_utils.Tensor("topk_ids", out.topk_ids),
        pb_utils.Tensor("extra_logprobs", out.extra_logprobs),
    ])


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        for note in numpy_warning(_PYLIB):
            self.logger.log_warn(note)
        self._engine_args = (os.path.join(args["model_repository"], args["model_version"]), config, self.logger)
        self.engine = self._load()  # the graphs load now: a model that cannot fails here, saying why
        if enabled(config, "load_on_first_use", "0"):
            # where the `search` model serves the windows this one waits for language detection or
            # a --stepwise-only gateway: its sessions (about 100 MB int8, 300 MB fp32) go back
            # until then, and the first request loads them again (a second or two)
            self.engine.close()
            self.engine = None
            release_free_heap()
            self.logger.log_info("decoder: graphs checked; loaded again on the first request (load_on_first_use)")

    def _load(self) -> DecoderEngine:
        try:
            engine = DecoderEngine(*self._engine_args)
        except Exception as error:  # the graphs do not fit: the model fails to load, saying why
            raise pb_utils.TritonModelException(f"decoder: {error}") from error
        engine.start_janitor()
        return engine

    def _step(self, index: int, request) -> Step:
        step = Step(index)
        try:
            step.cid = request.correlation_id()
            step.start = _flag(request, "START", START_FLAG)
            step.end = _flag(request, "END", END_FLAG)
            self.engine.parse(step, _inputs(request))
        except Exception as error:  # noqa: BLE001 - reported to that request only
            self.engine.fail(step, error)
        return step

    def execute(self, requests):
        if self.engine is None:
            started = time.perf_counter()
            try:
                self.engine = self._load()
            except pb_utils.TritonModelException as error:  # (its graphs were fine at load time)
                return [_error_response(str(error), "INTERNAL") for _ in requests]
            self.logger.log_info(f"decoder: graphs loaded on the first request in {time.perf_counter() - started:.1f} s")
        steps = [self._step(i, request) for i, request in enumerate(requests)]
        self.engine.execute(steps)
        return [_response(step) for step in steps]

    def finalize(self):
        if self.engine is not None:
            self.engine.close()
