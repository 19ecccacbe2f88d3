"""gateway.asr.audio on recorder formats generated here with PyAV from a real speech clip."""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from gateway.asr.audio import (
    SAMPLE_RATE,
    AudioDecodeError,
    AudioTooLongError,
    decode_audio,
    load_audio,
    load_pcm,
    pcm_to_float,
)


def _samples_dir() -> Path:
    import pytest_audioeval  # a namespace package: no __file__

    return Path(next(iter(pytest_audioeval.__path__))).resolve() / "samples" / "audio"


def read_float_wav(path: Path) -> np.ndarray:
    """Independent WAV reader (no FFmpeg) for the float32 mono sample clips."""
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    pos, fmt, pcm = 12, None, None
    while pos + 8 <= len(data):
        tag, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if tag == b"fmt ":
            fmt = struct.unpack("<HHIIHH", body[:16])
        elif tag == b"data":
            pcm = body
        pos += 8 + size + (size & 1)
    format_tag, channels, rate, _, _, bits = fmt
    assert (format_tag, channels, rate, bits) == (3, 1, SAMPLE_RATE, 32), fmt
    return np.frombuffer(pcm, dtype="<f4").copy()


@pytest.fixture(scope="module")
def clip_path() -> Path:
    return _samples_dir() / "zh" / "pangrama.wav"


@pytest.fixture(scope="module")
def speech(clip_path) -> np.ndarray:
    """Real Mandarin speech, float32 mono 16 kHz, about 4.1 s."""
    return read_float_wav(clip_path)


def encode(
    samples: np.ndarray,
    container: str,
    codec: str,
    *,
    rate: int = SAMPLE_RATE,
    codec_rate: int | None = None,
    layout: str = "mono",
) -> bytes:
    """Encode float32 [n] (mono) or [channels, n] audio into a container in memory."""
    planar = np.atleast_2d(samples).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=codec_rate or rate, layout=layout)
        step = 4096
        for start in range(0, planar.shape[1], step):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planar[:, start : start + step]), format="fltp", layout=layout
            )
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    n = min(len(reference), len(test))
    noise = test[:n] - reference[:n]
    return float(10 * np.log10(np.sum(reference[:n] ** 2) / max(np.sum(noise**2), 1e-20)))


def best_lag_correlation(reference: np.ndarray, test: np.ndarray, max_lag: int) -> tuple[int, float]:
    n = min(len(reference), len(test)) - 2 * max_lag
    ref = reference[max_lag : max_lag + n]
    best = (0, -1.0)
    for lag in range(-max_lag, max_lag + 1):
        seg = test[max_lag + lag : max_lag + lag + n]
        corr = float(np.dot(ref, seg) / np.sqrt(np.dot(ref, ref) * np.dot(seg, seg) + 1e-20))
        if corr > best[1]:
            best = (lag, corr)
    return best


def lowpass(x: np.ndarray, cutoff_hz: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    spectrum = np.fft.rfft(x)
    spectrum[np.fft.rfftfreq(len(x), 1 / rate) > cutoff_hz] = 0
    return np.fft.irfft(spectrum, n=len(x)).astype(np.float32)


def test_float_wav_is_bit_exact(clip_path, speech):
    decoded = load_audio(clip_path.read_bytes())
    assert decoded.samples.dtype == np.float32 and decoded.samples.ndim == 1
    np.testing.assert_array_equal(decoded.samples, speech)
    assert decoded.sample_rate == decoded.source_sample_rate == SAMPLE_RATE
    assert decoded.source_channels == 1
    assert decoded.codec == "pcm_f32le" and decoded.container == "wav"
    assert decoded.duration_s == pytest.approx(len(speech) / SAMPLE_RATE)
    assert decoded.source_duration_s == pytest.approx(len(speech) / SAMPLE_RATE)
    assert decoded.corrupt_packets == 0


def test_empty_audio():
    samples = decode_audio(b"")
    assert samples.dtype == np.float32 and samples.shape == (0,)
    assert load_audio(b"").duration_s == 0.0
    assert pcm_to_float(b"", 8000).shape == (0,)
    # a valid container holding zero samples is empty audio too
    assert decode_audio(encode(np.zeros(0, np.float32), "wav", "pcm_s16le")).shape == (0,)


@pytest.mark.parametrize(
    "data",
    [
        b"This is a plain text file, not a recording.\nSecond line.\n",
        b"1\n00:00:01,000 --> 00:00:02,000\nsubtitles are not audio\n\n",
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        b"ffconcat version 1.0\nfile /etc/passwd\n",
        bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8)),
        b"RIFF\x10\x00\x00\x00WAVEfmt ",  # header cut short
    ],
    ids=["text", "srt", "hls-playlist", "concat-list", "random-bytes", "truncated-header"],
)
def test_not_audio(data):
    with pytest.raises(AudioDecodeError) as excinfo:
        decode_audio(data)
    assert isinstance(excinfo.value, ValueError)
    assert str(excinfo.value)


