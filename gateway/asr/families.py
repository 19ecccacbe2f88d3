"""Model families behind one decoding path: what differs between Whisper and GLM-ASR.

The gateway's transcription loop (features -> Triton encoder -> beam search over the stateful
Triton decoder -> text) is the same for every family; a :class:`ModelFamily` supplies what is
model-specific, from the exported model directory only (``model_info.json``, ``tokenizer.json``,
``prompt.json``; no torch/transformers):

- ``n_mels``: features to compute (``gateway.asr.features.log_mel_spectrogram(audio, n_mels)``);
- ``decoder_audio(encoder_output, n_samples)``: what the decoder's START request carries
  (Whisper: the encoder output as is; GLM-ASR: the audio embeddings of the real audio, i.e.
  the first ``n_audio_tokens(n_samples)`` rows);
- ``prompt_ids(language, task, n_audio_tokens)``: the decoder prompt (Whisper:
  ``<|startoftranscript|><|zh|><|transcribe|><|notimestamps|>``; GLM-ASR: the chat prompt
  with ``n_audio_tokens`` audio placeholders, ids from ``prompt.json``);
- ``eos_ids``, ``suppress_ids``, ``begin_suppress_ids``, ``max_length``, ``max_new_tokens``:
  the search limits (``beam_search(..., eot_id=family.eos_ids, ...)``);
- ``decode(tokens)``: text of generated ids;
- language: ``supports_language_detection`` and, for Whisper, the detection prompt/ids;
  ``language_of(text)`` for a family that does not report the language (joining chunk texts);
- ``supports_timestamps``: Whisper's timestamp tokens (word timestamps); GLM-ASR has none;
- ``hotword_vocabulary()``: token bytes for hotword biasing (``gateway.asr.hotwords``), None for a
  family whose tokenizer the context graph cannot read (both families here are byte-level BPE).

``load_family(model_dir)`` picks the implementation from ``model_info.json``'s ``family``;
``check_deployed(family, deployed)`` compares it with what Triton serves (the decoder's
``family``/``model_name`` config parameters, ``TritonAsrClient.deployed_model()``).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gateway.asr.hotwords import ByteLevelVocabulary, TokenVocabulary, WhisperVocabulary
from gateway.asr.tokenizer import (
    MODEL_INFO_FILE,
    TOKENIZER_FILE,
    TokenizerConfigError,
    UnknownLanguageError,
    UnknownTaskError,
    WhisperTokenizer,
)

PROMPT_FILE = "prompt.json"
GLM_TASKS = ("transcribe",)


class FamilyError(ValueError):
    """The model directory names an unknown family or its files are inconsistent."""


class FamilyMismatchError(RuntimeError):
    """Triton serves another model than the gateway's model directory describes."""


class ModelFamily(ABC):
    """What the shared decoding path needs to know about one exported model."""

    family: str
    model_name: str
    model_info: Mapping[str, Any]
    n_mels: int
    eos_ids: tuple[int, ...]
    suppress_ids: list[int]
    begin_suppress_ids: list[int]
    max_length: int  # prompt + generated tokens the decoder holds
    max_new_tokens: int | None  # generated tokens per window (None: up to max_length)
    supports_language_detection: bool
    supports_timestamps: bool
    _vocabulary: TokenVocabulary | None = None

    @abstractmethod
    def validate(self, language: str | None, task: str = "transcribe") -> None:
        """Raise UnknownLanguageError / UnknownTaskError for options this model cannot honour."""

    @abstractmethod
    def n_audio_tokens(self, n_samples: int) -> int:
        """Rows of the encoder output the decoder gets for a window of ``n_samples`` samples."""

    def decoder_audio(self, encoder_output: np.ndarray, n_samples: int) -> np.ndarray:
        """encoder output [S, d] of one window -> the START request's ``encoder_output``."""
        return encoder_output[: self.n_audio_tokens(n_samples)]

    @abstractmethod
    def prompt_ids(self, language: str | None, task: str = "transcribe", n_audio_tokens: int = 0,
                   timestamps: bool = False) -> list[int]:
        """Decoder prompt for one window (``timestamps``: Whisper's timestamp mode)."""

    @abstractmethod
    def decode(self, tokens: Iterable[int]) -> str:
        """Text of generated token ids (special tokens dropped)."""

    def language_of(self, text: str) -> str:
        """Best guess of the language of a transcript ("" when unsure): for families whose
        decoder does not report it. Only zh vs en, from the script."""
        cjk = sum(1 for ch in text if "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff")
        latin = sum(1 for ch in text if ch.isascii() and ch.isalpha())
        if cjk and cjk >= latin / 4:
            return "zh"
        return "en" if latin else ""

    def hotword_vocabulary(self) -> TokenVocabulary | None:
        """Token bytes for hotword biasing (built once); None: this family cannot take hotwords."""
        if self._vocabulary is None:
            self._vocabulary = self._build_vocabulary()
        return self._vocabulary

    def _build_vocabulary(self) -> TokenVocabulary | None:
        return None

    # language detection (Whisper only)
    def language_detection_prompt(self) -> list[int]:
        raise NotImplementedError(f"{self.family} models do not detect the language")

    def language_token_ids(self) -> dict[str, int]:
        raise NotImplementedError(f"{self.family} models do not detect the language")


