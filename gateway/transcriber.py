"""Audio (16 kHz mono float32) -> text through Triton: features, encoder, beam search.

Audio longer than one 30 s window is transcribed window by window (every sample is
covered; windows run concurrently so Triton's batchers can combine them). VAD-based
segmentation replaces the fixed windows in a later step.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.decoding import DecodingOptions, beam_search
from gateway.features import N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from gateway.tokenizer import WhisperTokenizer
from gateway.triton_client import TritonAsrClient

DEFAULT_BEAM_SIZE = 5
MAX_BEAM_SIZE = 16
WINDOW_S = N_SAMPLES / SAMPLE_RATE


class ModelMismatchError(RuntimeError):
    """The model deployed in Triton is not the one the gateway's model directory describes."""


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None  # None: detect per window
    beam_size: int = DEFAULT_BEAM_SIZE
    task: str = "transcribe"

    def __post_init__(self) -> None:
        if not 1 <= self.beam_size <= MAX_BEAM_SIZE:
            raise ValueError(f"beam_size must be in 1..{MAX_BEAM_SIZE}, got {self.beam_size}")
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', got {self.task!r}")


@dataclass
class Segment:
    start_s: float
    end_s: float
    text: str
    confidence: float
    avg_logprob: float
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Transcript:
    text: str
    segments: list[Segment]
    duration_s: float
    language: str


class Transcriber:
    """Runs the whole recognition path for one audio array."""

    def __init__(self, client: TritonAsrClient, model_dir: Path, *, max_concurrent_windows: int = 4) -> None:
        self.client = client
        self.model_dir = Path(model_dir)
        self.model_info = json.loads((self.model_dir / "model_info.json").read_text(encoding="utf-8"))
        self.model_name: str = self.model_info["name"]
        self.tokenizer = WhisperTokenizer.from_model_dir(self.model_dir)
        self.n_mels: int = int(self.model_info["n_mels"])
        self.max_length: int = int(self.model_info["max_target_positions"])
        self._window_slots = asyncio.Semaphore(max_concurrent_windows)

    async def check_deployment(self) -> None:
        deployed = await self.client.deployed_model()
        if deployed.model_name != self.model_name or deployed.family != self.model_info["family"]:
            raise ModelMismatchError(
                f"Triton serves {deployed.family}/{deployed.model_name} but the gateway's model directory "
                f"{self.model_dir} holds {self.model_info['family']}/{self.model_name}"
            )

    def validate_language(self, language: str | None) -> None:
        if language:
            self.tokenizer.language_id(language)  # raises UnknownLanguageError

    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcript:
        self.validate_language(options.language)
        duration_s = len(audio) / SAMPLE_RATE
        if len(audio) == 0:
            return Transcript(text="", segments=[], duration_s=0.0, language=options.language or "")
        n_windows = math.ceil(len(audio) / N_SAMPLES)
        windows = [audio[i * N_SAMPLES : (i + 1) * N_SAMPLES] for i in range(n_windows)]
        results = await asyncio.gather(*(self._transcribe_window(w, i * WINDOW_S, options) for i, w in enumerate(windows)))
        segments = [segment for segment, _ in results if segment.text or segment.token_ids]
        languages = [language for _, language in results]
        language = options.language or max(set(languages), key=languages.count)
        text = "".join(s.text for s in segments) if language in ("zh", "ja", "yue") else " ".join(s.text for s in segments)
        return Transcript(text=text.strip(), segments=segments, duration_s=duration_s, language=language)

    async def _transcribe_window(self, window: np.ndarray, offset_s: float, options: TranscribeOptions):
        async with self._window_slots:
            features = log_mel_spectrogram(window, n_mels=self.n_mels)
            encoder_output = await self.client.encode(features)
            language = options.language or await self._detect_language(encoder_output)
            prompt = self.tokenizer.sot_sequence(language=language, task=options.task)
            session = self.client.decoder_session(
                encoder_output,
                suppress_ids=list(self.model_info["suppress_tokens"]),
                begin_suppress_ids=list(self.model_info["begin_suppress_tokens"]),
            )
            try:
                result = await beam_search(
                    session,
                    prompt,
                    DecodingOptions(beam_size=options.beam_size),
                    eot_id=self.model_info["eot"],
                    max_length=self.max_length,
                )
            finally:
                await session.close()
        text = self.tokenizer.decode(result.tokens).strip()
        end_s = offset_s + len(window) / SAMPLE_RATE
        segment = Segment(
            start_s=round(offset_s, 3),
            end_s=round(end_s, 3),
            text=text,
            confidence=float(math.exp(result.avg_logprob)) if result.tokens else 0.0,
            avg_logprob=float(result.avg_logprob),
            token_ids=[int(t) for t in result.tokens],
        )
        return segment, language

    async def _detect_language(self, encoder_output: np.ndarray) -> str:
        """One decoder step on <|startoftranscript|>; the most likely language token wins."""
        codes = list(self.model_info["lang_to_id"])
        lang_ids = np.array([[self.model_info["lang_to_id"][c] for c in codes]], dtype=np.int64)
        session = self.client.decoder_session(encoder_output)
        try:
            output = await session.step(
                np.array([[self.model_info["sot"]]], dtype=np.int64), None, top_k=1, extra_ids=lang_ids
            )
        finally:
            await session.close()
        return codes[int(np.argmax(output.extra_logprobs[0]))]
