"""Render the Triton model repository (encoder + stateful decoder) for one exported model.

    python -m model_repository.render --model-dir build/models/whisper-base --precision fp32 \
        --out build/model_repository [--execution-provider CPUExecutionProvider] \
        [--max-batch N | --encoder-max-batch 8 --decoder-max-batch 16] [--set KEY=VALUE ...]

For each model (``encoder``, ``decoder``) it fills the ``${NAME}`` placeholders of
``model_repository/<model>/config.pbtxt.in`` into ``<out>/<model>/config.pbtxt``, copies
``<model>/1/model.py`` and the engine package (``engine/`` -> ``<out>/<model>/1/engine/``),
and hard-links (copy when linking is impossible) the ONNX graphs of the chosen precision from
``<model-dir>/onnx/<precision>/`` into ``<out>/<model>/1/``; decoder_step.onnx is written
with one K/V input per layer instead when ``split_layer_inputs`` is on (engine/layers.py).
The graphs and extra parameters of a family come from its step runner (``engine/runners/``).
Family, model name and dimensions come from ``<model-dir>/model_info.json`` (falling back to
the static shapes of the ONNX graphs). Rerunning with the same inputs changes nothing.

``render_repository(model_dir, out_dir, precision="fp32", **tunables)`` does the same from
Python (tests); see ``DEFAULT_TUNABLES`` for the tunables.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
from pathlib import Path

from .engine.compute_lock import LOCK_MAX_CORES
from .engine.runners import runner_class
from .engine.search import CANCEL_POLL_S

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent
PYLIB_ENV = "ASR_TRITON_PYLIB"

# Deployed into every model's version folder next to model.py (the backend stub sees only that).
ENGINE = HERE / "engine"
ENGINE_DIR = "engine"
ENGINE_FILES = "*.py"
# The search model runs the gateway's beam search itself: deployed as engine/beam_search.py
BEAM_SEARCH = PROJECT_ROOT / "gateway" / "asr" / "decoding.py"
# ... and, for hotword-biased windows, the gateway's hotword scorer (engine/search_hotwords.py
# rebuilds it from the request over the model's tokenizer.json, deployed next to model.py)
HOTWORDS = PROJECT_ROOT / "gateway" / "asr" / "hotwords.py"
SEARCH_EXTRAS = {Path("beam_search.py"): BEAM_SEARCH, Path("hotwords.py"): HOTWORDS}
TOKENIZER_FILE = "tokenizer.json"


def family_runner(family: str) -> type:
    """The step runner class of a family (engine/runners: the one place families are registered):
    it names the graphs each model needs and the extra config parameters of the family."""
    return runner_class(family)


def family_parameters(family: str, info: dict) -> dict[str, dict[str, str]]:
    """Extra config parameters per model ({model: {key: value}}) of a family."""
    try:
        return family_runner(family).render_parameters(info)
    except ValueError as error:
        raise RenderError(str(error)) from error


DEFAULT_TUNABLES: dict[str, object] = {
    # both models
    "execution_provider": "CPUExecutionProvider",
    "pylib_dir": None,                      # default: $ASR_TRITON_PYLIB or build/triton/pylib
    "allow_spinning": False,                # ORT intra-op spin-waiting (burns CPU when idle)
    # one ORT run at a time across the stubs of a server (engine/compute_lock.py); None: on where
    # the execution provider is the CPU alone on at most LOCK_MAX_CORES cores
    "cpu_compute_lock": None,
    "fp16": False,                          # TensorRT EP: fp16 engines from the fp32 graphs (trt_fp16_enable)
    # encoder (dynamic batching)
    "encoder_max_batch_size": 8,
    "encoder_preferred_batch_sizes": None,  # default: [encoder_max_batch_size]
    "encoder_max_queue_delay_microseconds": 5000,
    "encoder_max_queue_size": 64,
    "encoder_default_timeout_microseconds": 60_000_000,
    "encoder_instance_count": 1,
    # 0 = ONNX Runtime default (one per core, each model). A budget of 1 + 1 (the stubs run at the
    # same time on 2 cores) was measured slower: RTFx 4.37 vs 5.05 (3-min recording) and 2.26 vs
    # 2.75 (20 calls) in one bench run (bench/results/ab_threads_encbatch.json)
    "encoder_intra_op_threads": 0,
    # ORT's CPU arena keeps the largest activations ever seen (encoder batches: hundreds of MB);
    # off, they go back after each run (bench/results/latest.json: with both arenas off and
    # buffer_pool_mb 256, peak memory 5.09 -> 3.66 GB at the same RTFx)
    "encoder_cpu_mem_arena": False,
    # windows per ONNX Runtime run within one batch (None: 1 on CPU, encoder_max_batch_size on a
    # GPU provider). Its attention activations grow with the batch: int8 peaks +69 MB at 1 window,
    # +256 MB at 2, +808 MB at 8 (fp32: +138 MB / +380 MB / +1.9 GB), and a CPU is no faster per
    # window in batches (0.63 s at 1, 0.74 s at 8, 2 cores): Triton still batches the requests,
    # the stub runs them one window at a time
    "encoder_run_batch_size": None,
    # decoder (sequence batching, oldest strategy)
    "decoder_max_batch_size": 16,
    "decoder_preferred_batch_sizes": None,  # default: [decoder_max_batch_size]
    "decoder_max_queue_delay_microseconds": 1000,
    "max_candidate_sequences": 32,
    "max_sequence_idle_microseconds": 60_000_000,
    "max_sequences": 64,                    # decoder caches held per instance
    "sequence_idle_timeout_s": None,        # default: max_sequence_idle_microseconds
    "decoder_instance_count": 1,
    # the decoder checks its graphs at load, then gives its sessions back until the first request
    # (about 100 MB int8 / 300 MB fp32): with the search model it only serves language detection
    # and --stepwise-only gateways. None: on when the search model is rendered
    "decoder_load_on_first_use": None,
    "decoder_intra_op_threads": 0,
    # the decoder keeps its arena: without it every START pays fresh pages for decoder_init's cross
    # K/V (37 MB per sequence) and ten STARTs in a row took long enough under load for the first
    # sequences to reach a 6 s idle timeout (tests/test_triton_models.py)
    "decoder_cpu_mem_arena": True,
    # ... but not for decoder_init: its output (the cross K/V, 37 MB per sequence) is copied into
    # the cross store at once, and an arena would keep the largest START batch's worth for good
    # (+350 MB after 4 STARTs at once); a fresh allocation costs 4-16 ms per START
    "decoder_init_cpu_mem_arena": False,
    "default_top_k": 5,
    # reusable KV-cache buffers kept per decoder instance: 64 holds two generations of the slabs
    # of 2-3 sequences (the usual decoder batch); 256 kept 190 MB more at 8 concurrent windows and
    # was no faster (an engine replay of 24 sequences, 2 cores: the C heap reuses freed slabs too)
    "buffer_pool_mb": 64,
    "split_layer_inputs": True,             # feed K/V per layer (decoder_step rewritten here, else at load; onnx)
    "max_runs": 2,                          # decoder_step calls per (K, T) group before copying cross K/V
    "max_dummy_fraction": 0.25,             # ... or one call padded with dummy rows for missing sequences
    # the same batch again reorders its beams inside its KV slab, copying only the beams whose
    # parent is another beam; off: every reorder gathers a new slab (engine/kv_cache.py)
    "kv_reorder_in_place": True,
    # the decoder engines' C heap (engine/heap.py); 0: glibc's defaults. Both workloads, int8,
    # summed peak RSS of all processes, each order once. 2 arenas (one per thread by default):
    # 1.65 / 1.60 GB against 1.76 / 1.76, RTFx (a) 29.15 / 30.13 against 29.92 / 28.00, (b) 14.48 /
    # 15.07 against 14.72 / 14.58 (bench/results/ab_heap_arena_max{,_2}.json): on. A fixed 16 MB
    # mmap threshold on top: 1.40 / 1.41 GB against 1.62 / 1.83, but RTFx (a) 22.99 / 28.48 against
    # 29.96 / 28.57 (ab_heap_mmap_threshold_3/_4.json; new caches mapped and faulted in afresh):
    # off, for a machine short of memory
    "heap_mmap_threshold_mb": 0,
    "heap_arena_max": 2,
    # search (whole-window beam search in the server, engine/search.py): a second decoder engine
    # whose windows share every decoder call; the gateway uses it for windows without hotwords
    "search_model": True,
    "search_max_windows": 16,               # windows searching at once (more wait, in order)
    "search_instance_count": 1,             # search stubs (each its own engine and windows)
    "search_max_waiting": 256,              # windows waiting at most (beyond: UNAVAILABLE)
    # how often a searching window asks Triton whether its client hung up (IPC; 0: every step)
    "search_cancel_poll_ms": round(CANCEL_POLL_S * 1000),
    # the search loop hands the C heap's free pages back at most this often (0: never): without it
    # the search stub kept glibc's high-water mark (786 / 621 MB against 558 / 482 at the peak of
    # both workloads, int8, speed unchanged; docs/performance.md)
    "search_heap_trim_ms": 1000,
    # hotword-biased windows searched there too (needs the model's tokenizer.json, and tokenizers
    # and zhconv in the stub's pylib); off: the gateway searches them stepwise
    "search_hotwords": True,
    # precision int8: "7bit" weights (onnx/int8, exact on every x86 CPU), "8bit" (onnx/int8-vnni,
    # exact only on CPUs with VNNI, where ONNX Runtime's U8S8 kernel does not saturate; closer to
    # fp32), or "auto": 8-bit when this machine's CPU has VNNI and the export has the variant
    "int8_weights": "auto",
}
# shorthands accepted by render_repository / --set
ALIASES = {
    "intra_op_threads": ("encoder_intra_op_threads", "decoder_intra_op_threads"),
    "instance_count": ("encoder_instance_count", "decoder_instance_count"),
    "cpu_mem_arena": ("encoder_cpu_mem_arena", "decoder_cpu_mem_arena"),
}

_PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")


class RenderError(RuntimeError):
    pass


# CPU flags of ONNX Runtime's U8S8 kernels that add u8 x s8 products straight into int32
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
INT8_WEIGHTS = ("auto", "7bit", "8bit")
INT8_VNNI = "int8-vnni"  # the 8-bit-weight variant of export/int8.py INT8_VARIANTS


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """True when the CPU (/proc/cpuinfo, or the text given) has VNNI: 8-bit int8 weights are
    exact there. False where it cannot tell (not Linux, not x86): the 7-bit weights are exact
    everywhere."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return any(flag in flags for flag in VNNI_FLAGS)
    return False


