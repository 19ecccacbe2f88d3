"""A hostile client against a real gateway + Triton: bad input, overload, idle and crashing
streams get a clean status at once and the gateway keeps serving (issue 12, items 1 and 2).

The gateway runs with tiny limits (1 Transcribe, 1 stream, 3 s idle timeout) and the decoder
crash hook armed, so every case is reached with a few requests.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from gateway.protocol import asr_pb2
from gateway.service.decode_pool import CRASH_MARKER_ENV
from tests.conftest import asr_client, sample_clips, wav16
from tests.test_reliability_audio import MAX_STATUS_BYTES, flac_claiming, pcm_wav

CRASH_MARKER = "CRASH-THE-DECODER"
IDLE_TIMEOUT_S = 3
SAMPLE_RATE = 16000
START_TIMEOUT_S = 600.0  # a first start may train the ticket model (analysis/) on a loaded machine


def gateway_process(model_dir, triton_url: str, logs, args: list[str], credentials=None):
    """A started gateway with ``args``, its history and log in ``logs`` (as conftest.running_gateway)."""
    from gateway.launch.local import GatewayProcess

    extra = ["--history-db", str(logs / "history.sqlite"), *args]
    process = GatewayProcess(model_dir, triton_url, log_path=logs / "gateway.log", extra_args=extra, credentials=credentials)
    try:
        return process.start(timeout_s=START_TIMEOUT_S)
    except BaseException:
        process.stop()
        raise


@contextlib.contextmanager
def gateway_running(model_dir, triton_url: str, logs, args: list[str]):
    """gateway_process, stopped when the block ends (fixtures: ``with ...: yield``)."""
    process = gateway_process(model_dir, triton_url, logs, args)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def hostile_gateway(triton, model_dir, tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv(CRASH_MARKER_ENV, CRASH_MARKER)  # the gateway's decoder workers inherit it
    args = ["--max-transcribes", "1", "--max-streams", "1", "--stream-idle-timeout-s", str(IDLE_TIMEOUT_S),
            "--decode-workers", "2", "--retry-after-s", "1.5"]
    logs = tmp_path_factory.mktemp("hostile")
    process = gateway_process(model_dir, triton.grpc_url, logs, args)
    try:
        yield process
    finally:
        process.stop()
        monkeypatch.undo()


@pytest.fixture(scope="module")
def stub(hostile_gateway):
    with asr_client(hostile_gateway.address) as client:
        yield client


def _status(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    assert "Traceback" not in (error.details() or "")
    assert len((error.details() or "").encode()) < MAX_STATUS_BYTES
    return error


def _clip_request(**kw) -> asr_pb2.TranscribeRequest:
    clip = sample_clips()[0]
    return asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), **{"language": clip.language, "beam_size": 1, **kw})


def test_decoder_crash_costs_one_request(stub, hostile_gateway):
    crashing = pcm_wav(8000, 1, 8000) + CRASH_MARKER.encode()
    error = _status(lambda: stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=crashing), timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "crashed" in error.details()
    assert stub.Transcribe(_clip_request(), timeout=120).text
    assert hostile_gateway.process.poll() is None


@pytest.mark.parametrize(
    "data, words",
    [(pcm_wav(1, 1, 16000), "1 Hz"), (pcm_wav(8000, 33, 800), "33 channels"), (flac_claiming(5 * 3600), "18000.0 s")],
    ids=["wav-1Hz", "wav-33-channels", "flac-header-5h"],
)
def test_hostile_headers_are_invalid_argument(stub, data, words):
    error = _status(lambda: stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=data), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details()


def _raw_call(address: str, method: str, payload: bytes, response_type):
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=response_type.FromString)
        return call(payload, timeout=30)


@pytest.mark.parametrize(
    "method, message, response_type",
    [
        ("/asr.v1.Asr/Transcribe", asr_pb2.TranscribeRequest(language="zz"), asr_pb2.TranscribeResponse),
        ("/asr.v1.Asr/AnalyzeTicket", asr_pb2.AnalyzeTicketRequest(text="zz"), asr_pb2.Ticket),
        ("/asr.v1.Asr/CorrectTicket", asr_pb2.CorrectTicketRequest(ticket_id="zz"), asr_pb2.CorrectTicketResponse),
    ],
    ids=["transcribe-language", "analyze-text", "correct-ticket-id"],
)
def test_text_that_is_not_utf8_is_invalid_argument(hostile_gateway, method, message, response_type):
    payload = message.SerializeToString().replace(b"zz", b"\xff\xfe")
    error = _status(lambda: _raw_call(hostile_gateway.address, method, payload, response_type))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in error.details()


def test_long_client_values_are_not_echoed(stub):
    error = _status(lambda: stub.Transcribe(_clip_request(language="x" * 10_000), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "10000 characters" in error.details()
    unknown = _status(lambda: stub.Transcribe(_clip_request(language="xx"), timeout=30))
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT and "'xx'" in unknown.details()


def _stream_config() -> asr_pb2.StreamingRecognizeRequest:
    return asr_pb2.StreamingRecognizeRequest(
        config=asr_pb2.StreamingConfig(encoding=asr_pb2.RawAudio.S16LE, sample_rate_hz=SAMPLE_RATE, language="en")
    )


def _silence(seconds: float) -> bytes:
    return np.zeros(int(SAMPLE_RATE * seconds), dtype="<i2").tobytes()


def test_audio_before_config_is_invalid_argument(stub):
    def requests():
        for _ in range(5):
            yield asr_pb2.StreamingRecognizeRequest(audio=_silence(0.1))

    error = _status(lambda: list(stub.StreamingRecognize(requests(), timeout=30)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "config" in error.details()


def test_idle_stream_is_closed(stub):
    release = threading.Event()

    def requests():
        yield _stream_config()
        release.wait(60)  # then silence: no message at all

    try:
        error = _status(lambda: list(stub.StreamingRecognize(requests(), timeout=60)))
    finally:
        release.set()
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in error.details()


def test_stream_over_the_limit_is_refused_with_a_retry_hint(stub):
    """One stream is held open (silence every 0.2 s); a second one is turned away at once."""
    release = threading.Event()
    holder_started = threading.Event()

    def held():
        yield _stream_config()
        holder_started.set()
        while not release.wait(0.2):
            yield asr_pb2.StreamingRecognizeRequest(audio=_silence(0.2))

    def second():
        yield _stream_config()

    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(lambda: list(stub.StreamingRecognize(held(), timeout=120)))
        try:
            holder_started.wait(30)
            refused = None
            for _ in range(200):  # until the holder's handler has started (it is admitted first)
                try:
                    list(stub.StreamingRecognize(second(), timeout=30))
                except grpc.RpcError as error:
                    refused = error
                    break
            assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(refused.trailing_metadata() or ())["retry-after-ms"] == "1500"
            assert "retry after 1.5 s" in refused.details()
        finally:
            release.set()
        holder.result(timeout=120)  # the admitted stream ends normally


def test_transcribe_over_the_limit_is_refused(stub):
    request = _clip_request()
    outcomes = []

    def call():
        try:
            stub.Transcribe(request, timeout=300)
            outcomes.append("OK")
        except grpc.RpcError as error:
            outcomes.append(error.code().name)
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert dict(error.trailing_metadata() or ())["retry-after-ms"] == "1500"

    with ThreadPoolExecutor(6) as pool:
        for _ in range(6):
            pool.submit(call)
    assert set(outcomes) == {"OK", "RESOURCE_EXHAUSTED"}, outcomes


def test_refused_call_is_never_read(stub, hostile_gateway):
    """Admission comes before the message is read (gateway/service/admission.py): while the one
    Transcribe slot is taken, a 60 MB request is refused without its bytes entering the gateway."""
    from tests.test_reliability_suite import PeakMemory, gateway_memory_mb

    payload = asr_pb2.TranscribeRequest(audio_content=bytes(60 * 1024 * 1024), language="zh")
    options = [("grpc.max_send_message_length", 128 * 1024 * 1024)]
    with ThreadPoolExecutor(1) as pool, grpc.insecure_channel(hostile_gateway.address, options=options) as channel:
        holder = pool.submit(stub.Transcribe, asr_pb2.TranscribeRequest(audio_content=_speech_wav(30.0), language="zh"), timeout=300)
        call = channel.unary_unary("/asr.v1.Asr/Transcribe", request_serializer=asr_pb2.TranscribeRequest.SerializeToString,
                                   response_deserializer=asr_pb2.TranscribeResponse.FromString)
        refused = None
        for _ in range(100):  # until the holder is admitted (before that the zeros are read: INVALID_ARGUMENT)
            before = gateway_memory_mb(hostile_gateway.process.pid)
            with PeakMemory(hostile_gateway.process.pid) as memory:
                error = _status(lambda: call(payload, timeout=60))
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refused = error
                break
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert not holder.done(), "the holding call ended before a refusal was seen"
        assert refused is not None and "at most 1 Transcribe calls" in refused.details()
        assert memory.peak - before < 30, f"gateway grew {memory.peak - before:.0f} MB for a refused 60 MB request"
        assert holder.result(timeout=300).text


def _speech_wav(seconds: float) -> bytes:
    """The demo calls one after another until `seconds` of 16 kHz mono speech, as a WAV."""
    from tests.conftest import PROJECT_ROOT, load_clip_audio

    calls = sorted((PROJECT_ROOT / "data" / "calls").glob("call_*.flac"))
    pieces, total = [], 0
    while total < seconds * SAMPLE_RATE:
        audio = load_clip_audio(calls[len(pieces) % len(calls)])
        pieces.append(audio)
        total += len(audio)
    return wav16(np.concatenate(pieces)[: int(seconds * SAMPLE_RATE)], SAMPLE_RATE)


def test_decoded_audio_in_flight_is_bounded(triton, model_dir, tmp_path):
    """Many calls each within the per-call limits could still hold more audio than memory allows:
    past --max-audio-in-flight-s a call is refused after decoding, with the retry hint; a call
    alone is always admitted."""
    long_call, short_call = _speech_wav(60.0), _speech_wav(15.0)
    with gateway_running(model_dir, triton.grpc_url, tmp_path, ["--max-audio-in-flight-s", "70", "--retry-after-s", "1.5"]) as process:
        with asr_client(process.address) as client, ThreadPoolExecutor(1) as pool:
            holder = pool.submit(client.Transcribe, asr_pb2.TranscribeRequest(audio_content=long_call, language="zh", beam_size=1), timeout=300)
            threading.Event().wait(2.0)  # the 60 s call is decoded (well under a second) and being transcribed
            error = _status(lambda: client.Transcribe(asr_pb2.TranscribeRequest(audio_content=short_call, language="zh"), timeout=60))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "decoded audio" in error.details()
            assert dict(error.trailing_metadata() or ())["retry-after-ms"] == "1500"
            assert holder.result(timeout=300).text
            assert client.Transcribe(asr_pb2.TranscribeRequest(audio_content=short_call, language="zh", beam_size=1), timeout=300).text