class WhisperFamily(ModelFamily):
    family = "whisper"
    supports_language_detection = True
    supports_timestamps = True

    def __init__(self, model_dir: Path, model_info: Mapping[str, Any]):
        self.model_dir = Path(model_dir)
        self.model_info = model_info
        self.model_name = str(model_info["name"])
        self.tokenizer = WhisperTokenizer.from_files(self.model_dir / TOKENIZER_FILE, model_info)
        self.n_mels = int(model_info["n_mels"])
        self.eos_ids = (int(model_info["eot"]),)
        self.suppress_ids = [int(t) for t in model_info["suppress_tokens"]]
        self.begin_suppress_ids = [int(t) for t in model_info["begin_suppress_tokens"]]
        self.max_length = int(model_info["max_target_positions"])
        self.max_new_tokens = None

    @property
    def languages(self) -> tuple[str, ...]:
        return self.tokenizer.languages

    def validate(self, language: str | None, task: str = "transcribe") -> None:
        if language:
            self.tokenizer.language_id(language)
        if task not in ("transcribe", "translate"):
            raise UnknownTaskError(task)

    def n_audio_tokens(self, n_samples: int) -> int:
        return int(self.model_info.get("n_audio_ctx") or self.model_info.get("encoder_frames") or 1500)

    def decoder_audio(self, encoder_output: np.ndarray, n_samples: int) -> np.ndarray:
        return encoder_output  # cross-attention over the whole (padded) window, as Whisper was trained

    def prompt_ids(self, language: str | None, task: str = "transcribe", n_audio_tokens: int = 0,
                   timestamps: bool = False) -> list[int]:
        return self.tokenizer.sot_sequence(language=language, task=task, timestamps=timestamps)

    def decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(tokens).strip()

    def language_detection_prompt(self) -> list[int]:
        return [self.tokenizer.sot]

    def language_token_ids(self) -> dict[str, int]:
        return dict(self.tokenizer.special.lang_to_id)

    def _build_vocabulary(self) -> TokenVocabulary:
        return WhisperVocabulary(self.tokenizer)