def int8_directory(onnx_root: Path, int8_weights: str, has_vnni=cpu_has_vnni) -> tuple[str, str]:
    """(directory under onnx/, label) of the int8 graphs for the `int8_weights` tunable."""
    if int8_weights not in INT8_WEIGHTS:
        raise RenderError(f"int8_weights must be one of {', '.join(INT8_WEIGHTS)}, got {int8_weights!r}")
    have_8bit = (onnx_root / INT8_VNNI).is_dir()
    if int8_weights == "8bit" and not have_8bit:
        raise RenderError(f"int8_weights=8bit but {onnx_root / INT8_VNNI} was not exported (make export)")
    if int8_weights == "8bit" or int8_weights == "auto" and have_8bit and has_vnni():
        return INT8_VNNI, "int8 (8-bit weights: VNNI)"
    return "int8", "int8 (7-bit weights)"


# --------------------------------------------------------------------------- helpers
def substitute(template: str, values: dict[str, object], source: str = "template") -> str:
    """Replace every ``${NAME}`` in ``template``; a placeholder without a value is an error."""
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise RenderError(f"{source}: no value for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def _pbtxt_string(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"')


def _int_list(value, what: str) -> str:
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value.strip()) if v]
    if isinstance(value, int):
        value = [value]
    items = [int(v) for v in value]
    if not items or any(v <= 0 for v in items):
        raise RenderError(f"{what} must be a non-empty list of positive integers, got {value!r}")
    return ", ".join(str(v) for v in sorted(set(items)))


