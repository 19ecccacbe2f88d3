"""Encoder self-attention fused into MultiHeadAttention (export/fused_attention.py): the rewrite
of the exported encoder computes what the unfused graph computes, on a real call, and refuses
graphs it does not understand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.fused_attention import CONTRIB_DOMAIN, AttentionFusionError, fuse_self_attention

from tests.conftest import PROJECT_ROOT, load_clip_audio

CALLS = PROJECT_ROOT / "data" / "calls"

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _session(model_or_path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _ops(model) -> dict:
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _attention_graph(extra_softmax_output: bool = False):
    """One attention chain as the exporter writes it: q scaled by a Mul, heads split by
    Reshape + Transpose, MatMul -> Softmax -> MatMul, heads merged back."""
    from onnx import TensorProto, helper

    S, D, H = 40, 32, 4
    nodes = [
        helper.make_node("Mul", ["q", "q_scale"], ["q_scaled"]),
        helper.make_node("Reshape", ["q_scaled", "heads"], ["q_heads"]),
        helper.make_node("Reshape", ["k", "heads"], ["k_heads"]),
        helper.make_node("Reshape", ["v", "heads"], ["v_heads"]),
        helper.make_node("Transpose", ["q_heads"], ["q_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_heads"], ["k_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_heads"], ["v_t"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "score_scale"], ["scores_scaled"]),
        helper.make_node("Softmax", ["scores_scaled"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v_t"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merged"], ["out"]),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, S, D])]
    if extra_softmax_output:  # the weights are read elsewhere: the chain is not the fused form
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, S, D]) for n in "qkv"], outputs,
        [helper.make_tensor("heads", TensorProto.INT64, [4], [1, S, H, D // H]),
         helper.make_tensor("merged", TensorProto.INT64, [3], [1, S, D]),
         helper.make_tensor("q_scale", TensorProto.FLOAT, [], [0.25]),
         helper.make_tensor("score_scale", TensorProto.FLOAT, [], [0.5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what onnxruntime reads
    return model, H


def test_fused_chain_computes_the_same_attention():
    model, heads = _attention_graph()
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((1, 40, 32)).astype(np.float32) for n in "qkv"}
    expected = _session(model).run(None, feed)[0]
    assert fuse_self_attention(model, heads) == 1
    assert _ops(model) == {"MultiHeadAttention": 1}
    node = model.graph.node[0]
    assert node.domain == CONTRIB_DOMAIN and list(node.input) == ["q", "k", "v"]
    assert [a.f for a in node.attribute if a.name == "scale"] == [pytest.approx(0.125)]  # both scales
    assert not [i.name for i in model.graph.initializer]  # the reshape shapes and scales went with the chain
    got = _session(model).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_chain_with_a_second_reader_is_refused():
    model, heads = _attention_graph(extra_softmax_output=True)
    with pytest.raises(AttentionFusionError, match="no self-attention chain"):
        fuse_self_attention(model, heads)


def test_exported_encoder_matches_the_unfused_one_on_a_real_call(model_dir):
    """The fp32 encoder fused by the same rewrite the int8 export applies, against itself unfused."""
    from gateway.asr.features import log_mel_spectrogram

    info = json.loads((model_dir / "model_info.json").read_text())
    call = json.loads((CALLS / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    features = log_mel_spectrogram(load_clip_audio(CALLS / call["file"]), info["n_mels"])[None]
    source = model_dir / "onnx" / "fp32" / "encoder.onnx"
    model = onnx.load(str(source))
    assert fuse_self_attention(model, info["n_heads"]) == info["n_encoder_layers"]
    assert "Softmax" not in _ops(model)
    expected = _session(source).run(None, {"input_features": features})[0]
    got = _session(model).run(None, {"input_features": features})[0]
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max())


def test_int8_export_ships_the_fused_encoder(model_dir):
    info = json.loads((model_dir / "model_info.json").read_text())
    ops = _ops(onnx.load(str(model_dir / "onnx" / "int8" / "encoder.onnx"), load_external_data=False))
    assert ops.get("MultiHeadAttention") == info["n_encoder_layers"] and "Softmax" not in ops
    # fp32 stays portable: TensorRT builds its engines from it
    fp32_ops = _ops(onnx.load(str(model_dir / "onnx" / "fp32" / "encoder.onnx"), load_external_data=False))
    assert "MultiHeadAttention" not in fp32_ops and fp32_ops.get("Softmax") == info["n_encoder_layers"]


def test_encoder_profile_sees_the_fused_operator(model_dir, tmp_path):
    """bench.step_profile's encoder profile of the int8 export: the fused operator carries the
    attention's kernel time (no Softmax left to carry it)."""
    from bench.step_profile import profile_encoder

    info = json.loads((model_dir / "model_info.json").read_text())
    level = profile_encoder(model_dir / "onnx" / "int8" / "encoder.onnx", info, runs=1, work=tmp_path)
    assert level["windows"] == 1 and level["call_ms"] > 0
    assert level["op_share"].get("MultiHeadAttention", 0) > 0.05 and "Softmax" not in level["op_share"]
