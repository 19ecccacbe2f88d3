"""Recorder formats, stereo calls and bad input, generated here with PyAV (no committed binaries).

Every format is encoded from the same speech and must decode (gateway/asr/audio.py) to the
samples of the WAV original within that codec's tolerance; through the gateway, stereo
calls can be transcribed per channel, and bad input gets a result or INVALID_ARGUMENT with a
precise message while other requests go on unaffected.
"""

from __future__ import annotations

import io
import struct
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import av
import grpc
import numpy as np
import pytest

from gateway.asr.audio import SAMPLE_RATE, AudioDecodeError, decode_audio, load_audio, load_pcm
from gateway.protocol import asr_pb2, asr_pb2_grpc
from tests.conftest import asr_client, load_clip_audio, running_gateway, sample_clips, wav16

CLIPS = {c.name: c for c in sample_clips()}
SR = SAMPLE_RATE


def speech() -> np.ndarray:
    return load_clip_audio(CLIPS["zh/pangrama"].path)


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    """16 kHz float -> ``rate`` (FFmpeg's resampler; what a recorder at that rate would hold)."""
    if rate == SR:
        return audio.copy()
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    frame = av.AudioFrame.from_ndarray(audio[np.newaxis].astype(np.float32), format="flt", layout="mono")
    frame.sample_rate = SR
    return np.concatenate([f.to_ndarray()[0] for f in [*resampler.resample(frame), *resampler.resample(None)]])


def encode(planar: np.ndarray, container: str, codec: str, rate: int, *, layout: str = "mono", bit_rate: int | None = None) -> bytes:
    """float32 [channels, n] at ``rate`` -> an in-memory file."""
    planar = np.atleast_2d(planar).astype(np.float32)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if bit_rate:
            stream.bit_rate = bit_rate
        if codec == "vorbis":  # FFmpeg's own Vorbis encoder (stereo only) is marked experimental
            stream.codec_context.options = {"strict": "experimental"}
        for start in range(0, planar.shape[1], 4096):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, start : start + 4096]), format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts, frame.time_base = start, Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def pcm_wav(samples: np.ndarray, rate: int, bits: int, *, float_format: bool = False) -> bytes:
    """Hand-written WAV (PCM 8/16/24/32-bit or float), mono."""
    if float_format:
        data, tag = samples.astype("<f4").tobytes(), 3
    elif bits == 8:
        data, tag = (np.clip(samples, -1, 1) * 127 + 128).round().astype(np.uint8).tobytes(), 1
    elif bits == 24:
        ints = (np.clip(samples, -1, 1) * (2**23 - 1)).round().astype("<i4")
        data, tag = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes(), 1
    else:
        dtype = {16: "<i2", 32: "<i4"}[bits]
        data, tag = (np.clip(samples, -1, 1) * (2 ** (bits - 1) - 1)).round().astype(dtype).tobytes(), 1
    block = bits // 8
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack(
        "<IHHIIHH", 16, tag, 1, rate, rate * block, block, bits
    ) + b"data" + struct.pack("<I", len(data))
    return header + data


def aligned_snr_db(reference: np.ndarray, test: np.ndarray, max_lag: int = 2000) -> tuple[float, int]:
    """Best SNR (dB) over lags (codecs add priming delay), and that lag."""
    n = min(len(reference), len(test)) - 2 * max_lag
    ref = reference[max_lag : max_lag + n]
    best = (-np.inf, 0)
    corr = np.correlate(test[: n + 2 * max_lag], ref, mode="valid")
    for lag in np.argsort(-corr)[:3]:
        seg = test[lag : lag + n]
        gain = float(np.dot(seg, ref) / max(np.dot(seg, seg), 1e-12))  # level differences are not noise
        snr = 10 * np.log10(np.sum(ref**2) / max(np.sum((ref - gain * seg) ** 2), 1e-20))
        best = max(best, (float(snr), int(lag) - max_lag))
    return best