def _first(info: dict, *keys):
    for k in keys:
        if info.get(k) is not None:
            return info[k]
    return None


@functools.lru_cache(maxsize=8)
def _load_onnx(path: str):
    try:
        import onnx
    except ImportError:
        return None
    try:
        return onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - a fallback source of information only
        return None


def _graph_dims(path: Path) -> dict[str, list]:
    """Static dims (int or None) of the inputs/outputs of an ONNX graph; {} if unreadable."""
    model = _load_onnx(str(path)) if path.exists() else None
    if model is None:
        return {}
    dims = {}
    for value in list(model.graph.input) + list(model.graph.output):
        shape = value.type.tensor_type.shape
        dims[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return dims


def _external_data_files(path: Path) -> set[str]:
    model = _load_onnx(str(path))
    if model is None:
        return set()
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    files = set()
    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(entry.value)
    return files


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
        sa, sb = a.stat(), b.stat()
        return sa.st_size == sb.st_size and int(sa.st_mtime) == int(sb.st_mtime)
    except OSError:
        return False


def _link_or_copy(src: Path, dst: Path) -> str:
    if dst.exists() and _same_file(src, dst):
        return "unchanged"
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
        how = "hard-linked"
    except OSError:
        shutil.copy2(src, tmp)
        how = "copied"
    os.replace(tmp, dst)
    return how


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


def _copy_if_changed(src: Path, dst: Path) -> bool:
    data = src.read_bytes()
    if dst.exists() and dst.read_bytes() == data:
        return False
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dst)
    return True


