"""Exceptions of the ticket analysis; each carries the context a user needs to act."""

from __future__ import annotations

from pathlib import Path


class AnalysisError(Exception):
    """Base class of every error raised by analysis/."""


class ConfigError(AnalysisError):
    """A configuration file is missing, unreadable or has an invalid value."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)
        self.message = message


class EmbeddingModelError(AnalysisError):
    """The sentence-embedding model cannot be loaded or run."""


class HistoryStoreError(AnalysisError):
    """The SQLite history store cannot be opened or written."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"history store {path}: {message}")
        self.path = Path(path)
        self.message = message


class HistoryStoreCorruptError(HistoryStoreError):
    """The history file exists but is not an intact history store; it is never reset silently."""


class TicketNotFoundError(AnalysisError):
    def __init__(self, ticket_id: str) -> None:
        super().__init__(f"no ticket with id {ticket_id!r} in the history store")
        self.ticket_id = ticket_id


class CorrectionError(AnalysisError):
    """A human correction names an unknown field or an invalid value."""

    def __init__(self, ticket_id: str, field: str, message: str) -> None:
        super().__init__(f"cannot correct {field!r} of ticket {ticket_id}: {message}")
        self.ticket_id = ticket_id
        self.field = field
