"""Triton Python-backend model `decoder`: stateful Whisper-family decoder (docs/INTERFACES.md).

One request is one decoding step of one sequence (all its K beams); the sequence batcher
(`oldest` strategy) hands execute() steps of several sequences at once. The model keeps, per
correlation id:
  - the cross-attention K/V computed by decoder_init.onnx from encoder_output at START,
  - the self-attention KV cache ([L, K, H, P, dh] per sequence),
  - the suppress lists and the step count.
Each step reorders the cache by parent_beams, groups the requests of this call by (K, T) and
runs decoder_step.onnx once per group (past padded to the group's longest, past_length masks
the rest; see _plan for the rare split of a group), appends the new K/V, and returns top-k
log-probs (log_softmax after suppression) plus the log-probs of requested extra ids. END frees
the sequence; sequences idle longer than sequence_idle_timeout_s are evicted; at most
max_sequences are held.

Memory layout (on CPU the cost that matters is copying caches, not arithmetic):
  - decoder_step.onnx is loaded with one input per layer for the stacked K/V (see
    split_layer_inputs): ONNX Runtime would otherwise copy every layer out of the stack on
    every step;
  - cross K/V of all live sequences live in one store [L, R, H, S, dh] with the live sequences
    in rows [0, n); a batch whose rows are consecutive is fed as views (no copy); a few missing
    rows are filled with dummy rows (computed and dropped), a batch split into a few runs of
    consecutive rows runs as that many calls, a more fragmented one copies its rows together;
  - the self-attention caches of the sequences that ran together share a slab with the
    graph's layout [L, N, K, H, cap, dh]; the same batch again without reordering runs on it in
    place (new tokens go into spare capacity), otherwise one gather copy (the parent_beams
    reorder folded in) builds the next slab; released slabs go to a buffer pool instead of
    fresh page-faulted memory.

Family switch (config parameter `family`; only the graph-running layer differs, the cache, beam
and top-k machinery is shared):
  - whisper: START runs decoder_init.onnx (cross-attention K/V kept per sequence); every step
    feeds token ids to decoder_step.onnx;
  - glm_asr: no cross-attention. Every step embeds its ids with embed_tokens.onnx; in a START
    request the positions holding the audio placeholder (`audio_token_id` parameter) get the
    rows of encoder_output (the audio embeddings, one per placeholder, in order); the step graph
    runs on inputs_embeds.

The backend stub runs Python in isolated mode (PYTHONPATH is ignored): the directory holding
numpy (< 2) and onnxruntime comes from the `pylib_dir` parameter of config.pbtxt, else from
the ASR_TRITON_PYLIB environment variable.
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
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

NEG_INF = np.float32(-np.inf)
CAP_STEP = 16          # self-attention cache capacity grows in multiples of this many positions
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


# --------------------------------------------------------------------------- ORT helpers
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


def make_session(path, config: dict, logger, label: str = "") -> "ort.InferenceSession":
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
    logger.log_info(f"loaded {label or path} with providers {session.get_providers()} "
                    f"(intra_op_threads={threads or 'auto'}, spinning={int(spinning)})")
    return session


LAYER_STACKED = ("past_k", "past_v", "cross_k", "cross_v")


def split_layer_inputs(model) -> dict:
    """Rewrite decoder_step so each layer's K/V is its own graph input ("cross_k.3" [N, H, S, dh]).

    The contract's graph takes K/V stacked over layers ([L, ...]) and picks layer l with
    Gather(axis 0): ONNX Runtime copies every layer out of the stack on every step (for the
    cross-attention K/V that is all of it: about 37 MB per sequence per step for Whisper base,
    more than half of a batched step). With one input per layer the slices of the stored
    [L, N, ...] cache (contiguous views) are fed without any copy. Returns {input: L} for the
    inputs rewritten; an input used any other way is left alone.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    for init in graph.initializer:
        if not init.dims:
            consts[init.name] = numpy_helper.to_array(init)
    done = {}
    for name in LAYER_STACKED:
        inp = next((i for i in graph.input if i.name == name), None)
        users = [n for n in graph.node if name in n.input]
        if inp is None or not users or any(o.name == name for o in graph.output):
            continue
        layer_of = {}
        for node in users:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if (node.op_type != "Gather" or node.input[0] != name or list(node.input).count(name) != 1
                    or axis != 0 or node.input[1] not in consts or consts[node.input[1]].ndim != 0):
                layer_of = None
                break
            layer_of[node.output[0]] = int(consts[node.input[1]])
        if not layer_of:
            continue
        dims = inp.type.tensor_type.shape.dim
        n_layers = max(layer_of.values()) + 1
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value != n_layers:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims[1:]]
        rename = {out: f"{name}.{layer}" for out, layer in layer_of.items()}
        for node in graph.node:
            for i, x in enumerate(node.input):
                if x in rename:
                    node.input[i] = rename[x]
        for node in users:
            graph.node.remove(node)
        position = list(graph.input).index(inp)
        graph.input.remove(inp)
        for layer in range(n_layers):
            graph.input.insert(position + layer, helper.make_tensor_value_info(
                f"{name}.{layer}", inp.type.tensor_type.elem_type, shape))
        done[name] = n_layers
    if done:  # drop the layer-index constants nobody reads any more
        used = {x for node in graph.node for x in node.input} | {o.name for o in graph.output}
        for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
            graph.node.remove(node)
    return done


