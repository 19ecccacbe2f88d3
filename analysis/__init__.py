"""Ticket analysis for the 12345 hotline: pure Python over transcripts and metadata.

    from analysis import analyze_ticket, HistoryStore
    ticket = analyze_ticket(text, {"received_at": "2026-11-16T09:30:00"}, store=HistoryStore(path))
    ticket.to_dict()

Category (taxonomy.yaml rules + sentence-embedding similarity), urgency (urgency.yaml
cues), place and responsible department (gazetteer.yaml, departments.yaml), duplicates
of earlier tickets (embeddings in the SQLite history), a one-line extractive summary.
Works without the ASR; `python -m analysis --help` for the command line.
"""

from analysis.analyzer import AnalysisConfig, TicketAnalyzer, analyze_ticket, default_analyzer, load_config
from analysis.errors import (
    AnalysisError,
    ConfigError,
    CorrectionError,
    EmbeddingModelError,
    HistoryStoreCorruptError,
    HistoryStoreError,
    TicketNotFoundError,
)
from analysis.store import Correction, HistoryStore
from analysis.ticket import CORRECTABLE_FIELDS, Ticket

__all__ = [
    "AnalysisConfig",
    "AnalysisError",
    "CORRECTABLE_FIELDS",
    "ConfigError",
    "Correction",
    "CorrectionError",
    "EmbeddingModelError",
    "HistoryStore",
    "HistoryStoreCorruptError",
    "HistoryStoreError",
    "Ticket",
    "TicketAnalyzer",
    "TicketNotFoundError",
    "analyze_ticket",
    "default_analyzer",
    "load_config",
]
