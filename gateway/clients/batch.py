"""Overnight batch: a folder of recordings -> transcripts, tickets, ledger and dashboard.

    python -m gateway.clients.cli batch INPUT_DIR --out OUT_DIR [--concurrency 4] [--server localhost:50051]
        [--language zh] [--beam-size 0] [--history-db PATH] [--recursive] [--no-progress]

Per recording OUT/<name>.json (transcript, segments, ticket), then OUT/ledger.xlsx,
OUT/dashboard.html (+ OUT/charts/*.png), OUT/failures.csv and OUT/batch_summary.json.

- Recordings go through the gateway's Transcribe RPC, `concurrency` at a time; results
  are analysed in the order the calls were received, so "duplicate of" always points
  to an earlier call. The SQLite history (analysis.store) keeps tickets across days.
- Call times come from INPUT_DIR/manifest.jsonl when present (one JSON object per line:
  "file", "received_at" and any other metadata, e.g. "caller"), else from file times.
- Resumable: a recording whose OUT/<name>.json holds the same content hash is skipped;
  every file is written atomically, so a killed job loses nothing already written. A
  failed recording is listed in failures.csv with the reason and the rest go on.
- Triton or the gateway restarting (UNAVAILABLE) or busy (RESOURCE_EXHAUSTED with a retry
  hint; without one it is a file over the gateway's size limit, which fails): the call is
  tried again with exponential backoff (1 s doubling to 30 s, jittered, never sooner than the
  gateway's retry-after-ms) for up to --retry-for seconds (600) before it counts as failed.
- Checked before any transcription: the output folder is writable, the history opens
  (a corrupt one is an error, never reset), the gateway answers.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

import grpc

from analysis.analyzer import TicketAnalyzer, load_config
from analysis.atomic import atomic_write_bytes, atomic_write_text
from analysis.errors import AnalysisError
from analysis.report import CallRecord, build_dashboard, build_ledger
from analysis.store import HistoryStore
from analysis.ticket import parse_time
from gateway.clients.channel import (
    DEFAULT_SERVER,
    ChannelSecurity,
    add_security_arguments,
    open_channel,
    response_to_dict,
    security_from_args,
)
from gateway.protocol import asr_pb2, asr_pb2_grpc

AUDIO_EXTENSIONS = frozenset({".wav", ".mp3", ".flac", ".ogg", ".opus", ".amr", ".m4a", ".aac", ".wma", ".webm", ".mp4", ".au"})
MANIFEST_NAME = "manifest.jsonl"
FAILURE_COLUMNS = ("file", "audio_sha256", "stage", "reason", "failed_at")
RETRYABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
RETRY_AFTER_KEY = "retry-after-ms"  # the gateway's hint (gateway/service/admission.py)
RESULT_VERSION = 1


class BatchError(RuntimeError):
    """The batch cannot start (bad input folder, unwritable output, no gateway, broken history)."""


class OutputNotWritableError(BatchError):
    pass


class GatewayUnreachableError(BatchError):
    pass


@dataclass(frozen=True)
class BatchOptions:
    input_dir: Path
    out_dir: Path
    server: str = DEFAULT_SERVER
    concurrency: int = 4
    language: str = "zh"
    beam_size: int = 0
    timeout_s: float = 600.0
    history_db: Path | None = None   # None: store.path of the analysis defaults
    recursive: bool = False
    retry_for_s: float = 600.0        # how long a call is retried while the gateway is UNAVAILABLE / busy
    progress: bool = True
    connect_timeout_s: float = 15.0
    security: ChannelSecurity | None = None  # TLS and API key (None: plaintext, no key)

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 256:
            raise ValueError(f"concurrency must be within 1..256, got {self.concurrency}")
        if self.beam_size < 0:
            raise ValueError(f"beam_size must be 0 (server default) or positive, got {self.beam_size}")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.retry_for_s < 0:
            raise ValueError("retry_for_s must not be negative")


@dataclass(frozen=True)
class Recording:
    path: Path
    name: str                 # OUT/<name>.json
    sha256: str
    received_at: datetime
    metadata: dict


@dataclass
class BatchSummary:
    total: int = 0
    transcribed: int = 0
    skipped: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    outputs: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Audio seconds transcribed per wall-clock second (this run)."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "total": self.total, "transcribed": self.transcribed, "skipped": self.skipped, "failed": self.failed,
            "audio_seconds": round(self.audio_seconds, 2), "wall_seconds": round(self.wall_seconds, 2),
            "throughput_audio_s_per_s": round(self.throughput, 2), "outputs": self.outputs,
        }


@dataclass(frozen=True)
class Failure:
    file: str
    audio_sha256: str
    stage: str    # read | transcribe | analyse
    reason: str
    failed_at: str


# -- setup checks ----------------------------------------------------------------------


def check_output_writable(out_dir: Path) -> None:
    """Create OUT (and OUT/charts) and prove a file can be written there, before any work."""
    try:
        (out_dir / "charts").mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out_dir)
        with os.fdopen(handle, "wb") as stream:
            stream.write(b"ok")
        os.unlink(probe)
    except OSError as error:
        raise OutputNotWritableError(f"output folder {out_dir} is not writable: {error.strerror or error}") from error


def check_gateway(channel: grpc.Channel, server: str, timeout_s: float) -> None:
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError as error:
        raise GatewayUnreachableError(f"no gateway answers at {server} within {timeout_s:.0f} s") from error


# -- discovery -------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(input_dir: Path) -> dict[str, dict]:
    path = input_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    entries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries[str(entry["file"])] = entry
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise BatchError(f"{path}:{number}: expected a JSON object with a 'file' key ({error})") from error
    return entries


def discover(input_dir: Path, recursive: bool) -> tuple[list[Recording], list[Failure]]:
    """Audio files under input_dir, oldest call first; unreadable ones come back as failures."""
    if not input_dir.is_dir():
        raise BatchError(f"input folder {input_dir} does not exist or is not a folder")
    manifest = read_manifest(input_dir)
    pattern = "**/*" if recursive else "*"
    paths = sorted(path for path in input_dir.glob(pattern) if path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS)
    stems: dict[str, int] = {}
    for path in paths:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    recordings, failures = [], []
    for path in paths:
        relative = path.relative_to(input_dir).as_posix()
        # Two recordings a.wav and a.mp3 must not share OUT/a.json.
        name = path.stem if stems[path.stem] == 1 else f"{path.stem}_{path.suffix.lstrip('.').lower()}"
        if recursive and path.parent != input_dir:
            name = relative.rsplit(".", 1)[0].replace("/", "__")
        try:
            sha = file_sha256(path)
            mtime = datetime.fromtimestamp(path.stat().st_mtime).replace(microsecond=0)
        except OSError as error:
            failures.append(Failure(relative, "", "read", f"cannot read: {error.strerror}", _now()))
            continue
        entry = dict(manifest.get(relative) or manifest.get(path.name) or {})
        try:
            received_at = parse_time(entry["received_at"]) if entry.get("received_at") else mtime
        except AnalysisError as error:
            failures.append(Failure(relative, sha, "read", f"manifest: {error}", _now()))
            continue
        metadata = {key: value for key, value in entry.items() if key not in ("file", "received_at", "expected", "text")}
        recordings.append(Recording(path, name, sha, received_at, metadata))
    recordings.sort(key=lambda item: (item.received_at, item.path.name))
    return recordings, failures


def _now() -> str:
    return datetime.now().replace(microsecond=0).isoformat()


def load_finished(out_dir: Path, recording: Recording) -> dict | None:
    """The earlier result for this exact content, or None."""
    path = out_dir / f"{recording.name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("audio_sha256") != recording.sha256 or "ticket" not in data:
        return None
    return data


# -- transcription ---------------------------------------------------------------------


class Transcriber:
    """Transcribe calls on one shared channel (gRPC channels are thread-safe)."""

    def __init__(self, channel: grpc.Channel, options: BatchOptions) -> None:
        self.stub = asr_pb2_grpc.AsrStub(channel)
        self.options = options

    def __call__(self, recording: Recording) -> dict:
        data = recording.path.read_bytes()
        request = asr_pb2.TranscribeRequest(
            audio_content=data, language=self.options.language, beam_size=self.options.beam_size, request_id=recording.path.name
        )
        give_up_at = time.monotonic() + self.options.retry_for_s
        attempt = 0
        while True:
            try:
                return response_to_dict(self.stub.Transcribe(request, timeout=self.options.timeout_s))
            except grpc.RpcError as error:
                hint = retry_hint_s(error)
                # RESOURCE_EXHAUSTED without the gateway's hint: a message over the size limit
                if error.code() not in RETRYABLE_CODES or (error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and hint is None):
                    raise
                delay = backoff_s(attempt, hint)  # the gateway or Triton is restarting, or busy
                if time.monotonic() + delay > give_up_at:
                    raise
                time.sleep(delay)
                attempt += 1


def retry_hint_s(error: grpc.RpcError) -> float | None:
    """The gateway's retry-after hint in seconds (admission refusals carry one), or None."""
    try:
        hint = dict(error.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
        return float(hint) / 1000.0 if hint else None
    except (TypeError, ValueError):
        return None


def backoff_s(attempt: int, hint_s: float | None = None) -> float:
    """Exponential backoff with jitter, at least the gateway's retry-after hint."""
    return max(min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2**attempt) * random.uniform(0.8, 1.2), hint_s or 0.0)


