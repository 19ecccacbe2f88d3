"""Decoder sequences in Triton: a cancelled Transcribe or stream ENDs its sequences at once
(issue 12, item 2), and every Triton request carries the gateway's request id (item 4).

A Triton of this module's own holds at most MAX_SEQUENCES decoder sequences and evicts idle
ones only after an hour, and logs verbosely: its decoder reports "N live sequences" after every
execution, and every request line carries its request id. So a sequence left behind by a
cancelled call shows up as a live sequence that never goes, and as a START refused with
"max_sequences", long before any eviction could hide it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.protocol import asr_pb2
from tests.conftest import asr_client, load_clip_audio
from tests.test_reliability_gateway import gateway_running

CALLS_DIR = Path(__file__).resolve().parent.parent / "data" / "calls"
MAX_SEQUENCES = 8  # = the gateway's --max-concurrent-windows: a leaked sequence is refused work at once
IDLE_EVICTION_S = 3600  # Triton's and the decoder's idle timeouts: far beyond this module's run
SETTLE_S = 60  # how long the ENDs of cancelled calls may take to arrive (<< IDLE_EVICTION_S)
CANCELLED_CALLS = 8  # Transcribe calls and streams cancelled mid-decode, each
_LIVE = re.compile(r"decoder execute: .*?, (\d+) live sequences")


@pytest.fixture(scope="module")
def sequence_triton(model_dir, tmp_path_factory):
    from gateway.launch.triton_process import TritonProcess
    from model_repository.render import render_repository

    repo = render_repository(model_dir, tmp_path_factory.mktemp("repository"), "fp32", max_sequences=MAX_SEQUENCES,
                             max_sequence_idle_microseconds=IDLE_EVICTION_S * 1_000_000)
    log = tmp_path_factory.mktemp("triton") / "triton.log"
    with TritonProcess(repo, log_path=log, log_verbose=1) as server:
        yield server


@pytest.fixture(scope="module")
def sequence_gateway(sequence_triton, model_dir, tmp_path_factory):
    with gateway_running(model_dir, sequence_triton.grpc_url, tmp_path_factory.mktemp("gateway"),
                         ["--max-concurrent-windows", str(MAX_SEQUENCES), "--log-format", "json",
                          "--stepwise-only"]) as process:  # the decoder model's sequences are the subject
        yield process


@pytest.fixture(scope="module")
def stub(sequence_gateway):
    with asr_client(sequence_gateway.address) as client:
        yield client


@pytest.fixture(scope="module")
def long_pcm() -> bytes:
    """Four sample calls back to back (~35 s, 16 kHz S16LE): several windows decode at once."""
    audio = np.concatenate([load_clip_audio(path) for path in sorted(CALLS_DIR.glob("call_0[1-4]_*.flac"))])
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def live_sequences(triton) -> int | None:
    """The decoder's live sequences after its last execution (None before the first)."""
    counts = _LIVE.findall(triton.log_path.read_text(errors="replace"))
    return int(counts[-1]) if counts else None


def decoder_requests(client: triton_grpc.InferenceServerClient, model: str = "decoder") -> int:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    return sum(int(stats.get(kind, {}).get("count", 0)) for kind in ("success", "fail"))


def wait_for_decoding(client: triton_grpc.InferenceServerClient, before: int, timeout_s: float = 120.0,
                      model: str = "decoder") -> None:
    """Until Triton has answered more than ``before`` requests of ``model`` (a decoder step: the
    call's sequences are in flight; an encoder window: its search follows at once)."""
    deadline = time.monotonic() + timeout_s
    while decoder_requests(client, model) <= before:
        assert time.monotonic() < deadline, f"no {model} request reached Triton"
        time.sleep(0.02)


def wait_for_no_live_sequences(triton) -> int | None:
    deadline = time.monotonic() + SETTLE_S
    while (live := live_sequences(triton)) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    return live


async def fill_every_sequence_slot(triton_url: str, model_dir: Path) -> None:
    """MAX_SEQUENCES STARTs through the gateway's own client; a leaked sequence makes one fail."""
    import json

    from gateway.asr.triton_client import TritonAsrClient

    info = json.loads((model_dir / "model_info.json").read_text())
    client = TritonAsrClient(triton_url)
    try:
        encoded = await client.encode(np.zeros((int(info["n_mels"]), int(info["n_frames"])), np.float32))
        sessions = [client.decoder_session(encoded) for _ in range(MAX_SEQUENCES)]
        try:
            await asyncio.gather(*(s.step(np.array([[info["sot"]]], np.int64), None, top_k=1) for s in sessions))
        finally:
            await asyncio.gather(*(s.close() for s in sessions))
    finally:
        await client.close()


def _stream_requests(pcm: bytes, stop: threading.Event):
    yield asr_pb2.StreamingRecognizeRequest(config=asr_pb2.StreamingConfig(
        encoding=asr_pb2.RawAudio.S16LE, sample_rate_hz=16000, language="zh", request_id="cancelled-stream"))
    step = 16000 * 2 // 5  # 0.2 s pieces, sent as fast as the gateway takes them
    for start in range(0, len(pcm), step):
        if stop.is_set():
            return
        yield asr_pb2.StreamingRecognizeRequest(audio=pcm[start : start + step])
    stop.wait(120)  # held open (no half-close): only the cancel ends it


