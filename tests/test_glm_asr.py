"""GLM-ASR (glm_asr family): export checks, ONNX vs PyTorch parity, decoding through Triton, and
Transcribe through the real gateway over gRPC (result fields, per-request hotwords, invalid hotwords).

Runs on the exported model in $ASR_GLM_MODEL_DIR (default build/models/glm-asr-tiny: a seeded,
randomly initialised GlmAsrConfig of the real architecture with small dims, exported here when
missing or out of date). The same tests run on a real GLM-ASR-Nano-2512 export:

    python -m export --model glm-asr-nano --checkpoint DIR --out build/models/glm-asr-nano
    ASR_GLM_MODEL_DIR=build/models/glm-asr-nano python -m pytest tests/test_glm_asr.py

A random model produces arbitrary tokens: comparisons force long outputs by suppressing the eos
ids the same way on both sides (or compare up to max_new_tokens), so they compare 20+ tokens.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from model_repository.render import cpu_has_vnni  # noqa: E402
from tests.conftest import asr_client, glm_model_dir_path, normalize_for_cer, running_gateway, sample_clips  # noqa: E402

DEFAULT_DIR = ROOT / "build" / "models" / "glm-asr-tiny"
MODEL_DIR = glm_model_dir_path()
TRITON_DIR = Path(os.environ.get("ASR_TRITON_DIR", ROOT / "build" / "triton"))
STEPS = 20  # cached decoder steps compared
SAMPLE_RATE = 16000

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from export.glm_asr import (  # noqa: E402
    CheckpointError,
    OnnxGlmAsr,
    check_checkpoint,
    load_reference,
    n_audio_tokens,
)
from gateway.asr.decoding import DecodingOptions, StepOutput, beam_search  # noqa: E402
from gateway.asr.families import (  # noqa: E402
    FamilyMismatchError,
    GlmAsrFamily,
    WhisperFamily,
    check_deployed,
    load_family,
)
from gateway.asr.tokenizer import UnknownTaskError  # noqa: E402


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir() -> Path:
    if MODEL_DIR.resolve() == DEFAULT_DIR.resolve():
        from export import export_model

        export_model("glm-asr-tiny", MODEL_DIR)  # a no-op when the stamp is up to date
    if not (MODEL_DIR / "model_info.json").is_file():
        pytest.fail(f"{MODEL_DIR} has no exported GLM-ASR model (python -m export --model glm-asr-... --out {MODEL_DIR})")
    return MODEL_DIR


@pytest.fixture(scope="module")
def info(model_dir) -> dict:
    data = json.loads((model_dir / "model_info.json").read_text(encoding="utf-8"))
    assert data["family"] == "glm_asr"
    return data


@pytest.fixture(scope="module")
def reference(model_dir, info):
    torch.set_num_threads(2)
    checkpoint = model_dir / "hf" if (model_dir / "hf" / "config.json").is_file() else Path(info["checkpoint"])
    return load_reference(checkpoint)


@pytest.fixture(scope="module")
def family(model_dir) -> GlmAsrFamily:
    fam = load_family(model_dir)
    assert isinstance(fam, GlmAsrFamily)
    return fam


def _clip(seconds: float, seed: int) -> np.ndarray:
    """Speech if pytest-audioeval is installed (a random model does not care), else a chirp + noise."""
    try:
        from export.onnx_tools import read_audio as load_audio, sample_clip

        path = sample_clip("zh", "jishu")
        if path is not None:
            audio = load_audio(path)
            start = (seed * 7919) % max(1, len(audio) - int(seconds * SAMPLE_RATE))
            audio = audio[start:start + int(seconds * SAMPLE_RATE)]
            if len(audio) == int(seconds * SAMPLE_RATE):
                return audio.astype(np.float32)
    except Exception:  # noqa: BLE001 - fall back to a synthetic clip
        pass
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return _clip(6.3, 1)


@pytest.fixture(scope="module")
def inputs(reference, clip):
    """The processor's view of the clip: prompt ids, features, audio token count."""
    _, processor = reference
    batch = processor.apply_transcription_request(clip)
    return batch


