"""The seam between the transcriber and the model: one audio window (<= 30 s) in, tokens out.

The transcriber plans windows (VAD), turns tokens into segments, words and times, and never
talks to the inference server itself. A backend implements :class:`WindowDecoder`:

- :class:`TritonWindowDecoder`: log-mel features here, the Triton encoder, then the beam
  search: inside Triton (model ``search``, one request per window; windows in flight share
  every decoder call; a hotword scorer travels as data) when the server serves it, else in the
  gateway with one Triton decoder step per token (hotword biasing happens between steps);
- another backend (e.g. a TensorRT-LLM ``generate`` model) would implement the same two
  methods and be handed to ``Transcriber(window_decoder=...)``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from gateway.asr.decoding import DecodingOptions, DecodingResult, TokenScorer, beam_search
from gateway.asr.families import ModelFamily
from gateway.asr.features import N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from gateway.asr.hotwords import scorer_wire
from gateway.asr.triton_client import TritonUnavailableError, window_tag

log = logging.getLogger(__name__)

MAX_INITIAL_TIMESTAMP_S = 1.0  # openai-whisper's max_initial_timestamp
MAX_TOKENS_PER_S = 15.0  # generated tokens per second of audio at most (plus MIN_NEW_TOKENS)
MIN_NEW_TOKENS = 16
# openai-whisper's threshold: a text whose zlib compression ratio is above it is a repetition
# loop. A hotword-biased window that loops is decoded again without the hotwords.
COMPRESSION_RATIO_THRESHOLD = 2.4
# ... as is one where a stretch of 4+ characters comes 3+ times in a row (short loops such
# as 市场监督管理局 x 5 compress less than whisper's threshold)
_REPEATED_RUN = re.compile(r"(\S.{3,}?)\1{2,}", re.DOTALL)


def compression_ratio(text: str) -> float:
    """UTF-8 bytes over zlib-compressed bytes (0 for empty text); loops compress well."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def looks_like_loop(text: str) -> bool:
    """A repetition loop: compresses above whisper's threshold, or repeats a 4+ character
    stretch three times in a row."""
    return compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD or _REPEATED_RUN.search(text) is not None


@dataclass(frozen=True)
class WindowOptions:
    """What one window decode needs; validated by TranscribeOptions before it gets here."""

    language: str | None  # None: detected by the backend where the family can
    task: str
    beam_size: int
    timestamps: bool  # Whisper timestamp tokens (only where the family supports them)
    scorer: TokenScorer | None  # hotword biasing; None: none
    max_biased_logprob: float | None


@dataclass(frozen=True)
class WindowResult:
    result: DecodingResult
    language: str  # "" when the family reports none


@runtime_checkable
class WindowDecoder(Protocol):
    async def decode_window(self, audio: np.ndarray, options: WindowOptions) -> WindowResult:
        """Decode float32 16 kHz mono ``audio`` of at most N_SAMPLES samples."""

    async def deployed_model(self) -> dict:
        """What the server reports about the deployed model (checked against the family)."""


