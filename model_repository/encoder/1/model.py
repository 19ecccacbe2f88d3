"""Triton Python-backend model `encoder`: ONNX Runtime over encoder.onnx with dynamic batching.

input_features FP32 [B, n_mels, frames] -> encoder_output FP32 [B, S, d] (docs/INTERFACES.md).
All requests of one execute() call are concatenated into a single ONNX Runtime run; a request
that cannot be served gets its own error response without failing the others.

The backend stub runs Python in isolated mode (PYTHONPATH is ignored): the engine package
(sessions, sys.path bootstrap) is found next to this file (or, in the source tree, in
model_repository/), and the directory with numpy (< 2) and onnxruntime comes from the
`pylib_dir` parameter of this model's config.pbtxt, else the ASR_TRITON_PYLIB environment
variable (engine/bootstrap.py).
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

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from engine.responses import error_response  # noqa: E402
from engine.config import enabled, param  # noqa: E402
from engine.heap import release_free_heap  # noqa: E402
from engine.profile import profiler  # noqa: E402
from engine.session import make_session  # noqa: E402


def _error_response(message: str, code: str = "INTERNAL"):
    return error_response(pb_utils, message, code)


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        self.config = json.loads(args["model_config"])
        for note in numpy_warning(_PYLIB):
            self.logger.log_warn(note)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_file = param(self.config, "onnx_file", "encoder.onnx")
        self.session = make_session(os.path.join(version_dir, onnx_file), self.config, self.logger)
        inp = self.session.get_inputs()[0]
        self.input_name = "input_features" if any(i.name == "input_features" for i in self.session.get_inputs()) \
            else inp.name
        meta = {i.name: i for i in self.session.get_inputs()}[self.input_name]
        # static trailing dims of the graph input (None where dynamic)
        self.feature_dims = [d if isinstance(d, int) and d > 0 else None for d in meta.shape[1:]]
        self.output_name = "encoder_output"  # name in config.pbtxt
        graph_outputs = [o.name for o in self.session.get_outputs()]
        self.graph_output = self.output_name if self.output_name in graph_outputs else graph_outputs[0]
        self.max_batch = int(self.config.get("max_batch_size", 0)) or None
        # windows per ONNX Runtime run (0: the whole batch at once): the attention activations
        # grow with it, the time per window does not shrink on a CPU (render.py)
        self.run_batch = max(0, int(param(self.config, "run_batch_size", "0") or 0))
        self.profile = profiler("encoder")  # None unless ASR_ENGINE_PROFILE_DIR is set
        if enabled(self.config, "warmup") and all(self.feature_dims):
            started = time.perf_counter()
            try:  # the first run of a session is slow: pay for it before serving
                self._run(np.zeros([1] + self.feature_dims, np.float32))
                self.logger.log_info(f"encoder warm-up {1e3 * (time.perf_counter() - started):.0f} ms")
            except Exception as error:  # noqa: BLE001 - only a warm-up
                self.logger.log_warn(f"encoder warm-up failed: {error!r}")
            release_free_heap()  # the warm-up's activations (about 70 MB)

    def _features(self, request) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, "input_features")
        if tensor is None:
            raise ValueError("input_features is required")
        x = tensor.as_numpy()
        if x.ndim != 1 + len(self.feature_dims) or x.shape[0] < 1:
            raise ValueError(f"input_features must be [B, {', '.join(str(d or '?') for d in self.feature_dims)}], "
                             f"got {list(x.shape)}")
        for got, want in zip(x.shape[1:], self.feature_dims):
            if want is not None and got != want:
                raise ValueError(f"input_features must be [B, {', '.join(str(d or '?') for d in self.feature_dims)}], "
                                 f"got {list(x.shape)}")
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError("input_features contains NaN or infinite values")
        return x

    def _run(self, x: np.ndarray) -> np.ndarray:
        """encoder_output of the batch x, run in slices of at most run_batch windows."""
        step = self.run_batch or x.shape[0]
        if x.shape[0] <= step:
            return self._run_slice(x)
        # the outputs are small (whisper base: 3 MB a window) beside the activations of one slice
        return np.concatenate([self._run_slice(x[i:i + step]) for i in range(0, x.shape[0], step)])

    def _run_slice(self, x: np.ndarray) -> np.ndarray:
        if self.profile is None:
            return self.session.run([self.graph_output], {self.input_name: x})[0]
        started = time.perf_counter()
        out = self.session.run([self.graph_output], {self.input_name: x})[0]
        self.profile.add("ort", time.perf_counter() - started)
        self.profile.count("windows", x.shape[0])
        return out

    def execute(self, requests):
        started = time.perf_counter()
        responses = [None] * len(requests)
        good, arrays = [], []
        for i, request in enumerate(requests):
            try:
                arrays.append(self._features(request))
                good.append(i)
            except Exception as error:  # noqa: BLE001 - reported to that request only
                responses[i] = _error_response(f"encoder: {error}", "INVALID_ARG")
        if good:
            shapes = {a.shape[1:] for a in arrays}
            outputs = None
            if len(shapes) == 1:
                batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
                try:
                    outputs = self._run(np.ascontiguousarray(batch))
                except Exception as error:  # noqa: BLE001
                    if len(arrays) == 1:
                        responses[good[0]] = _error_response(f"encoder: inference failed: {error}")
                        good, arrays = [], []
                    else:
                        self.logger.log_warn(f"encoder batch of {len(arrays)} failed ({error}); retrying one by one")
            if outputs is not None:
                offset = 0
                for i, a in zip(good, arrays):
                    n = a.shape[0]
                    out = outputs[offset:offset + n]
                    offset += n
                    responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, out)])
            else:
                for i, a in zip(good, arrays):
                    try:
                        out = self._run(np.ascontiguousarray(a))
                        responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, out)])
                    except Exception as error:  # noqa: BLE001
                        responses[i] = _error_response(f"encoder: inference failed: {error}")
        # the run's activations (arena off) go back to the system, not to an idle heap
        release_free_heap()
        if self.profile is not None:
            self.profile.add("execute", time.perf_counter() - started)
            self.profile.count("requests", len(requests))
        self.logger.log_verbose(
            f"encoder execute: {len(requests)} requests, batch {sum(a.shape[0] for a in arrays)}, "
            f"{(time.perf_counter() - started) * 1e3:.1f} ms")
        return responses

    def finalize(self):
        self.session = None
        if self.profile is not None:
            self.profile.close()