def describe_error(error: BaseException) -> tuple[str, str]:
    """(stage, reason) for failures.csv."""
    if isinstance(error, grpc.RpcError):
        return "transcribe", f"{error.code().name}: {error.details()}"
    if isinstance(error, OSError):
        return "read", f"cannot read: {error.strerror or error}"
    if isinstance(error, AnalysisError):
        return "analyse", str(error)
    return "analyse", f"{type(error).__name__}: {error}"


# -- outputs ---------------------------------------------------------------------------


def write_failures(path: Path, failures: list[Failure]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(FAILURE_COLUMNS)
    for failure in failures:
        writer.writerow([failure.file, failure.audio_sha256, failure.stage, failure.reason, failure.failed_at])
    # UTF-8 with BOM: Excel on the staff PCs opens it with the Chinese intact.
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8-sig"))


def result_document(recording: Recording, response: dict, ticket: dict) -> dict:
    segments = [
        {key: segment.get(key) for key in ("start_s", "end_s", "text", "confidence", "avg_logprob")}
        for segment in response.get("segments", [])
    ]
    return {
        "version": RESULT_VERSION,
        "file": recording.path.name,
        "audio_sha256": recording.sha256,
        "machine_generated": True,
        "transcript": {
            "text": response.get("text", ""),
            "language": response.get("language", ""),
            "model_name": response.get("model_name", ""),
            "audio_duration_s": float(response.get("audio_duration_s", 0.0)),
            "processing_time_s": float(response.get("processing_time_s", 0.0)),
            "segments": segments,
        },
        "ticket": ticket,
    }


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="call", desc="batch", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def run_batch(
    input_dir: Path | str,
    out_dir: Path | str,
    server: str = DEFAULT_SERVER,
    concurrency: int = 4,
    *,
    analyzer: TicketAnalyzer | None = None,
    on_result: Callable[[Recording, dict], None] | None = None,
    **option_values: Any,
) -> BatchSummary:
    """Run the batch; returns counts and timing. Raises BatchError before any work when it cannot start."""
    options = BatchOptions(Path(input_dir), Path(out_dir), server=server, concurrency=concurrency, **option_values)
    started = time.perf_counter()
    out = options.out_dir
    check_output_writable(out)  # first: an unwritable folder must fail before anything is sent
    recordings, failures = discover(options.input_dir, options.recursive)

    analyzer = analyzer or TicketAnalyzer(load_config())
    config = analyzer.config
    try:
        store = HistoryStore(options.history_db or config.defaults.store_path, categories=config.taxonomy.names)
    except AnalysisError as error:
        raise BatchError(str(error)) from error

    channel = open_channel(options.server, options.security)
    summary = BatchSummary(total=len(recordings) + len(failures))
    records: dict[str, CallRecord] = {}
    pending: list[Recording] = []
    for recording in recordings:
        finished = load_finished(out, recording)
        if finished is None:
            pending.append(recording)
            continue
        summary.skipped += 1
        records[recording.name] = CallRecord(finished["ticket"], recording.path.name, finished["transcript"].get("audio_duration_s"))
    failures_path = out / "failures.csv"
    try:
        if pending:
            check_gateway(channel, options.server, options.connect_timeout_s)
        write_failures(failures_path, failures)
        transcribe = Transcriber(channel, options)
        lock = threading.Lock()
        bar = _progress(summary.total, summary.skipped + len(failures), options.progress)
        window: deque[tuple[Recording, Future]] = deque()
        queue = iter(pending)
        with bar, ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="transcribe") as pool:
            def refill() -> None:
                # Keep the workers busy without reading thousands of files into memory.
                while len(window) < options.concurrency * 2:
                    recording = next(queue, None)
                    if recording is None:
                        return
                    window.append((recording, pool.submit(transcribe, recording)))

            refill()
            while window:
                recording, future = window.popleft()  # in call order: duplicates point backwards
                try:
                    response = future.result()
                    ticket = analyzer.analyze(
                        None,
                        {
                            "ticket_id": f"HL-{recording.received_at:%Y%m%d}-{recording.sha256[:8]}",
                            "received_at": recording.received_at.isoformat(),
                            "file": recording.path.name,
                            "audio_sha256": recording.sha256,
                            **recording.metadata,
                        },
                        segments=response.get("segments", []) or [{"start_s": 0.0, "end_s": 0.0, "text": response.get("text", "")}],
                        store=store,
                    )
                    document = result_document(recording, response, ticket.to_dict())
                    atomic_write_text(out / f"{recording.name}.json", json.dumps(document, ensure_ascii=False, indent=2))
                    duration = document["transcript"]["audio_duration_s"]
                    records[recording.name] = CallRecord(document["ticket"], recording.path.name, duration)
                    with lock:
                        summary.transcribed += 1
                        summary.audio_seconds += duration
                    if on_result:
                        on_result(recording, document)
                except Exception as error:  # one bad call must not stop the night's batch
                    stage, reason = describe_error(error)
                    failures.append(Failure(recording.path.relative_to(options.input_dir).as_posix(), recording.sha256, stage, reason, _now()))
                    write_failures(failures_path, failures)
                refill()
                elapsed = time.perf_counter() - started
                bar.set_postfix_str(f"{summary.audio_seconds / elapsed:.1f} audio-s/s, {len(failures)} failed", refresh=False)
                bar.update(1)
        summary.failed = len(failures)
        summary.wall_seconds = time.perf_counter() - started
        summary.outputs = write_reports(out, list(records.values()), store, analyzer, failures, summary)
    finally:
        channel.close()
        store.close()
    return summary


