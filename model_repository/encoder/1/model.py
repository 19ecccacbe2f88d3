"""Triton Python-backend model `encoder`: ONNX Runtime over encoder.onnx with dynamic batching.

input_features FP32 [B, n_mels, frames] -> encoder_output FP32 [B, S, d] (docs/INTERFACES.md).
All requests of one execute() call are concatenated into a single ONNX Runtime run; a request
that cannot be served gets its own error response without failing the others.

The backend stub runs Python in isolated mode (PYTHONPATH is ignored), so the directory with
numpy (< 2) and onnxruntime is put on sys.path first: the `pylib_dir` parameter of this
model's config.pbtxt, else the ASR_TRITON_PYLIB environment variable.
"""
import os
import re
import sys

PYLIB_ENV = "ASR_TRITON_PYLIB"


def _add_pylib() -> str:
    candidates = []
    try:
        config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config.pbtxt")
        with open(config, encoding="utf-8") as f:
            match = re.search(r'key:\s*"pylib_dir"\s*value\s*:?\s*\{\s*string_value:\s*"([^"]*)"', f.read())
        if match:
            candidates.append(match.group(1))
    except (OSError, NameError):
        pass
    candidates.append(os.environ.get(PYLIB_ENV, ""))
    for path in candidates:
        if path and os.path.isdir(path):
            if path not in sys.path:
                sys.path.insert(0, path)
            return path
    return ""


_PYLIB = _add_pylib()

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _param(config: dict, key: str, default: str = "") -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value not in ("", None) else default


def resolve_providers(requested: str, logger) -> list:
    """Requested execution provider(s) -> ORT providers list, falling back to CPU with a warning."""
    available = ort.get_available_providers()
    wanted = [p.strip() for p in (requested or "CPUExecutionProvider").split(",") if p.strip()]
    chosen = []
    for p in wanted:
        if p in available:
            chosen.append(p)
            if p == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
                chosen.append("CUDAExecutionProvider")
        else:
            logger.log_warn(f"execution provider {p} is not available in this onnxruntime "
                            f"(available: {', '.join(available)}); falling back to CPUExecutionProvider")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return list(dict.fromkeys(chosen))


def make_session(path: str, config: dict, logger) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    threads = int(_param(config, "intra_op_threads", "0") or 0)
    if threads > 0:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    spinning = _param(config, "allow_spinning", "0") in ("1", "true", "True")
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    providers = resolve_providers(_param(config, "execution_provider", "CPUExecutionProvider"), logger)
    session = ort.InferenceSession(path, options, providers=providers)
    logger.log_info(f"loaded {path} with providers {session.get_providers()} "
                    f"(intra_op_threads={threads or 'auto'}, spinning={int(spinning)})")
    return session


def error_response(message: str, code: str = "INTERNAL"):
    try:
        error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    except (AttributeError, TypeError):  # older backends: message only
        error = pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        self.config = json.loads(args["model_config"])
        if not _PYLIB:
            self.logger.log_warn(f"no pylib_dir parameter / {PYLIB_ENV}: importing numpy/onnxruntime from the "
                                 "system Python")
        if int(np.__version__.split(".")[0]) >= 2:
            self.logger.log_warn(f"numpy {np.__version__} in the backend stub: the Python backend needs numpy < 2")
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_file = _param(self.config, "onnx_file", "encoder.onnx")
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
        if _param(self.config, "warmup", "1") not in ("0", "false", "False") and all(self.feature_dims):
            started = time.perf_counter()
            try:  # the first run of a session is slow: pay for it before serving
                self._run(np.zeros([1] + self.feature_dims, np.float32))
                self.logger.log_info(f"encoder warm-up {1e3 * (time.perf_counter() - started):.0f} ms")
            except Exception as error:  # noqa: BLE001 - only a warm-up
                self.logger.log_warn(f"encoder warm-up failed: {error!r}")

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
        return self.session.run([self.graph_output], {self.input_name: x})[0]

    def execute(self, requests):
        started = time.perf_counter()
        responses = [None] * len(requests)
        good, arrays = [], []
        for i, request in enumerate(requests):
            try:
                arrays.append(self._features(request))
                good.append(i)
            except Exception as error:  # noqa: BLE001 - reported to that request only
                responses[i] = error_response(f"encoder: {error}", "INVALID_ARG")
        if good:
            shapes = {a.shape[1:] for a in arrays}
            outputs = None
            if len(shapes) == 1:
                batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
                try:
                    outputs = self._run(np.ascontiguousarray(batch))
                except Exception as error:  # noqa: BLE001
                    if len(arrays) == 1:
                        responses[good[0]] = error_response(f"encoder: inference failed: {error}")
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
                        responses[i] = error_response(f"encoder: inference failed: {error}")
        self.logger.log_verbose(
            f"encoder execute: {len(requests)} requests, batch {sum(a.shape[0] for a in arrays)}, "
            f"{(time.perf_counter() - started) * 1e3:.1f} ms")
        return responses

    def finalize(self):
        self.session = None