# (id, bytes builder, rate, minimum SNR against the WAV original at that rate, max |lag| samples)
FORMATS = [
    ("wav-pcm8", lambda x, r: pcm_wav(x, r, 8), 16000, 28, 0),
    ("wav-pcm16", lambda x, r: pcm_wav(x, r, 16), 16000, 70, 0),
    ("wav-pcm24", lambda x, r: pcm_wav(x, r, 24), 44100, 100, 0),
    ("wav-pcm32", lambda x, r: pcm_wav(x, r, 32), 48000, 100, 0),
    ("wav-float", lambda x, r: pcm_wav(x, r, 32, float_format=True), 22050, 120, 0),
    ("wav-mulaw", lambda x, r: encode(x, "wav", "pcm_mulaw", r), 8000, 33, 0),
    ("wav-alaw", lambda x, r: encode(x, "wav", "pcm_alaw", r), 8000, 33, 0),
    ("mp3", lambda x, r: encode(x, "mp3", "libmp3lame", r, bit_rate=64000), 16000, 22, 0),
    ("flac", lambda x, r: encode(x, "flac", "flac", r), 44100, 75, 0),
    ("ogg-vorbis", lambda x, r: encode(x, "ogg", "libvorbis", r), 16000, 20, 0),
    ("ogg-opus", lambda x, r: encode(x, "ogg", "libopus", r, bit_rate=32000), 48000, 16, 0),
    # AMR-NB is a CELP codec (waveform SNR is low by design) and its decoder is ~80 samples late
    ("amr-nb", lambda x, r: encode(x, "amr", "libopencore_amrnb", r, bit_rate=12200), 8000, 4, 200),
    ("m4a-aac", lambda x, r: encode(x, "mp4", "aac", r, bit_rate=64000), 16000, 28, 0),
]


def _available(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
        return True
    except Exception:  # noqa: BLE001 - missing encoder in this FFmpeg build
        return False


@pytest.mark.parametrize("name, build, rate, min_snr, max_lag", FORMATS, ids=[f[0] for f in FORMATS])
def test_format_decodes_like_the_wav_original(name, build, rate, min_snr, max_lag):
    codec = {"ogg-vorbis": "libvorbis"}.get(name)
    if codec and not _available(codec):
        codec = "vorbis"
        if not _available(codec):
            pytest.skip("no Vorbis encoder in this FFmpeg build")
        build = lambda x, r: encode(np.stack([x, x]), "ogg", "vorbis", r, layout="stereo")  # noqa: E731 - stereo only
    source = resample(speech(), rate)
    data = build(source, rate)
    original = load_audio(pcm_wav(source, rate, 32, float_format=True)).samples  # the WAV original, through the same path
    decoded = load_audio(data)
    assert decoded.sample_rate == SR and decoded.source_sample_rate == rate
    assert abs(decoded.duration_s - original.shape[0] / SR) < 0.15, (decoded.duration_s, original.shape[0] / SR)
    snr, lag = aligned_snr_db(original, decoded.samples)
    assert snr >= min_snr, f"{name}: SNR {snr:.1f} dB < {min_snr}"
    assert abs(lag) <= max_lag, f"{name}: delay of {lag} samples"


def test_stereo_channels_kept_apart():
    left = speech()
    right = 0.5 * load_clip_audio(CLIPS["en/quick_brown_fox"].path)
    n = max(len(left), len(right))
    planar = np.zeros((2, n), np.float32)
    planar[0, : len(left)] = left
    planar[1, : len(right)] = right
    for data in (encode(planar, "wav", "pcm_s16le", SR, layout="stereo"), encode(planar, "flac", "flac", SR, layout="stereo")):
        kept = load_audio(data, keep_channels=True)
        assert kept.samples.shape == (2, n)
        np.testing.assert_allclose(kept.samples[0], planar[0], atol=2e-4)
        np.testing.assert_allclose(kept.samples[1], planar[1], atol=2e-4)
        np.testing.assert_allclose(decode_audio(data), planar.mean(axis=0), atol=2e-4)
    interleaved = (planar.T * 32767).astype("<i2").tobytes()
    raw = load_pcm(interleaved, SR, "s16le", channels=2, keep_channels=True)
    assert raw.samples.shape == (2, n)
    np.testing.assert_allclose(raw.samples[1], planar[1], atol=1e-4)
    with pytest.raises(AudioDecodeError, match="at most 8"):
        load_pcm(np.zeros((10, 9), "<i2").tobytes(), SR, "s16le", channels=9, keep_channels=True)


# --------------------------------------------------------------------------- through the gateway
def test_stereo_call_per_channel(asr_stub):
    """Agent on the left channel at 1 s, caller on the right at 6 s."""
    agent = load_clip_audio(CLIPS["en/hello_world"].path)
    caller = load_clip_audio(CLIPS["en/quick_brown_fox"].path)
    planar = np.zeros((2, SR * 10), np.float32)
    planar[0, SR : SR + len(agent)] = agent
    planar[1, 6 * SR : 6 * SR + len(caller)] = caller
    planar += np.random.default_rng(0).normal(0, 0.002, planar.shape).astype(np.float32)
    data = encode(planar, "wav", "pcm_s16le", SR, layout="stereo")
    request = asr_pb2.TranscribeRequest(
        audio_content=data, language="en", beam_size=1, word_timestamps=True,
        channel_mode=asr_pb2.CHANNEL_MODE_SEPARATE, channel_labels=["agent", "caller"],
    )
    response = asr_stub.Transcribe(request, timeout=120)
    by_speaker = {}
    for s in response.segments:
        by_speaker.setdefault(s.speaker, []).append(s)
    assert set(by_speaker) == {"agent", "caller"}, [(s.speaker, s.text) for s in response.segments]
    assert all(s.channel == 0 for s in by_speaker["agent"]) and all(s.channel == 1 for s in by_speaker["caller"])
    assert "hello" in " ".join(s.text for s in by_speaker["agent"]).lower()
    assert "quick" in " ".join(s.text for s in by_speaker["caller"]).lower()
    assert abs(by_speaker["agent"][0].start_s - 1.05) < 0.5 and abs(by_speaker["caller"][0].start_s - 6.05) < 0.5
    assert [s.start_s for s in response.segments] == sorted(s.start_s for s in response.segments)
    # downmixed (the default): one transcript with both, no speaker labels
    mixed = asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=data, language="en", beam_size=1), timeout=120)
    assert "hello" in mixed.text.lower() and "quick" in mixed.text.lower()
    assert all(s.speaker == "" and s.channel == 0 for s in mixed.segments)