def torch_logits(model, prompt_embeds: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Next-token logits after prompt + tokens, recomputed without a cache (the reference path)."""
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long)) if tokens else None
        x = prompt_embeds if emb is None else torch.cat([prompt_embeds, emb], dim=1)
        return model(inputs_embeds=x, use_cache=False).logits[0, -1].to(torch.float64)


def prompt_embeddings(model, batch) -> torch.Tensor:
    """inputs_embeds of the prompt with the audio embeddings in place (transformers' own code)."""
    with torch.no_grad():
        audio = model.get_audio_features(batch["input_features"], batch["input_features_mask"]).pooler_output
        emb = model.get_input_embeddings()(batch["input_ids"])
        mask = model.model.get_placeholder_mask(batch["input_ids"], emb, audio)
        return emb.masked_scatter(mask, audio.to(emb.dtype))


# --------------------------------------------------------------------------- bad input
def _write(path: Path, name: str, text: str = "{}") -> None:
    (path / name).write_text(text, encoding="utf-8")


def test_bad_checkpoint_dirs_fail_fast_naming_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(empty)
    missing = " | ".join(err.value.missing)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "chat_template.jinja"):
        assert name in missing
    assert "is missing: config.json; model.safetensors" in str(err.value)
    partial = tmp_path / "partial"
    partial.mkdir()
    _write(partial, "config.json", json.dumps({"model_type": "glmasr", "audio_config": {}, "text_config": {}}))
    _write(partial, "tokenizer.json")
    _write(partial, "model.safetensors.index.json", json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                              "b": "model-00002-of-00002.safetensors"}}))
    (partial / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(partial)
    missing = " | ".join(err.value.missing)
    assert "model-00002-of-00002.safetensors" in missing and "model-00001" not in missing
    assert "tokenizer_config.json" in missing and "tokenizer.json" not in missing.replace("tokenizer_config", "")
    assert "chat_template.jinja" in missing and "config.json" not in err.value.missing
    whisper = tmp_path / "whisper"
    whisper.mkdir()
    _write(whisper, "config.json", json.dumps({"model_type": "whisper"}))
    with pytest.raises(CheckpointError, match="'whisper' checkpoint, not GLM-ASR"):
        check_checkpoint(whisper)


def test_export_cli_rejects_bad_checkpoint_before_long_work(tmp_path):
    (tmp_path / "ckpt").mkdir()
    _write(tmp_path / "ckpt", "config.json", json.dumps({"model_type": "llama"}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "export", "--model", "glm-asr-nano", "--checkpoint",
                             str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'llama' checkpoint, not GLM-ASR" in result.stdout + result.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()
    result = subprocess.run([sys.executable, "-m", "export", "--model", "glm-asr-nano", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2 and "--checkpoint" in result.stdout + result.stderr


# --------------------------------------------------------------------------- export outputs
def test_model_info_prompt_and_tokenizer_come_from_the_checkpoint(model_dir, info, reference, family):
    model, processor = reference
    prompt = json.loads((model_dir / "prompt.json").read_text(encoding="utf-8"))
    tok = processor.tokenizer
    assert info["n_mels"] == 128 == processor.feature_extractor.feature_size
    assert info["audio_token_id"] == model.config.audio_token_id == prompt["audio_token_id"]
    eos = model.generation_config.eos_token_id
    assert sorted(info["eos_token_ids"]) == sorted(eos if isinstance(eos, list) else [eos])
    assert info["vocab_size"] == model.config.text_config.vocab_size
    assert prompt["tokens_per_window"] == n_audio_tokens(30 * SAMPLE_RATE) == 375
    assert tok.decode(prompt["prefix_ids"]) == "<|user|>\n<|begin_of_audio|>"
    assert tok.decode(prompt["suffix_ids"]) == (
        "<|end_of_audio|><|user|>\nPlease transcribe this audio into text<|assistant|>\n")
    for name in ("<|user|>", "<|assistant|>", "<|begin_of_audio|>", "<|end_of_audio|>", "<|endoftext|>"):
        assert info["special_tokens"][name] == tok.convert_tokens_to_ids(name)
    assert (model_dir / "tokenizer.json").read_bytes() == (Path(processor.tokenizer.name_or_path) / "tokenizer.json"
                                                          ).read_bytes()


@pytest.mark.parametrize("seconds", [30.0, 12.34, 6.3, 1.0, 0.25])
def test_gateway_prompt_equals_the_processor_prompt(reference, family, seconds):
    _, processor = reference
    audio = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
    ids = processor.apply_transcription_request(audio)["input_ids"][0].tolist()
    n = family.n_audio_tokens(len(audio))
    assert family.prompt_ids(None, "transcribe", n) == ids


def test_gateway_features_match_the_processor(reference, clip):
    from gateway.asr.features import log_mel_spectrogram

    _, processor = reference
    expected = processor.apply_transcription_request(clip)["input_features"][0].numpy()
    ours = log_mel_spectrogram(clip, n_mels=128)
    assert ours.shape == expected.shape == (128, 3000)
    assert float(np.abs(ours - expected).max()) < 2e-4


# --------------------------------------------------------------------------- ONNX vs PyTorch
def test_onnx_audio_embeddings_match_torch(model_dir, info, reference, inputs):
    model, _ = reference
    runner = OnnxGlmAsr(model_dir / "onnx" / "fp32", info)
    n = int((inputs["input_ids"][0] == info["audio_token_id"]).sum())
    ours = runner.audio_embeddings(inputs["input_features"].numpy(), n)[0]
    with torch.no_grad():
        ref = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output.numpy()
    assert ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    print(f"audio embeddings fp32: max |diff| {diff:.2e} (scale {np.abs(ref).max():.2f})")
    assert diff < 1e-3 * max(1.0, float(np.abs(ref).max()))


# max |logit diff| relative to the largest |logit|, and the share of steps with the same argmax.
# fp16/int8 on the tiny model are a stress case (random weights 25x transformers' init scale).
# int8-vnni (8-bit weights) only where the CPU has VNNI: elsewhere its U8S8 products saturate, which
# is why render.py serves it only there
@pytest.mark.parametrize("precision,rtol,min_agree", [("fp32", 1e-4, 1.0), ("fp16", 0.05, 0.8), ("int8", 0.35, 0.6)]
                         + ([("int8-vnni", 0.35, 0.6)] if cpu_has_vnni() else []))
def test_onnx_logits_match_torch_prefill_and_cached_steps(model_dir, info, reference, inputs, precision, rtol,
                                                           min_agree):
    """Prefill + STEPS cached steps (teacher-forced on torch's greedy tokens, eos suppressed)."""
    model, _ = reference
    try:
        runner = OnnxGlmAsr(model_dir / "onnx" / precision, info)
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"{precision} graphs do not load in this onnxruntime: {error}")
    ids = inputs["input_ids"][0].tolist()
    eos = info["eos_token_ids"]
    prompt = prompt_embeddings(model, inputs)
    n_audio = ids.count(info["audio_token_id"])
    audio = runner.audio_embeddings(inputs["input_features"].numpy(), n_audio)[0]
    pk, pv = runner.empty_cache()
    logits, pk, pv = runner.run_step(runner.prefill_embeds(ids, audio), pk, pv)
    tokens, diffs, agree, scale = [], [], 0, 0.0
    for step in range(STEPS + 1):
        ref = torch_logits(model, prompt, tokens).numpy()
        scale = max(scale, float(np.abs(ref).max()))
        got = logits[0, 0].astype(np.float64)
        diffs.append(float(np.abs(got - ref).max()))
        masked_ref, masked_got = ref.copy(), got.copy()
        masked_ref[eos] = masked_got[eos] = -np.inf
        agree += int(np.argmax(masked_ref) == np.argmax(masked_got))
        if step == STEPS:
            break
        tok = int(np.argmax(masked_ref))
        tokens.append(tok)
        logits, pk, pv = runner.run_step(runner.embed_ids([[[tok]]]), pk, pv)
    print(f"{precision}: prefill ({len(ids)} tokens) + {STEPS} cached steps: max |logit diff| prefill "
          f"{diffs[0]:.2e}, steps {max(diffs[1:]):.2e}; argmax agreement {agree}/{STEPS + 1}; "
          f"logit scale {scale:.1f}")
    assert pk.shape[4] == len(ids) + STEPS
    assert max(diffs) < rtol * scale
    assert agree >= min_agree * (STEPS + 1)


def test_onnx_step_batches_sequences_with_padded_caches(model_dir, info):
    """N sequences x K beams with different cached lengths in one decoder_step run (what the Triton
    decoder does) equal each sequence run alone."""
    runner = OnnxGlmAsr(model_dir / "onnx" / "fp32", info)
    rng = np.random.default_rng(3)
    L, H, dh, d = info["n_layers"], info["n_kv_heads"], info["head_dim"], info["d_model"]
    lengths, K, P = [7, 3], 2, 9
    pk = rng.standard_normal((L, 2, K, H, P, dh)).astype(np.float32)
    pv = rng.standard_normal((L, 2, K, H, P, dh)).astype(np.float32)
    x = rng.standard_normal((2, K, 1, d)).astype(np.float32)
    batched = runner.step.run(None, {"inputs_embeds": x, "past_length": np.array(lengths, np.int64),
                                     "past_k": pk, "past_v": pv})
    for n, p in enumerate(lengths):
        alone = runner.step.run(None, {"inputs_embeds": x[n:n + 1], "past_length": np.array([p], np.int64),
                                       "past_k": np.ascontiguousarray(pk[:, n:n + 1, :, :, :p]),
                                       "past_v": np.ascontiguousarray(pv[:, n:n + 1, :, :, :p])})
        for a, b in zip(batched, alone):
            np.testing.assert_allclose(a[n] if a.ndim == 3 else a[:, n], b[0] if b.ndim == 3 else b[:, 0], atol=1e-4)


def test_external_data_graph_runs_the_same(model_dir, info, tmp_path):
    """Graphs over 2 GB (the real decoder in fp32) are saved with external data: same outputs."""
    import onnx

    from export.onnx_tools import save_onnx

    src = model_dir / "onnx" / "fp32" / "decoder_step.onnx"
    if src.with_name(src.name + ".data").exists():
        pytest.skip("this export already keeps its decoder weights as external data (and the other tests run it)")
    dst = tmp_path / "decoder_step.onnx"
    save_onnx(onnx.load(str(src)), dst, external=True)
    assert (tmp_path / "decoder_step.onnx.data").stat().st_size > dst.stat().st_size
    rng = np.random.default_rng(5)
    feeds = {"inputs_embeds": rng.standard_normal((1, 1, 3, info["d_model"])).astype(np.float32),
             "past_length": np.zeros(1, np.int64),
             "past_k": np.zeros((info["n_layers"], 1, 1, info["n_kv_heads"], 0, info["head_dim"]), np.float32)}
    feeds["past_v"] = feeds["past_k"]
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- gateway pieces
class FakeSession:
    def __init__(self, tables):
        self.tables, self.i = tables, 0

    async def step(self, input_ids, parent_beams, top_k, extra_ids):
        table = self.tables[min(self.i, len(self.tables) - 1)]
        self.i += 1
        lp = np.log(np.asarray(table, np.float64))
        lp = np.repeat(lp[None], input_ids.shape[0], axis=0)
        order = np.argsort(-lp, axis=1, kind="stable")[:, :top_k]
        return StepOutput(np.take_along_axis(lp, order, 1).astype(np.float32), order)

    async def close(self):
        pass


def test_beam_search_accepts_several_eos_ids():
    # vocab 0..5; 4 and 5 are both end tokens
    tables = [[0.1, 0.6, 0.1, 0.1, 0.05, 0.05], [0.05, 0.05, 0.1, 0.1, 0.1, 0.6]]
    run = lambda eot: asyncio.run(beam_search(FakeSession(tables), [0], DecodingOptions(beam_size=1),  # noqa: E731
                                              eot_id=eot, max_length=10))
    result = run([4, 5])
    assert result.tokens == [1] and result.finished and result.eot_token == 5
    assert math.isclose(result.eot_logprob, math.log(0.6), rel_tol=1e-6)
    single = run(4)  # backwards compatible: an int, and 5 is an ordinary token then
    assert single.tokens[:2] == [1, 5]
    assert run((5,)).tokens == [1]
    from gateway.asr.decoding import DecodingOptionsError

    with pytest.raises(DecodingOptionsError):
        run([])


def test_families(model_dir, family, info):
    whisper_dir = ROOT / "build" / "models" / "whisper-base"
    if (whisper_dir / "model_info.json").is_file():
        w = load_family(whisper_dir)
        assert isinstance(w, WhisperFamily) and w.supports_language_detection
        assert w.prompt_ids("zh") == w.tokenizer.sot_sequence("zh")
        assert w.prompt_ids("en", timestamps=True) == w.tokenizer.sot_sequence("en", timestamps=True)
        assert w.eos_ids == (w.tokenizer.eot,) and w.n_mels == 80
        enc = np.zeros((1500, 4), np.float32)
        assert w.decoder_audio(enc, 16000) is enc
    assert family.family == "glm_asr" and not family.supports_language_detection
    assert family.n_mels == 128 and family.eos_ids == tuple(info["eos_token_ids"])
    assert family.decoder_audio(np.zeros((375, 4), np.float32), 16000).shape == (12, 4)
    with pytest.raises(UnknownTaskError):
        family.prompt_ids(None, "translate", 10)
    family.validate("zh")  # accepted (the model hears the language itself), never an error
    assert not family.supports_timestamps
    assert family.language_of("请问有什么可以帮您") == "zh" and family.language_of("hello there") == "en"
    assert family.language_of("") == ""
    text = "请把这段音频转写成文字。"
    ids = family.tokenizer.encode(text, add_special_tokens=False).ids
    assert family.decode(ids + [info["special_tokens"]["<|assistant|>"]]) == text

    class Deployed:
        family, model_name = "glm_asr", info["name"]

    check_deployed(family, Deployed)
    Deployed.model_name = "other"
    with pytest.raises(FamilyMismatchError):
        check_deployed(family, Deployed)


def test_sizing_doc_is_generated_from_the_config_and_counts_parameters_exactly(reference):
    from export import sizing

    assert sizing.main(["--check"]) == 0, "docs/glm_asr_sizing.md is stale: run python -m export.sizing"
    model, _ = reference
    counts = sizing.parameter_counts(sizing.Dims.from_config(model.config.to_dict()))
    lm = model.model.language_model
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tied = model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()
    assert counts == {"audio encoder": numel(model.model.audio_tower), "adapter": numel(model.model.multi_modal_projector),
                      "decoder layers": numel(lm) - lm.embed_tokens.weight.numel(),
                      "token embeddings": lm.embed_tokens.weight.numel(),
                      "lm_head": 0 if tied else model.lm_head.weight.numel()}
    real = sizing.sizing(sizing.REAL_CONFIG, sizing.PROMPT_TEXT_TOKENS)
    assert real["kv_per_token"] == 57344 and real["audio_tokens"] == 375
    assert 2.2e9 < real["total"] < 2.3e9


def test_trt_without_tensorrt_stops_with_a_clear_message(model_dir):
    from export.trt import find_tensorrt

    found = find_tensorrt()
    if found["trtexec"] or found["ort_trt"]:
        pytest.skip("TensorRT is installed here")
    result = subprocess.run([sys.executable, "-m", "export.trt", "--model-dir", str(model_dir)], capture_output=True,
                            text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert result.returncode == 3
    assert "TensorRT is not available on this machine" in result.stderr


# --------------------------------------------------------------------------- through Triton
@pytest.fixture(scope="module")
def triton_url(model_dir, tmp_path_factory):
    if not (TRITON_DIR / "bin" / "tritonserver").exists():
        pytest.skip(f"no tritonserver in {TRITON_DIR} (make setup)")
    from gateway.launch.triton_process import TritonProcess
    from model_repository.render import render_repository

    repo = render_repository(model_dir, tmp_path_factory.mktemp("glm_repository"), "fp32",
                             decoder_max_queue_delay_microseconds=20000)
    config = (repo / "decoder" / "config.pbtxt").read_text()
    assert 'key: "family" value { string_value: "glm_asr" }' in config
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonProcess(repo, log_path=log, log_verbose=1) as server:
        yield server.grpc_url
    print(f"tritonserver log: {log}")


@pytest.fixture(scope="module")
def early_eos(reference, inputs, info) -> list[int]:
    """The model's eos ids plus a token its greedy output first emits at step 6..12: an eos set
    that makes both sides finish mid-way (a random model rarely emits its own eos)."""
    model, _ = reference
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, suppress_tokens=info["eos_token_ids"])
    tokens = gen[0, inputs["input_ids"].shape[1]:].tolist()
    for i, tok in enumerate(tokens):
        if 6 <= i <= 12 and tokens.index(tok) == i:
            return list(info["eos_token_ids"]) + [tok]
    pytest.skip(f"no usable early-eos token in {tokens}")


async def _decode_through_triton(url, features, family, n_samples, options, suppress=(), eos=None):
    from gateway.asr.triton_client import TritonAsrClient

    client = TritonAsrClient(url)
    try:
        deployed = await client.deployed_model()
        check_deployed(family, deployed)
        encoder_output = await client.encode(features)
        audio = family.decoder_audio(encoder_output, n_samples)
        prompt = family.prompt_ids(None, "transcribe", audio.shape[0])
        session = client.decoder_session(audio, suppress_ids=list(suppress))
        try:
            return await beam_search(session, prompt, options, eot_id=eos or family.eos_ids,
                                     max_length=family.max_length)
        finally:
            await session.close()
    finally:
        await client.close()


# eos modes: "suppressed" (exactly STEPS tokens), "model" (the model's own eos ids), "early" (the
# eos ids plus a token the model emits mid-way: both sides must finish there, multi-eos)
EOS_MODES = ("suppressed", "model", "early")


def _eos_setup(mode, info, early_eos):
    if mode == "suppressed":
        return list(info["eos_token_ids"]), list(info["eos_token_ids"])
    return [], (early_eos if mode == "early" else list(info["eos_token_ids"]))


@pytest.mark.parametrize("mode", EOS_MODES)
def test_greedy_through_triton_equals_transformers_generate(triton_url, reference, family, inputs, clip, info,
                                                            request, mode):
    model, _ = reference
    suppress, eos = _eos_setup(mode, info, request.getfixturevalue("early_eos") if mode == "early" else None)
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=eos,
                             **({"suppress_tokens": suppress} if suppress else {}))
    expected = gen[0, inputs["input_ids"].shape[1]:].tolist()
    finished = bool(expected) and expected[-1] in eos
    if finished:
        expected = expected[:-1]
    result = asyncio.run(_decode_through_triton(
        triton_url, inputs["input_features"][0].numpy(), family, len(clip),
        DecodingOptions(beam_size=1, max_new_tokens=STEPS), suppress=suppress, eos=eos))
    print(f"greedy (eos {mode}): {len(result.tokens)} tokens {result.tokens} finished={result.finished} "
          f"(eot {result.eot_token})")
    assert result.tokens == expected
    assert result.finished == finished
    if mode == "suppressed":
        assert len(result.tokens) == STEPS
    if mode == "early":
        assert result.finished and result.eot_token == eos[-1] and len(result.tokens) >= 6


def reference_beam_search(model, prompt_embeds, beam_size: int, eos, max_new_tokens: int, suppress=()):
    """gateway/asr/decoding.py's rules over torch log-probs (recomputed, no cache; log_softmax after
    suppression, like the Triton decoder): top beam_size+1 per beam; candidates by summed log-prob (ties: parent row, then rank); eos candidates finish;
    stop at beam_size finished, no live beam, or max_new_tokens; rank by sum / length."""
    eos = set(eos)
    beams = [((), 0.0)]
    finished = []
    for step in range(max_new_tokens):
        cands = []
        for row, (tokens, score) in enumerate(beams):
            logits = torch_logits(model, prompt_embeds, list(tokens))
            logits[list(suppress)] = -math.inf  # suppressed before the softmax, as the decoder does
            lp = torch.log_softmax(logits, -1).numpy()
            order = sorted(range(len(lp)), key=lambda i: (-lp[i], i))[: beam_size + 1]
            for rank, tok in enumerate(order):
                if np.isfinite(lp[tok]):
                    cands.append((-(score + lp[tok]), row, rank, tokens, tok, score + lp[tok]))
        cands.sort(key=lambda c: c[:3])
        next_beams, new_finished = [], []
        for _, _, _, tokens, tok, score in cands:
            if tok in eos:
                new_finished.append((tokens, score))
            else:
                next_beams.append((tokens + (tok,), score))
                if len(next_beams) == beam_size:
                    break
        for hyp in new_finished:
            if len(finished) >= beam_size:
                break
            finished.append(hyp)
        if len(finished) >= beam_size or not next_beams or step + 1 >= max_new_tokens:
            break
        beams = next_beams
    pool = finished or next_beams or beams
    return max(pool, key=lambda h: h[1] / max(len(h[0]), 1))


@pytest.mark.parametrize("mode,beam_size", [("suppressed", 4), ("model", 3), ("early", 4)])
def test_beam_search_through_triton_equals_reference_beam_search(triton_url, reference, family, inputs, clip, info,
                                                                 request, mode, beam_size):
    model, _ = reference
    suppress, eos = _eos_setup(mode, info, request.getfixturevalue("early_eos") if mode == "early" else None)
    prompt = prompt_embeddings(model, inputs)
    tokens, score = reference_beam_search(model, prompt, beam_size, eos, STEPS, suppress)
    result = asyncio.run(_decode_through_triton(
        triton_url, inputs["input_features"][0].numpy(), family, len(clip),
        DecodingOptions(beam_size=beam_size, max_new_tokens=STEPS), suppress=suppress, eos=eos))
    print(f"beam {beam_size} (eos {mode}): {len(result.tokens)} tokens, finished={result.finished}, "
          f"sum log-prob Triton {result.sum_logprob:.5f} vs reference {score:.5f}")
    assert result.tokens == list(tokens)
    assert abs(result.sum_logprob - score) < 1e-3 * max(1.0, abs(score))
    if mode == "suppressed":
        assert len(result.tokens) == STEPS


def test_concurrent_sequences_through_triton_keep_their_own_state(triton_url, reference, family, info):
    """Two windows decoded concurrently (their steps batch in one decoder execution) equal each
    decoded alone; a START whose placeholders do not match its audio fails alone."""
    from gateway.asr.features import log_mel_spectrogram
    from gateway.asr.triton_client import TritonAsrClient, TritonInferenceError

    clips = [_clip(4.0, 11), _clip(9.5, 12)]
    feats = [log_mel_spectrogram(c, n_mels=128) for c in clips]
    options = DecodingOptions(beam_size=2, max_new_tokens=12)
    suppress = info["eos_token_ids"]
    alone = [asyncio.run(_decode_through_triton(triton_url, f, family, len(c), options, suppress))
             for f, c in zip(feats, clips)]

    async def together():
        client = TritonAsrClient(triton_url)
        try:
            bad = client.decoder_session(np.zeros((5, info["d_model"]), np.float32))
            with pytest.raises(TritonInferenceError, match="audio placeholders"):
                await bad.step(np.array([family.prompt_ids(None, "transcribe", 4)]), None, 3)
            return await asyncio.gather(*(_decode_through_triton(triton_url, f, family, len(c), options, suppress)
                                          for f, c in zip(feats, clips)))
        finally:
            await client.close()

    both = asyncio.run(together())
    for a, b in zip(alone, both):
        assert a.tokens == b.tokens and len(a.tokens) == 12
        assert abs(a.sum_logprob - b.sum_logprob) < 1e-3
    assert alone[0].tokens != alone[1].tokens  # the audio reaches the decoder


def test_trt_profiles_cover_every_graph_input_and_calibration_cache_is_written(model_dir, info, tmp_path, clip):
    """What `make trt` feeds TensorRT, checked without TensorRT: an optimisation profile for every
    input of every graph (min <= opt <= max), and the INT8 calibration cache from recordings."""
    from export.trt import graph_profiles, write_calibration_cache
    from gateway.asr.features import log_mel_spectrogram

    profiles = graph_profiles(info, max_windows=8, max_rows=16, max_beams=5, max_positions=1024)
    assert set(profiles) == {"encoder", "embed_tokens", "decoder_step"}
    for graph, profile in profiles.items():
        session = ort.InferenceSession(str(model_dir / "onnx" / "fp32" / f"{graph}.onnx"),
                                       providers=["CPUExecutionProvider"])
        assert set(profile) == {i.name for i in session.get_inputs()}
        for i in session.get_inputs():
            lo, opt, hi = profile[i.name]
            assert len(lo) == len(opt) == len(hi) == len(i.shape)
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
            assert all(d == s for d, s in zip(hi, i.shape) if isinstance(s, int))
    features = log_mel_spectrogram(clip, n_mels=128)[np.newaxis]
    out = write_calibration_cache(model_dir / "onnx" / "fp32" / "encoder.onnx", [features], tmp_path, method="minmax")
    assert (out / "calibration.flatbuffers").stat().st_size > 0
    native = (out / "calibration.trt.cache").read_text().splitlines()
    assert native[0].startswith("TRT-") and native[0].endswith("-EntropyCalibration2")
    assert any(line.startswith("encoder_output: ") for line in native[1:])


# --------------------------------------------------------------------------- through the gateway (gRPC)
HOTWORD = "朝阳区"  # not in anything the random model writes by itself


@pytest.fixture(scope="module")
def glm_stub(model_dir, triton_url, tmp_path_factory):
    """The real gateway (`python -m gateway.service.server`) on the glm_asr export and its Triton, without
    server-side hotword lists, and an Asr stub over a real channel."""
    logs = tmp_path_factory.mktemp("glm_gateway")
    (logs / "hotwords").mkdir()
    with running_gateway(model_dir, triton_url, logs, ["--hotword-dir", str(logs / "hotwords")]) as gateway:
        with asr_client(gateway.address) as stub:
            yield stub


@pytest.fixture(scope="module")
def call_audio() -> bytes:
    return next(c for c in sample_clips() if c.name == "zh/nihao_shijie").path.read_bytes()


def test_transcribe_over_grpc_returns_a_glm_asr_result(glm_stub, call_audio, family, info):
    from gateway.asr.audio import decode_audio
    from gateway.protocol import asr_pb2

    duration = len(decode_audio(call_audio)) / SAMPLE_RATE
    # word_timestamps is accepted and ignored: glm_asr has no timestamp tokens
    r = glm_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=call_audio, beam_size=2, word_timestamps=True),
                            timeout=60)
    assert r.model_name == info["name"]
    assert r.text and r.language in ("zh", "en", "")
    assert r.audio_duration_s == pytest.approx(duration, abs=0.01)
    assert 0 < r.processing_time_s < 60
    assert r.normalized_text == "" and not r.HasField("ticket")
    assert len(r.segments) == 1  # one VAD chunk, one plain segment
    seg = r.segments[0]
    assert 0 <= seg.start_s < seg.end_s <= duration + 1e-6
    assert seg.text == r.text == family.decode(seg.token_ids)  # the GLM detokenizer, no special tokens
    assert seg.token_ids and all(0 <= t < info["vocab_size"] and t not in info["eos_token_ids"] for t in seg.token_ids)
    assert 0 < seg.confidence <= 1 and seg.avg_logprob <= 0
    assert not seg.words and seg.channel == 0 and seg.speaker == "" and seg.normalized_text == ""
    given = glm_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=call_audio, beam_size=1, language="zh"),
                                timeout=60)
    assert given.language == "zh" and given.text  # accepted and reported back, not enforced