def _sync_tree(src: Path, dst: Path, pattern: str, extras: dict[Path, Path] | None = None) -> list[str]:
    """Make dst hold exactly the files of src matching pattern (recursively, same layout) plus
    ``extras`` ({path in dst: source file}); returns the files copied. Unchanged files are left
    alone, stale ones removed."""
    sources = {p.relative_to(src): p for p in src.rglob(pattern) if "__pycache__" not in p.parts}
    sources.update(extras or {})
    wanted = set(sources)
    copied = []
    for rel in sorted(wanted):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if _copy_if_changed(sources[rel], dst / rel):
            copied.append(str(rel))
    if dst.is_dir():
        for stale in sorted(dst.rglob(pattern)):
            if "__pycache__" not in stale.parts and stale.relative_to(dst) not in wanted:
                stale.unlink()
    return copied


def _fmt_bool(v) -> str:
    if isinstance(v, str):
        v = v.strip().lower() in ("1", "true", "yes", "on")
    return "1" if v else "0"


# --------------------------------------------------------------------------- main API
def resolve_tunables(tunables: dict) -> dict:
    values = dict(DEFAULT_TUNABLES)
    for key, value in tunables.items():
        if key in ALIASES:
            for target in ALIASES[key]:
                values[target] = value
        elif key in DEFAULT_TUNABLES:
            values[key] = value
        else:
            known = ", ".join(sorted(list(DEFAULT_TUNABLES) + list(ALIASES)))
            raise RenderError(f"unknown tunable {key!r} (known: {known})")
    if values["pylib_dir"] is None:
        values["pylib_dir"] = os.environ.get(PYLIB_ENV) or str(PROJECT_ROOT / "build" / "triton" / "pylib")
    values["pylib_dir"] = str(Path(values["pylib_dir"]).resolve())
    if values["sequence_idle_timeout_s"] is None:
        values["sequence_idle_timeout_s"] = int(values["max_sequence_idle_microseconds"]) / 1e6
    cpu_only = str(values["execution_provider"]).strip() in ("", "CPUExecutionProvider")
    if values["cpu_compute_lock"] is None:
        values["cpu_compute_lock"] = cpu_only and (os.cpu_count() or 1) <= LOCK_MAX_CORES
    if values["decoder_load_on_first_use"] is None:
        values["decoder_load_on_first_use"] = values["search_model"]
    if values["encoder_run_batch_size"] is None:
        values["encoder_run_batch_size"] = 1 if cpu_only else int(values["encoder_max_batch_size"])
    if int(values["search_max_windows"]) < 1 or int(values["search_max_waiting"]) < 0 or int(values["search_instance_count"]) < 1:
        raise RenderError("search_max_windows and search_instance_count must be >= 1, search_max_waiting >= 0")
    for key in ("search_cancel_poll_ms", "search_heap_trim_ms"):
        if int(values[key]) < 0:
            raise RenderError(f"{key} must be >= 0")
    for m in ("encoder", "decoder"):
        if values[f"{m}_preferred_batch_sizes"] is None:
            values[f"{m}_preferred_batch_sizes"] = [int(values[f"{m}_max_batch_size"])]
    return values


