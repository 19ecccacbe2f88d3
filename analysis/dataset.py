"""The labelled tickets, from every source, as one record type.

Sources (paths relative to the repository):
- data/eval/hotline_tickets.jsonl: 214 tickets written with the first rules (stream "eval");
  labels under "expected"; a district outside the city is labelled null there;
- data/labelled/raw/writer_<W>.jsonl: tickets written independently by writer W (stream W);
  labels under "labels"; a district outside the city is labelled as heard (东城区);
- data/labelled/asr/*.jsonl: {"id", "asr_text"}: what the project's ASR made of a
  synthesised reading of ticket `id` (optional, attached as `asr_text`).

Duplicate links point inside one stream: each stream is its own history.

    from analysis.dataset import load_labelled
    records = load_labelled()          # sorted by (stream, received_at, id)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from analysis.errors import AnalysisError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EVAL_FILE = PROJECT_ROOT / "data" / "eval" / "hotline_tickets.jsonl"
LABELLED_DIR = PROJECT_ROOT / "data" / "labelled"
RAW_DIR = LABELLED_DIR / "raw"
ASR_DIR = LABELLED_DIR / "asr"
EVAL_STREAM = "eval"
EVAL_PREFIX = "eval:"   # data/eval ids are qualified: writer E numbers its tickets E001... too
_WRITER_FILE = re.compile(r"^writer_([A-Za-z0-9]+)\.jsonl$")
URGENCY_LEVELS = ("high", "medium", "low")


class DatasetError(AnalysisError):
    """A labelled file has a malformed line, a missing label or an id used twice."""


@dataclass(frozen=True)
class LabelledTicket:
    id: str
    stream: str                 # "eval" or the writer letter: duplicate links stay inside a stream
    received_at: str            # ISO 8601, as written
    text: str                   # the reference text the writer wrote
    category: str | None
    urgency: str | None
    district: str | None        # gazetteer name, a name outside the city as heard, or None
    department: str | None
    duplicate_of: str | None
    unknown_district_labelled: bool = True  # False for data/eval: a district outside the city is null there
    asr_text: str | None = None
    source: str = ""            # file:line, for error messages and reports

    @property
    def writer(self) -> str:
        return self.stream


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read: {error.strerror}") from error
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            # A file another process is appending to may end in half a line: skip only the last.
            if number == len(lines):
                continue
            raise DatasetError(f"{path}:{number}: not JSON ({error})") from error
        if not isinstance(item, dict):
            raise DatasetError(f"{path}:{number}: not a JSON object")
        yield number, item


def _record(item: dict, labels: dict, *, stream: str, where: str, unknown_labelled: bool) -> LabelledTicket:
    try:
        ticket_id, text, received_at = str(item["id"]), item["text"], str(item["received_at"])
    except KeyError as error:
        raise DatasetError(f"{where}: missing {error}") from error
    if not isinstance(text, str):
        raise DatasetError(f"{where}: text must be a string")
    if not isinstance(labels, dict):
        raise DatasetError(f"{where}: labels must be an object")
    urgency = labels.get("urgency")
    if urgency is not None and urgency not in URGENCY_LEVELS:
        raise DatasetError(f"{where}: urgency {urgency!r} is not one of {URGENCY_LEVELS}")
    return LabelledTicket(
        id=ticket_id,
        stream=stream,
        received_at=received_at,
        text=text,
        category=labels.get("category"),
        urgency=urgency,
        district=labels.get("district") or None,
        department=labels.get("department") or None,
        duplicate_of=labels.get("duplicate_of") or None,
        unknown_district_labelled=unknown_labelled,
        source=where,
    )


def load_eval_file(path: Path = EVAL_FILE) -> list[LabelledTicket]:
    """data/eval's ids (E001...) are those writer E uses too: here they read eval:E001."""
    records = []
    for number, item in _read_jsonl(path):
        record = _record(item, item.get("expected") or {}, stream=EVAL_STREAM, where=f"{path.name}:{number}", unknown_labelled=False)
        records.append(replace(
            record,
            id=f"{EVAL_PREFIX}{record.id}",
            duplicate_of=f"{EVAL_PREFIX}{record.duplicate_of}" if record.duplicate_of else None,
        ))
    return records


def writer_files(raw_dir: Path = RAW_DIR) -> dict[str, Path]:
    """Writer letter -> its file, for the files present now."""
    if not raw_dir.is_dir():
        return {}
    found = {}
    for path in sorted(raw_dir.iterdir()):
        match = _WRITER_FILE.match(path.name)
        if match:
            found[match.group(1).upper()] = path
    return found


def load_writer_file(path: Path, writer: str) -> list[LabelledTicket]:
    records = []
    for number, item in _read_jsonl(path):
        declared = str(item.get("writer") or writer).upper()
        if declared != writer:
            raise DatasetError(f"{path.name}:{number}: writer {declared!r} in the file of writer {writer!r}")
        records.append(_record(item, item.get("labels") or {}, stream=writer, where=f"{path.name}:{number}", unknown_labelled=True))
    return records


def load_asr_texts(asr_dir: Path = ASR_DIR) -> dict[str, str]:
    """Ticket id -> ASR transcript of its synthesised reading (empty when the folder is absent)."""
    texts: dict[str, str] = {}
    if not asr_dir.is_dir():
        return texts
    for path in sorted(asr_dir.glob("*.jsonl")):
        for number, item in _read_jsonl(path):
            if "id" not in item or not isinstance(item.get("asr_text"), str):
                raise DatasetError(f"{path.name}:{number}: need id and asr_text")
            texts[str(item["id"])] = item["asr_text"]
    return texts


def load_labelled(
    *, eval_file: Path | None = EVAL_FILE, raw_dir: Path = RAW_DIR, asr_dir: Path = ASR_DIR
) -> list[LabelledTicket]:
    """Every labelled ticket, sorted by (stream, received_at, id); ids must be unique across sources."""
    records: list[LabelledTicket] = []
    if eval_file is not None and eval_file.is_file():
        records.extend(load_eval_file(eval_file))
    for writer, path in writer_files(raw_dir).items():
        records.extend(load_writer_file(path, writer))
    seen: dict[str, str] = {}
    for record in records:
        if record.id in seen:
            raise DatasetError(f"ticket id {record.id!r} used twice ({seen[record.id]} and {record.source})")
        seen[record.id] = record.source
    asr = load_asr_texts(asr_dir)
    if asr:
        records = [replace(record, asr_text=asr.get(record.id)) for record in records]
    return sorted(records, key=lambda record: (record.stream, record.received_at, record.id))


def chain_roots(records: Iterable[LabelledTicket]) -> dict[str, str]:
    """Ticket id -> the first report of its duplicate chain (itself when it is not a duplicate).

    A link to an id outside the records (a writer's typo) ends the chain there."""
    parent = {record.id: record.duplicate_of for record in records}
    roots: dict[str, str] = {}
    for ticket_id in parent:
        root, seen = ticket_id, {ticket_id}
        while parent.get(root) and parent[root] in parent and parent[root] not in seen:
            root = parent[root]
            seen.add(root)
        roots[ticket_id] = root
    return roots


def by_stream(records: Iterable[LabelledTicket]) -> dict[str, list[LabelledTicket]]:
    streams: dict[str, list[LabelledTicket]] = {}
    for record in records:
        streams.setdefault(record.stream, []).append(record)
    for items in streams.values():
        items.sort(key=lambda record: (record.received_at, record.id))
    return streams
