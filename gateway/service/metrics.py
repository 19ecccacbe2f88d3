"""Prometheus metrics and the one log line per request.

The interceptor (auth.py) calls :func:`observe` around every RPC but health, so counts,
latencies and the request log cannot miss an RPC or a status. Served over HTTP with
``--metrics-port`` (``/metrics``); nothing is exported without it.

    asr_requests_total{rpc,code}          finished RPCs by status
    asr_request_seconds{rpc}              latency histogram
    asr_audio_seconds_total{rpc}          audio transcribed (Transcribe responses)
    asr_in_flight{rpc}                    RPCs running now (Transcribe calls + open streams)
    asr_admission_rejected_total{rpc}     turned away at a limit (RESOURCE_EXHAUSTED)
    asr_decoder_crashes_total             audio decoder processes that died
    asr_triton_ready                      1 while Triton's models are ready
    asr_triton_health_rtt_seconds         round trip of the health poll to Triton
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("gateway.requests")

REGISTRY = CollectorRegistry(auto_describe=True)  # the gateway's own; no process-global defaults
# seconds: streams and long recordings run to minutes
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

REQUESTS = Counter("asr_requests_total", "Finished RPCs by status code", ("rpc", "code"), registry=REGISTRY)
LATENCY = Histogram("asr_request_seconds", "RPC latency", ("rpc",), buckets=LATENCY_BUCKETS_S, registry=REGISTRY)
AUDIO_SECONDS = Counter("asr_audio_seconds_total", "Seconds of audio transcribed", ("rpc",), registry=REGISTRY)
IN_FLIGHT = Gauge("asr_in_flight", "RPCs running now", ("rpc",), registry=REGISTRY)
REJECTED = Counter("asr_admission_rejected_total", "RPCs turned away at a configured limit", ("rpc",), registry=REGISTRY)
DECODER_CRASHES = Counter("asr_decoder_crashes_total", "Audio decoder processes that died", registry=REGISTRY)
TRITON_READY = Gauge("asr_triton_ready", "1 while Triton's models are ready", registry=REGISTRY)
TRITON_RTT = Histogram(
    "asr_triton_health_rtt_seconds", "Round trip of the health poll to Triton",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5), registry=REGISTRY,
)
MAX_LOGGED_ID_CHARS = 64


def serve_metrics(host: str, port: int) -> None:
    start_http_server(port, addr=host, registry=REGISTRY)


def request_id_of(request) -> str:
    """The client's request_id (shortened), or a new one: every log line of a request carries it."""
    given = ""
    if hasattr(request, "request_id"):
        given = request.request_id
    elif hasattr(request, "config"):
        given = request.config.request_id
    return given[:MAX_LOGGED_ID_CHARS] if given else uuid.uuid4().hex[:16]


class RequestRecord:
    """What the request line says; filled in while the RPC runs."""

    def __init__(self, rpc: str, identity: str | None, peer: str) -> None:
        self.rpc = rpc
        self.identity = identity
        self.peer = peer
        self.request_id = ""
        self.audio_s = 0.0
        self.started = time.perf_counter()

    def finish(self, code: grpc.StatusCode, details: str = "") -> None:
        elapsed = time.perf_counter() - self.started
        REQUESTS.labels(self.rpc, code.name).inc()
        LATENCY.labels(self.rpc).observe(elapsed)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            REJECTED.labels(self.rpc).inc()
        if self.audio_s:
            AUDIO_SECONDS.labels(self.rpc).inc(self.audio_s)
        fields = {
            "event": "request", "rpc": self.rpc, "request_id": self.request_id, "code": code.name,
            "duration_s": round(elapsed, 4), "audio_s": round(self.audio_s, 3), "peer": self.peer,
        }
        if self.identity:
            fields["identity"] = self.identity
        if code != grpc.StatusCode.OK:
            fields["details"] = details[:200]
        log.info("%s", json.dumps(fields, ensure_ascii=False), extra={"fields": fields})


def status_of(context, error: BaseException | None) -> tuple[grpc.StatusCode, str]:
    """The status an RPC ended with (after context.abort, or an exception that escaped)."""
    if isinstance(error, grpc.aio.AbortError) or error is None:
        code = context.code() or grpc.StatusCode.OK
        details = context.details() or ""
        if isinstance(details, bytes):
            details = details.decode("utf-8", errors="replace")
        return (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN), details
    if isinstance(error, BaseException) and error.__class__.__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED, "cancelled"
    return grpc.StatusCode.UNKNOWN, ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, and a request line's fields."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)
