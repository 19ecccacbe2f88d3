"""ONNX Runtime sessions for every model of the repository (encoder and decoder alike).

Execution provider, intra-op threads, spin-waiting and the CPU memory arena come from the model's
config parameters (`execution_provider`, `intra_op_threads`, `allow_spinning`, `cpu_mem_arena`); a provider this onnxruntime lacks
falls back to CPU with a warning instead of failing the model.

Loading a graph leaves freed parse buffers in the C heap (about 50 MB for the decoder_step graph):
they go back to the system once the session exists (heap.release_free_heap).
"""
import numpy as np
import onnxruntime as ort

from .compute_lock import LockedSession, compute_lock
from .config import param
from .heap import release_free_heap

CPU = "CPUExecutionProvider"
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def resolve_providers(requested: str, logger) -> list:
    """Requested execution provider(s) -> ORT providers list, falling back to CPU with a warning."""
    available = ort.get_available_providers()
    wanted = [p.strip() for p in (requested or CPU).split(",") if p.strip()]
    chosen = []
    for p in wanted:
        if p in available:
            chosen.append(p)
            if p == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
                chosen.append("CUDAExecutionProvider")  # TensorRT hands unsupported nodes to CUDA
        else:
            logger.log_warn(f"execution provider {p} is not available in this onnxruntime "
                            f"(available: {', '.join(available)}); falling back to {CPU}")
    if CPU not in chosen:
        chosen.append(CPU)
    return list(dict.fromkeys(chosen))


def make_session(path_or_bytes, config: dict, logger, label: str = "",
                 cpu_mem_arena: bool = None) -> "ort.InferenceSession":
    """A session for a graph file (or serialized graph) with the model's provider and threads.

    cpu_mem_arena: overrides the model's `cpu_mem_arena` parameter for this session."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    threads = int(param(config, "intra_op_threads", "0") or 0)
    if threads > 0:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    spinning = param(config, "allow_spinning", "0") in ("1", "true", "True")  # off unless asked: burns idle CPU
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # the CPU arena keeps the largest activations of any run (encoder batches: hundreds of MB) for
    # good; without it (and without memory patterns, which preallocate through it) the memory goes
    # back after each run
    if cpu_mem_arena is None:
        cpu_mem_arena = param(config, "cpu_mem_arena", "1") not in ("0", "false", "False")
    if not cpu_mem_arena:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    providers = resolve_providers(param(config, "execution_provider", CPU), logger)
    if param(config, "fp16", "0") in ("1", "true", "True"):  # TensorRT builds fp16 engines from fp32 graphs
        providers = [("TensorrtExecutionProvider", {"trt_fp16_enable": True}) if p == "TensorrtExecutionProvider"
                     else p for p in providers]
    session = ort.InferenceSession(path_or_bytes, options, providers=providers)
    release_free_heap()
    lock = compute_lock(config) if session.get_providers() == [CPU] else None
    logger.log_info(f"loaded {label or path_or_bytes} with providers {session.get_providers()} "
                    f"(intra_op_threads={threads or 'auto'}, spinning={int(spinning)}, "
                    f"cpu_mem_arena={int(options.enable_cpu_mem_arena)}"
                    f"{f', compute lock {lock.path}' if lock is not None else ''})")
    return session if lock is None else LockedSession(session, lock)


def input_type(session, name: str, default=np.float32):
    """numpy dtype of a graph input (float types only; `default` otherwise)."""
    meta = {i.name: i for i in session.get_inputs()}[name]
    return ORT_TYPES.get(meta.type, default)