def model_dims(model_dir: Path, onnx_dir: Path, info: dict) -> dict[str, object]:
    """Placeholders for the tensor dims: model_info.json first, static ONNX shapes second, -1 last."""
    found = {
        "N_MELS": _first(info, "n_mels", "num_mel_bins"),
        "N_FRAMES": _first(info, "n_frames", "nb_max_frames", "input_frames"),
        "ENCODER_FRAMES": _first(info, "encoder_frames", "n_audio_ctx", "max_source_positions"),
        "D_MODEL": _first(info, "d_model", "n_audio_state", "hidden_size"),
        "VOCAB_SIZE": _first(info, "vocab_size", "n_vocab"),
        "MAX_TARGET_POSITIONS": _first(info, "max_target_positions", "n_text_ctx", "max_length"),
    }
    if any(found[k] is None for k in ("N_MELS", "N_FRAMES", "ENCODER_FRAMES", "D_MODEL", "VOCAB_SIZE")):
        enc = _graph_dims(onnx_dir / "encoder.onnx")
        enc_in = enc.get("input_features") or [None, None, None]
        enc_out = enc.get("encoder_output") or [None, None, None]
        logits = (_graph_dims(onnx_dir / "decoder_step.onnx").get("logits") or [None, None, None])
        for key, value in (("N_MELS", enc_in[1]), ("N_FRAMES", enc_in[2]), ("ENCODER_FRAMES", enc_out[1]),
                           ("D_MODEL", enc_out[2]), ("VOCAB_SIZE", logits[-1])):
            if found[key] is None:
                found[key] = value
    if found["N_FRAMES"] is None and found["ENCODER_FRAMES"] and (info.get("family") or "whisper") == "whisper":
        found["N_FRAMES"] = 2 * int(found["ENCODER_FRAMES"])
    return {k: (int(v) if v not in (None, 0) else -1) for k, v in found.items()}


def _exported(model_dir: Path, precision: str) -> tuple[dict, Path, Path]:
    """(model_info.json, onnx root, onnx dir of the precision) of an exported model."""
    info_path = model_dir / "model_info.json"
    if not info_path.exists():
        raise RenderError(f"{info_path} not found: export the model first (make export)")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    onnx_root = model_dir / "onnx"
    onnx_dir = onnx_root / precision
    if not onnx_dir.is_dir():
        have = sorted(p.name for p in onnx_root.iterdir()) if onnx_root.is_dir() else []
        raise RenderError(f"{onnx_dir} not found (precisions exported: {', '.join(have) or 'none'})")
    return info, onnx_root, onnx_dir


def _graph_sources(models: dict, onnx_root: Path, precision: str) -> tuple[dict[str, Path], str]:
    """Where each graph comes from, and the precision label: missing graphs of a precision fall
    back to fp32, loudly, and the label says which."""
    onnx_dir = onnx_root / precision
    sources: dict[str, Path] = {}
    used_precisions = {}
    for graphs in models.values():
        for graph in graphs:
            src = onnx_dir / graph
            if not src.exists() and precision != "fp32" and (onnx_root / "fp32" / graph).exists():
                print(f"[render] WARNING: {src} missing; using the fp32 {graph}", file=sys.stderr)
                src = onnx_root / "fp32" / graph
            if not src.exists():
                raise RenderError(f"{onnx_dir / graph} not found")
            sources[graph] = src
            used_precisions[graph] = src.parent.name
    label = precision
    if any(p != precision for p in used_precisions.values()):
        label += " (" + ", ".join(f"{g}: {p}" for g, p in used_precisions.items() if p != precision) + ")"
    return sources, label


