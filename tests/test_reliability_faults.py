"""Triton stopped under a running gateway: new calls get UNAVAILABLE at once, from the health
state, with a retry hint, instead of waiting for their deadline; Triton back -> served again
(issue 12, item 2)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from gateway.protocol import asr_pb2
from tests.conftest import asr_client, sample_clips
from tests.test_gateway_faults import _wait_health
from tests.test_reliability_gateway import gateway_process


def test_triton_not_ready_is_unavailable_at_once(repository, model_dir, tmp_path):
    from gateway.launch.triton_process import TritonProcess, find_free_port

    clip = sample_clips()[0]
    request = asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), language=clip.language, beam_size=1)
    grpc_port = find_free_port()
    triton = TritonProcess(repository, grpc_port=grpc_port, log_path=tmp_path / "triton.log").start()
    gateway = gateway_process(model_dir, triton.grpc_url, tmp_path, [])
    try:
        with asr_client(gateway.address) as stub:
            assert stub.Transcribe(request, timeout=120).text
            triton.stop()
            assert _wait_health(gateway.address, health_pb2.HealthCheckResponse.NOT_SERVING, 30)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Transcribe(request, timeout=60)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "not ready" in refused.value.details()  # refused by admission, not after a Triton timeout
            assert int(dict(refused.value.trailing_metadata())["retry-after-ms"]) > 0
            config = asr_pb2.StreamingRecognizeRequest(
                config=asr_pb2.StreamingConfig(encoding=asr_pb2.RawAudio.S16LE, sample_rate_hz=16000))
            with pytest.raises(grpc.RpcError) as stream_refused:
                list(stub.StreamingRecognize(iter([config]), timeout=60))
            assert stream_refused.value.code() == grpc.StatusCode.UNAVAILABLE

            triton = TritonProcess(repository, grpc_port=grpc_port, log_path=tmp_path / "triton2.log").start()
            assert _wait_health(gateway.address, health_pb2.HealthCheckResponse.SERVING, 60)
            assert stub.Transcribe(request, timeout=120).text
            assert gateway.process.poll() is None
    finally:
        gateway.stop()
        triton.stop()