def test_request_hotwords_bias_the_glm_decode_over_grpc(glm_stub, call_audio):
    from gateway.protocol import asr_pb2

    base = dict(audio_content=call_audio, beam_size=5)
    plain = glm_stub.Transcribe(asr_pb2.TranscribeRequest(**base), timeout=60)
    boosted = glm_stub.Transcribe(asr_pb2.TranscribeRequest(
        **base, hotwords=[asr_pb2.Hotword(phrase=HOTWORD, weight=10.0)], hotword_boost=10.0), timeout=60)
    print(f"without hotwords {plain.text!r}\nwith {HOTWORD} {boosted.text!r}")
    assert HOTWORD not in normalize_for_cer(plain.text)
    assert HOTWORD in normalize_for_cer(boosted.text)  # any of 朝阳区 / 朝陽區 / mixed


@pytest.mark.parametrize("request_fields, message", [
    ({"hotwords": [{"phrase": "", "weight": 1.0}]}, "empty"),
    ({"hotwords": [{"phrase": HOTWORD, "weight": 50.0}]}, "weight"),
    ({"hotwords": [{"phrase": HOTWORD}], "hotword_boost": 11.0}, "boost"),
])
def test_invalid_hotwords_are_invalid_argument_for_glm_asr(glm_stub, call_audio, request_fields, message):
    import grpc

    from gateway.protocol import asr_pb2

    with pytest.raises(grpc.RpcError) as error:
        glm_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=call_audio, **request_fields), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details().lower()