def topk_rows(x: np.ndarray, k: int):
    """Top-k (ids, values) of every row of x [R, V], sorted best first (ties: lower id first).

    Faster than argpartition over the vocabulary: a threshold from strided block maxima keeps
    only a handful of candidates per row, which are then sorted.
    """
    rows, vocab = x.shape
    k = min(k, vocab)
    nb = vocab // 64
    if k * 4 <= nb and rows > 0:
        bm = x[:, :nb * 64].reshape(rows, 64, nb).max(axis=1)
        if vocab % 64:
            bm = np.concatenate([bm, x[:, nb * 64:].max(axis=1, keepdims=True)], axis=1)
        thr = np.partition(bm, bm.shape[1] - k, axis=1)[:, bm.shape[1] - k]
        flat = np.flatnonzero(x >= thr[:, None])
        r = flat // vocab
        counts = np.bincount(r, minlength=rows)
        if counts.min() >= k and flat.size <= 64 * k * rows + 4096:
            cols = flat - r * vocab
            vals = x.reshape(-1)[flat]
            order = np.lexsort((-vals, r))
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            idx = starts[:, None] + np.arange(k)
            return cols[order][idx], vals[order][idx]
    # general path (NaNs, huge k, ...)
    if k < vocab:
        part = np.argpartition(x, vocab - k, axis=1)[:, vocab - k:]
    else:
        part = np.broadcast_to(np.arange(vocab), x.shape)
    vals = np.take_along_axis(x, part, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), np.take_along_axis(vals, order, 1)


# --------------------------------------------------------------------------- state
class RequestError(Exception):
    """A problem with one request: reported to its client, never fails the others.

    code: the TritonError code the client sees (INVALID_ARG -> gRPC INVALID_ARGUMENT, ...)."""

    def __init__(self, message: str, code: str = "INVALID_ARG"):
        super().__init__(message)
        self.code = code


