"""TensorRT engines from the exported ONNX graphs (``make trt``).

    python -m export.trt --model-dir build/models/glm-asr-nano [--precision fp16|int8]
        [--calibration DIR_OR_FILES ...] [--backend auto|trtexec|ort] [--out DIR]
    python -m export.trt --model-dir ... --precision int8 --calibration DIR --calibrate-only

Where TensorRT exists (``trtexec`` on PATH or under /usr/src/tensorrt/bin, or ONNX Runtime with
the TensorrtExecutionProvider, e.g. inside NVIDIA's Triton container) it builds one engine per
graph of the model directory (``encoder``, and ``embed_tokens`` + ``decoder_step`` for GLM-ASR or
``decoder_init`` + ``decoder_step`` for Whisper) with optimisation profiles for the shapes the
Triton models use (batch of windows, sequences x beams x new tokens, cached positions):

- ``--backend trtexec``: ``OUT/<graph>.plan`` files (``trtexec --saveEngine``);
- ``--backend ort``: ONNX Runtime TensorRT engine cache in ``OUT/`` (``trt_engine_cache_path``),
  what the Triton models use with ``--execution-provider TensorrtExecutionProvider``.

INT8: the encoder runs in INT8 with a calibration cache computed from real recordings
(``--calibration``: audio files or directories; the 30 s windows go through the same log-mel
features as the gateway); the decoder graphs build in fp16 (their inputs are cache tensors, not
recordings). The calibration cache is computed with ONNX Runtime on the CPU, so
``--calibrate-only`` works without TensorRT.

Without TensorRT it says so and exits with status 3 before doing anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

EXIT_NO_TENSORRT = 3
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".amr")


class TrtError(RuntimeError):
    pass


def find_tensorrt() -> dict:
    """What TensorRT tooling this machine has: {"trtexec": path|None, "ort_trt": bool, "tensorrt": version|None}."""
    trtexec = shutil.which("trtexec")
    for candidate in ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec"):
        if trtexec is None and os.access(candidate, os.X_OK):
            trtexec = candidate
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    try:
        import tensorrt

        version = getattr(tensorrt, "__version__", "?")
    except ImportError:
        version = None
    return {"trtexec": trtexec, "ort_trt": "TensorrtExecutionProvider" in providers, "tensorrt": version,
            "ort_providers": providers}


def no_tensorrt_message(found: dict) -> str:
    return ("TensorRT is not available on this machine: no `trtexec` on PATH (nor /usr/src/tensorrt/bin), no "
            "`tensorrt` Python package, and onnxruntime offers no TensorrtExecutionProvider (it has: "
            f"{', '.join(found['ort_providers']) or 'none'}). Build the engines where TensorRT and a GPU exist, e.g. "
            "inside NVIDIA's Triton container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3, which has trtexec) with "
            "this repository mounted: `make trt MODEL=... PRECISION=fp16|int8 CALIBRATION=DIR`. The ONNX graphs "
            "(fp32/fp16/int8) serve without TensorRT (ONNX Runtime CPU/CUDA). "
            "`python -m export.trt --calibrate-only` computes the INT8 calibration cache here.")


# --------------------------------------------------------------------------------------------
# shapes


def graph_profiles(info: dict, max_windows: int, max_rows: int, max_beams: int, max_positions: int) -> dict:
    """{graph: {input: (min, opt, max) shapes}} for the Triton models' traffic."""
    n_mels, frames = int(info["n_mels"]), int(info.get("n_frames", 3000))
    L = int(info["n_layers"])
    dh = int(info["head_dim"] if "head_dim" in info else info["d_model"] // info["n_heads"])
    d = int(info["d_model"])
    prompt = int(info.get("audio_tokens_per_window", 0)) + 64  # prefill of one window
    profiles = {"encoder": {"input_features": ((1, n_mels, frames), (max(1, max_windows // 2), n_mels, frames),
                                               (max_windows, n_mels, frames))}}
    if info.get("family") == "glm_asr":
        hkv = int(info["n_kv_heads"])
        profiles["embed_tokens"] = {"input_ids": ((1, 1, 1), (max_rows, max_beams, 1), (max_rows, max_beams, prompt))}
        profiles["decoder_step"] = {
            "inputs_embeds": ((1, 1, 1, d), (max_rows, max_beams, 1, d), (max_rows, max_beams, prompt, d)),
            "past_length": ((1,), (max_rows,), (max_rows,)),
            "past_k": ((L, 1, 1, hkv, 0, dh), (L, max_rows, max_beams, hkv, prompt, dh),
                       (L, max_rows, max_beams, hkv, max_positions, dh)),
            "past_v": ((L, 1, 1, hkv, 0, dh), (L, max_rows, max_beams, hkv, prompt, dh),
                       (L, max_rows, max_beams, hkv, max_positions, dh)),
        }
    else:
        h, s = int(info["n_heads"]), int(info.get("n_audio_ctx", frames // 2))
        profiles["decoder_init"] = {"encoder_output": ((1, s, d), (max_rows, s, d), (max_rows, s, d))}
        profiles["decoder_step"] = {
            "input_ids": ((1, 1, 1), (max_rows, max_beams, 1), (max_rows, max_beams, 8)),
            "past_length": ((1,), (max_rows,), (max_rows,)),
            "past_k": ((L, 1, 1, h, 0, dh), (L, max_rows, max_beams, h, 64, dh), (L, max_rows, max_beams, h, max_positions, dh)),
            "past_v": ((L, 1, 1, h, 0, dh), (L, max_rows, max_beams, h, 64, dh), (L, max_rows, max_beams, h, max_positions, dh)),
            "cross_k": ((L, 1, h, s, dh), (L, max_rows, h, s, dh), (L, max_rows, h, s, dh)),
            "cross_v": ((L, 1, h, s, dh), (L, max_rows, h, s, dh), (L, max_rows, h, s, dh)),
        }
    return profiles


def _shape_arg(profile: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(v) for v in shapes[which])}" for name, shapes in profile.items())


# --------------------------------------------------------------------------------------------
# INT8 calibration (ONNX Runtime, CPU)


def calibration_files(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise TrtError(f"calibration input {p} does not exist")
    if not files:
        raise TrtError(f"no recordings ({', '.join(AUDIO_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return files


def calibration_windows(files, n_mels: int, max_windows: int = 64):
    """log-mel features [1, n_mels, 3000] of up to max_windows 30 s windows of the recordings."""
    from gateway.asr.features import N_SAMPLES, log_mel_spectrogram

    from .onnx_tools import read_audio

    n = 0
    for path in files:
        audio = read_audio(path)
        for start in range(0, max(1, len(audio)), N_SAMPLES):
            window = audio[start:start + N_SAMPLES]
            if len(window) == 0:
                continue
            yield log_mel_spectrogram(window, n_mels=n_mels)[np.newaxis].astype(np.float32)
            n += 1
            if n >= max_windows:
                return


def write_calibration_cache(encoder_onnx: Path, windows, out_dir: Path, method: str = "entropy") -> Path:
    """Entropy calibration of the encoder's activations -> out_dir/calibration.* ; returns out_dir."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator, write_calibration_table

    class Reader(CalibrationDataReader):
        def __init__(self, it):
            self.it = iter(it)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input_features": x}

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="calib-") as td:
        calibrator = create_calibrator(str(encoder_onnx), augmented_model_path=str(Path(td) / "augmented.onnx"),
                                       calibrate_method={"entropy": CalibrationMethod.Entropy,
                                                         "minmax": CalibrationMethod.MinMax}[method],
                                       providers=["CPUExecutionProvider"])
        calibrator.collect_data(Reader(windows))
        ranges = calibrator.compute_data()
    data = ranges.data if hasattr(ranges, "data") else ranges
    write_calibration_table(data, dir=str(out_dir))  # calibration.{json,flatbuffers,cache}: ORT TensorRT EP
    write_native_cache(data, out_dir / "calibration.trt.cache")
    return out_dir


def write_native_cache(data, path: Path) -> None:
    """TensorRT's own calibration cache format (trtexec --calib): a header line, then
    ``tensor: <scale as big-endian float32 hex>`` with scale = max |range| / 127."""
    import struct

    version = "0"
    try:
        import tensorrt

        major, minor, patch = (tensorrt.__version__.split(".") + ["0", "0"])[:3]
        version = f"{int(major)}{int(minor):02d}{int(patch):02d}"
    except (ImportError, ValueError):
        pass
    lines = [f"TRT-{version}-EntropyCalibration2"]
    for name in sorted(data):
        d = data[name].to_dict() if hasattr(data[name], "to_dict") else {}
        lo, hi = float(np.asarray(d.get("lowest", 0)).item()), float(np.asarray(d.get("highest", 0)).item())
        scale = max(abs(lo), abs(hi)) / 127.0 or 1e-8
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# builds


def build_trtexec(trtexec: str, onnx_path: Path, plan: Path, profile: dict, fp16: bool, int8_cache: Path | None,
                  workspace_mb: int) -> None:
    cmd = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={plan}",
           f"--minShapes={_shape_arg(profile, 0)}", f"--optShapes={_shape_arg(profile, 1)}",
           f"--maxShapes={_shape_arg(profile, 2)}", f"--memPoolSize=workspace:{workspace_mb}"]
    if fp16:
        cmd.append("--fp16")
    if int8_cache is not None:
        cmd += ["--int8", f"--calib={int8_cache / 'calibration.trt.cache'}"]
    print("[trt] " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise TrtError(f"trtexec failed for {onnx_path.name} ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def build_ort(onnx_path: Path, cache_dir: Path, profile: dict, fp16: bool, int8_cache: Path | None,
              workspace_mb: int) -> None:
    import onnxruntime as ort

    options = {
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir), "trt_fp16_enable": fp16,
        "trt_max_workspace_size": workspace_mb << 20, "trt_profile_min_shapes": _shape_arg(profile, 0),
        "trt_profile_opt_shapes": _shape_arg(profile, 1), "trt_profile_max_shapes": _shape_arg(profile, 2),
    }
    if int8_cache is not None:  # the table is looked up in the engine cache directory
        if int8_cache.resolve() != cache_dir.resolve():
            shutil.copyfile(int8_cache / "calibration.flatbuffers", cache_dir / "calibration.flatbuffers")
        options.update(trt_int8_enable=True, trt_int8_calibration_table_name="calibration.flatbuffers",
                       trt_int8_use_native_calibration_table=False)
    print(f"[trt] ORT TensorRT EP build of {onnx_path.name} -> {cache_dir}", flush=True)
    session = ort.InferenceSession(str(onnx_path), providers=[("TensorrtExecutionProvider", options),
                                                               "CUDAExecutionProvider"])
    feeds = {}
    for inp in session.get_inputs():
        shape = profile[inp.name][1]
        dtype = {"tensor(int64)": np.int64, "tensor(float16)": np.float16}.get(inp.type, np.float32)
        feeds[inp.name] = np.zeros(shape, dtype) if inp.name != "past_length" else np.full(shape, 0, np.int64)
    session.run(None, feeds)  # the engine is built (and cached) on the first run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="exported model (model_info.json, onnx/)")
    ap.add_argument("--precision", choices=("fp16", "int8"), default="fp16")
    ap.add_argument("--calibration", nargs="*", default=[], help="recordings or directories (INT8)")
    ap.add_argument("--calibration-windows", type=int, default=64)
    ap.add_argument("--backend", choices=("auto", "trtexec", "ort"), default="auto")
    ap.add_argument("--out", type=Path, default=None, help="default: <model-dir>/trt/<precision>")
    ap.add_argument("--max-windows", type=int, default=8, help="encoder batch (Triton encoder max_batch_size)")
    ap.add_argument("--max-rows", type=int, default=16, help="sequences per decoder step (decoder max_batch_size)")
    ap.add_argument("--max-beams", type=int, default=5)
    ap.add_argument("--max-positions", type=int, default=1024, help="cached positions per sequence")
    ap.add_argument("--workspace-mb", type=int, default=4096)
    ap.add_argument("--calibrate-only", action="store_true", help="write the INT8 calibration cache and stop")
    args = ap.parse_args(argv)

    found = find_tensorrt()
    have_trt = bool(found["trtexec"] or found["ort_trt"])
    if not have_trt and not args.calibrate_only:
        print(f"[trt] error: {no_tensorrt_message(found)}", file=sys.stderr)
        return EXIT_NO_TENSORRT
    try:
        info_path = args.model_dir / "model_info.json"
        if not info_path.is_file():
            raise TrtError(f"{info_path} not found: export the model first (make export MODEL=...)")
        info = json.loads(info_path.read_text(encoding="utf-8"))
        out = args.out or args.model_dir / "trt" / args.precision
        fp32_dir = args.model_dir / "onnx" / "fp32"
        cache = None
        if args.precision == "int8":
            if not args.calibration:
                raise TrtError("INT8 needs --calibration with recordings (CALIBRATION=DIR for make trt)")
            windows = calibration_windows(calibration_files(args.calibration), int(info["n_mels"]),
                                          args.calibration_windows)
            cache = write_calibration_cache(fp32_dir / "encoder.onnx", windows, out)
            print(f"[trt] calibration caches in {cache}: calibration.flatbuffers (ONNX Runtime TensorRT EP), "
                  "calibration.trt.cache (trtexec)")
        if args.calibrate_only:
            return 0
        backend = args.backend
        if backend == "auto":
            backend = "trtexec" if found["trtexec"] else "ort"
        if backend == "trtexec" and not found["trtexec"]:
            raise TrtError("--backend trtexec: no trtexec found")
        if backend == "ort" and not found["ort_trt"]:
            raise TrtError("--backend ort: this onnxruntime has no TensorrtExecutionProvider")
        out.mkdir(parents=True, exist_ok=True)
        profiles = graph_profiles(info, args.max_windows, args.max_rows, args.max_beams, args.max_positions)
        built = {}
        for graph, profile in profiles.items():
            onnx_path = fp32_dir / f"{graph}.onnx"  # TensorRT picks fp16/int8 kernels itself
            int8 = cache if graph == "encoder" else None
            if backend == "trtexec":
                plan = out / f"{graph}.plan"
                build_trtexec(found["trtexec"], onnx_path, plan, profile, True, int8, args.workspace_mb)
                built[graph] = str(plan)
            else:
                build_ort(onnx_path, out, profile, True, int8, args.workspace_mb)
                built[graph] = str(out)
        (out / "manifest.json").write_text(json.dumps(
            {"model": info.get("name"), "family": info.get("family"), "precision": args.precision, "backend": backend,
             "engines": built, "profiles": {g: {k: list(map(list, v)) for k, v in p.items()} for g, p in profiles.items()},
             "int8_calibration_cache": str(cache) if cache else None}, indent=2) + "\n", encoding="utf-8")
        print(f"[trt] engines ready in {out}")
        return 0
    except TrtError as error:
        print(f"[trt] error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