def write_reports(out: Path, records: list[CallRecord], store: HistoryStore, analyzer: TicketAnalyzer, failures: list[Failure], summary: BatchSummary) -> dict:
    """Ledger (this batch + the week's summary sheet), dashboard over the week, failures, summary."""
    week: dict[str, CallRecord] = {}
    if records:
        last_day = max(record.day for record in records)
        start = datetime.combine(last_day - timedelta(days=6), datetime.min.time())
        for ticket in store.tickets_between(start, start + timedelta(days=7)):
            week[ticket.ticket_id] = CallRecord(ticket.to_dict(), str(ticket.metadata.get("file", "")))
    for record in records:
        week[record.ticket["ticket_id"]] = record
    config = analyzer.config
    build_ledger(records, out / "ledger.xlsx", week=list(week.values()))
    dashboard = build_dashboard(
        records, out, week=list(week.values()), categories=config.taxonomy.names, districts=config.gazetteer.district_names,
        failures=len(failures),
    )
    write_failures(out / "failures.csv", failures)
    outputs = {
        "ledger": str(out / "ledger.xlsx"),
        "dashboard": str(dashboard.html_path),
        "failures": str(out / "failures.csv"),
        "charts": [str(path) for path in dashboard.charts],
        "cjk_font": dashboard.font,
    }
    atomic_write_text(out / "batch_summary.json", json.dumps({**summary.to_dict(), "outputs": outputs, "finished_at": _now()}, ensure_ascii=False, indent=2))
    return outputs