class _Pool:
    """Released cache buffers (flat arrays) for reuse.

    Fresh memory is expensive (page faults on first touch: tens of ms per 100 MB, far more in a
    VM), and every beam-search step builds a new cache slab, so buffers are recycled: get()
    takes the smallest free buffer that is large enough, and new buffers get 25% headroom so a
    cache that grows by a few positions still fits next time.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.free = []
        self.bytes = 0

    def get(self, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape))
        dtype = np.dtype(dtype)
        best = -1
        for i, buf in enumerate(self.free):
            if buf.dtype == dtype and buf.size >= n and (best < 0 or buf.size < self.free[best].size):
                best = i
        if best >= 0:
            buf = self.free.pop(best)
            self.bytes -= buf.nbytes
        else:
            buf = np.empty(n + n // 4, dtype)
        return buf[:n].reshape(shape)

    def put(self, arr: np.ndarray) -> None:
        while isinstance(arr.base, np.ndarray) and arr.base.dtype == arr.dtype and arr.base.flags.c_contiguous:
            arr = arr.base
        if not arr.flags.c_contiguous or not arr.flags.writeable or arr.nbytes > self.max_bytes:
            return
        self.free.append(arr.reshape(-1))
        self.bytes += arr.nbytes
        while self.bytes > self.max_bytes and self.free:
            self.bytes -= self.free.pop(0).nbytes


class _Slab:
    """K/V arrays shared by the sequences of one group: member n is row n of axis 1."""
    __slots__ = ("k", "v", "live", "cap")

    def __init__(self, k, v, cap=0):
        self.k, self.v, self.live, self.cap = k, v, 0, cap


class _Seq:
    __slots__ = ("cid", "row", "kv", "kv_idx", "length", "beams", "suppress",
                 "begin_suppress", "steps", "last_used", "ts_rules", "history", "ts_pending")

    def __init__(self, cid, suppress, begin_suppress, now):
        self.cid = cid
        self.row = None     # row of the cross-attention K/V store
        self.kv = None      # self-attention cache slab and row in it
        self.kv_idx = 0
        self.length = 0
        self.beams = 0
        self.suppress = suppress
        self.begin_suppress = begin_suppress
        self.steps = 0
        self.last_used = now
        self.ts_rules = None    # Whisper timestamp rules (timestamp_rules input), see _timestamp_rules
        self.history = None     # [K, n] tokens generated so far per beam (timestamp rules only)
        self.ts_pending = None  # (step, history) of a step not yet known to be committed


class _Req:
    __slots__ = ("index", "cid", "start", "end", "ids", "K", "T", "parents", "top_k", "extra", "enc",
                 "suppress", "begin", "seq", "response", "error", "code", "ts_rules")

    def __init__(self, index):
        self.index = index
        self.cid = None
        self.start = self.end = False
        self.ids = self.parents = self.extra = self.enc = self.suppress = self.begin = None
        self.K = self.T = 0
        self.top_k = 5
        self.seq = self.response = self.error = None
        self.code = "INTERNAL"
        self.ts_rules = None


def _flag(request, name: str, bit: int) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is not None:
        value = tensor.as_numpy()
        return bool(value.size and value.reshape(-1)[0])
    flags = getattr(request, "flags", None)
    return bool(flags() & bit) if callable(flags) else False


def _error_response(message: str, code: str = "INTERNAL"):
    try:
        error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    except (AttributeError, TypeError):  # older backends: message only
        error = pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


# --------------------------------------------------------------------------- model
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
        cfg = self.config
        self.family = _param(cfg, "family", "whisper")
        self.embeds = self.family == "glm_asr"  # family switch: see the module docstring
        self.init_session = self.embed_session = None
        if self.embeds:
            self.embed_session = make_session(
                os.path.join(version_dir, _param(cfg, "embed_onnx_file", "embed_tokens.onnx")), cfg, self.logger)
            self.audio_token_id = int(_param(cfg, "audio_token_id", "-1"))
            if self.audio_token_id < 0:
                raise pb_utils.TritonModelException("a glm_asr decoder needs the audio_token_id parameter")
        else:
            self.init_session = make_session(
                os.path.join(version_dir, _param(cfg, "init_onnx_file", "decoder_init.onnx")), cfg, self.logger)
        self.step_session, self.split = self._load_step(
            os.path.join(version_dir, _param(cfg, "step_onnx_file", "decoder_step.onnx")), cfg)
        self.max_sequences = int(_param(cfg, "max_sequences", "64"))
        self.idle_timeout_s = float(_param(cfg, "sequence_idle_timeout_s", "60"))
        self.default_top_k = int(_param(cfg, "default_top_k", "5"))
        vocab = int(_param(cfg, "vocab_size", "-1"))
        if vocab <= 0:
            dim = {o.name: o.shape for o in self.step_session.get_outputs()}.get("logits", [None])[-1]
            vocab = dim if isinstance(dim, int) and dim > 0 else -1
        self.vocab = vocab if vocab > 0 else None
        max_pos = int(_param(cfg, "max_target_positions", "-1"))
        self.max_positions = max_pos if max_pos > 0 else None
        self.pool = _Pool(int(float(_param(cfg, "buffer_pool_mb", "1024")) * (1 << 20)))

        step_inputs = {i.name: i for i in self.step_session.get_inputs()}
        stacked = LAYER_STACKED[:2] if self.embeds else LAYER_STACKED
        expected = {"inputs_embeds" if self.embeds else "input_ids", "past_length"} | {
            n + ".0" if n in self.split else n for n in stacked}
        missing = expected - set(step_inputs)
        if missing:
            raise pb_utils.TritonModelException(f"decoder_step.onnx lacks inputs {sorted(missing)}")
        if "past_k" in self.split:
            meta = step_inputs["past_k.0"]
            shape = [self.split["past_k"], None, None, meta.shape[2], None, meta.shape[4]]
        else:
            meta = step_inputs["past_k"]
            shape = meta.shape  # [L, N, K, H, P, dh]
        self.kv_dtype = _ORT_TYPES.get(meta.type, np.float32)
        self.kv_dims = tuple(d if isinstance(d, int) and d > 0 else None for d in (shape[0], shape[3], shape[5]))
        if self.embeds:
            self.init_input = None
            self.embeds_dtype = _ORT_TYPES.get(step_inputs["inputs_embeds"].type, np.float32)
        else:
            init_inputs = [i.name for i in self.init_session.get_inputs()]
            self.init_input = "encoder_output" if "encoder_output" in init_inputs else init_inputs[0]
        self.seqs = {}
        self.row_owner = []         # row r of cross_k/cross_v belongs to row_owner[r]
        self.cross_k = self.cross_v = None
        self._pending_starts = 0
        self.last_active = time.monotonic()
        self._evicted = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._janitor, name="decoder-janitor", daemon=True).start()
        # a batch whose sequences' cross rows form at most this many runs of consecutive rows runs as
        # that many decoder_step calls on views; more fragmented batches copy their rows together
        self.max_runs = max(1, int(_param(cfg, "max_runs", "2")))
        # ... or as one call with dummy rows for the missing ones when at most this fraction is missing
        self.max_dummy_fraction = float(_param(cfg, "max_dummy_fraction", "0.25"))
        self.logger.log_info(
            f"decoder ready: family={_param(cfg, 'family', '?')} model={_param(cfg, 'model_name', '?')} "
            f"precision={_param(cfg, 'precision', '?')} vocab={self.vocab} max_positions={self.max_positions} "
            f"max_sequences={self.max_sequences} idle_timeout={self.idle_timeout_s}s "
            f"per-layer inputs={sorted(self.split) or 'none'}")
        if _param(cfg, "warmup", "1") not in ("0", "false", "False"):
            self._warmup()

    def _warmup(self) -> None:
        """One tiny decoder_init + decoder_step run, so the first real request does not pay for it."""
        if self.embeds:
            started = time.perf_counter()
            try:
                L, H, dh = self.kv_dims
                past = np.zeros((L, 1, 1, H, CAP_STEP, dh), self.kv_dtype)
                feeds = {"inputs_embeds": self._embed([None], np.zeros((1, 1, 1), np.int64)),
                         "past_length": np.zeros(1, np.int64)}
                for name, array in (("past_k", past), ("past_v", past)):
                    self._feed_layers(feeds, name, array)
                self.step_session.run(["logits", "new_k", "new_v"], feeds)
                self.logger.log_info(f"decoder warm-up {1e3 * (time.perf_counter() - started):.0f} ms")
            except Exception as error:  # noqa: BLE001 - only a warm-up
                self.logger.log_warn(f"decoder warm-up failed: {error!r}")
            return
        dims = next((i.get("dims") for i in self.config.get("input", []) if i.get("name") == "encoder_output"), None)
        dims = [int(d) for d in dims] if dims else []
        if len(dims) != 2 or min(dims) <= 0:
            return
        started = time.perf_counter()
        try:
            ck, cv = self.init_session.run(["cross_k", "cross_v"],
                                           {self.init_input: np.zeros([1] + dims, np.float32)})
            L, H, dh = self.kv_dims
            L, H, dh = L or ck.shape[0], H or ck.shape[2], dh or ck.shape[4]
            past = np.zeros((L, 1, 1, H, CAP_STEP, dh), self.kv_dtype)
            feeds = {"input_ids": np.zeros((1, 1, 1), np.int64), "past_length": np.zeros(1, np.int64)}
            for name, array in (("past_k", past), ("past_v", past), ("cross_k", ck), ("cross_v", cv)):
                self._feed_layers(feeds, name, array)
            self.step_session.run(["logits", "new_k", "new_v"], feeds)
            self.logger.log_info(f"decoder warm-up {1e3 * (time.perf_counter() - started):.0f} ms")
        except Exception as error:  # noqa: BLE001 - only a warm-up
            self.logger.log_warn(f"decoder warm-up failed: {error!r}")

    def _load_step(self, path: str, cfg: dict):
        """decoder_step session, with per-layer K/V inputs when the graph allows (see split_layer_inputs)."""
        if _param(cfg, "split_layer_inputs", "1") not in ("0", "false", "False"):
            try:
                import onnx

                model = onnx.load(path)
                split = split_layer_inputs(model)
                if split:
                    session = make_session(model.SerializeToString(), cfg, self.logger,
                                           label=f"{path} (per-layer inputs for {', '.join(sorted(split))})")
                    return session, split
                self.logger.log_warn(f"{path}: stacked K/V inputs are not plain per-layer Gathers; "
                                     "using the graph as is")
            except ImportError:
                self.logger.log_warn("the onnx package is missing from pylib_dir: running decoder_step with "
                                     "layer-stacked K/V inputs (slower: a copy of the caches per step)")
            except Exception as error:  # noqa: BLE001 - fall back to the unmodified graph
                self.logger.log_warn(f"could not split the K/V inputs of {path} per layer ({error!r}); "
                                     "using the graph as is")
        return make_session(path, cfg, self.logger), {}

    def _feed_layers(self, feeds: dict, name: str, array: np.ndarray) -> None:
        if name in self.split:
            for layer in range(self.split[name]):
                feeds[f"{name}.{layer}"] = array[layer]
        else:
            feeds[name] = array

    # ------------------------------------------------------------------ request parsing
    def _parse(self, req: _Req, request) -> None:
        ids_t = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if ids_t is None:
            raise RequestError("input_ids is required")
        ids = ids_t.as_numpy()
        if ids.ndim != 3 or ids.shape[0] != 1:
            raise RequestError(f"input_ids must be [1, K, T], got {list(ids.shape)}")
        req.K, req.T = int(ids.shape[1]), int(ids.shape[2])
        if req.K > 0 and req.T < 1:
            raise RequestError("input_ids must hold at least one new token per beam (T >= 1)")
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or (self.vocab and hi >= self.vocab):
                raise RequestError(f"input_ids must be token ids in [0, {self.vocab}), got values in [{lo}, {hi}]")
        req.ids = ids

        t = pb_utils.get_input_tensor_by_name(request, "top_k")
        if t is not None:
            arr = t.as_numpy()
            if arr.size != 1:
                raise RequestError(f"top_k must be [1, 1], got {list(arr.shape)}")
            req.top_k = int(arr.reshape(-1)[0])
        else:
            req.top_k = self.default_top_k
        if req.top_k < 1:
            raise RequestError(f"top_k must be >= 1, got {req.top_k}")
        if self.vocab:
            req.top_k = min(req.top_k, self.vocab)

        t = pb_utils.get_input_tensor_by_name(request, "parent_beams")
        if t is not None:
            arr = t.as_numpy()
            if arr.ndim != 2 or arr.shape[0] != 1 or arr.shape[1] != req.K:
                raise RequestError(f"parent_beams must be [1, K={req.K}], got {list(arr.shape)}")
            req.parents = arr.reshape(-1).astype(np.int64)

        t = pb_utils.get_input_tensor_by_name(request, "extra_ids")
        if t is not None:
            arr = t.as_numpy()
            if arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[1] != req.K:
                raise RequestError(f"extra_ids must be [1, K={req.K}, E], got {list(arr.shape)}")
            if arr.size:
                lo, hi = int(arr.min()), int(arr.max())
                if lo < -1 or (self.vocab and hi >= self.vocab):
                    raise RequestError(f"extra_ids must be token ids in [0, {self.vocab}) or -1, got [{lo}, {hi}]")
            req.extra = arr[0].astype(np.int64)

        if req.start:
            t = pb_utils.get_input_tensor_by_name(request, "encoder_output")
            if t is None:
                raise RequestError("the START request of a sequence needs encoder_output [1, S, d]")
            enc = t.as_numpy()
            if enc.ndim != 3 or enc.shape[0] != 1:
                raise RequestError(f"encoder_output must be [1, S, d], got {list(enc.shape)}")
            req.enc = enc
            req.suppress = self._id_list(request, "suppress_ids")
            req.begin = self._id_list(request, "begin_suppress_ids")
            req.ts_rules = self._timestamp_rules_input(request)

    def _timestamp_rules_input(self, request):
        """timestamp_rules [1, 4] = (timestamp_begin, no_timestamps id, max initial timestamp index
        (-1: none), eot id), or None when absent."""
        t = pb_utils.get_input_tensor_by_name(request, "timestamp_rules")
        if t is None:
            return None
        arr = t.as_numpy()
        if arr.shape != (1, 4):
            raise RequestError(f"timestamp_rules must be [1, 4] (timestamp_begin, no_timestamps, "
                               f"max_initial_timestamp_index, eot), got {list(arr.shape)}")
        ts_begin, no_ts, max_initial, eot = (int(v) for v in arr.reshape(-1))
        vocab = self.vocab or (1 << 31)
        if not (0 < ts_begin < vocab and 0 <= no_ts < vocab and 0 <= eot < ts_begin and max_initial >= -1):
            raise RequestError(f"timestamp_rules {arr.reshape(-1).tolist()} are not valid token ids for a "
                               f"vocabulary of {self.vocab}")
        return ts_begin, no_ts, max_initial, eot

    def _id_list(self, request, name: str):
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            return None
        arr = t.as_numpy()
        if arr.ndim != 2 or arr.shape[0] != 1:
            raise RequestError(f"{name} must be [1, M], got {list(arr.shape)}")
        if arr.size == 0:
            return None
        ids = np.unique(arr.astype(np.int64))
        if ids[0] < 0 or (self.vocab and ids[-1] >= self.vocab):
            raise RequestError(f"{name} must be token ids in [0, {self.vocab})")
        return ids

    # ------------------------------------------------------------------ state management
    def _release(self, slab) -> None:
        if slab is None:
            return
        slab.live -= 1
        if slab.live <= 0:
            if slab.k is not None:
                self.pool.put(slab.k)
                self.pool.put(slab.v)
            slab.k = slab.v = None

    # Cross-attention K/V of every live sequence: one row each of cross_k/cross_v [L, R, H, S, dh].
    # Live sequences occupy rows [0, n) (an END moves the last row into the hole), so a group of
    # sequences with consecutive rows is fed to the per-layer graph inputs as views, no copy.
    def _add_rows(self, seqs, ck: np.ndarray, cv: np.ndarray) -> None:
        n, add = len(self.row_owner), len(seqs)
        if self.cross_k is not None and self.cross_k.shape[2:] != ck.shape[2:]:
            raise RequestError(f"encoder_output gives cross K/V {list(ck.shape[2:])}, the live sequences have "
                               f"{list(self.cross_k.shape[2:])}")
        capacity = 0 if self.cross_k is None else self.cross_k.shape[1]
        if n + add > capacity:  # grow (rarely: the store is kept, see _free_row)
            self._resize_rows(max(n + add, min(2 * capacity, self.max_sequences), 4), ck)
        for j, seq in enumerate(seqs):
            seq.row = n + j
            self.row_owner.append(seq)
        self.cross_k[:, n:n + add] = ck
        self.cross_v[:, n:n + add] = cv

    def _resize_rows(self, capacity: int, like: np.ndarray) -> None:
        n = len(self.row_owner)
        shape = (like.shape[0], capacity) + like.shape[2:]
        new_k, new_v = np.empty(shape, like.dtype), np.empty(shape, like.dtype)
        if n:
            new_k[:, :n] = self.cross_k[:, :n]
            new_v[:, :n] = self.cross_v[:, :n]
        self.cross_k, self.cross_v = new_k, new_v

    def _free_row(self, seq) -> None:
        """Free a sequence's row: the last live row moves into the hole (rows stay [0, n)).

        The store itself is kept (its pages are already faulted in) until the decoder has been
        idle for sequence_idle_timeout_s (see _evict_idle)."""
        r = seq.row
        if r is None:
            return
        seq.row = None
        last = len(self.row_owner) - 1
        if r != last:
            moved = self.row_owner[last]
            self.cross_k[:, r] = self.cross_k[:, last]
            self.cross_v[:, r] = self.cross_v[:, last]
            self.row_owner[r] = moved
            moved.row = r
        self.row_owner.pop()

    def _drop(self, cid) -> None:
        seq = self.seqs.pop(cid, None)
        if seq is not None:
            self._free_row(seq)
            self._release(seq.kv)
            seq.kv = None

    def _evict_idle(self, now: float) -> None:
        for cid, seq in list(self.seqs.items()):
            if now - seq.last_used > self.idle_timeout_s:
                self._evicted.append(f"{cid} (idle {now - seq.last_used:.0f} s)")
                self._drop(cid)
        if not self.seqs and now - self.last_active > self.idle_timeout_s and (self.cross_k is not None
                                                                              or self.pool.free):
            self.cross_k = self.cross_v = None  # idle: give the memory back
            self.pool.free.clear()
            self.pool.bytes = 0

    def _bind(self, req: _Req, now: float) -> None:
        """Attach the sequence state (new on START) and validate the step against it."""
        if req.start:
            existing = req.cid in self.seqs
            if len(self.seqs) - int(existing) + self._pending_starts >= self.max_sequences:
                raise RequestError(
                    f"the decoder already holds {len(self.seqs)} sequences (max_sequences={self.max_sequences}); "
                    "END finished sequences or retry later", code="UNAVAILABLE")
            if req.K < 1:
                raise RequestError("the START request needs at least one beam (input_ids [1, K>=1, T])")
            if existing:  # restarting a sequence id: the old cache is gone
                self._drop(req.cid)
            req.seq = _Seq(req.cid, req.suppress, req.begin, now)
            req.seq.ts_rules = req.ts_rules
            self._pending_starts += 1
            length = 0
        else:
            seq = self.seqs.get(req.cid)
            if seq is None and req.K == 0:
                return  # nothing to step and nothing to free (e.g. END after an eviction)
            if seq is None:
                raise RequestError(
                    f"sequence {req.cid} has no decoder state: it was not STARTed, already ENDed, or evicted "
                    f"after {self.idle_timeout_s:g} s idle", code="NOT_FOUND")
            req.seq = seq
            length = seq.length
            if req.K == 0:
                return
            if req.parents is None:
                if req.K != seq.beams:
                    raise RequestError(f"parent_beams is required when the beam count changes ({seq.beams} -> {req.K})")
            else:
                if req.parents.size and (req.parents.min() < 0 or req.parents.max() >= seq.beams):
                    raise RequestError(f"parent_beams must index the {seq.beams} cached beams, got {req.parents.tolist()}")
                if np.array_equal(req.parents, np.arange(seq.beams)):
                    req.parents = None
        if self.max_positions and length + req.T > self.max_positions:
            raise RequestError(f"sequence too long: {length} cached + {req.T} new tokens > "
                               f"max_target_positions {self.max_positions}")

    # ------------------------------------------------------------------ one group step
    def _start(self, starts) -> None:
        """Cross K/V for new sequences (one decoder_init run) stored in fresh rows."""
        if self.embeds:  # glm_asr: the audio embeddings enter with the prompt (see _embed)
            for q in starts:  # a bad START fails alone (it still runs, uncommitted, with its batch)
                counts = (q.ids[0] == self.audio_token_id).sum(axis=1)
                if counts.min() != counts.max() or int(counts[0]) != q.enc.shape[1]:
                    self._fail(q, RequestError(f"the START prompt holds {counts.tolist()} audio placeholders (id "
                                               f"{self.audio_token_id}) per beam for {q.enc.shape[1]} audio embeddings"))
            return
        shapes = {q.enc.shape[1:] for q in starts}
        if len(shapes) != 1:
            raise RequestError(f"encoder_output shapes differ within one batch: {sorted(shapes)}")
        enc = starts[0].enc if len(starts) == 1 else np.concatenate([q.enc for q in starts], axis=0)
        ck, cv = self.init_session.run(["cross_k", "cross_v"],
                                       {self.init_input: np.ascontiguousarray(enc, dtype=np.float32)})
        self._add_rows([q.seq for q in starts], ck, cv)

    def _kv_for(self, slots, K: int, T: int):
        """Self-attention past [L, N, K, H, cap, dh] for the slots (None = dummy row, empty past),
        each cache reordered by its parent_beams."""
        N = len(slots)
        members = [q for q in slots if q is not None]
        need = max(q.seq.length for q in members) + T
        slab = members[0].seq.kv
        if (slab is not None and len(members) == N and not any(q.start for q in members) and slab.k.shape[1] == N
                and slab.k.shape[2] == K and slab.cap >= need
                and all(q.seq.kv is slab and q.seq.kv_idx == n and q.parents is None for n, q in enumerate(members))):
            return slab, False  # same sequences, same order, no reordering: in place, no copy at all
        cap = -(-need // CAP_STEP) * CAP_STEP
        L, H, dh = self.kv_dims
        if L is None or H is None or dh is None:
            src = next((q.seq.kv.k for q in members if q.seq.kv is not None), None)
            if src is not None:
                L, H, dh = src.shape[0], src.shape[3], src.shape[5]
            else:  # whisper: self-attention heads/dims equal the cross-attention ones
                L, H, dh = self.cross_k.shape[0], self.cross_k.shape[2], self.cross_k.shape[4]
        shape = (L, N, K, H, cap, dh)
        pk, pv = self.pool.get(shape, self.kv_dtype), self.pool.get(shape, self.kv_dtype)
        for n, q in enumerate(slots):
            p = q.seq.length if q is not None else 0
            if p:
                sk, sv, row = q.seq.kv.k, q.seq.kv.v, q.seq.kv_idx
                if q.parents is None:
                    pk[:, n, :, :, :p] = sk[:, row, :, :, :p]
                    pv[:, n, :, :, :p] = sv[:, row, :, :, :p]
                else:
                    for k_new, k_old in enumerate(q.parents.tolist()):
                        pk[:, n, k_new, :, :p] = sk[:, row, k_old, :, :p]
                        pv[:, n, k_new, :, :p] = sv[:, row, k_old, :, :p]
            pk[:, n, :, :, p:] = 0
            pv[:, n, :, :, p:] = 0
        return _Slab(pk, pv, cap), True

    def _step(self, members, K: int, T: int, now: float) -> str:
        """Run one (K, T) group; sets q.response / q.error per member; returns timings for the log."""
        notes = []
        starts = [q for q in members if q.start]
        if starts:
            t0 = time.perf_counter()
            try:
                self._start(starts)
            except Exception as error:  # noqa: BLE001 - fails these START requests only
                for q in starts:
                    self._fail(q, error)
                members = [q for q in members if not q.start]
            notes.append(f"init {1e3 * (time.perf_counter() - t0):.1f}")
        members.sort(key=lambda q: -1 if q.seq.row is None else q.seq.row)
        for slots, view in self._plan(members):
            try:
                notes.append(self._run(slots, K, T, now, view))
            except Exception as error:  # noqa: BLE001
                run = [q for q in slots if q is not None]
                if len(run) == 1:
                    self._fail(run[0], error)
                    continue
                self.logger.log_warn(f"decoder run of {len(run)} sequences (K={K}, T={T}) failed: "
                                     f"{self._describe(error)}; retrying one by one")
                for q in run:
                    q.error = q.response = None
                    try:
                        self._run([q], K, T, now, "cross_k" in self.split)
                    except Exception as single:  # noqa: BLE001
                        self._fail(q, single)
        for q in starts:  # a START that failed leaves nothing behind
            if q.error is not None:
                self._free_row(q.seq)
                self._release(q.seq.kv)
                q.seq.kv = None
        return "; ".join(n for n in notes if n)

    def _plan(self, members):
        """Split a (K, T) group (sorted by cross row) into decoder_step calls: [(slots, view)].

        view=True: the slots are consecutive cross rows, fed as views; a slot may be None (a row
        whose sequence is not in this batch: computed as a dummy with an empty past and dropped),
        which is cheaper than a second call when few rows are missing. Otherwise up to max_runs
        calls over runs of consecutive rows, or one call on a copy of the rows."""
        if not members:
            return []
        if "cross_k" not in self.split:
            return [(members, False)]
        lo, hi = members[0].seq.row, members[-1].seq.row
        holes = hi - lo + 1 - len(members)
        if holes <= max(1, int(self.max_dummy_fraction * len(members))):
            slots = [None] * (hi - lo + 1)
            for q in members:
                slots[q.seq.row - lo] = q
            return [(slots, True)]
        runs = []
        for q in members:
            if runs and runs[-1][-1].seq.row + 1 == q.seq.row:
                runs[-1].append(q)
            else:
                runs.append([q])
        if len(runs) <= self.max_runs:
            return [(run, True) for run in runs]
        return [(members, False)]

    def _run(self, slots, K: int, T: int, now: float, contiguous: bool) -> str:
        """One decoder_step call for the slots: consecutive cross rows fed as views when
        ``contiguous`` (None slots are dummies), else the members' rows copied together."""
        run = [q for q in slots if q is not None]
        N = len(slots)
        t0 = time.perf_counter()
        rows = [q.seq.row for q in run]
        if self.embeds:  # no cross-attention
            cross_k = cross_v = None
        elif contiguous:
            a, b = rows[0], rows[0] + N
            cross_k, cross_v = self.cross_k[:, a:b], self.cross_v[:, a:b]  # per layer: contiguous views
        else:  # copy the rows together (into pooled buffers)
            shape = (self.cross_k.shape[0], N) + self.cross_k.shape[2:]
            cross_k, cross_v = self.pool.get(shape, self.cross_k.dtype), self.pool.get(shape, self.cross_k.dtype)
            np.take(self.cross_k, rows, axis=1, out=cross_k, mode="clip")
            np.take(self.cross_v, rows, axis=1, out=cross_v, mode="clip")
        kv = None
        kv_new = False
        try:
            kv, kv_new = self._kv_for(slots, K, T)
            dummy = np.zeros((1, K, T), np.int64)
            ids = run[0].ids if N == 1 else np.concatenate([q.ids if q is not None else dummy for q in slots], axis=0)
            lengths = np.array([q.seq.length if q is not None else 0 for q in slots], dtype=np.int64)
            if self.embeds:
                feeds = {"inputs_embeds": self._embed(slots, ids), "past_length": lengths}
                stacks = (("past_k", kv.k), ("past_v", kv.v))
            else:
                feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64), "past_length": lengths}
                stacks = (("past_k", kv.k), ("past_v", kv.v), ("cross_k", cross_k), ("cross_v", cross_v))
            for name, array in stacks:
                self._feed_layers(feeds, name, array)
            t1 = time.perf_counter()
            logits, new_k, new_v = self.step_session.run(["logits", "new_k", "new_v"], feeds)
            t2 = time.perf_counter()
            if logits.shape[:2] != (N, K) or new_k.shape[4] != T:
                raise RuntimeError(f"decoder_step returned logits {list(logits.shape)}, new_k {list(new_k.shape)} "
                                   f"for N={N}, K={K}, T={T}")
            if self.vocab is None:
                self.vocab = int(logits.shape[-1])
            real = [n for n, q in enumerate(slots) if q is not None]
            if len(real) < N:
                logits = logits[real]  # (a copy)
            elif not logits.flags.writeable:
                logits = logits.copy()
            self._postprocess(run, logits)
            t3 = time.perf_counter()
            # commit: append the new K/V and point the sequences at the (possibly new) cache slab
            for n, q in enumerate(slots):
                if q is None or q.error is not None:
                    continue
                seq = q.seq
                p = seq.length
                kv.k[:, n, :, :, p:p + T] = new_k[:, n]
                kv.v[:, n, :, :, p:p + T] = new_v[:, n]
                if kv_new:
                    old, seq.kv, seq.kv_idx = seq.kv, kv, n
                    kv.live += 1
                    self._release(old)
                seq.length = p + T
                seq.beams = K
                seq.steps += 1
                seq.last_used = now
                if q.start:
                    self.seqs[q.cid] = seq
        finally:
            if kv_new and kv.live == 0:  # nobody took the new slab (errors): back to the pool
                kv.live = 1
                self._release(kv)
            if not contiguous and cross_k is not None:
                self.pool.put(cross_k)
                self.pool.put(cross_v)
        return (f"N={len(run)}{f'+{N - len(run)} dummy' if N > len(run) else ''} prep {1e3 * (t1 - t0):.1f}"
                f"{'' if contiguous else '+cross copy'}{'+gather' if kv_new else ''} "
                f"ort {1e3 * (t2 - t1):.1f} post {1e3 * (t3 - t2):.1f} commit {1e3 * (time.perf_counter() - t3):.1f}")

    def _embed(self, slots, ids: np.ndarray) -> np.ndarray:
        """glm_asr: inputs_embeds [N, K, T, D] of ids [N, K, T]; in the rows of START requests the
        audio placeholders get that request's audio embeddings (checked in _start)."""
        (emb,) = self.embed_session.run(["inputs_embeds"], {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)})
        if emb.dtype != self.embeds_dtype or not emb.flags.writeable:
            emb = emb.astype(self.embeds_dtype)
        for n, q in enumerate(slots):
            if q is not None and q.start and q.error is None:
                audio = q.enc[0].astype(emb.dtype, copy=False)  # [A, D]
                if audio.shape[-1] != emb.shape[-1]:
                    self._fail(q, RequestError(f"encoder_output has width {audio.shape[-1]}, the decoder embeds "
                                               f"to {emb.shape[-1]}"))
                    continue
                mask = q.ids[0] == self.audio_token_id  # [K, T], A per row
                emb[n][mask] = np.broadcast_to(audio, (mask.shape[0],) + audio.shape).reshape(-1, audio.shape[-1])
        return emb

    def _postprocess(self, members, logits: np.ndarray) -> None:
        """Suppression, log_softmax, top-k and extra ids; sets q.response (or q.error) per member."""
        N, K, V = logits.shape
        for n, q in enumerate(members):
            seq = q.seq
            if seq.suppress is not None:
                logits[n][:, seq.suppress[seq.suppress < V]] = NEG_INF
            if seq.steps == 0 and seq.begin_suppress is not None:
                logits[n][:, seq.begin_suppress[seq.begin_suppress < V]] = NEG_INF
            if seq.ts_rules is not None:
                self._timestamp_rules(q, logits[n])
        rows = logits.reshape(N * K, V)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            m = rows.max(axis=1, keepdims=True)
            m[~np.isfinite(m)] = 0
            tmp = np.subtract(rows, m)
            np.exp(tmp, out=tmp)
            lse = (m + np.log(tmp.sum(axis=1, keepdims=True))).reshape(N, K, 1)
        by_k = {}
        for n, q in enumerate(members):
            by_k.setdefault(min(q.top_k, V), []).append(n)
        top = {}
        for k, ns in by_k.items():
            sub = logits[ns].reshape(len(ns) * K, V) if len(ns) != N else rows
            ids, vals = topk_rows(sub, k)
            for j, n in enumerate(ns):
                top[n] = (ids[j * K:(j + 1) * K], vals[j * K:(j + 1) * K])
        for n, q in enumerate(members):
            try:
                ids, vals = top[n]
                topk_lp = (vals - lse[n]).astype(np.float32)
                if q.extra is not None and q.extra.size:
                    if q.extra.max() >= V:
                        raise RequestError(f"extra_ids must be < vocabulary size {V}")
                    valid = q.extra >= 0
                    got = np.take_along_axis(logits[n], np.where(valid, q.extra, 0), axis=1) - lse[n]
                    extra = np.where(valid, got, NEG_INF).astype(np.float32)
                else:
                    extra = np.zeros((K, 0), dtype=np.float32)
                q.response = pb_utils.InferenceResponse([
                    pb_utils.Tensor("topk_logprobs", np.ascontiguousarray(topk_lp[np.newaxis])),
                    pb_utils.Tensor("topk_ids", np.ascontiguousarray(ids[np.newaxis].astype(np.int32))),
                    pb_utils.Tensor("extra_logprobs", np.ascontiguousarray(extra[np.newaxis])),
                ])
            except RequestError as error:
                q.error, q.code = str(error), error.code

    def _timestamp_rules(self, q, logits: np.ndarray) -> None:
        """openai-whisper's ApplyTimestampRules on logits [K, V] (after suppression), per beam.

        The tokens each beam generated so far (the prompt excluded) are kept per sequence and
        reordered by parent_beams like the cache. A step's history only becomes the sequence's
        history once the step is committed (seq.steps moved on), so a retried step starts over.
        """
        seq = q.seq
        ts_begin, no_ts, max_initial, eot = seq.ts_rules
        if seq.ts_pending is not None and seq.ts_pending[0] == seq.steps - 1:
            seq.history = seq.ts_pending[1]
        K, V = logits.shape
        if q.start or seq.history is None:
            history = np.zeros((K, 0), np.int64)
        else:
            base = seq.history if q.parents is None else seq.history[q.parents]
            history = np.concatenate([base, q.ids[0].astype(np.int64)], axis=1)
        seq.ts_pending = (seq.steps, history)
        if no_ts < V:
            logits[:, no_ts] = NEG_INF
        for k in range(K):
            tokens = history[k]
            row = logits[k]
            last_ts = tokens.size >= 1 and tokens[-1] >= ts_begin
            penultimate_ts = tokens.size < 2 or tokens[-2] >= ts_begin
            if last_ts:
                if penultimate_ts:  # a pair is complete: text (or EOT) next
                    row[ts_begin:] = NEG_INF
                else:  # a segment just ended: another timestamp or EOT, no text
                    row[:eot] = NEG_INF
            stamps = tokens[tokens >= ts_begin]
            if stamps.size:  # timestamps never decrease; a segment has a nonzero length
                last = stamps[-1] if (last_ts and not penultimate_ts) else stamps[-1] + 1
                row[ts_begin:last] = NEG_INF
            if tokens.size == 0:  # the first token is a timestamp, at most max_initial
                row[:ts_begin] = NEG_INF
                if max_initial >= 0:
                    row[ts_begin + max_initial + 1:] = NEG_INF
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                stamp_part = row[ts_begin:]
                top = stamp_part.max() if stamp_part.size else NEG_INF
                if np.isfinite(top):
                    stamp_lse = top + np.log(np.exp(stamp_part - top).sum())
                    if stamp_lse > row[:ts_begin].max():  # timestamps together beat every text token
                        row[:ts_begin] = NEG_INF

    def _empty_response(self, req: _Req):
        k = req.top_k
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("topk_logprobs", np.zeros((1, 0, k), np.float32)),
            pb_utils.Tensor("topk_ids", np.zeros((1, 0, k), np.int32)),
            pb_utils.Tensor("extra_logprobs", np.zeros((1, 0, 0), np.float32)),
        ])

    # ------------------------------------------------------------------ execute
    def _process_round(self, reqs, now: float, stats: list) -> None:
        groups = {}
        self._pending_starts = 0
        for req in reqs:
            try:
                self._bind(req, now)
            except RequestError as error:
                req.error, req.code = str(error), error.code
                continue
            if req.K == 0:
                req.response = self._empty_response(req)
                if req.seq is not None:
                    req.seq.last_used = now
                continue
            groups.setdefault((req.K, req.T), []).append(req)
        for (K, T), members in groups.items():
            t0 = time.perf_counter()
            detail = self._step(members, K, T, now)
            stats.append(f"N={len(members)} K={K} T={T} {1e3 * (time.perf_counter() - t0):.1f}ms ({detail})")

    def _fail(self, req: _Req, error: Exception) -> None:
        req.error = self._describe(error)
        req.code = error.code if isinstance(error, RequestError) else "INTERNAL"

    def _describe(self, error: Exception) -> str:
        if isinstance(error, RequestError):
            return str(error)
        self.logger.log_error(f"decoder step failed: {error!r}\n{traceback.format_exc()}")
        text = str(error).strip().splitlines()
        return f"decoder inference failed: {type(error).__name__}: {text[-1][:500] if text else ''}"

    def _janitor(self) -> None:
        """Evicts idle sequences and frees idle memory even when no request comes."""
        period = max(1.0, min(30.0, self.idle_timeout_s / 2))
        while not self._stop.wait(period):
            with self._lock:
                self._evict_idle(time.monotonic())

    def execute(self, requests):
        with self._lock:
            return self._execute(requests)

    def _execute(self, requests):
        started = time.perf_counter()
        now = time.monotonic()
        self._evict_idle(now)
        if self._evicted:  # (logged here: the janitor thread does not log)
            self.logger.log_info(f"decoder: evicted idle sequences {', '.join(self._evicted[:20])}"
                                 f"{' ...' if len(self._evicted) > 20 else ''}")
            self._evicted.clear()
        self.last_active = now
        reqs = []
        for i, request in enumerate(requests):
            req = _Req(i)
            reqs.append(req)
            try:
                req.cid = request.correlation_id()
                req.start = _flag(request, "START", 1)
                req.end = _flag(request, "END", 2)
                if req.cid in (None, 0, ""):
                    raise RequestError("decoder requests need a sequence (correlation) id")
                self._parse(req, request)
            except RequestError as error:
                req.error, req.code = str(error), error.code
            except Exception as error:  # noqa: BLE001
                self._fail(req, error)
        stats = []
        # steps of one sequence must run one after another: split duplicates into rounds
        pending = [r for r in reqs if r.error is None]
        while pending:
            seen, this, rest = set(), [], []
            for req in pending:
                (rest if req.cid in seen else this).append(req)
                seen.add(req.cid)
            self._process_round(this, now, stats)
            for req in this:
                if req.end and req.cid is not None:
                    self._drop(req.cid)
            pending = rest
        responses = []
        for req in reqs:
            if req.error is not None:
                if req.end and req.cid not in (None, 0, ""):
                    self._drop(req.cid)
                responses.append(_error_response(f"decoder: {req.error}", req.code))
            else:
                responses.append(req.response)
        self.logger.log_verbose(
            f"decoder execute: {len(requests)} requests ({sum(r.start for r in reqs)} start, "
            f"{sum(r.end for r in reqs)} end, {sum(r.error is not None for r in reqs)} errors), groups [{'; '.join(stats)}], "
            f"{len(self.seqs)} live sequences, {1e3 * (time.perf_counter() - started):.1f} ms")
        return responses

    def finalize(self):
        self._stop.set()
        with self._lock:
            for cid in list(self.seqs):
                self._drop(cid)
        self.init_session = self.step_session = self.embed_session = None
