"""Whisper tokenizer: ``tokenizer.json`` (HF tokenizers) + ``model_info.json`` special ids.

The model directory written by ``make export`` holds both files. ``model_info.json``
carries the special token ids the prompt and the search need (sot, eot,
no_timestamps, transcribe, translate, timestamp_begin, lang_to_id, ...), so the
gateway never guesses them from token strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

TASKS = ("transcribe", "translate")
REQUIRED_KEYS = (
    "sot",
    "eot",
    "no_timestamps",
    "transcribe",
    "translate",
    "lang_to_id",
    "timestamp_begin",
    "suppress_tokens",
    "begin_suppress_tokens",
    "max_target_positions",
)
TOKENIZER_FILE = "tokenizer.json"
MODEL_INFO_FILE = "model_info.json"


class TokenizerConfigError(ValueError):
    """tokenizer.json / model_info.json are missing, malformed or disagree."""


class UnknownLanguageError(ValueError):
    """A language code the model has no token for."""

    def __init__(self, language: str, valid: Iterable[str]):
        self.language = language
        self.valid = tuple(sorted(valid))
        super().__init__(f"unknown language {language!r}; valid codes: {', '.join(self.valid)}")


class UnknownTaskError(ValueError):
    """A task other than transcribe/translate."""

    def __init__(self, task: str):
        self.task = task
        super().__init__(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


@dataclass(frozen=True)
class SpecialTokens:
    sot: int
    eot: int
    no_timestamps: int
    transcribe: int
    translate: int
    timestamp_begin: int  # first <|0.00|>; every id >= this is a timestamp
    lang_to_id: Mapping[str, int]  # "zh" -> 50260
    suppress_tokens: tuple[int, ...]
    begin_suppress_tokens: tuple[int, ...]
    max_target_positions: int  # prompt + generated tokens the decoder can hold (448)

    @classmethod
    def from_model_info(cls, info: Mapping[str, Any]) -> SpecialTokens:
        missing = [k for k in REQUIRED_KEYS if k not in info]
        if missing:
            raise TokenizerConfigError(f"model_info lacks keys {missing}")
        try:
            lang_to_id = {str(code): int(i) for code, i in dict(info["lang_to_id"]).items()}
            return cls(
                sot=int(info["sot"]),
                eot=int(info["eot"]),
                no_timestamps=int(info["no_timestamps"]),
                transcribe=int(info["transcribe"]),
                translate=int(info["translate"]),
                timestamp_begin=int(info["timestamp_begin"]),
                lang_to_id=lang_to_id,
                suppress_tokens=tuple(int(t) for t in info["suppress_tokens"]),
                begin_suppress_tokens=tuple(int(t) for t in info["begin_suppress_tokens"]),
                max_target_positions=int(info["max_target_positions"]),
            )
        except (TypeError, ValueError) as exc:
            raise TokenizerConfigError(f"malformed model_info: {exc}") from exc


class WhisperTokenizer:
    """Text <-> token ids, prompts and special-token tests for one Whisper model."""

    def __init__(self, tokenizer: Tokenizer, model_info: Mapping[str, Any]):
        self._tokenizer = tokenizer
        self.special = SpecialTokens.from_model_info(model_info)
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special) | {
            self.special.sot,
            self.special.eot,
            self.special.no_timestamps,
            self.special.transcribe,
            self.special.translate,
            *self.special.lang_to_id.values(),
        }
        for name in ("sot", "eot", "transcribe", "translate", "no_timestamps"):
            token_id = getattr(self.special, name)
            if tokenizer.id_to_token(token_id) is None:
                raise TokenizerConfigError(f"model_info {name}={token_id} is not in tokenizer.json")

    @classmethod
    def from_files(cls, tokenizer_json: Path | str, model_info: Mapping[str, Any] | Path | str) -> WhisperTokenizer:
        path = Path(tokenizer_json)
        if not path.is_file():
            raise TokenizerConfigError(f"{path} not found")
        if not isinstance(model_info, Mapping):
            info_path = Path(model_info)
            if not info_path.is_file():
                raise TokenizerConfigError(f"{info_path} not found")
            try:
                model_info = json.loads(info_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise TokenizerConfigError(f"{info_path} is not valid JSON: {exc}") from exc
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise TokenizerConfigError(f"cannot load {path}: {exc}") from exc
        return cls(tokenizer, model_info)

    @classmethod
    def from_model_dir(cls, model_dir: Path | str) -> WhisperTokenizer:
        """Load ``tokenizer.json`` and ``model_info.json`` from an exported model directory."""
        model_dir = Path(model_dir)
        return cls.from_files(model_dir / TOKENIZER_FILE, model_dir / MODEL_INFO_FILE)

    # ids
    @property
    def sot(self) -> int:
        return self.special.sot

    @property
    def eot(self) -> int:
        return self.special.eot

    @property
    def no_timestamps(self) -> int:
        return self.special.no_timestamps

    @property
    def timestamp_begin(self) -> int:
        return self.special.timestamp_begin

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.special.lang_to_id)

    def language_id(self, language: str) -> int:
        try:
            return self.special.lang_to_id[language]
        except KeyError:
            raise UnknownLanguageError(language, self.special.lang_to_id) from None

    def sot_sequence(self, language: str | None, task: str = "transcribe", timestamps: bool = False) -> list[int]:
        """Decoder prompt, e.g. [sot, <|zh|>, <|transcribe|>, <|notimestamps|>].

        ``language=None`` leaves the language token out (English-only models).
        """
        if task not in TASKS:
            raise UnknownTaskError(task)
        sequence = [self.special.sot]
        if language is not None:
            sequence.append(self.language_id(language))
        sequence.append(self.special.transcribe if task == "transcribe" else self.special.translate)
        if not timestamps:
            sequence.append(self.special.no_timestamps)
        return sequence

    @property
    def backend(self) -> Tokenizer:
        """The HF ``tokenizers.Tokenizer`` (byte-level BPE)."""
        return self._tokenizer

    @property
    def special_ids(self) -> frozenset[int]:
        """Control tokens below ``timestamp_begin`` (sot, eot, languages, tasks, other added specials)."""
        return self._special_ids

    def is_special(self, token_id: int) -> bool:
        """Control tokens (sot, eot, languages, tasks, ...) and timestamps."""
        return token_id in self._special_ids or token_id >= self.special.timestamp_begin

    def is_timestamp(self, token_id: int) -> bool:
        return token_id >= self.special.timestamp_begin

    # text
    def encode(self, text: str) -> list[int]:
        """Text tokens only (no sot/eot added)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the non-special tokens in ``ids``."""
        text_ids = [int(i) for i in ids if not self.is_special(int(i))]
        return self._tokenizer.decode(text_ids, skip_special_tokens=False)

    def decode_token(self, token_id: int) -> str:
        """Raw BPE string of one token (byte-level, may be part of a UTF-8 character)."""
        token = self._tokenizer.id_to_token(int(token_id))
        return token if token is not None else ""
