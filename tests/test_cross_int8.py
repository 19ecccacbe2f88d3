"""Cross-attention over 8-bit K/V (export/cross_int8.py): the rewrite of decoder_init and
decoder_step, checked against numpy and the float graphs on a real clip, and the kernels it
picks (U8U8: nothing can saturate on AVX2 without VNNI)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export.cross_int8 import CROSS_INPUTS, Q_MAX, ZERO_POINT, CrossRewriteError, rewrite_init, rewrite_step

from tests.conftest import PROJECT_ROOT, load_clip_audio

CALLS = PROJECT_ROOT / "data" / "calls"

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def quantize_reference(k: np.ndarray, v: np.ndarray):
    """What decoder_init's rewrite computes, in numpy: K [L, N, H, S, dh] with one scale per frame
    (returned transposed), V with one per channel, symmetric around the zero point."""
    def q(x, axis):
        scale = np.maximum(np.abs(x).max(axis=axis, keepdims=True), 1e-30) / Q_MAX
        return (np.rint(x / scale) + ZERO_POINT).astype(np.uint8), scale.astype(np.float32)

    k_u8, k_scale = q(k, -1)
    v_u8, v_scale = q(v, -2)
    return (np.ascontiguousarray(k_u8.swapaxes(-1, -2)), np.ascontiguousarray(k_scale.swapaxes(-1, -2)),
            v_u8, v_scale)


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rewritten(model_dir, tmp_path, graph: str):
    """(float session, 8-bit session) of an fp32 graph and its rewrite."""
    source = model_dir / "onnx" / "fp32" / f"{graph}.onnx"
    model = onnx.load(str(source))
    rewrite_init(model) if graph == "decoder_init" else rewrite_step(model)
    path = tmp_path / f"{graph}.onnx"
    onnx.save(model, str(path))
    return _session(source), _session(path)


@pytest.fixture(scope="module")
def graphs(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cross_int8")
    init32, init8 = _rewritten(model_dir, tmp, "decoder_init")
    step32, step8 = _rewritten(model_dir, tmp, "decoder_step")
    return {"init32": init32, "init8": init8, "step32": step32, "step8": step8}


@pytest.fixture(scope="module")
def clip_encoder_output(model_dir):
    from gateway.asr.features import log_mel_spectrogram

    info = json.loads((model_dir / "model_info.json").read_text())
    call = json.loads((CALLS / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    features = log_mel_spectrogram(load_clip_audio(CALLS / call["file"]), info["n_mels"])[None]
    encoder = _session(model_dir / "onnx" / "fp32" / "encoder.onnx")
    return encoder.run(None, {"input_features": features})[0], info


def test_init_quantizes_like_the_numpy_reference(graphs):
    rng = np.random.default_rng(0)
    enc = (rng.standard_normal((2, 1500, 512)) * 0.5).astype(np.float32)
    k, v = graphs["init32"].run(["cross_k", "cross_v"], {"encoder_output": enc})
    got = dict(zip([o.name for o in graphs["init8"].get_outputs()], graphs["init8"].run(None, {"encoder_output": enc})))
    assert list(got) == list(CROSS_INPUTS)
    expected = dict(zip(CROSS_INPUTS, quantize_reference(k, v)))
    for name in CROSS_INPUTS:
        assert got[name].shape == expected[name].shape and got[name].dtype == expected[name].dtype, name
        if got[name].dtype == np.uint8:
            diff = np.abs(got[name].astype(np.int16) - expected[name])
            assert diff.max() <= 1 and (diff == 0).mean() > 0.999, name  # a rounding tie at most
        else:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6)
    # symmetric around the zero point: the largest |k| of every frame is 128 +- 127
    assert ((got["cross_k"].max(axis=3) == 255) | (got["cross_k"].min(axis=3) == 1)).all()
    # dequantized, K and V are the float ones to half a step
    k_back = (got["cross_k"].astype(np.float32) - 128) * got["cross_k_scale"]
    assert np.abs(k_back - k.swapaxes(-1, -2)).max() <= 0.5 * got["cross_k_scale"].max() * 1.0001


def test_step_over_8bit_cross_attention_follows_the_float_step_on_a_clip(graphs, clip_encoder_output):
    enc, info = clip_encoder_output
    cross32 = dict(zip(["cross_k", "cross_v"], graphs["init32"].run(["cross_k", "cross_v"], {"encoder_output": enc})))
    cross8 = dict(zip(CROSS_INPUTS, graphs["init8"].run(list(CROSS_INPUTS), {"encoder_output": enc})))
    L, H, dh = info["n_layers"], info["n_heads"], info["head_dim"]
    past = {"32": np.zeros((L, 1, 1, H, 0, dh), np.float32), "8": np.zeros((L, 1, 1, H, 0, dh), np.float32)}
    past_v = dict(past)
    ids = np.array([[[info["sot"], info["lang_to_id"]["zh"], info["transcribe"], info["no_timestamps"]]]], np.int64)
    agree, worst, steps = 0, 0.0, 0
    for _ in range(30):  # teacher-forced on the float step's greedy path
        out = {}
        for tag, session, cross in (("32", graphs["step32"], cross32), ("8", graphs["step8"], cross8)):
            logits, nk, nv = session.run(None, {"input_ids": ids, "past_length": np.array([past[tag].shape[4]]),
                                                "past_k": past[tag], "past_v": past_v[tag], **cross})
            past[tag] = np.concatenate([past[tag], nk], axis=4)
            past_v[tag] = np.concatenate([past_v[tag], nv], axis=4)
            lg = logits[0, 0].astype(np.float64)
            out[tag] = lg - lg.max() - np.log(np.exp(lg - lg.max()).sum())
        token = int(np.argmax(out["32"]))
        agree += token == int(np.argmax(out["8"]))
        top = np.argsort(out["32"])[-5:]
        worst = max(worst, float(np.abs(out["8"][top] - out["32"][top]).max()))
        steps += 1
        if token == info["eot"]:
            break
        ids = np.array([[[token]]], np.int64)
    print(f"\n8-bit cross-attention vs float over {steps} steps: argmax {agree}/{steps}, "
          f"top-5 log-prob max|diff| {worst:.3f}")
    assert steps >= 20 and agree >= steps - 2 and worst < 0.5


def test_exported_int8_cross_products_are_u8u8(model_dir):
    """Both cross-attention products multiply uint8 by uint8 (16-bit widening kernels): no
    u8 x s8 pair to saturate on AVX2 without VNNI, whatever the K/V values."""
    path = model_dir / "onnx" / "int8" / "decoder_step.onnx"
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    inits = {i.name for i in model.graph.initializer}
    products = [n for n in model.graph.node if n.op_type == "MatMulInteger" and n.input[1] not in inits]
    assert len(products) == 2 * 6  # scores and context, every layer
    for node in products:
        assert types[node.input[0]] == types[node.input[1]] == onnx.TensorProto.UINT8, node.name
    assert {i.name for i in model.graph.input} >= set(CROSS_INPUTS)


def test_the_rewrite_refuses_graphs_it_does_not_know(model_dir, tmp_path):
    init = onnx.load(str(model_dir / "onnx" / "fp32" / "decoder_init.onnx"))
    rewrite_init(init)
    with pytest.raises(CrossRewriteError, match="expected cross_k and cross_v"):
        rewrite_init(init)  # already rewritten
    encoder = onnx.load(str(model_dir / "onnx" / "fp32" / "encoder.onnx"), load_external_data=False)
    with pytest.raises(CrossRewriteError, match="lack cross_k"):
        rewrite_step(encoder)


def test_the_engine_refuses_init_and_step_of_different_variants(model_dir, tmp_path):
    from model_repository.engine.decoder import DecoderEngine
    from model_repository.engine.runners.base import ModelLoadError
    from tests.test_decoder_engine import Log, config

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copyfile(model_dir / "onnx" / "fp32" / "decoder_init.onnx", mixed / "decoder_init.onnx")
    shutil.copyfile(model_dir / "onnx" / "int8" / "decoder_step.onnx", mixed / "decoder_step.onnx")
    with pytest.raises(ModelLoadError, match="not from one export variant"):
        DecoderEngine(str(mixed), config("whisper"), Log())