def test_pcm16_wav(speech):
    decoded = load_audio(encode(speech, "wav", "pcm_s16le"))
    assert decoded.codec == "pcm_s16le"
    np.testing.assert_allclose(decoded.samples, speech, atol=1.0 / 32768 + 1e-7)


@pytest.mark.parametrize("codec", ["pcm_mulaw", "pcm_alaw"])
def test_mulaw_wav(speech, codec):
    # named for the common call-center case; A-law runs through the same test
    decoded = load_audio(encode(speech, "wav", codec))
    assert decoded.codec == codec
    assert len(decoded.samples) == len(speech)  # no delay, no padding
    assert snr_db(speech, decoded.samples) > 30  # 8-bit companding: about 37 dB here


def test_mp3(speech):
    decoded = load_audio(encode(speech, "mp3", "libmp3lame"))
    assert decoded.container == "mp3"
    # the LAME/Xing header lets FFmpeg drop encoder delay and padding: sample-aligned
    assert abs(len(decoded.samples) - len(speech)) <= 1152
    lag, corr = best_lag_correlation(speech, decoded.samples, 200)
    assert lag == 0 and corr > 0.99
    assert decoded.source_duration_s == pytest.approx(len(speech) / SAMPLE_RATE, abs=0.08)


def test_flac(speech):
    decoded = load_audio(encode(speech, "flac", "flac"))
    assert decoded.codec == "flac"
    assert len(decoded.samples) == len(speech)
    np.testing.assert_allclose(decoded.samples, speech, atol=1.0 / 32768 + 1e-7)  # lossless s16


def test_ogg_opus(speech):
    decoded = load_audio(encode(speech, "ogg", "libopus"))
    assert decoded.codec == "opus" and decoded.source_sample_rate == 48000
    assert abs(len(decoded.samples) - len(speech)) <= 320  # pre-skip honoured
    lag, corr = best_lag_correlation(speech, decoded.samples, 200)
    assert abs(lag) <= 2 and corr > 0.99


def test_m4a_aac(speech):
    decoded = load_audio(encode(speech, "ipod", "aac"))
    assert decoded.codec == "aac" and decoded.container.startswith("mov")
    # the edit list drops the 1024-sample priming; the last frame's padding remains
    lag, corr = best_lag_correlation(speech, decoded.samples, 1100)
    assert lag == 0 and corr > 0.99
    assert 0 <= len(decoded.samples) - len(speech) < 1024


def test_amr_nb(speech):
    # AMR-NB: 8 kHz narrow-band speech codec at 12.2 kbit/s, typical of phone recorders
    decoded = load_audio(encode(speech, "amr", "libopencore_amrnb", codec_rate=8000))
    assert decoded.codec == "amrnb" and decoded.source_sample_rate == 8000
    assert decoded.sample_rate == SAMPLE_RATE
    assert abs(decoded.duration_s - len(speech) / SAMPLE_RATE) < 0.03  # 20 ms frames
    # a parametric codec: compare the telephone band, allowing the codec's small delay
    lag, corr = best_lag_correlation(lowpass(speech, 3400), lowpass(decoded.samples, 3400), 160)
    assert abs(lag) < 160 and corr > 0.75


