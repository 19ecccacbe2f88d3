"""End to end over a real gRPC channel: gateway -> real Triton -> ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.protocol import asr_pb2
from tests.conftest import PROJECT_ROOT, cer, load_clip_audio, sample_clips, wav16

CLIPS = sample_clips()
CLIP_IDS = [clip.name for clip in CLIPS]
EOT_AND_ABOVE = 50257  # whisper: ids >= <|endoftext|> are special tokens


def reference_generate(reference_model, audio: np.ndarray, language: str, num_beams: int) -> list[int]:
    model, processor = reference_model
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        sequences = model.generate(features, language=language, task="transcribe", num_beams=num_beams, do_sample=False)
    return [int(t) for t in sequences[0] if int(t) < EOT_AND_ABOVE]


@pytest.mark.parametrize("clip", CLIPS, ids=CLIP_IDS)
def test_greedy_tokens_equal_transformers_reference(asr_stub, reference_model, clip):
    audio = load_clip_audio(clip.path)
    expected = reference_generate(reference_model, audio, clip.language, num_beams=1)
    response = asr_stub.Transcribe(
        asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), language=clip.language, beam_size=1), timeout=120
    )
    got = [t for segment in response.segments for t in segment.token_ids]
    assert got == expected, f"{clip.name}: gateway {response.text!r} vs reference {reference_model[1].tokenizer.decode(expected)!r}"
    assert response.model_name == "whisper-base"
    assert response.audio_duration_s == pytest.approx(len(audio) / 16000, abs=1e-3)
    assert 0.0 < response.segments[0].confidence <= 1.0


def test_beam5_cer_within_one_point_of_transformers(asr_stub, reference_model):
    model, processor = reference_model
    gateway_errors, reference_errors = [], []
    for clip in CLIPS:
        audio = load_clip_audio(clip.path)
        ref_text = processor.tokenizer.decode(reference_generate(reference_model, audio, clip.language, num_beams=5))
        response = asr_stub.Transcribe(
            asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), language=clip.language, beam_size=5), timeout=120
        )
        gateway_errors.append(cer(response.text, clip.reference_text))
        reference_errors.append(cer(ref_text, clip.reference_text))
    gateway_cer = 100 * float(np.mean(gateway_errors))
    reference_cer = 100 * float(np.mean(reference_errors))
    assert abs(gateway_cer - reference_cer) <= 1.0, f"gateway CER {gateway_cer:.2f} vs transformers {reference_cer:.2f}"


@pytest.mark.parametrize("clip", [c for c in CLIPS if c.name in ("zh/pangrama", "en/quick_brown_fox")], ids=lambda c: c.name)
def test_language_detected_when_not_given(asr_stub, clip):
    response = asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), beam_size=1), timeout=120)
    assert response.language == clip.language


def test_empty_audio(asr_stub):
    response = asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=wav16(np.zeros(0, np.float32))), timeout=30)
    assert response.text == "" and len(response.segments) == 0 and response.audio_duration_s == 0.0


def test_empty_bytes_is_empty_result(asr_stub):
    response = asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=b""), timeout=30)
    assert response.text == "" and response.audio_duration_s == 0.0


def test_undecodable_bytes(asr_stub):
    with pytest.raises(grpc.RpcError) as error:
        asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=b"this is a text file, not audio\n" * 20), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "audio" in error.value.details().lower()


def test_no_audio_field(asr_stub):
    with pytest.raises(grpc.RpcError) as error:
        asr_stub.Transcribe(asr_pb2.TranscribeRequest(language="zh"), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("beam_size", [-1, 17])
def test_bad_beam_size(asr_stub, beam_size):
    with pytest.raises(grpc.RpcError) as error:
        asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=CLIPS[0].path.read_bytes(), beam_size=beam_size), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "beam_size" in error.value.details()


def test_unknown_language(asr_stub):
    with pytest.raises(grpc.RpcError) as error:
        asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=CLIPS[0].path.read_bytes(), language="klingon"), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "klingon" in error.value.details()


def test_raw_pcm_8khz(asr_stub):
    clip = next(c for c in CLIPS if c.name == "en/quick_brown_fox")
    audio = load_clip_audio(clip.path)
    import av

    resampler = av.AudioResampler(format="s16", layout="mono", rate=8000)
    frame = av.AudioFrame.from_ndarray(audio[np.newaxis, :], format="flt", layout="mono")
    frame.sample_rate = 16000
    pcm = b"".join(bytes(f.planes[0])[: f.samples * 2] for f in [*resampler.resample(frame), *resampler.resample(None)])
    request = asr_pb2.TranscribeRequest(
        raw_audio=asr_pb2.RawAudio(pcm=pcm, sample_rate_hz=8000, encoding=asr_pb2.RawAudio.S16LE, channels=1),
        language="en",
        beam_size=1,
    )
    response = asr_stub.Transcribe(request, timeout=60)
    assert response.audio_duration_s == pytest.approx(len(audio) / 16000, abs=0.01)
    assert cer(response.text, clip.reference_text) < 0.2, response.text


def test_long_audio_is_segmented_by_vad(asr_stub):
    """65 s, the clip at ~10 s, ~41 s and ~62 s: VAD finds each one (nothing truncated), in
    order, at its place; the silence between them is not decoded."""
    en = load_clip_audio(next(c for c in CLIPS if c.name == "en/hello_world").path)
    silence = np.zeros(16000 * 10, np.float32)
    audio = np.concatenate([silence, en, np.zeros(16000 * 29, np.float32), en, np.zeros(16000 * 20, np.float32), en])
    audio = np.concatenate([audio, np.zeros(16000 * 65 - len(audio), np.float32)]) if len(audio) < 16000 * 65 else audio
    placed = [10.0, 10.0 + len(en) / 16000 + 29, 10.0 + 2 * len(en) / 16000 + 49]
    response = asr_stub.Transcribe(
        asr_pb2.TranscribeRequest(audio_content=wav16(audio), language="en", beam_size=1, word_timestamps=True), timeout=300
    )
    assert response.audio_duration_s == pytest.approx(len(audio) / 16000, abs=1e-3)
    assert len(response.segments) == 3, [(s.start_s, s.text) for s in response.segments]
    for segment, start in zip(response.segments, placed):
        assert "hello" in segment.text.lower(), [s.text for s in response.segments]
        assert abs(segment.start_s - start) < 0.5 and segment.end_s <= start + len(en) / 16000 + 0.5
    # without word timestamps the same audio is one chunk (silence left out), one segment
    plain = asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=wav16(audio), language="en", beam_size=1), timeout=300)
    assert plain.text.lower().count("hello") == 3
    assert plain.segments[0].start_s == pytest.approx(10.0, abs=0.5) and plain.segments[-1].end_s < 64.5


def test_health_serving_and_reflection(gateway):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "asr.v1.Asr"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
    assert {"asr.v1.Asr", "grpc.health.v1.Health"} <= names


def test_cli_transcribe_json(gateway):
    clip = next(c for c in CLIPS if c.name == "en/hello_world")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.clients.cli", "transcribe", str(clip.path), "--json", "--server", gateway.address, "--language", "en"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    payload = json.loads(result.stdout)
    assert payload[0]["file"] == str(clip.path)
    assert "hello" in payload[0]["text"].lower()
    assert payload[0]["segments"][0]["end_s"] > 0


def test_cli_reports_bad_file(gateway, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio at all " * 50)
    result = subprocess.run(
        [sys.executable, "-m", "gateway.clients.cli", "transcribe", str(bad), "--server", gateway.address],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr
