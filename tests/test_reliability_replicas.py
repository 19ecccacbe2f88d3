"""Scale-out over two Triton replicas (issue 12, item 5): one gateway with `--triton A,B`.

Both replicas get work and the transcripts equal the single-replica ones; a replica killed in
the middle of a run costs no request: the windows it was decoding are decoded again on the
other one, new windows go there, and health stays SERVING.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2

from gateway.protocol import asr_pb2
from tests.conftest import asr_client
from tests.test_gateway_faults import _health
from tests.test_reliability_gateway import gateway_running
from tests.test_reliability_sequences import decoder_requests, wait_for_decoding

CALLS_DIR = Path(__file__).resolve().parent.parent / "data" / "calls"
CALLS = sorted(CALLS_DIR.glob("call_*.flac"))[:8]


def _requests() -> list[asr_pb2.TranscribeRequest]:
    return [asr_pb2.TranscribeRequest(audio_content=path.read_bytes(), language="zh", beam_size=2, request_id=path.name)
            for path in CALLS]


def _texts(stub, requests, workers: int = 4) -> list[str]:
    with ThreadPoolExecutor(workers) as pool:
        return [response.text for response in pool.map(lambda r: stub.Transcribe(r, timeout=600), requests)]


def _model_counts(url: str) -> dict[str, int]:
    with triton_grpc.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(as_json=True)["model_stats"]
    return {m["name"]: int(m.get("inference_count", 0)) for m in stats}


@pytest.fixture(scope="module")
def single_replica_texts(asr_stub) -> list[str]:
    """The session gateway: one Triton (the `triton` fixture, replica A below)."""
    return _texts(asr_stub, _requests())


@pytest.fixture(scope="module")
def replica_b(repository, tmp_path_factory):
    """A second Triton on the session's repository (killed by the last test)."""
    from gateway.launch.triton_process import TritonProcess

    server = TritonProcess(repository, log_path=tmp_path_factory.mktemp("replica-b") / "triton.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def two_replica_gateway(triton, replica_b, model_dir, tmp_path_factory):
    with gateway_running(model_dir, f"{triton.grpc_url},{replica_b.grpc_url}", tmp_path_factory.mktemp("gateway"), []) as process:
        yield process


def test_both_replicas_get_work_and_transcripts_equal_one_replica(
    triton, replica_b, two_replica_gateway, single_replica_texts
):
    before = {url: _model_counts(url) for url in (triton.grpc_url, replica_b.grpc_url)}
    with asr_client(two_replica_gateway.address) as stub:
        texts = _texts(stub, _requests())
    assert texts == single_replica_texts
    for url in (triton.grpc_url, replica_b.grpc_url):
        after = _model_counts(url)
        for model in ("encoder", "search"):
            assert after[model] > before[url][model], f"{url} got no {model} work"


def test_a_replica_killed_mid_run_costs_no_request(
    triton, replica_b, two_replica_gateway, single_replica_texts
):
    requests = _requests()
    with asr_client(two_replica_gateway.address) as stub, ThreadPoolExecutor(4) as pool:
        with triton_grpc.InferenceServerClient(replica_b.grpc_url) as client:
            before = decoder_requests(client, "encoder")
            calls = [pool.submit(stub.Transcribe, request, timeout=600) for request in requests]
            wait_for_decoding(client, before, model="encoder")  # replica B is decoding windows of the run
        replica_b.kill()
        texts = [call.result().text for call in calls]
        assert texts == single_replica_texts
        assert _health(two_replica_gateway.address) == health_pb2.HealthCheckResponse.SERVING
        # new work after the kill all goes to replica A
        before_a = _model_counts(triton.grpc_url)["search"]
        assert stub.Transcribe(requests[0], timeout=600).text == single_replica_texts[0]
        assert _model_counts(triton.grpc_url)["search"] > before_a
    log = two_replica_gateway.log_path.read_text(errors="replace")
    assert any(f"triton {replica_b.grpc_url}:" in line and "not ready, skipped" in line for line in log.splitlines())
    assert two_replica_gateway.process.poll() is None