def test_resample_44k1(speech):
    upsampled = pcm_to_float((np.round(speech * 32767)).astype("<i2").tobytes(), SAMPLE_RATE)
    wav = encode(speech, "wav", "pcm_s16le", codec_rate=44100)  # encoder resamples to 44.1 kHz
    decoded = load_audio(wav)
    assert decoded.source_sample_rate == 44100
    assert abs(len(decoded.samples) - len(speech)) <= 2
    assert decoded.source_duration_s == pytest.approx(len(speech) / SAMPLE_RATE, abs=1e-3)
    assert snr_db(upsampled, decoded.samples) > 25


def test_stereo(speech):
    quiet = 0.25 * speech
    # channels are averaged: identical channels give the signal back at its level
    same = load_audio(encode(np.stack([speech, speech]), "wav", "pcm_f32le", layout="stereo"))
    assert same.source_channels == 2
    np.testing.assert_allclose(same.samples, speech, atol=1e-6)
    mixed = decode_audio(encode(np.stack([speech, quiet]), "wav", "pcm_f32le", layout="stereo"))
    np.testing.assert_allclose(mixed.astype(np.float64), 0.625 * speech, atol=1e-6)
    opposite = decode_audio(encode(np.stack([speech, -speech]), "flac", "flac", layout="stereo"))
    assert np.abs(opposite).max() < 1e-4
    # and through the raw PCM path
    interleaved = np.stack([speech, quiet], axis=1).astype("<f4").tobytes()
    raw = load_pcm(interleaved, SAMPLE_RATE, "f32le", channels=2)
    np.testing.assert_allclose(raw.samples, 0.625 * speech, atol=1e-6)
    assert raw.source_channels == 2 and raw.source_duration_s == pytest.approx(len(speech) / SAMPLE_RATE)


def test_multichannel_without_layout(speech):
    # 3-channel PCM WAV with no channel mask: FFmpeg reports an unordered layout
    pcm = (np.stack([speech, speech, speech], axis=1) * 32767).astype("<i2").tobytes()
    header = (
        b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 3, SAMPLE_RATE, SAMPLE_RATE * 6, 6, 16)
        + b"data" + struct.pack("<I", len(pcm))
    )
    decoded = load_audio(header + pcm)
    assert decoded.source_channels == 3
    np.testing.assert_allclose(decoded.samples, speech, atol=2.0 / 32768)


def test_raw_pcm_8k(speech):
    # telephone-band PCM made with numpy (no FFmpeg): band-limit, then keep every other sample
    narrow = lowpass(speech, 3600)
    pcm8k = np.round(narrow[::2] * 32767).astype("<i2").tobytes()
    decoded = load_pcm(pcm8k, 8000, "s16le")
    assert decoded.sample_rate == SAMPLE_RATE and decoded.source_sample_rate == 8000
    assert decoded.source_duration_s == pytest.approx(len(speech[::2]) / 8000)
    assert abs(len(decoded.samples) - 2 * len(speech[::2])) <= 1
    lag, corr = best_lag_correlation(narrow, decoded.samples, 8)
    assert lag == 0
    assert snr_db(narrow, decoded.samples) > 25


def test_raw_pcm_tone_is_resampled_without_loss():
    rate = 8000
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype("<f4")
    out = pcm_to_float(tone.tobytes(), rate, encoding="f32le")
    assert len(out) == 2 * rate
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / SAMPLE_RATE)
    middle = slice(400, -400)  # away from the filter's edge transients
    np.testing.assert_allclose(out[middle], expected[middle], atol=5e-3)


def test_raw_pcm_16k_needs_no_resampling(speech):
    s16 = np.round(speech * 32767).astype("<i2")
    out = pcm_to_float(s16.tobytes(), SAMPLE_RATE)
    np.testing.assert_array_equal(out, s16.astype(np.float32) / 32768)