def _invalid(asr_stub, request, *fragments) -> str:
    with pytest.raises(grpc.RpcError) as error:
        asr_stub.Transcribe(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value
    details = error.value.details()
    assert "Traceback" not in details
    for fragment in fragments:
        assert fragment in details, details
    return details


def test_bad_input(asr_stub):
    clip = load_clip_audio(CLIPS["en/hello_world"].path)
    # zero-length and silence only: empty results
    empty = asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=b""), timeout=30)
    assert empty.text == "" and empty.audio_duration_s == 0.0
    silence = asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=wav16(np.zeros(SR * 20, np.float32))), timeout=30)
    assert silence.text == "" and silence.audio_duration_s == pytest.approx(20.0) and not silence.segments
    # a truncated MP3: what decodes is transcribed
    mp3 = encode(resample(np.concatenate([clip, np.zeros(SR // 2, np.float32)]), SR), "mp3", "libmp3lame", SR, bit_rate=64000)
    truncated = asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=mp3[: int(len(mp3) * 0.8)], language="en", beam_size=1), timeout=60)
    assert 0.5 < truncated.audio_duration_s < 1.4 and "hello" in truncated.text.lower()
    # a text file renamed .wav
    _invalid(asr_stub, asr_pb2.TranscribeRequest(audio_content=b"RIFF? no, just notes about a call\n" * 40), "audio")
    # NaN / Inf samples in raw float PCM
    bad = np.concatenate([clip, [np.nan, np.inf, -np.inf]]).astype("<f4").tobytes()
    raw = asr_pb2.RawAudio(pcm=bad, sample_rate_hz=SR, encoding=asr_pb2.RawAudio.F32LE)
    _invalid(asr_stub, asr_pb2.TranscribeRequest(raw_audio=raw), "3 NaN/Inf samples")
    # sample rate 0 / 1 MHz, odd byte counts, unknown encodings
    pcm = (clip * 32767).astype("<i2").tobytes()
    _invalid(asr_stub, asr_pb2.TranscribeRequest(raw_audio=asr_pb2.RawAudio(pcm=pcm, encoding=asr_pb2.RawAudio.S16LE)), "sample_rate_hz is required")
    _invalid(
        asr_stub,
        asr_pb2.TranscribeRequest(raw_audio=asr_pb2.RawAudio(pcm=pcm, sample_rate_hz=1_000_000, encoding=asr_pb2.RawAudio.S16LE)),
        "1000000 Hz is outside 1000..384000 Hz",
    )
    _invalid(
        asr_stub,
        asr_pb2.TranscribeRequest(raw_audio=asr_pb2.RawAudio(pcm=pcm[:-1], sample_rate_hz=SR, encoding=asr_pb2.RawAudio.S16LE)),
        "not a whole number",
    )
    _invalid(asr_stub, asr_pb2.TranscribeRequest(raw_audio=asr_pb2.RawAudio(pcm=pcm, sample_rate_hz=SR)), "encoding")
    _invalid(asr_stub, asr_pb2.TranscribeRequest(audio_content=wav16(clip), vad=asr_pb2.VadConfig(threshold=2.0)), "vad: threshold")
    _invalid(asr_stub, asr_pb2.TranscribeRequest(audio_content=wav16(clip), channel_mode=7), "channel_mode")
    # the server is still up and answers correctly
    ok = asr_stub.Transcribe(asr_pb2.TranscribeRequest(audio_content=wav16(clip), language="en", beam_size=1), timeout=60)
    assert "hello" in ok.text.lower()


def test_bad_requests_do_not_disturb_others(asr_stub):
    clip = CLIPS["zh/nihao_shijie"]
    good = asr_pb2.TranscribeRequest(audio_content=clip.path.read_bytes(), language="zh", beam_size=1)
    junk = [
        asr_pb2.TranscribeRequest(audio_content=b"\x00garbage" * 1000),
        asr_pb2.TranscribeRequest(raw_audio=asr_pb2.RawAudio(pcm=b"\x00" * 10, sample_rate_hz=0)),
        asr_pb2.TranscribeRequest(audio_content=b"ID3" + b"\xff" * 5000),
    ]

    def call(request):
        try:
            return asr_stub.Transcribe(request, timeout=120)
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, [good, *junk, good, *junk, good]))
    answers = [r for r in results if not isinstance(r, grpc.StatusCode)]
    assert len(answers) == 3 and all("你好" in r.text for r in answers)
    assert all(r == grpc.StatusCode.INVALID_ARGUMENT for r in results if isinstance(r, grpc.StatusCode))


def test_limits_are_configurable_and_reported(triton, model_dir, tmp_path):
    from gateway.launch.local import GatewayProcess

    extra = ["--max-audio-mb", "0.5", "--max-audio-duration-s", "10"]
    with GatewayProcess(model_dir, triton.grpc_url, log_path=tmp_path / "gateway.log", extra_args=extra) as gateway:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = asr_pb2_grpc.AsrStub(channel)
            big = wav16(np.zeros(SR * 20, np.float32))  # 640 KB
            details = _invalid(stub, asr_pb2.TranscribeRequest(audio_content=big), "at most 524288")
            assert str(len(big)) in details
            long = encode(np.zeros(SR * 30, np.float32), "flac", "flac", SR)  # small file, 30 s
            _invalid(stub, asr_pb2.TranscribeRequest(audio_content=long), "at most 10.0 s")
            pcm = np.zeros(SR * 12, "<i2").tobytes()
            raw = asr_pb2.RawAudio(pcm=pcm, sample_rate_hz=SR, encoding=asr_pb2.RawAudio.S16LE)
            _invalid(stub, asr_pb2.TranscribeRequest(raw_audio=raw), "12.0 s long", "at most 10.0 s")
            with pytest.raises(grpc.RpcError) as error:
                config = asr_pb2.StreamingConfig(encoding=asr_pb2.RawAudio.S16LE, sample_rate_hz=SR)
                requests = [asr_pb2.StreamingRecognizeRequest(config=config)] + [
                    asr_pb2.StreamingRecognizeRequest(audio=np.zeros(SR, "<i2").tobytes()) for _ in range(12)
                ]
                list(stub.StreamingRecognize(iter(requests), timeout=60))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 10.0 s" in error.value.details()


@pytest.mark.slow
def test_two_hour_file(asr_stub, triton, model_dir, tmp_path):
    """Two hours of FLAC (digital silence, one utterance at 1:23:20): refused by a gateway with the
    default one-hour Transcribe limit (memory per request, README Reliability) with a message
    saying what to do; a correct result from one started with --max-audio-duration-s 7200."""
    n = SR * 7200
    clip = load_clip_audio(CLIPS["en/quick_brown_fox"].path)
    audio = np.zeros(n, np.float32)
    at = SR * 5000
    audio[at : at + len(clip)] = clip
    data = encode(audio, "flac", "flac", SR)
    del audio
    request = asr_pb2.TranscribeRequest(audio_content=data, language="en", beam_size=1, word_timestamps=True)
    with pytest.raises(grpc.RpcError) as error:
        asr_stub.Transcribe(request, timeout=300)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 3600.0 s" in error.value.details()
    with running_gateway(model_dir, triton.grpc_url, tmp_path, ["--max-audio-duration-s", "7200"]) as gateway:
        with asr_client(gateway.address) as stub:
            response = stub.Transcribe(request, timeout=900)
    assert response.audio_duration_s == pytest.approx(7200.0, abs=0.1)
    assert len(response.segments) == 1 and "quick" in response.text.lower()
    assert abs(response.segments[0].start_s - 5000.05) < 0.5
