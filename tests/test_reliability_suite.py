"""`make reliability`: hostile clients, fuzzed containers, overload and a soak against a real
gateway + Triton, with a table of cases and outcomes (issue 12, item 6).

`make test` runs the fast subset (18 fuzzed containers, 12-call overload, 50-request soak
without the memory verdict); RELIABILITY_FULL=1 (`make reliability`) runs the full sizes: 216
fuzzed containers (9 codecs x 4 mutations x 6), 64 concurrent calls, a 1,000-request soak whose
gateway memory must stay flat within 10%. Memory is the resident set of the gateway and its
decoder processes (summed: pages they share count twice, so the figures are upper bounds).

Time goes to transcription (a whisper-base encoder pass over a padded 30 s window per request,
about 0.7 s of the 2 cores), so the fuzzed containers hold 1 s of speech and one soak request in
ten after the first pass transcribes; the rest exercise decoding and refusal.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import av
import grpc
import numpy as np
import pytest

from gateway.protocol import asr_pb2, asr_pb2_grpc
from tests.conftest import PROJECT_ROOT, asr_client, sample_clips
from tests.test_reliability_audio import MAX_STATUS_BYTES, flac_claiming, pcm_wav
from tests.test_reliability_gateway import gateway_running

FULL = os.environ.get("RELIABILITY_FULL") == "1"
FUZZ_CASES = 216 if FULL else 18
OVERLOAD_CALLS = 64 if FULL else 12
SOAK_REQUESTS = 1000 if FULL else 50
CLIENTS = 4  # fuzz and soak requests in flight at once (Triton batches the transcriptions)
TRANSCRIBED_EVERY = 10  # after the first pass, every 10th soak request is transcribed, the rest refused at decode
FUZZ_AUDIO_S = 1  # seconds of speech in each fuzzed container (the OK ones are transcribed)
MAX_TRANSCRIBES = 8  # the gateway under test (default 16): the rest of an overload is turned away
MAX_GATEWAY_MB = 1536  # issue 12's ceiling for any request and under overload
CLEAN_CODES = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
# the codecs the README lists, as (container, codec, rate, layout)
FORMATS = [
    ("wav", "pcm_s16le", 16000, "mono"), ("wav", "pcm_mulaw", 8000, "mono"), ("wav", "pcm_alaw", 8000, "mono"),
    ("wav", "pcm_f32le", 16000, "stereo"), ("mp3", "libmp3lame", 16000, "mono"), ("flac", "flac", 16000, "mono"),
    ("ogg", "libopus", 48000, "mono"), ("amr", "libopencore_amrnb", 8000, "mono"), ("ipod", "aac", 16000, "mono"),
]

ROWS: list[tuple[str, str, str]] = []  # (case, outcome, figures): the printed table


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    width = max([len(case) for case, _, _ in ROWS] + [4])
    lines = [f"{'case':{width}}  {'outcome':40}  figures", "-" * (width + 60)]
    lines += [f"{case:{width}}  {outcome:40}  {figures}" for case, outcome, figures in ROWS]
    report = "\n".join(lines)
    print("\n\nreliability: cases and outcomes\n" + report)
    out = PROJECT_ROOT / "build" / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.txt").write_text(report + "\n", encoding="utf-8")


def gateway_memory_mb(pid: int) -> float:
    """Resident MB of the gateway and all its descendants (forkserver, decoder workers: started
    from a worker thread, so /proc/<pid>/task/<pid>/children would miss them)."""
    import psutil

    try:
        processes = [psutil.Process(pid)]
        processes += processes[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / (1024 * 1024)


class PeakMemory:
    """Samples gateway_memory_mb every 20 ms while in the with block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, gateway_memory_mb(self.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, gateway_memory_mb(self.pid))