class TritonWindowDecoder:
    """Features -> Triton encoder -> beam search: the `search` model's (one request per window,
    hotwords included where the server takes them) or the gateway's over Triton decoder steps
    (KV cache in Triton)."""

    def __init__(self, client, family: ModelFamily, *, server_search: bool = True, server_encode: bool = True) -> None:
        self.client = client  # gateway.asr.triton_client.TritonAsrClient (or a wrapper of it)
        self.family = family
        # windows searched inside Triton when it serves the `search` model
        self.server_search = server_search and hasattr(client, "search")
        # ... sent as features, encoded there too, when the model takes them (input_features)
        self.server_encode = server_encode
        info = family.model_info
        if family.supports_timestamps:
            self._timestamp_rules = (
                int(info["timestamp_begin"]),
                int(info["no_timestamps"]),
                round(MAX_INITIAL_TIMESTAMP_S / float(info.get("time_precision", 0.02))),
                int(info["eot"]),
            )

    async def deployed_model(self) -> dict:
        return await self.client.deployed_model()

    async def decode_window(self, audio: np.ndarray, options: WindowOptions) -> WindowResult:
        if audio.shape[0] > N_SAMPLES:
            raise ValueError(f"a window holds at most {N_SAMPLES} samples, got {audio.shape[0]}")
        features = await asyncio.to_thread(log_mel_spectrogram, audio, n_mels=self.family.n_mels)
        tag = window_tag()  # Triton request ids: <request id>-w<n>-...
        # Several Triton replicas (TritonReplicas): a window whose replica went away mid-decode
        # is decoded again from its features on another one (its sequence died with the server).
        any_ready = getattr(self.client, "any_ready", None)
        attempts = len(getattr(self.client, "replicas", ())) or 1
        for attempt in range(attempts):
            try:
                attempt_tag = f"{tag}-a{attempt}" if attempt and tag else tag
                return await self._decode_features(features, audio.shape[0], options, attempt_tag)
            except TritonUnavailableError as error:
                if attempt + 1 == attempts or any_ready is None or not any_ready():
                    raise
                log.warning("window %s: %s; decoding it again on another Triton replica", tag or "-", error)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _decode_features(self, features: np.ndarray, n_samples: int, options: WindowOptions, tag: str) -> WindowResult:
        family = self.family
        # Triton request ids (triton_client): <tag>-enc, steps <tag>-s<n> and <tag>-end, language
        # detection <tag>-lang-s0, a decode again without hotwords <tag>-nohw-s<n>
        ids = (lambda suffix: {"request_id": f"{tag}-{suffix}" if suffix else tag}) if tag else (lambda suffix: {})
        encoded: list[np.ndarray] = []  # the window's encoder output, asked for at most once

        async def encoder_output() -> np.ndarray:
            if not encoded:
                encoded.append(await self.client.encode(features, **ids("enc")))
            return encoded[0]

        if options.language:
            language = options.language
        elif family.supports_language_detection:
            language = await self._detect_language(await encoder_output(), ids("lang"))
        else:
            language = ""
        timestamps = options.timestamps and family.supports_timestamps
        audio_tokens = family.n_audio_tokens(n_samples)  # rows of the encoder output the decoder attends to
        prompt = family.prompt_ids(language, options.task, audio_tokens, timestamps=timestamps)
        rules = self._timestamp_rules if timestamps else None
        # a hallucination loop stops after what the audio could hold (speech is < 8 tokens/s)
        max_new_tokens = int(MIN_NEW_TOKENS + MAX_TOKENS_PER_S * n_samples / SAMPLE_RATE)
        if family.max_new_tokens is not None:
            max_new_tokens = min(max_new_tokens, family.max_new_tokens)
        decoding = DecodingOptions(
            beam_size=options.beam_size, max_new_tokens=max_new_tokens, max_biased_logprob=options.max_biased_logprob
        )

        async def search(scorer: TokenScorer | None, name: str) -> DecodingResult:
            # a scorer the server cannot rebuild (not a hotword scorer) stays with the stepwise search
            wire = scorer_wire(scorer) if scorer is not None else None
            if (self.server_search and (scorer is None or wire is not None)
                    and await self.client.has_search(hotwords=wire is not None)):
                options = {"prompt": [int(t) for t in prompt], "beam_size": decoding.beam_size,
                           "patience": decoding.patience, "length_penalty": decoding.length_penalty,
                           "max_new_tokens": decoding.max_new_tokens, "max_length": family.max_length,
                           "eot_ids": [int(t) for t in family.eos_ids],
                           "suppress_ids": [int(t) for t in family.suppress_ids],
                           "begin_suppress_ids": [int(t) for t in family.begin_suppress_ids],
                           "timestamp_rules": None if rules is None else list(rules),
                           "max_biased_logprob": decoding.max_biased_logprob, "hotwords": wire}
                if (self.server_encode and not encoded
                        and await self.client.has_search(hotwords=wire is not None, features=True)):
                    # the server encodes the window itself: its encoder output (3 MB for Whisper
                    # base) stays in Triton instead of a round trip through this process
                    options["audio_tokens"] = audio_tokens
                    return await self.client.search(features, options, features=True, **ids(name or "search"))
                return await self.client.search(family.decoder_audio(await encoder_output(), n_samples), options,
                                                **ids(name or "search"))
            session = self.client.decoder_session(
                family.decoder_audio(await encoder_output(), n_samples),
                suppress_ids=list(family.suppress_ids),
                begin_suppress_ids=list(family.begin_suppress_ids),
                timestamp_rules=rules,
                **ids(name),
            )
            try:
                return await beam_search(
                    session, prompt, decoding, eot_id=list(family.eos_ids), max_length=family.max_length, scorer=scorer
                )
            finally:
                await session.close()

        result = await search(options.scorer, "")
        if options.scorer is not None:
            text = family.decode(result.tokens)
            if looks_like_loop(text):
                # hotwords pulled the decoder into a loop (listed names repeated): this window
                # is decoded again without them
                log.warning("hotword-biased window loops (%r...); decoded again without hotwords", text[:40])
                result = await search(None, "nohw")
        return WindowResult(result=result, language=language)

    async def _detect_language(self, encoder_output: np.ndarray, ids: dict) -> str:
        """One decoder step on <|startoftranscript|>; the most likely language token wins."""
        lang_to_id = self.family.language_token_ids()
        codes = list(lang_to_id)
        lang_ids = np.array([[lang_to_id[c] for c in codes]], dtype=np.int64)
        session = self.client.decoder_session(encoder_output, **ids)
        try:
            output = await session.step(
                np.array([self.family.language_detection_prompt()], dtype=np.int64), None, top_k=1, extra_ids=lang_ids
            )
        finally:
            await session.close()
        return codes[int(np.argmax(output.extra_logprobs[0]))]