@pytest.mark.parametrize("rate", [0, 999, 384001, -16000])
def test_raw_pcm_sample_rate_out_of_range(rate):
    with pytest.raises(AudioDecodeError, match=str(rate)):
        pcm_to_float(b"\x00\x00" * 100, rate)


@pytest.mark.parametrize("rate", [1000, 384000])
def test_raw_pcm_sample_rate_limits_accepted(rate):
    out = pcm_to_float(b"\x00\x00" * rate, rate)
    assert abs(len(out) - SAMPLE_RATE) <= 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_raw_pcm_float_rejects_non_finite(bad):
    samples = np.zeros(1600, "<f4")
    samples[800] = bad
    with pytest.raises(AudioDecodeError, match="NaN/Inf"):
        pcm_to_float(samples.tobytes(), SAMPLE_RATE, encoding="f32le")


def test_raw_pcm_bad_arguments():
    with pytest.raises(AudioDecodeError, match="whole number"):
        pcm_to_float(b"\x00\x00\x00", SAMPLE_RATE)
    with pytest.raises(AudioDecodeError, match="whole number"):
        pcm_to_float(b"\x00\x00" * 3, SAMPLE_RATE, channels=2)
    with pytest.raises(AudioDecodeError, match="encoding"):
        pcm_to_float(b"\x00\x00", SAMPLE_RATE, encoding="s24le")
    with pytest.raises(AudioDecodeError, match="channels"):
        pcm_to_float(b"\x00\x00", SAMPLE_RATE, channels=0)


def test_corrupt_frames_are_skipped(speech):
    mp3 = bytearray(encode(np.tile(speech, 3), "mp3", "libmp3lame"))
    rng = np.random.default_rng(1)
    for fraction in (0.2, 0.4, 0.6):
        pos = int(len(mp3) * fraction)
        mp3[pos : pos + 300] = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    decoded = load_audio(bytes(mp3))
    assert decoded.corrupt_packets > 0
    # the damaged frames are lost, the rest decodes
    assert decoded.duration_s > 0.8 * 3 * len(speech) / SAMPLE_RATE


def test_truncated_file_keeps_decodable_part(speech):
    wav = encode(speech, "wav", "pcm_s16le")
    half = decode_audio(wav[: len(wav) // 2])
    n = len(half)
    assert abs(n - len(speech) // 2) < 100
    np.testing.assert_allclose(half, speech[:n], atol=1.0 / 32768 + 1e-7)
    flac = encode(speech, "flac", "flac")
    part = decode_audio(flac[: len(flac) // 2])
    assert 0.3 * len(speech) < len(part) < 0.7 * len(speech)


def test_sample_rate_change_mid_stream(speech):
    # two MP3 streams at different rates back to back (as concatenated recordings come)
    first = encode(speech, "mp3", "libmp3lame")
    second = encode(speech, "mp3", "libmp3lame", codec_rate=8000)
    decoded = load_audio(first + second)
    # the second stream's header frame, encoder delay and padding are not trimmed
    assert decoded.duration_s == pytest.approx(2 * len(speech) / SAMPLE_RATE, abs=0.3)
    assert decoded.source_duration_s == pytest.approx(decoded.duration_s, abs=0.01)
    second_half = decoded.samples[len(speech) :]
    lag, corr = best_lag_correlation(lowpass(speech, 3400), lowpass(second_half, 3400)[: len(speech)], 3000)
    assert corr > 0.95


def test_max_duration(speech):
    wav = encode(speech, "wav", "pcm_s16le")
    with pytest.raises(AudioTooLongError, match="at most 1.0 s"):
        load_audio(wav, max_duration_s=1.0)
    assert issubclass(AudioTooLongError, AudioDecodeError)
    with pytest.raises(AudioTooLongError):
        pcm_to_float(b"\x00\x00" * 32000, SAMPLE_RATE, max_duration_s=1.0)
    assert len(decode_audio(wav, max_duration_s=10.0)) == len(speech)


def test_other_output_rate(speech):
    out = decode_audio(encode(speech, "flac", "flac"), sample_rate=8000)
    assert abs(len(out) - len(speech) // 2) <= 1