@pytest.fixture(scope="module")
def gateway(triton, model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("reliability")
    with gateway_running(model_dir, triton.grpc_url, logs, ["--max-transcribes", str(MAX_TRANSCRIBES)]) as process:
        yield process


@pytest.fixture(scope="module")
def stub(gateway):
    with asr_client(gateway.address) as client:
        yield client


def outcome_of(call) -> tuple[str, str]:
    try:
        call()
        return "OK", ""
    except grpc.RpcError as error:
        details = error.details() or ""
        assert "Traceback" not in details and len(details.encode()) < MAX_STATUS_BYTES, details[:200]
        return error.code().name, details


# ---------------------------------------------------------------------- hostile inputs
def eight_channel_wav() -> bytes:
    return pcm_wav(16000, 8, 5000)  # 1.28 MB less header: the input that segfaulted the gateway


def silent_flac(seconds: float) -> bytes:
    """Real FLAC of silence: the header states its true (long) length."""
    buffer = io.BytesIO()
    rate = 8000
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        block = av.AudioFrame.from_ndarray(np.zeros((1, rate * 60), np.int16), format="s16", layout="mono")
        block.sample_rate = rate
        for minute in range(int(seconds // 60)):
            block.pts = minute * rate * 60
            for packet in stream.encode(block):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


HOSTILE = {
    "8-channel WAV 1.28 MB (was: segfault)": (lambda: eight_channel_wav(), {"OK"}),
    "WAV at 1 Hz, 32 KB (was: 6 s, 880 MB)": (lambda: pcm_wav(1, 1, 16000), {"INVALID_ARGUMENT"}),
    "WAV with 33 channels": (lambda: pcm_wav(8000, 33, 800), {"INVALID_ARGUMENT"}),
    "FLAC header says 5 h, 8 KB": (lambda: flac_claiming(5 * 3600), {"INVALID_ARGUMENT"}),
    "FLAC of 5 h silence (was: 15 s, +880 MB)": (lambda: silent_flac(5 * 3600), {"INVALID_ARGUMENT"}),
    "random bytes 64 KB": (lambda: np.random.default_rng(1).bytes(65536), {"INVALID_ARGUMENT"}),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input(stub, gateway, name):
    make, expected = HOSTILE[name]
    data = make()
    before = gateway_memory_mb(gateway.process.pid)
    with PeakMemory(gateway.process.pid) as memory:
        started = time.perf_counter()
        code, details = outcome_of(lambda: stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=data, language="en"), timeout=60))
        elapsed = time.perf_counter() - started
    ROWS.append((name, f"{code} {details[:30]}", f"{elapsed * 1000:.0f} ms, +{memory.peak - before:.0f} MB peak"))
    assert code in expected
    assert memory.peak < MAX_GATEWAY_MB
    assert gateway.process.poll() is None


def test_hostile_text(stub, gateway):
    code, details = outcome_of(lambda: stub.Transcribe(asr_pb2.TranscribeRequest(
        audio_content=pcm_wav(16000, 1, 16000), language="x" * 10_000), timeout=30))
    ROWS.append(("10,000-character language code", code, f"{len(details.encode())} B message"))
    assert code == "INVALID_ARGUMENT"
    with grpc.insecure_channel(gateway.address) as channel:
        call = channel.unary_unary("/asr.v1.Asr/AnalyzeTicket", request_serializer=None,
                                   response_deserializer=asr_pb2.Ticket.FromString)
        payload = asr_pb2.AnalyzeTicketRequest(text="zz").SerializeToString().replace(b"zz", b"\xff\xfe")
        code, details = outcome_of(lambda: call(payload, timeout=30))
    ROWS.append(("AnalyzeTicket text not UTF-8 (was: UNKNOWN)", code, details[:40]))
    assert code == "INVALID_ARGUMENT"


# ---------------------------------------------------------------------- the largest request
MAX_AUDIO_BYTES = 64 * 1024 * 1024  # the gateway's defaults (gateway/service/server.py GatewayConfig)
MAX_AUDIO_DURATION_S = 3600


def largest_wav(n_bytes: int, seconds: int) -> bytes:
    """A WAV of exactly ``n_bytes`` that decodes to ``seconds``: 8 kHz 16-bit mono (the most
    audio per byte of plain PCM), filled up with a `junk` chunk; quiet noise with speech in it."""
    rate = 8000
    pcm = (np.random.default_rng(3).standard_normal(rate * seconds) * 20).astype("<i2")
    for clip, at_s in zip(sample_clips()[:3], (0, seconds // 2, seconds - 10)):
        from gateway.asr.audio import decode_audio

        speech = (decode_audio(clip.path.read_bytes())[::2] * 32767).astype("<i2")  # 16 -> 8 kHz
        pcm[at_s * rate : at_s * rate + speech.size] = speech
    data = pcm.tobytes()
    junk = n_bytes - 12 - 24 - 8 - 8 - len(data)
    return (
        b"RIFF" + struct.pack("<I", n_bytes - 8) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"junk" + struct.pack("<I", junk) + bytes(junk)
        + b"data" + struct.pack("<I", len(data)) + data
    )


def test_largest_request(gateway):
    """64 MB of audio that decodes to an hour, the most the default limits let in: one request
    stays under MAX_GATEWAY_MB of gateway memory (its decoder workers counted)."""
    data = largest_wav(MAX_AUDIO_BYTES, MAX_AUDIO_DURATION_S)
    assert len(data) == MAX_AUDIO_BYTES
    request = asr_pb2.TranscribeRequest(audio_content=data, language="zh", beam_size=1)
    options = [("grpc.max_send_message_length", 2 * MAX_AUDIO_BYTES)]
    before = gateway_memory_mb(gateway.process.pid)
    with grpc.insecure_channel(gateway.address, options=options) as channel, PeakMemory(gateway.process.pid) as memory:
        started = time.perf_counter()
        response = asr_pb2_grpc.AsrStub(channel).Transcribe(request, timeout=600)
        elapsed = time.perf_counter() - started
        del request, data
    ROWS.append(("largest request: 64 MB WAV of 1 h (default limits)", f"OK, {len(response.text)} characters",
                 f"{elapsed:.0f} s, peak {memory.peak:.0f} MB (start {before:.0f} MB)"))
    assert response.audio_duration_s == pytest.approx(MAX_AUDIO_DURATION_S, abs=1)
    assert len(response.text) >= 20  # the speech in it (three clips) was transcribed
    assert memory.peak < MAX_GATEWAY_MB
    # one byte more is refused
    too_big = asr_pb2.TranscribeRequest(audio_content=bytes(MAX_AUDIO_BYTES + 1))
    with grpc.insecure_channel(gateway.address, options=options) as channel:
        code, details = outcome_of(lambda: asr_pb2_grpc.AsrStub(channel).Transcribe(too_big, timeout=60))
    assert code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"), details


@pytest.mark.skipif(not FULL, reason="make reliability only: 16 x 64 MB requests, about a minute")
def test_overload_of_largest_requests(triton, model_dir, tmp_path):
    """16 concurrent largest requests at the default limits: one is transcribed, the rest are turned
    away (request bytes and decoded audio in flight), and the gateway stays under MAX_GATEWAY_MB
    while it happens: a message is read only once its call is admitted, two at a time
    (gateway/service/admission.py)."""
    data = largest_wav(MAX_AUDIO_BYTES, MAX_AUDIO_DURATION_S)
    outcomes: list[str] = []
    with gateway_running(model_dir, triton.grpc_url, tmp_path, []) as process:
        options = [("grpc.max_send_message_length", 2 * MAX_AUDIO_BYTES)]
        with grpc.insecure_channel(process.address, options=options) as channel, PeakMemory(process.process.pid) as memory:
            stub = asr_pb2_grpc.AsrStub(channel)
            calls = [stub.Transcribe.future(asr_pb2.TranscribeRequest(audio_content=data, language="zh", beam_size=1), timeout=600)
                     for _ in range(16)]
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and sum(call.done() for call in calls) < len(calls) - 1:
                time.sleep(1.0)
            for call in calls:
                if not call.done():
                    outcomes.append("running (cancelled)")
                    call.cancel()
                    continue
                try:
                    call.result()
                    outcomes.append("OK")
                except grpc.RpcError as error:
                    outcomes.append(error.code().name)
    counts = {outcome: outcomes.count(outcome) for outcome in sorted(set(outcomes))}
    ROWS.append(("overload: 16 x 64 MB WAV of 1 h at once", str(counts), f"peak {memory.peak:.0f} MB"))
    assert outcomes.count("RESOURCE_EXHAUSTED") >= 14
    assert memory.peak < MAX_GATEWAY_MB


# ---------------------------------------------------------------------- fuzzing
def encode(samples: np.ndarray, container: str, codec: str, rate: int, layout: str) -> bytes:
    """16 kHz mono float samples -> a container of ``codec`` (resampled, channels duplicated)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=rate, layout=layout)
        channels = 2 if layout == "stereo" else 1
        frame = av.AudioFrame.from_ndarray(np.repeat(samples[None], channels, 0).T.reshape(1, -1).astype(np.float32),
                                           format="flt", layout=layout)
        frame.sample_rate = 16000
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout=layout, rate=rate)
        for resampled in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(resampled):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


def fuzz_corpus(count: int) -> list[tuple[str, bytes]]:
    from gateway.asr.audio import decode_audio

    rng = np.random.default_rng(12)
    clips = sample_clips()
    originals = []
    for index, (container, codec, rate, layout) in enumerate(FORMATS):
        samples = decode_audio(clips[index % len(clips)].path.read_bytes())[: 16000 * FUZZ_AUDIO_S]
        originals.append((f"{container}/{codec}", encode(samples, container, codec, rate, layout)))
    corpus = []
    for number in range(count):
        name, data = originals[number % len(originals)]
        mutable = bytearray(data)
        kind = ("truncated", "bit-flipped", "header-mangled", "spliced")[number // len(originals) % 4]
        if kind == "truncated":
            mutable = mutable[: int(rng.integers(1, len(mutable)))]
        elif kind == "bit-flipped":
            for position in rng.integers(0, len(mutable), size=int(rng.integers(1, 64))):
                mutable[position] ^= 1 << int(rng.integers(0, 8))
        elif kind == "header-mangled":
            span = min(len(mutable), 64)
            for position in rng.integers(0, span, size=int(rng.integers(1, 12))):
                mutable[position] = int(rng.integers(0, 256))
        else:  # a piece of another format's file in the middle
            other = originals[int(rng.integers(0, len(originals)))][1]
            start = int(rng.integers(0, len(mutable)))
            mutable[start : start + 2048] = other[:2048]
        corpus.append((f"{name} {kind}", bytes(mutable)))
    return corpus


def _transcribe_code(stub, data: bytes) -> str:
    request = asr_pb2.TranscribeRequest(audio_content=data, language="en", beam_size=1)
    return outcome_of(lambda: stub.Transcribe(request, timeout=120))[0]


def test_fuzzed_containers(stub, gateway):
    corpus = fuzz_corpus(FUZZ_CASES)
    counts: dict[str, int] = {}
    before = gateway_memory_mb(gateway.process.pid)
    with PeakMemory(gateway.process.pid) as memory, ThreadPoolExecutor(CLIENTS) as pool:
        started = time.perf_counter()
        codes = list(pool.map(lambda item: _transcribe_code(stub, item[1]), corpus))
        elapsed = time.perf_counter() - started
    for (name, _), code in zip(corpus, codes):
        counts[code] = counts.get(code, 0) + 1
        assert code in CLEAN_CODES, f"{name}: {code}"
    summary = ", ".join(f"{code} {n}" for code, n in sorted(counts.items()))
    ROWS.append((f"{len(corpus)} fuzzed containers ({len(FORMATS)} codecs)", summary,
                 f"{elapsed:.0f} s, peak {memory.peak:.0f} MB (start {before:.0f} MB)"))
    assert gateway.process.poll() is None
    assert memory.peak < MAX_GATEWAY_MB


# ---------------------------------------------------------------------- overload, soak
def test_overload(stub, gateway):
    clip = sample_clips()[0]
    request = asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), language=clip.language, beam_size=5)
    codes: list[str] = []
    latencies: dict[str, list[float]] = {}

    def call():
        started = time.perf_counter()
        code, _ = outcome_of(lambda: stub.Transcribe(request, timeout=300))
        latencies.setdefault(code, []).append(time.perf_counter() - started)
        codes.append(code)

    with PeakMemory(gateway.process.pid) as memory, ThreadPoolExecutor(OVERLOAD_CALLS) as pool:
        for _ in range(OVERLOAD_CALLS):
            pool.submit(call)
    counts = {code: codes.count(code) for code in sorted(set(codes))}
    figures = "; ".join(f"{code} max {max(values):.2f} s" for code, values in sorted(latencies.items()))
    ROWS.append((f"overload: {OVERLOAD_CALLS} concurrent Transcribe (limit {MAX_TRANSCRIBES})",
                 ", ".join(f"{c} {n}" for c, n in counts.items()), f"{figures}; peak {memory.peak:.0f} MB"))
    assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"} and counts.get("OK", 0) >= 1
    assert counts.get("RESOURCE_EXHAUSTED", 0) >= 1
    assert memory.peak < MAX_GATEWAY_MB


def test_soak(stub, gateway):
    """Real clips, fuzzed and hostile inputs from 4 clients; gateway memory stays flat.

    The first pass sends every input once; after it, one request in TRANSCRIBED_EVERY (10) is
    one that transcribes (a real clip or a fuzzed file that decodes) and the rest are refused at
    decode, so 1,000 requests fit the suite's time on a 2-core machine.
    """
    clip = sample_clips()[0]
    inputs = [clip.path.read_bytes()] + [data for _, data in fuzz_corpus(36)] + [make() for make, _ in HOSTILE.values()]
    samples = []
    counts: dict[str, int] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        first = list(pool.map(lambda data: _transcribe_code(stub, data), inputs))
        transcribed = [data for data, code in zip(inputs, first) if code == "OK"]
        refused = [data for data, code in zip(inputs, first) if code != "OK"]
        for code in first:
            counts[code] = counts.get(code, 0) + 1
        plan = [transcribed[n % len(transcribed)] if n % TRANSCRIBED_EVERY == 0 else refused[n % len(refused)]
                for n in range(SOAK_REQUESTS - len(inputs))]
        tenth = max(len(plan) // 10, 1)
        for start in range(0, len(plan), tenth):
            for code in pool.map(lambda data: _transcribe_code(stub, data), plan[start : start + tenth]):
                counts[code] = counts.get(code, 0) + 1
            samples.append(gateway_memory_mb(gateway.process.pid))
    elapsed = time.perf_counter() - started
    warm = samples[1]  # after the first tenth: pools, caches and arenas have grown to size
    growth = (max(samples[1:]) - warm) / warm
    ROWS.append((f"soak: {SOAK_REQUESTS} requests", ", ".join(f"{c} {n}" for c, n in sorted(counts.items())),
                 f"{elapsed:.0f} s; memory {samples[0]:.0f} -> {samples[-1]:.0f} MB, growth after warm-up {growth * 100:+.1f}%"))
    assert set(counts) <= CLEAN_CODES
    assert gateway.process.poll() is None
    if FULL:
        assert growth < 0.10
