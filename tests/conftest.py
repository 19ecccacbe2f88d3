"""Session fixtures: a real tritonserver and a real gateway on free ports.

The model directory comes from `make export` (ASR_MODEL_DIR, default build/models/whisper-base).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def model_dir_path() -> Path:
    return Path(os.environ.get("ASR_MODEL_DIR", PROJECT_ROOT / "build" / "models" / "whisper-base"))


def glm_model_dir_path() -> Path:
    """The glm_asr export the GLM tests run on (ASR_GLM_MODEL_DIR, default build/models/glm-asr-tiny)."""
    path = Path(os.environ.get("ASR_GLM_MODEL_DIR", PROJECT_ROOT / "build" / "models" / "glm-asr-tiny"))
    return path if path.is_absolute() else PROJECT_ROOT / path


@dataclass(frozen=True)
class Clip:
    name: str
    language: str
    path: Path
    reference_text: str


def sample_clips() -> list[Clip]:
    import pytest_audioeval

    root = Path(next(iter(pytest_audioeval.__path__))).resolve() / "samples" / "audio"
    clips = []
    for language in ("zh", "en"):
        for wav in sorted((root / language).glob("*.wav")):
            text = wav.with_suffix(".txt").read_text(encoding="utf-8").strip()
            clips.append(Clip(f"{language}/{wav.stem}", language, wav, text))
    return clips


@pytest.fixture(scope="session")
def model_dir() -> Path:
    path = model_dir_path()
    if not (path / "model_info.json").is_file():
        pytest.fail(f"{path} has no exported model; run `make export` (make test does it)")
    return path


@pytest.fixture(scope="session")
def repository(model_dir, tmp_path_factory) -> Path:
    from model_repository.render import render_repository

    out = tmp_path_factory.mktemp("model_repository")
    render_repository(model_dir, out, precision="fp32")
    return out


@pytest.fixture(scope="session")
def triton(repository, tmp_path_factory):
    from gateway.launch.triton_process import TritonProcess

    log_path = tmp_path_factory.mktemp("logs") / "triton.log"
    with TritonProcess(repository, log_path=log_path) as server:
        yield server


@contextlib.contextmanager
def running_gateway(model_dir: Path, triton_url: str, logs: Path, extra_args: list[str] | None = None):
    """`python -m gateway.service.server` on a free port in front of ``triton_url``; log and history in ``logs``."""
    from gateway.launch.local import GatewayProcess

    # never the project's default history database: tests write tickets
    extra = ["--history-db", str(logs / "history.sqlite"), *(extra_args or [])]
    with GatewayProcess(model_dir, triton_url, log_path=logs / "gateway.log", extra_args=extra) as process:
        yield process


@contextlib.contextmanager
def asr_client(address: str):
    """An ``asr.v1.Asr`` stub over a real gRPC channel to ``address``."""
    import grpc

    from gateway.protocol import asr_pb2_grpc

    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
    try:
        yield asr_pb2_grpc.AsrStub(channel)
    finally:
        channel.close()


@pytest.fixture(scope="session")
def gateway(triton, model_dir, tmp_path_factory):
    with running_gateway(model_dir, triton.grpc_url, tmp_path_factory.mktemp("logs")) as process:
        yield process


@pytest.fixture(scope="session")
def asr_stub(gateway):
    with asr_client(gateway.address) as stub:
        yield stub


@pytest.fixture(scope="session")
def reference_model(model_dir):
    """transformers' Whisper on the same weights: the decoding reference."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    torch.set_num_threads(2)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir / "hf").eval()
    processor = WhisperProcessor.from_pretrained(model_dir / "hf")
    return model, processor


_PUNCTUATION = re.compile(r"[\s\W_]+", re.UNICODE)


def normalize_for_cer(text: str) -> str:
    """Simplified Chinese, lower case, no punctuation or spaces: what CER compares."""
    import zhconv

    return _PUNCTUATION.sub("", zhconv.convert(text, "zh-cn").lower())


def cer(hypothesis: str, reference: str) -> float:
    import jiwer

    ref = normalize_for_cer(reference)
    hyp = normalize_for_cer(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return jiwer.cer(ref, hyp)


def load_clip_audio(path: Path) -> np.ndarray:
    from gateway.asr.audio import decode_audio

    return decode_audio(path.read_bytes())


def wav16(audio: np.ndarray, rate: int = 16000, channels: int = 1) -> bytes:
    """Float samples in [-1, 1] (interleaved when channels > 1) as a 16-bit PCM WAV."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()