def _cancel_while_decoding(calls: list, rng) -> int:
    """Once Triton answers the calls' first decoder step, cancel them one by one at random
    moments of their decodes; how many were still running when cancelled."""
    time.sleep(float(rng.uniform(0, 0.3)))
    cancelled = 0
    for call in calls:
        cancelled += call.cancel()
        time.sleep(float(rng.uniform(0, 0.3)))  # the others are at other steps by now
    return cancelled


def test_cancelled_calls_end_their_decoder_sequences_at_once(stub, sequence_triton, sequence_gateway, long_pcm, model_dir):
    """CANCELLED_CALLS Transcribe calls at once, cancelled one by one mid-decode, then as many
    streams: no decoder sequence is left behind."""
    rng = np.random.default_rng(7)
    triton = triton_grpc.InferenceServerClient(sequence_triton.grpc_url)
    request = asr_pb2.TranscribeRequest(
        raw_audio=asr_pb2.RawAudio(pcm=long_pcm, sample_rate_hz=16000, encoding=asr_pb2.RawAudio.S16LE),
        language="zh", beam_size=5)
    stop = threading.Event()
    try:
        before = decoder_requests(triton)
        calls = [stub.Transcribe.future(request, timeout=300) for _ in range(CANCELLED_CALLS)]
        wait_for_decoding(triton, before)
        cancelled = _cancel_while_decoding(calls, rng)
        # the calls' ENDs are counted requests too: the streams' first step is waited for after them
        live = wait_for_no_live_sequences(sequence_triton)
        assert live == 0, f"{live} decoder sequences left behind by the cancelled Transcribe calls"

        before = decoder_requests(triton)
        streams = [stub.StreamingRecognize(_stream_requests(long_pcm, stop), timeout=300) for _ in range(CANCELLED_CALLS)]
        with ThreadPoolExecutor(CANCELLED_CALLS) as readers:
            drained = [readers.submit(lambda s=s: sum(1 for _ in s)) for s in streams]
            wait_for_decoding(triton, before)
            cancelled += _cancel_while_decoding(streams, rng)
            stop.set()
            for reader in drained:
                with pytest.raises(grpc.RpcError) as ended:
                    reader.result(timeout=60)
                assert ended.value.code() == grpc.StatusCode.CANCELLED
    finally:
        stop.set()
        triton.close()
    assert cancelled == 2 * CANCELLED_CALLS  # every call was still running when it was cancelled

    # every sequence was ENDed: none is live, and a full set of new sequences fits
    live = wait_for_no_live_sequences(sequence_triton)
    assert live == 0, f"{live} decoder sequences left behind by the cancelled calls"
    asyncio.run(fill_every_sequence_slot(sequence_triton.grpc_url, model_dir))
    assert "evicted idle sequences" not in sequence_triton.log_path.read_text(errors="replace")
    assert sequence_gateway.process.poll() is None


# ---------------------------------------------------------------------- request ids
def _request_line(gateway, request_id: str) -> dict:
    import json

    for line in gateway.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "request" and entry.get("request_id") == request_id:
                return entry
    raise AssertionError(f"no request line for {request_id}")


def _triton_request_ids(triton, prefix: str) -> set[str]:
    return set(re.findall(r"\[request id: (" + re.escape(prefix) + r"[^\]]*)\]", triton.log_path.read_text(errors="replace")))


def test_triton_requests_carry_the_gateway_request_id(stub, sequence_triton, sequence_gateway):
    """Transcribe (language detected, so every kind of request is made) and a stream: each of
    their Triton requests is named after the request_id of the gateway's request log line."""
    from tests.conftest import sample_clips

    clip = sample_clips()[0]
    assert stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), beam_size=2,
                                                     request_id="join-me/42"), timeout=120).text
    assert _request_line(sequence_gateway, "join-me/42")["code"] == "OK"
    ids = _triton_request_ids(sequence_triton, "join-me/42-")
    assert {"join-me/42-w0-enc", "join-me/42-w0-lang-s0", "join-me/42-w0-s0", "join-me/42-w0-s1",
            "join-me/42-w0-end"} <= ids, sorted(ids)

    pcm = (np.clip(load_clip_audio(clip.path), -1, 1) * 32767).astype("<i2").tobytes()
    config = asr_pb2.StreamingRecognizeRequest(config=asr_pb2.StreamingConfig(
        encoding=asr_pb2.RawAudio.S16LE, sample_rate_hz=16000, language=clip.language, request_id="stream-7"))
    results = list(stub.StreamingRecognize(iter([config, asr_pb2.StreamingRecognizeRequest(audio=pcm)]), timeout=120))
    assert any(r.result.is_final for r in results)
    assert _request_line(sequence_gateway, "stream-7")["code"] == "OK"
    stream_ids = _triton_request_ids(sequence_triton, "stream-7-")
    assert {"stream-7-w0-enc", "stream-7-w0-s0", "stream-7-w0-end"} <= stream_ids, sorted(stream_ids)

    # No request_id from the client: the id the gateway makes up for its log line names the Triton requests too.
    import json

    def transcribe_ids() -> list[str]:
        lines = [json.loads(line) for line in sequence_gateway.log_path.read_text(errors="replace").splitlines() if line.startswith("{")]
        return [e["request_id"] for e in lines if e.get("event") == "request" and e.get("rpc", "").endswith("Transcribe")]

    before = set(transcribe_ids())
    assert stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), language=clip.language), timeout=120).text
    made_up = [request_id for request_id in transcribe_ids() if request_id not in before]
    assert len(made_up) == 1 and f"{made_up[0]}-w0-enc" in _triton_request_ids(sequence_triton, made_up[0])
