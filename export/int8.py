"""INT8 weight quantization shared by every model family, safe on every x86 CPU.

ONNX Runtime's dynamic quantization runs MatMulInteger with uint8 activations and int8
weights (U8S8). On AVX2 without VNNI that kernel multiplies adjacent pairs along K with
``vpmaddubsw``, which adds two u8 x s8 products into a *saturating* int16: with full-range
weights a pair reaches 255 * (127 + 127) = 64,770 and is clipped at 32,767, so logits go
wrong silently (measured on an AMD EPYC without VNNI: GLM tiny argmax 10/21, Whisper int8
CER 20.5% against 14.7% fp32). Quantizing weights to 7 bits (``reduce_range``: -64..64)
keeps every pair at most 255 * 128 = 32,640, exact on AVX2, AVX-512 and VNNI alike, so one
exported model is correct on whatever CPU serves it (Whisper: CER 14.9%).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The int8 variants every export writes: "int8" with 7-bit weights, exact on every x86 CPU, and
# "int8-vnni" with 8-bit weights, exact only where the U8S8 kernel adds u8 x s8 products straight
# into int32 (VNNI); model_repository/render.py serves the second where the CPU has VNNI (Whisper
# base, 10-minute recording: CER 14.77 / 14.72 against 15.49 / 15.75, fp32 14.40, same speed)
INT8_VARIANTS = {"int8": {"reduce_range": True}, "int8-vnni": {"reduce_range": False}}

U8_MAX = 255
INT16_MAX = 32767
# Adjacent K pairs summed by the AVX2 U8S8 kernel before widening to int32.
U8S8_PAIR = 2


def quantize_embedding_gathers(model, min_elements: int = 1 << 20) -> int:
    """Replace Gather(W, ids) on a float initializer by an int8 table with one symmetric scale per
    gathered slice (per token): Gather(Wq, ids) -> Cast -> Mul(Gather(scale, ids)).

    The decoder's [d, V] vocabulary matrix serves both the token lookup (Gather on axis 1) and the
    output projection (MatMul). The projection is left to quantize_dynamic (per-channel int8); the
    lookup gets its own per-token int8 table here, which is far more accurate than the per-tensor
    uint8 table quantize_dynamic would make. Small tables (position embeddings) stay float.
    A Gather is plain integer indexing (no U8S8 arithmetic), so the full int8 range is safe.
    Returns the number of rewritten Gathers."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    count = 0
    for node in model.graph.node:
        w = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if (w is None or w.data_type != onnx.TensorProto.FLOAT or len(w.dims) != 2
                or int(np.prod(w.dims)) < min_elements):
            new_nodes.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        arr = numpy_helper.to_array(w)
        red = 1 - axis  # reduce over the other dim -> one scale per gathered index
        scale = np.abs(arr).max(axis=red) / 127.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.rint(arr / np.expand_dims(scale, red)), -127, 127).astype(np.int8)
        base = f"{w.name}_gather{count}"
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{base}_int8"),
                                        numpy_helper.from_array(scale, f"{base}_scale")])
        out = node.output[0]
        new_nodes += [
            helper.make_node("Gather", [f"{base}_int8", node.input[1]], [f"{base}_q"], name=f"{node.name}_int8",
                             axis=axis),
            helper.make_node("Cast", [f"{base}_q"], [f"{base}_f"], name=f"{node.name}_cast",
                             to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [f"{base}_scale", node.input[1]], [f"{base}_s"], name=f"{node.name}_scale",
                             axis=0),
        ]
        if axis == 0:  # [M..., d] * [M..., 1]
            new_nodes.append(helper.make_node("Unsqueeze", [f"{base}_s", f"{base}_axes"], [f"{base}_su"],
                                              name=f"{node.name}_unsq"))
            model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{base}_axes"))
            new_nodes.append(helper.make_node("Mul", [f"{base}_f", f"{base}_su"], [out], name=f"{node.name}_mul"))
        else:  # axis 1 on [d, V]: [d, M...] * [M...]
            new_nodes.append(helper.make_node("Mul", [f"{base}_f", f"{base}_s"], [out], name=f"{node.name}_mul"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return count


def quantize_matmuls(model, dst: Path, options: dict, exclude: list[str], *, external_data: bool = False) -> None:
    """Dynamic int8 quantization of the constant-weight MatMuls of ``model`` into ``dst``.

    ``options``: the family's INT8_OPTIONS (weight_type, per_channel, op_types,
    matmul_const_b_only, reduce_range); ``exclude``: MatMul node names kept in float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        model, str(dst),
        op_types_to_quantize=list(options["op_types"]),
        per_channel=options["per_channel"],
        reduce_range=options["reduce_range"],
        weight_type=getattr(QuantType, options["weight_type"]),
        nodes_to_exclude=exclude,
        use_external_data_format=external_data,
        extra_options={"MatMulConstBOnly": options["matmul_const_b_only"]},
    )


def u8s8_pair_peak(model) -> int:
    """The largest |u8 x s8 + u8 x s8| the AVX2 U8S8 kernel can form for any integer MatMul
    weight of ``model`` (uint8 activations at 255): above INT16_MAX the kernel saturates."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    peak = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMulInteger", "DynamicQuantizeMatMul"):
            continue
        weight = inits.get(node.input[1])
        if weight is None:
            continue
        w = numpy_helper.to_array(weight)
        if w.dtype != np.int8 or w.ndim != 2:
            continue
        k = w.shape[0] - w.shape[0] % U8S8_PAIR
        pairs = np.abs(w[:k].astype(np.int32)).reshape(k // U8S8_PAIR, U8S8_PAIR, -1).sum(axis=1)
        peak = max(peak, U8_MAX * int(pairs.max(initial=0)))
    return peak