class GlmAsrFamily(ModelFamily):
    """GLM-ASR-Nano: a chat prompt around the audio embeddings; the model picks the language."""

    family = "glm_asr"
    supports_language_detection = False
    supports_timestamps = False
    DEFAULT_MAX_NEW_TOKENS = 448  # a 30 s window: ~250 Mandarin tokens at most, with room to spare

    def __init__(self, model_dir: Path, model_info: Mapping[str, Any], prompt: Mapping[str, Any]):
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        self.model_info = model_info
        self.prompt = prompt
        try:
            self.model_name = str(model_info["name"])
            self.n_mels = int(model_info["n_mels"])
            self.eos_ids = tuple(int(t) for t in model_info["eos_token_ids"])
            self.audio_token_id = int(model_info["audio_token_id"])
            self.max_length = int(model_info["max_target_positions"])
            self.suppress_ids = [int(t) for t in model_info.get("suppress_tokens", [])]
            self.begin_suppress_ids = [int(t) for t in model_info.get("begin_suppress_tokens", [])]
            self.prefix_ids = [int(t) for t in prompt["prefix_ids"]]
            self.suffix_ids = [int(t) for t in prompt["suffix_ids"]]
            self.tokens_per_window = int(prompt["tokens_per_window"])
            rule = prompt["audio_tokens"]
            self._hop = int(rule["hop_length"])
            self._n_frames = int(rule["n_frames"])
            self._convs = [tuple(int(v) for v in c) for c in rule["convs"]]
            self._merge = int(rule["merge_factor"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FamilyError(f"{self.model_dir}: malformed model_info.json/prompt.json for glm_asr: {exc!r}") from exc
        if not self.eos_ids:
            raise FamilyError(f"{self.model_dir}: model_info.json has no eos_token_ids")
        if int(prompt.get("audio_token_id", self.audio_token_id)) != self.audio_token_id:
            raise FamilyError(f"{self.model_dir}: prompt.json and model_info.json disagree on the audio token id")
        if self.n_audio_tokens(self._n_frames * self._hop) != self.tokens_per_window:
            raise FamilyError(f"{self.model_dir}: prompt.json's audio token rule does not give "
                              f"{self.tokens_per_window} tokens for a full window")
        self.max_new_tokens = min(self.DEFAULT_MAX_NEW_TOKENS,
                                  self.max_length - len(self.prefix_ids) - len(self.suffix_ids) - self.tokens_per_window)
        path = self.model_dir / TOKENIZER_FILE
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise TokenizerConfigError(f"cannot load {path}: {exc}") from exc
        for name, token_id in (("audio_token_id", self.audio_token_id), *(("eos", e) for e in self.eos_ids)):
            if self.tokenizer.id_to_token(token_id) is None:
                raise TokenizerConfigError(f"model_info {name}={token_id} is not in {path}")
        self._special_ids = frozenset(i for i, tok in self.tokenizer.get_added_tokens_decoder().items() if tok.special)

    def validate(self, language: str | None, task: str = "transcribe") -> None:
        # the prompt has no language slot: the model transcribes whatever it hears (a given
        # language is accepted and reported back, not enforced)
        if task not in GLM_TASKS:
            raise UnknownTaskError(task)

    def n_audio_tokens(self, n_samples: int) -> int:
        """GlmAsrProcessor's count for one window of ``n_samples`` (at most a full window)."""
        length = min(self._n_frames, -(-max(0, int(n_samples)) // self._hop))
        for padding, kernel, stride in self._convs:
            length = (length + 2 * padding - (kernel - 1) - 1) // stride + 1
        return max(1, (length - self._merge) // self._merge + 1)

    def prompt_ids(self, language: str | None = None, task: str = "transcribe", n_audio_tokens: int = 0,
                   timestamps: bool = False) -> list[int]:
        self.validate(language, task)
        if timestamps:
            raise ValueError("glm_asr models have no timestamp tokens (check supports_timestamps)")
        if not 1 <= n_audio_tokens <= self.tokens_per_window:
            raise ValueError(f"n_audio_tokens must be in 1..{self.tokens_per_window}, got {n_audio_tokens}")
        return self.prefix_ids + [self.audio_token_id] * int(n_audio_tokens) + self.suffix_ids

    def decode(self, tokens: Iterable[int]) -> str:
        ids = [int(t) for t in tokens if int(t) not in self._special_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _build_vocabulary(self) -> TokenVocabulary:
        # every added token (chat markers, audio placeholder, eos) is a control token here
        ignore = {*self.tokenizer.get_added_tokens_decoder(), *self.eos_ids, self.audio_token_id}
        return ByteLevelVocabulary(self.tokenizer, ignore, int(self.model_info.get("vocab_size") or self.tokenizer.get_vocab_size()))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FamilyError(f"{path} not found (export the model first: make export)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FamilyError(f"{path} is not valid JSON: {exc}") from exc


FAMILIES = ("whisper", "glm_asr")


def load_family(model_dir: Path | str) -> ModelFamily:
    """The family implementation for an exported model directory."""
    model_dir = Path(model_dir)
    info = _read_json(model_dir / MODEL_INFO_FILE)
    family = info.get("family", "whisper")
    if family == "whisper":
        return WhisperFamily(model_dir, info)
    if family == "glm_asr":
        return GlmAsrFamily(model_dir, info, _read_json(model_dir / str(info.get("prompt_file") or PROMPT_FILE)))
    raise FamilyError(f"{model_dir / MODEL_INFO_FILE}: unknown model family {family!r} (known: {', '.join(FAMILIES)})")


def check_deployed(family: ModelFamily, deployed: Any) -> None:
    """Raise FamilyMismatchError unless Triton's decoder (``deployed.family``/``.model_name``,
    from ``TritonAsrClient.deployed_model()``) is the model the family was loaded from."""
    if deployed.family != family.family or deployed.model_name != family.model_name:
        raise FamilyMismatchError(
            f"Triton serves {deployed.family or '?'}/{deployed.model_name or '?'} but the gateway's model directory "
            f"{getattr(family, 'model_dir', '?')} holds {family.family}/{family.model_name}")


__all__ = [
    "FAMILIES", "FamilyError", "FamilyMismatchError", "GlmAsrFamily", "ModelFamily", "UnknownLanguageError",
    "UnknownTaskError", "WhisperFamily", "check_deployed", "load_family",
]
