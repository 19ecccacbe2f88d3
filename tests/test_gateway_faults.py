"""Triton going away and coming back; concurrent load batched by Triton."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.protocol import asr_pb2, asr_pb2_grpc
from tests.conftest import sample_clips


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="asr.v1.Asr"), timeout=2).status
        except grpc.RpcError:
            return -1


def _wait_health(address: str, status: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _health(address) == status:
            return True
        time.sleep(0.2)
    return False


def test_triton_down_then_back(repository, model_dir, tmp_path):
    from gateway.launch.local import GatewayProcess
    from gateway.launch.triton_process import TritonProcess, find_free_port

    clip = sample_clips()[0]
    request = asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), language=clip.language, beam_size=1)
    grpc_port = find_free_port()
    triton = TritonProcess(repository, grpc_port=grpc_port, log_path=tmp_path / "triton.log").start()
    gateway = GatewayProcess(model_dir, triton.grpc_url, log_path=tmp_path / "gateway.log").start()
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = asr_pb2_grpc.AsrStub(channel)
            first = stub.Transcribe(request, timeout=60)
            assert first.text

            triton.stop()
            assert _wait_health(gateway.address, health_pb2.HealthCheckResponse.NOT_SERVING, 15)
            with pytest.raises(grpc.RpcError) as error:
                stub.Transcribe(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Traceback" not in (error.value.details() or "")

            triton = TritonProcess(repository, grpc_port=grpc_port, log_path=tmp_path / "triton2.log").start()
            assert _wait_health(gateway.address, health_pb2.HealthCheckResponse.SERVING, 30)
            again = stub.Transcribe(request, timeout=60)
            assert again.text == first.text
            assert gateway.process.poll() is None
    finally:
        gateway.stop()
        triton.stop()


def test_concurrent_requests_are_batched_by_triton(asr_stub, triton):
    clips = sample_clips()
    client = triton_grpc.InferenceServerClient(triton.grpc_url)

    def counts():
        stats = client.get_inference_statistics(as_json=True)["model_stats"]
        return {m["name"]: (int(m.get("inference_count", 0)), int(m.get("execution_count", 0))) for m in stats}

    before = counts()
    requests = [
        asr_pb2.TranscribeRequest(audio_content=c.path.read_bytes(), language=c.language, beam_size=5) for c in clips * 2
    ]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        responses = list(pool.map(lambda r: asr_stub.Transcribe(r, timeout=300), requests))
    assert all(r.text for r in responses)
    # the same clip gives the same text whatever it was batched with
    assert [r.text for r in responses[: len(clips)]] == [r.text for r in responses[len(clips) :]]
    after = counts()
    # the encoder's dynamic batcher; the decoder steps of these windows run inside the search
    # model, which shares its decoder calls between windows (tests/test_search_engine.py), and
    # the stepwise decoder model's batching is tests/test_triton_models.py's
    inferences = after["encoder"][0] - before["encoder"][0]
    executions = after["encoder"][1] - before["encoder"][1]
    assert inferences > executions, f"encoder: {inferences} inferences in {executions} executions: no batching"