def _per_model_placeholders(values: dict) -> dict[str, dict[str, object]]:
    """The placeholders of each model's template from the resolved tunables (validated)."""
    per_model = {
        "encoder": {
            "MAX_BATCH_SIZE": int(values["encoder_max_batch_size"]),
            "PREFERRED_BATCH_SIZES": _int_list(values["encoder_preferred_batch_sizes"], "encoder_preferred_batch_sizes"),
            "MAX_QUEUE_DELAY_MICROSECONDS": int(values["encoder_max_queue_delay_microseconds"]),
            "MAX_QUEUE_SIZE": int(values["encoder_max_queue_size"]),
            "DEFAULT_TIMEOUT_MICROSECONDS": int(values["encoder_default_timeout_microseconds"]),
            "INSTANCE_COUNT": int(values["encoder_instance_count"]),
            "INTRA_OP_THREADS": int(values["encoder_intra_op_threads"]),
            "CPU_MEM_ARENA": _fmt_bool(values["encoder_cpu_mem_arena"]),
            "RUN_BATCH_SIZE": int(values["encoder_run_batch_size"]),
        },
        "decoder": {
            "MAX_BATCH_SIZE": int(values["decoder_max_batch_size"]),
            "PREFERRED_BATCH_SIZES": _int_list(values["decoder_preferred_batch_sizes"], "decoder_preferred_batch_sizes"),
            "MAX_QUEUE_DELAY_MICROSECONDS": int(values["decoder_max_queue_delay_microseconds"]),
            "MAX_CANDIDATE_SEQUENCES": int(values["max_candidate_sequences"]),
            "MAX_SEQUENCE_IDLE_MICROSECONDS": int(values["max_sequence_idle_microseconds"]),
            "MAX_SEQUENCES": int(values["max_sequences"]),
            "SEQUENCE_IDLE_TIMEOUT_S": float(values["sequence_idle_timeout_s"]),
            "INSTANCE_COUNT": int(values["decoder_instance_count"]),
            "INTRA_OP_THREADS": int(values["decoder_intra_op_threads"]),
            "CPU_MEM_ARENA": _fmt_bool(values["decoder_cpu_mem_arena"]),
            "INIT_CPU_MEM_ARENA": _fmt_bool(values["decoder_init_cpu_mem_arena"]),
            "DEFAULT_TOP_K": int(values["default_top_k"]),
            "BUFFER_POOL_MB": int(values["buffer_pool_mb"]),
            "SPLIT_LAYER_INPUTS": _fmt_bool(values["split_layer_inputs"]),
            "MAX_RUNS": int(values["max_runs"]),
            "MAX_DUMMY_FRACTION": float(values["max_dummy_fraction"]),
            "KV_REORDER_IN_PLACE": _fmt_bool(values["kv_reorder_in_place"]),
            "HEAP_MMAP_THRESHOLD_MB": int(values["heap_mmap_threshold_mb"]),
            "HEAP_ARENA_MAX": int(values["heap_arena_max"]),
            "LOAD_ON_FIRST_USE": _fmt_bool(values["decoder_load_on_first_use"]),
        },
    }
    for name, vals in per_model.items():
        for key in ("MAX_BATCH_SIZE", "INSTANCE_COUNT", "RUN_BATCH_SIZE"):
            if key in vals and int(vals[key]) < 1:
                raise RenderError(f"{name}: {key.lower()} must be >= 1")
    if int(values["max_candidate_sequences"]) < 1 or int(values["max_sequences"]) < 1:
        raise RenderError("max_candidate_sequences and max_sequences must be >= 1")
    return per_model


def _config_text(name: str, placeholders: dict, extra_parameters: dict[str, str]) -> str:
    """config.pbtxt of model `name`: its template filled in, plus the family's extra parameters."""
    template_path = HERE / name / "config.pbtxt.in"
    text = substitute(template_path.read_text(encoding="utf-8"), placeholders, str(template_path))
    for key, value in extra_parameters.items():
        text += f'parameters {{ key: "{key}" value {{ string_value: "{_pbtxt_string(value)}" }} }}\n'
    return text


def _deploy_graph(src: Path, version: Path, say) -> set[str]:
    """Link the graph and its external data files into the version folder; returns their names."""
    graph = src.name
    files = {graph: src}
    for extra in _external_data_files(src) | {p.name for p in src.parent.glob(graph + "*")}:
        files.setdefault(extra, src.parent / extra)
    for fname, fsrc in sorted(files.items()):
        if not fsrc.is_file():
            raise RenderError(f"{fsrc} (referenced by {src}) not found")
        how = _link_or_copy(fsrc, version / fname)
        say(f"[render] {version / fname}: {how} from {fsrc}")
    return set(files)


STEP_GRAPH = "decoder_step.onnx"  # the decoder graph whose stacked K/V inputs are split per layer