# -- command line ----------------------------------------------------------------------


def _cmd_batch(args: argparse.Namespace) -> int:
    try:
        summary = run_batch(
            args.input_dir, args.out, server=args.server, concurrency=args.concurrency, language=args.language,
            beam_size=args.beam_size, timeout_s=args.timeout, history_db=args.history_db, recursive=args.recursive,
            retry_for_s=args.retry_for,
            progress=not args.no_progress, security=security_from_args(args),
        )
    except (BatchError, AnalysisError, ValueError) as error:
        print(f"batch: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{summary.total} recordings: {summary.transcribed} transcribed, {summary.skipped} already done, "
        f"{summary.failed} failed; {summary.audio_seconds:.1f} s of audio in {summary.wall_seconds:.1f} s "
        f"({summary.throughput:.2f} audio-s/s)"
    )
    for key in ("ledger", "dashboard", "failures"):
        print(f"  {key}: {summary.outputs.get(key)}")
    return 1 if summary.failed else 0


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    """`batch` subcommand for gateway/clients/cli.py."""
    parser = subparsers.add_parser("batch", help="transcribe and analyse a folder of recordings (ledger, dashboard)")
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; must be writable)")
    parser.add_argument("--server", default=DEFAULT_SERVER)
    parser.add_argument("--concurrency", type=int, default=4, help="recordings in flight at once")
    parser.add_argument("--language", default="zh", help="language code; '' lets the model detect it")
    parser.add_argument("--beam-size", type=int, default=0, help="0: server default (5); 1: greedy (faster)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-recording deadline in seconds")
    parser.add_argument("--retry-for", type=float, default=600.0,
                        help="seconds a recording is retried while the gateway or Triton is unavailable or busy")
    parser.add_argument("--history-db", type=Path, help="SQLite history of tickets (default: store.path in analysis/config/defaults.yaml)")
    parser.add_argument("--recursive", action="store_true", help="also take recordings from subfolders")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_security_arguments(parser)
    parser.set_defaults(func=_cmd_batch)
    return parser
