"""Prometheus metrics and one JSON log line per request, with its id (issue 12, item 4)."""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import pytest

from gateway.launch.triton_process import find_free_port
from gateway.protocol import asr_pb2
from tests.conftest import asr_client, sample_clips
from tests.test_reliability_gateway import gateway_process


@pytest.fixture(scope="module")
def observed(triton, model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("observed")
    port = find_free_port()
    process = gateway_process(model_dir, triton.grpc_url, logs, ["--metrics-port", str(port), "--log-format", "json"])
    try:
        yield process, port, logs / "gateway.log"
    finally:
        process.stop()


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_requests_are_counted_and_logged_with_their_id(observed):
    process, port, log_path = observed
    clip = sample_clips()[0]
    with asr_client(process.address) as stub:
        response = stub.Transcribe(
            asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), language=clip.language, beam_size=1,
                                      request_id="call-0001"), timeout=120)
        with pytest.raises(grpc.RpcError):
            stub.Transcribe(asr_pb2.TranscribeRequest(request_id="call-0002"), timeout=30)
    # the client has its status before the gateway's interceptor counts and logs the call
    failed = 'asr_requests_total{code="INVALID_ARGUMENT",rpc="Transcribe"}'
    deadline = time.monotonic() + 30
    while (values := _metrics(port)).get(failed, 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert values['asr_requests_total{code="OK",rpc="Transcribe"}'] >= 1
    assert values['asr_requests_total{code="INVALID_ARGUMENT",rpc="Transcribe"}'] >= 1
    assert values['asr_audio_seconds_total{rpc="Transcribe"}'] >= response.audio_duration_s - 1e-3
    assert values['asr_request_seconds_count{rpc="Transcribe"}'] >= 2
    assert values['asr_in_flight{rpc="Transcribe"}'] == 0
    assert values["asr_triton_ready"] == 1
    lines = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.startswith("{")]
    requests = {entry["request_id"]: entry for entry in lines if entry.get("event") == "request"}
    assert requests["call-0001"]["code"] == "OK" and requests["call-0001"]["rpc"] == "Transcribe"
    assert requests["call-0002"]["code"] == "INVALID_ARGUMENT" and "audio" in requests["call-0002"]["details"]
