"""ONNX helpers shared by every model family: the torch -> ONNX export, saving (external
data for graphs over 2 GB), ONNX Runtime sessions for verification, the int8 quantization
driver, and reading audio through the gateway's own front end."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .common import log
from .int8 import quantize_embedding_gathers, quantize_matmuls

# graphs larger than this keep their weights in OUT/.../<graph>.onnx.data (protobuf's 2 GB cap)
EXTERNAL_DATA_BYTES = 1_800_000_000
_BYTES_PER_ELEMENT = {10: 2, 16: 2, 2: 1, 3: 1}  # float16, bfloat16, uint8, int8; others 4


def graph_bytes(model) -> int:
    return sum(int(np.prod(t.dims)) * _BYTES_PER_ELEMENT.get(t.data_type, 4) for t in model.graph.initializer)


def load_onnx(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save_onnx(model, path: Path, external: bool | None = None) -> None:
    """Save (and check) ``model``; a graph over EXTERNAL_DATA_BYTES keeps its weights in ``path.data``."""
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    if external is None:
        external = graph_bytes(model) > EXTERNAL_DATA_BYTES
    tmp = path.with_name(path.stem + ".tmp.onnx")
    if tmp.exists():
        tmp.unlink()
    if data.exists():  # onnx appends to an existing external data file
        data.unlink()
    model.producer_name = "asr-export"
    if external:  # tmp refers to data.name, which is where it ends up: the same directory
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(tmp))
    os.replace(tmp, path)
    onnx.checker.check_model(str(path))


@contextlib.contextmanager
def export_patches():
    """The TorchScript exporter cannot handle aten::diff in
    transformers.masking_utils.find_packed_sequence_indices; no packed sequences here."""
    import transformers.masking_utils as mu

    orig = getattr(mu, "find_packed_sequence_indices", None)
    if orig is not None:
        mu.find_packed_sequence_indices = lambda *a, **k: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if orig is not None:
            mu.find_packed_sequence_indices = orig


def torch_to_onnx(module, args, path: Path, input_names, output_names, dynamic_axes, opset: int) -> None:
    """TorchScript export of ``module`` into ``path`` (written whole or not at all)."""
    import torch

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as td:
        tmp = Path(td) / path.name
        with torch.no_grad(), export_patches():
            torch.onnx.export(module, args, str(tmp), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False)
        save_onnx(load_onnx(tmp), path)


def ort_session(path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def read_audio(path, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 samples of any recording, through the gateway's own decoder (PyAV)."""
    from gateway.asr.audio import decode_audio

    return decode_audio(Path(path).read_bytes(), sample_rate=sample_rate)


def sample_clip(lang: str, name: str) -> Path | None:
    """Path of a pytest-audioeval sample clip (e.g. ('zh', 'jishu')), or None if not installed."""
    import importlib.util

    spec = importlib.util.find_spec("pytest_audioeval")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        p = Path(base) / "samples" / "audio" / lang / f"{name}.wav"
        if p.is_file():
            return p
    return None


def fp32_matmuls(model, graph: str, options: dict, encoder_layer: str) -> list[str]:
    """MatMul nodes (constant weight) that stay float in the int8 variant: every module named in
    ``options['fp32_modules']`` and, in the encoder, its first ``options['encoder_fp32_layers']``
    layers (``encoder_layer`` formats a layer index into the node-name fragment)."""
    inits = {i.name for i in model.graph.initializer}
    first_layers = [encoder_layer.format(i) for i in range(options["encoder_fp32_layers"])]
    keep = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        if any(f"/{m}/" in node.name for m in options["fp32_modules"]):
            keep.append(node.name)
        elif graph == "encoder" and any(fragment in node.name for fragment in first_layers):
            keep.append(node.name)
    return keep


def quantize_graphs(fp32_dir: Path, int8_dir: Path, graphs, options: dict, *, encoder_layer: str,
                    gather_min_elements: dict[str, int] | None = None, copy_graphs=()) -> None:
    """Every graph of ``fp32_dir`` -> dynamic int8 in ``int8_dir`` (export/int8.py).

    ``gather_min_elements``: graph -> smallest Gather table rewritten per-token int8 (absent: none);
    a graph in ``copy_graphs`` is copied as it is."""
    import shutil

    int8_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing" warnings
    try:
        for name in graphs:
            graph = name[: -len(".onnx")]
            if graph in copy_graphs:
                shutil.copyfile(fp32_dir / name, int8_dir / name)
                continue
            model = load_onnx(fp32_dir / name)
            min_elements = (gather_min_elements or {}).get(graph)
            n_gather = quantize_embedding_gathers(model, min_elements) if min_elements is not None else 0
            exclude = fp32_matmuls(model, graph, options, encoder_layer)
            with tempfile.TemporaryDirectory(dir=int8_dir, prefix=".quant-") as td:
                tmp = Path(td) / name
                quantize_matmuls(model, tmp, options, exclude, external_data=graph_bytes(model) > EXTERNAL_DATA_BYTES)
                save_onnx(load_onnx(tmp), int8_dir / name)
            log(f"  {graph}: {len(exclude)} MatMul(s) kept in fp32, {n_gather} per-token int8 Gather(s)")
    finally:
        root.setLevel(level)
