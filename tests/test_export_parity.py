"""ONNX vs PyTorch parity of the exported whisper graphs (see docs/INTERFACES.md).

Needs the export output: `python -m export --model whisper-base --out build/models/whisper-base`
(`make test` runs it first). Directory: $ASR_MODEL_DIR, default build/models/whisper-base, via the
`model_dir` fixture of conftest.py (which fails when the export is missing).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from export import whisper as wx  # noqa: E402
from export.onnx_tools import read_audio, sample_clip  # noqa: E402

CLIPS = [("zh", "jishu"), ("en", "quick_brown_fox")]  # sequence 0, sequence 1
N_TEACHER = 13  # teacher-forced tokens per beam (sequence 1 consumes all of them)

# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def info(model_dir):
    return json.loads((model_dir / "model_info.json").read_text())


@pytest.fixture(scope="module")
def reference(model_dir):
    torch.set_num_threads(2)
    return wx.load_reference(model_dir)


@pytest.fixture(scope="module")
def features(reference):
    _, processor = reference
    clips = []
    for lang, name in CLIPS:
        path = sample_clip(lang, name)
        if path is None:
            pytest.skip("pytest-audioeval sample clips not installed")
        clips.append(read_audio(path))
    return processor.feature_extractor(clips, sampling_rate=16000, return_tensors="np").input_features


@pytest.fixture(scope="module")
def hf_encoder_output(reference, features):
    model, _ = reference
    with torch.no_grad():
        return model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()


def _sessions(model_dir, variant):
    return {g: wx.ort_session(model_dir / "onnx" / variant / f"{g}.onnx") for g in
            ("encoder", "decoder_init", "decoder_step")}


@pytest.fixture(scope="module")
def fp32_sessions(model_dir):
    return _sessions(model_dir, "fp32")


@pytest.fixture(scope="module")
def int8_sessions(model_dir):
    return _sessions(model_dir, "int8")


@pytest.fixture(scope="module")
def onnx_encoder_outputs(fp32_sessions, int8_sessions, features):
    return {v: s["encoder"].run(None, {"input_features": features})[0]
            for v, s in (("fp32", fp32_sessions), ("int8", int8_sessions))}


@pytest.fixture(scope="module")
def prompts(info):
    return [[info["sot"], info["lang_to_id"][lang], info["transcribe"], info["no_timestamps"]]
            for lang, _ in CLIPS]


@pytest.fixture(scope="module")
def teacher(reference, hf_encoder_output, prompts, info):
    """tokens[n][k]: beam 0 = greedy path of sequence n, beam 1 = runner-up token at each step."""
    model, _ = reference
    enc = torch.from_numpy(hf_encoder_output)
    ids = torch.tensor(prompts)
    beam0, beam1 = [], []
    with torch.no_grad():
        for _ in range(N_TEACHER):
            logits = model(encoder_outputs=(enc,), decoder_input_ids=ids).logits[:, -1]
            logits[:, info["suppress_tokens"]] = -np.inf
            top2 = logits.topk(2, dim=-1).indices
            beam0.append(top2[:, 0])
            beam1.append(top2[:, 1])
            ids = torch.cat([ids, top2[:, :1]], dim=1)
    b0 = torch.stack(beam0, 1).tolist()
    b1 = torch.stack(beam1, 1).tolist()
    return [[b0[n], b1[n]] for n in range(len(CLIPS))]


@pytest.fixture(scope="module")
def hf_logits(reference, hf_encoder_output, prompts, teacher):
    """ref[n][k]: HF logits [len, V] for prompt + all teacher tokens of beam k of sequence n."""
    model, _ = reference
    out = []
    with torch.no_grad():
        for n in range(len(CLIPS)):
            ids = torch.tensor([prompts[n] + teacher[n][k] for k in range(2)])
            enc = torch.from_numpy(hf_encoder_output[n:n + 1]).expand(2, -1, -1)
            out.append(model(encoder_outputs=(enc,), decoder_input_ids=ids).logits.numpy())
    return out


# ------------------------------------------------------------------------- decoding protocol


def run_protocol(step_fn, cross, prompts, teacher, info, seed=0):
    """Drive a decoder_step implementation like the server does, with N=2 sequences of
    different past lengths (padding filled with noise) and K=2 beams.

    cross: decoder_init's outputs by name ({cross_k, cross_v} or the 8-bit variant's four);
    step_fn(input_ids, past_length, past_k, past_v, cross) -> (logits, new_k, new_v).
    Returns a list of (n, k, position_of_last_token, logits[V]).
    """
    rng = np.random.default_rng(seed)
    L, H, dh = info["n_layers"], info["n_heads"], info["head_dim"]
    results = []
    used = [0, 0]  # teacher tokens consumed per sequence (same for both beams)
    cache_k = [None, None]  # per sequence: [L, K, H, len, dh]
    cache_v = [None, None]

    def step(seqs, k_beams, tokens):
        # tokens[i][k] = list of T new tokens of beam k of sequence seqs[i]
        T = len(tokens[0][0])
        lens = [0 if cache_k[n] is None else cache_k[n].shape[3] for n in seqs]
        P = max(lens)
        past_k = rng.normal(0, 10, (L, len(seqs), k_beams, H, P, dh)).astype(np.float32)
        past_v = rng.normal(0, 10, (L, len(seqs), k_beams, H, P, dh)).astype(np.float32)
        for i, n in enumerate(seqs):
            if lens[i]:
                past_k[:, i, :, :, :lens[i]] = cache_k[n]
                past_v[:, i, :, :, :lens[i]] = cache_v[n]
        ids = np.array(tokens, dtype=np.int64).reshape(len(seqs), k_beams, T)
        rows = {name: np.ascontiguousarray(array[:, seqs]) for name, array in cross.items()}
        logits, nk, nv = step_fn(ids, np.array(lens, np.int64), past_k, past_v, rows)
        assert logits.shape == (len(seqs), k_beams, info["vocab_size"])
        assert nk.shape == nv.shape == (L, len(seqs), k_beams, H, T, dh)
        for i, n in enumerate(seqs):
            cache_k[n] = nk[:, i] if cache_k[n] is None else np.concatenate([cache_k[n], nk[:, i]], axis=3)
            cache_v[n] = nv[:, i] if cache_v[n] is None else np.concatenate([cache_v[n], nv[:, i]], axis=3)
            for k in range(k_beams):
                results.append((n, k, lens[i] + T - 1, logits[i, k]))

    # 1) prefill both prompts at once: K=1, T=4, P=0 (zero-size past)
    step([0, 1], 1, [[prompts[0]], [prompts[1]]])
    for n in (0, 1):  # fork into 2 beams (what the server's parent_beams reorder does)
        cache_k[n] = np.repeat(cache_k[n], 2, axis=1)
        cache_v[n] = np.repeat(cache_v[n], 2, axis=1)

    def take(n, t):
        toks = [teacher[n][k][used[n]:used[n] + t] for k in range(2)]
        used[n] += t
        return toks

    # 2) sequence 1 runs ahead alone for 3 steps -> past lengths 4 and 7
    for _ in range(3):
        step([1], 2, [take(1, 1)])
    # 3) joint step with T=2 (causal among new tokens + padded past)
    step([0, 1], 2, [take(0, 2), take(1, 2)])
    # 4) joint single-token steps
    for _ in range(8):
        step([0, 1], 2, [take(0, 1), take(1, 1)])
    assert used == [10, 13]
    return results


def onnx_step_fn(sess):
    def fn(ids, past_length, past_k, past_v, cross):
        return sess.run(None, {"input_ids": ids, "past_length": past_length, "past_k": past_k,
                               "past_v": past_v, **cross})
    return fn


def torch_step_fn(module):
    def fn(ids, past_length, past_k, past_v, cross):
        arrays = (ids, past_length, past_k, past_v, cross["cross_k"], cross["cross_v"])
        with torch.no_grad():
            return [t.numpy() for t in module(*(torch.from_numpy(a) for a in arrays))]
    return fn


# -------------------------------------------------------------------------------------- tests


def test_model_info_and_layout(info, model_dir):
    assert info["family"] == "whisper" and info["name"] == "whisper-base"
    expect = {"n_mels": 80, "n_frames": 3000, "n_audio_ctx": 1500, "d_model": 512, "n_layers": 6,
              "n_heads": 8, "head_dim": 64, "vocab_size": 51865, "max_target_positions": 448,
              "sample_rate": 16000, "n_fft": 400, "hop_length": 160, "chunk_length_s": 30}
    assert {k: info[k] for k in expect} == expect
    assert (info["eot"], info["sot"], info["translate"], info["transcribe"]) == (50257, 50258, 50358, 50359)
    assert (info["no_speech"], info["no_timestamps"], info["timestamp_begin"]) == (50362, 50363, 50364)
    assert info["lang_to_id"]["en"] == 50259 and info["lang_to_id"]["zh"] == 50260
    assert len(info["lang_to_id"]) == 99
    assert info["begin_suppress_tokens"] == [220, 50257]
    assert 50358 in info["suppress_tokens"] and len(info["suppress_tokens"]) == 88
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    added = {a["content"]: a["id"] for a in tok["added_tokens"]}
    assert added["<|startoftranscript|>"] == info["sot"] and added["<|zh|>"] == info["lang_to_id"]["zh"]
    for variant in ("fp32", "int8"):
        for g in ("encoder", "decoder_init", "decoder_step"):
            assert (model_dir / "onnx" / variant / f"{g}.onnx").is_file()
    gen = json.loads((model_dir / "hf" / "generation_config.json").read_text())
    assert gen["lang_to_id"]["<|zh|>"] == 50260 and gen["task_to_id"]["transcribe"] == 50359
    assert gen["no_timestamps_token_id"] == 50363 and gen["max_length"] == 448 and gen["is_multilingual"]


def test_ct2_reader_on_assembled_weights(model_dir):
    from export.ct2 import read_model

    path = model_dir / "ct2" / "model.bin"
    assert path.stat().st_size == 145_217_532
    m = read_model(path)
    assert m.spec == "WhisperSpec" and m.binary_version == 6
    assert m["decoder/projection/weight"] is m["decoder/embeddings/weight"]  # alias
    assert m["decoder/embeddings/weight"].shape == (51865, 512)
    assert m["decoder/embeddings/weight"].dtype == "float16"
    assert m["encoder/conv1/weight"].shape == (512, 80, 3)
    assert m["decoder/layer_5/self_attention/linear_0/weight"].shape == (1536, 512)
    assert int(m["encoder/num_heads"].data) == 8


def test_onnx_io_contract(model_dir):
    import onnx

    F32, U8 = onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8
    CROSS_CONTRACT = {  # decoder_init's outputs = decoder_step's cross inputs (docs/INTERFACES.md)
        "fp32": {"cross_k": (F32, [6, "N", 8, "S", 64]), "cross_v": (F32, [6, "N", 8, "S", 64])},
        "int8": {"cross_k": (U8, [6, "N", 8, 64, "S"]), "cross_k_scale": (F32, [6, "N", 8, 1, "S"]),
                 "cross_v": (U8, [6, "N", 8, "S", 64]), "cross_v_scale": (F32, [6, "N", 8, 1, 64])},
    }

    def sig(vi):
        t = vi.type.tensor_type
        return t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

    I64 = onnx.TensorProto.INT64
    for variant in ("fp32", "int8"):
        d = model_dir / "onnx" / variant
        m = onnx.load(str(d / "decoder_step.onnx"), load_external_data=False)
        ins = {i.name: sig(i) for i in m.graph.input}
        outs = {o.name: sig(o) for o in m.graph.output}
        cross = CROSS_CONTRACT[variant]
        assert list(ins) == ["input_ids", "past_length", "past_k", "past_v"] + list(cross)
        assert ins["input_ids"][0] == I64 and ins["past_length"][0] == I64
        assert ins["past_k"] == (F32, [6, "N", "K", 8, "P", 64])
        assert {name: ins[name] for name in cross} == cross
        assert list(outs) == ["logits", "new_k", "new_v"]
        assert outs["logits"] == (F32, ["N", "K", 51865])
        assert outs["new_k"] == (F32, [6, "N", "K", 8, "T", 64])
        m = onnx.load(str(d / "encoder.onnx"), load_external_data=False)
        assert [i.name for i in m.graph.input] == ["input_features"]
        assert [o.name for o in m.graph.output] == ["encoder_output"]
        m = onnx.load(str(d / "decoder_init.onnx"), load_external_data=False)
        assert [i.name for i in m.graph.input] == ["encoder_output"]
        frames = {n: (t, [1500 if d == "S" else d for d in shape]) for n, (t, shape) in cross.items()}
        assert {o.name: sig(o) for o in m.graph.output} == frames  # S: the encoder's 1500 frames


def test_encoder_parity(onnx_encoder_outputs, hf_encoder_output):
    out = onnx_encoder_outputs["fp32"]
    assert out.shape == (2, 1500, 512)
    scale = np.abs(hf_encoder_output).max()
    rel = np.abs(out - hf_encoder_output).max() / scale
    print(f"\nencoder fp32: max|diff| {np.abs(out - hf_encoder_output).max():.2e} (relative {rel:.2e})")
    assert rel < 1e-3
    q = onnx_encoder_outputs["int8"]
    cos = np.sum(q * hf_encoder_output, -1) / (np.linalg.norm(q, axis=-1) * np.linalg.norm(hf_encoder_output, axis=-1))
    print(f"encoder int8: min frame cosine {cos.min():.4f}, mean {cos.mean():.4f}")
    assert cos.mean() > 0.995 and cos.min() > 0.9


def test_decoder_init_parity(reference, fp32_sessions, hf_encoder_output):
    model, _ = reference
    ck, cv = fp32_sessions["decoder_init"].run(None, {"encoder_output": hf_encoder_output})
    assert ck.shape == cv.shape == (6, 2, 8, 1500, 64)
    enc = torch.from_numpy(hf_encoder_output)
    worst = 0.0
    with torch.no_grad():
        for i, layer in enumerate(model.model.decoder.layers):
            k = layer.encoder_attn.k_proj(enc).reshape(2, 1500, 8, 64).transpose(1, 2).numpy()
            v = layer.encoder_attn.v_proj(enc).reshape(2, 1500, 8, 64).transpose(1, 2).numpy()
            worst = max(worst, np.abs(ck[i] - k).max(), np.abs(cv[i] - v).max())
    print(f"\ndecoder_init fp32: max|diff| {worst:.2e}")
    assert worst < 1e-3


def _compare(results, hf_logits):
    diffs, agree = [], []
    for n, k, pos, logits in results:
        ref = hf_logits[n][k, pos]
        diffs.append(float(np.abs(logits - ref).max()))
        agree.append(int(np.argmax(logits)) == int(np.argmax(ref)))
    return np.array(diffs), np.array(agree)


def test_decoder_step_parity_fp32(reference, fp32_sessions, hf_encoder_output, prompts, teacher, hf_logits, info):
    ck, cv = fp32_sessions["decoder_init"].run(None, {"encoder_output": hf_encoder_output})
    results = run_protocol(onnx_step_fn(fp32_sessions["decoder_step"]), {"cross_k": ck, "cross_v": cv}, prompts,
                           teacher, info)
    diffs, agree = _compare(results, hf_logits)
    print(f"\ndecoder_step fp32 vs HF over {len(diffs)} (seq, beam, pos) logits: max|diff| {diffs.max():.2e}, "
          f"mean {diffs.mean():.2e}, argmax agreement {agree.mean():.0%}")
    assert len(results) == 2 + 3 * 2 + 4 + 8 * 4
    assert diffs.max() < 5e-3
    assert agree.all()


def test_decoder_step_torch_module_matches_hf(reference, hf_encoder_output, prompts, teacher, hf_logits, info):
    model, _ = reference
    _, cross_kv, step = wx.load_step_modules(model)
    with torch.no_grad():
        ck, cv = (t.numpy() for t in cross_kv(torch.from_numpy(hf_encoder_output)))
    results = run_protocol(torch_step_fn(step), {"cross_k": ck, "cross_v": cv}, prompts, teacher, info)
    diffs, agree = _compare(results, hf_logits)
    print(f"\ndecoder_step torch module vs HF: max|diff| {diffs.max():.2e}")
    assert diffs.max() < 5e-3 and agree.all()


def test_int8_pipeline_agrees_in_argmax(int8_sessions, onnx_encoder_outputs, prompts, teacher, hf_logits, info):
    enc = onnx_encoder_outputs["int8"]
    init = int8_sessions["decoder_init"]
    cross = dict(zip([o.name for o in init.get_outputs()], init.run(None, {"encoder_output": enc})))
    results = run_protocol(onnx_step_fn(int8_sessions["decoder_step"]), cross, prompts, teacher, info)
    diffs, agree = _compare(results, hf_logits)
    # beam 0 follows the greedy path: that is where agreement matters most
    greedy = np.array([a for (n, k, _, _), a in zip(results, agree) if k == 0])
    print(f"\nint8 pipeline vs HF fp32: argmax agreement {agree.mean():.0%} (greedy beam {greedy.mean():.0%}), "
          f"max|diff| {diffs.max():.2f}")
    assert np.isfinite(diffs).all()
    assert agree.mean() >= 0.85 and greedy.mean() >= 0.9


def test_onnx_greedy_transcripts(fp32_sessions, int8_sessions, onnx_encoder_outputs, features, prompts, reference,
                                 info):
    _, processor = reference
    texts = {}
    for variant, s in (("fp32", fp32_sessions), ("int8", int8_sessions)):
        sessions = (s["encoder"], s["decoder_init"], s["decoder_step"])
        for n, (lang, name) in enumerate(CLIPS):
            ids = wx.onnx_greedy_decode(sessions, features[n:n + 1], prompts[n], info["eot"],
                                        info["suppress_tokens"], info["begin_suppress_tokens"], 40,
                                        encoder_output=onnx_encoder_outputs[variant][n:n + 1])
            texts[variant, name] = processor.tokenizer.decode(ids, skip_special_tokens=True)
    print("\n" + "\n".join(f"{v} {n}: {t!r}" for (v, n), t in texts.items()))
    assert "quick brown fox" in texts["fp32", "quick_brown_fox"].lower()
    assert "quick brown fox" in texts["int8", "quick_brown_fox"].lower()
    for variant in ("fp32", "int8"):
        zh = texts[variant, "jishu"]
        assert sum(c.isdigit() or c in "一二三四五六七八九十" for c in zh) >= 5, zh