def _deploy_layer_split(src: Path, version: Path, say) -> set[str] | None:
    """The step graph with one K/V input per layer (engine/layers.py), written into the version
    folder, so the backend stub loads it from a file: splitting it there instead (onnx.load and a
    session from the serialized bytes) costs the decoder stub about 100 MB (int8) to 200 MB (fp32)
    for good, and twice the graph at load. A stamp names the source it was made from (a rerun
    with the same source writes nothing). None when it cannot be done here (no onnx package,
    external data, no stacked per-layer Gathers): the graph is linked and the stub splits it."""
    if _external_data_files(src):
        return None
    dst, stamp = version / src.name, version / (src.name + ".split.json")
    st = src.stat()
    source = json.dumps({"source": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    if dst.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == source and not _same_file(src, dst):
        say(f"[render] {dst}: unchanged (per-layer K/V inputs)")
        return {src.name, stamp.name}
    try:
        import onnx

        from .engine.layers import split_layer_inputs
    except ImportError:
        return None
    model = onnx.load(str(src))
    split = split_layer_inputs(model)
    if not split:
        return None
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, dst)
    _write_if_changed(stamp, source)
    say(f"[render] {dst}: written from {src} with per-layer inputs for {', '.join(sorted(split))}")
    return {src.name, stamp.name}


def _write_model(model_out: Path, name: str, text: str, graphs: list[Path], say, split_step: bool = False,
                 files: tuple[Path, ...] = ()) -> None:
    """One model folder: config.pbtxt, 1/model.py, 1/engine/, the graphs and ``files``; nothing else."""
    version = model_out / "1"
    version.mkdir(parents=True, exist_ok=True)
    changed = _write_if_changed(model_out / "config.pbtxt", text)
    say(f"[render] {model_out / 'config.pbtxt'}: {'written' if changed else 'unchanged'}")
    changed = _copy_if_changed(HERE / name / "1" / "model.py", version / "model.py")
    say(f"[render] {version / 'model.py'}: {'copied' if changed else 'unchanged'}")
    copied = _sync_tree(ENGINE, version / ENGINE_DIR, ENGINE_FILES, SEARCH_EXTRAS if name == "search" else None)
    say(f"[render] {version / ENGINE_DIR}: {', '.join(copied) + ' copied' if copied else 'unchanged'}")
    expected = {"model.py", ENGINE_DIR}
    for src in graphs:
        written = _deploy_layer_split(src, version, say) if split_step and src.name == STEP_GRAPH else None
        expected |= written if written is not None else _deploy_graph(src, version, say)
    for src in files:
        say(f"[render] {version / src.name}: {_link_or_copy(src, version / src.name)} from {src}")
        expected.add(src.name)
    for stale in version.iterdir():
        if stale.name not in expected and stale.name != "__pycache__":
            say(f"[render] removing stale {stale}")
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()


def render_repository(model_dir, out_dir, precision: str = "fp32", *, verbose: bool = False,
                      **tunables) -> Path:
    """Render ``out_dir`` (a Triton model repository) from ``model_dir``; returns ``out_dir``."""
    model_dir = Path(model_dir).resolve()
    out_dir = Path(out_dir).resolve()
    say = print if verbose else (lambda *a, **k: None)
    values = resolve_tunables(tunables)
    graphs_dir, label = precision, None
    if precision == "int8":
        graphs_dir, label = int8_directory(model_dir / "onnx", str(values["int8_weights"]))
    info, onnx_root, onnx_dir = _exported(model_dir, graphs_dir)
    family = str(_first(info, "family") or "whisper")
    model_name = str(_first(info, "name", "model_name") or model_dir.name)
    models = family_runner(family).graphs
    sources, precision_label = _graph_sources(models, onnx_root, graphs_dir)
    if label is not None:
        precision_label = precision_label.replace(graphs_dir, label, 1)
    say(f"[render] precision {precision_label}")
    common = {
        "FAMILY": _pbtxt_string(family), "MODEL_NAME": _pbtxt_string(model_name),
        "PRECISION": _pbtxt_string(precision_label),
        "EXECUTION_PROVIDER": _pbtxt_string(str(values["execution_provider"])),
        "PYLIB_DIR": _pbtxt_string(values["pylib_dir"]), "ALLOW_SPINNING": _fmt_bool(values["allow_spinning"]),
        "COMPUTE_LOCK": _fmt_bool(values["cpu_compute_lock"]),
        "FP16": _fmt_bool(values["fp16"]),
        **model_dims(model_dir, onnx_dir, info),
    }
    per_model = _per_model_placeholders(values)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra_parameters = family_parameters(family, info)
    split = _fmt_bool(values["split_layer_inputs"]) == "1"
    for name, graphs in models.items():
        text = _config_text(name, {**common, **per_model[name]}, extra_parameters.get(name, {}))
        _write_model(out_dir / name, name, text, [sources[g] for g in graphs], say,
                     split_step=name == "decoder" and split)
    search_dir = out_dir / "search"
    if _fmt_bool(values["search_model"]) == "1":
        # the decoder's graphs and parameters, plus the search's own
        tokenizer = model_dir / TOKENIZER_FILE
        hotwords = _fmt_bool(values["search_hotwords"]) == "1"
        if hotwords and not tokenizer.is_file():
            say(f"[render] search: no {tokenizer}: hotword-biased windows stay with the gateway")
            hotwords = False
        placeholders = {**common, **per_model["decoder"], "SEARCH_MAX_WINDOWS": int(values["search_max_windows"]),
                        "SEARCH_MAX_WAITING": int(values["search_max_waiting"]), "SEARCH_HOTWORDS": _fmt_bool(hotwords),
                        "SEARCH_INSTANCE_COUNT": int(values["search_instance_count"]),
                        "SEARCH_CANCEL_POLL_MS": int(values["search_cancel_poll_ms"]),
                        "SEARCH_HEAP_TRIM_MS": int(values["search_heap_trim_ms"])}
        text = _config_text("search", placeholders, extra_parameters.get("decoder", {}))
        _write_model(search_dir, "search", text, [sources[g] for g in models["decoder"]], say, split_step=split,
                     files=(tokenizer,) if hotwords else ())
    elif search_dir.is_dir():
        say(f"[render] removing {search_dir} (search_model off)")
        shutil.rmtree(search_dir)
    return out_dir


# --------------------------------------------------------------------------- CLI
def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render the Triton model repository (encoder + decoder).")
    ap.add_argument("--model-dir", required=True, help="exported model, e.g. build/models/whisper-base")
    ap.add_argument("--precision", default="fp32", help="fp32 | int8 (a directory under <model-dir>/onnx/)")
    ap.add_argument("--out", required=True, help="repository to write, e.g. build/model_repository")
    ap.add_argument("--execution-provider", default=None,
                    help="ONNX Runtime provider: CPUExecutionProvider (default), CUDAExecutionProvider, "
                         "TensorrtExecutionProvider")
    ap.add_argument("--max-batch", type=int, default=None, help="max_batch_size of both models")
    ap.add_argument("--encoder-max-batch", type=int, default=None, help="encoder max_batch_size (8)")
    ap.add_argument("--decoder-max-batch", type=int, default=None, help="decoder max_batch_size (16)")
    ap.add_argument("--max-candidate-sequences", type=int, default=None)
    ap.add_argument("--max-sequences", type=int, default=None)
    ap.add_argument("--intra-op-threads", type=int, default=None, help="ONNX Runtime threads per model (0 = auto)")
    ap.add_argument("--pylib-dir", default=None, help="packages the backend stub imports (build/triton/pylib)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any tunable: " + ", ".join(sorted(DEFAULT_TUNABLES)))
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    tunables: dict[str, object] = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        value = _parse_value(value)
        if key.endswith("preferred_batch_sizes") and isinstance(value, (int, str)):
            value = str(value)
        tunables[key.strip()] = value
    if args.max_batch is not None:
        tunables.setdefault("encoder_max_batch_size", args.max_batch)
        tunables.setdefault("decoder_max_batch_size", args.max_batch)
    for key, value in (("execution_provider", args.execution_provider),
                       ("encoder_max_batch_size", args.encoder_max_batch),
                       ("decoder_max_batch_size", args.decoder_max_batch),
                       ("max_candidate_sequences", args.max_candidate_sequences),
                       ("max_sequences", args.max_sequences),
                       ("intra_op_threads", args.intra_op_threads),
                       ("pylib_dir", args.pylib_dir)):
        if value is not None:
            tunables[key] = value
    try:
        out = render_repository(args.model_dir, args.out, args.precision, verbose=not args.quiet, **tunables)
    except RenderError as error:
        print(f"render: error: {error}", file=sys.stderr)
        return 2
    pylib = resolve_tunables(tunables)["pylib_dir"]
    if not Path(pylib).is_dir():
        print(f"[render] note: {pylib} does not exist yet (python tools/setup_triton.py creates it)", file=sys.stderr)
    print(f"[render] repository ready: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
