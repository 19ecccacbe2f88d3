"""gateway.asr.vad: Silero VAD through ONNX Runtime, speech regions and <= 30 s chunks (no Triton)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from gateway.asr.vad import (
    FRAME_S,
    FRAME_SAMPLES,
    MAX_SEGMENT_S,
    SAMPLE_RATE,
    SileroVad,
    SpeechChunk,
    VadModelError,
    VadOptions,
    VadOptionsError,
    fixed_windows,
    plan_chunks,
    quietest_point,
    speech_regions,
)
from tests.conftest import load_clip_audio, sample_clips

CLIPS = sample_clips()


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    return {c.name: load_clip_audio(c.path) for c in CLIPS}


def noise(n: int, level: float = 0.002, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(0.0, level, n)).astype(np.float32)


def place(clips: dict[str, np.ndarray], names: list[str], gaps_s: list[float]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Clips separated by silence (gaps_s[i] before clip i, the last gap after the last clip)."""
    parts, spans, t = [], [], 0
    for name, gap in zip(names, gaps_s):
        parts.append(np.zeros(int(gap * SAMPLE_RATE), np.float32))
        t += len(parts[-1])
        parts.append(clips[name])
        spans.append((t / SAMPLE_RATE, (t + len(clips[name])) / SAMPLE_RATE))
        t += len(clips[name])
    parts.append(np.zeros(int(gaps_s[-1] * SAMPLE_RATE), np.float32))
    audio = np.concatenate(parts)
    return audio + noise(len(audio)), spans


def test_options_are_validated():
    options = VadOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.threshold = 0.3  # type: ignore[misc]
    assert options.max_segment_s == MAX_SEGMENT_S and options.exit_threshold == pytest.approx(0.35)
    for bad in (
        dict(max_segment_s=31.0),
        dict(max_segment_s=0.5),
        dict(threshold=0.0),
        dict(threshold=1.0),
        dict(neg_threshold=0.7),
        dict(min_silence_ms=-1),
        dict(speech_pad_ms=20_000),
        dict(speech_pad_ms=5000, max_segment_s=10.0),
    ):
        with pytest.raises(VadOptionsError):
            VadOptions(**bad)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(VadModelError, match="setup_vad"):
        SileroVad(tmp_path / "nope.onnx")


def test_probabilities_follow_speech(vad, clips):
    audio, spans = place(clips, ["zh/pangrama", "en/quick_brown_fox"], [2.0, 3.0, 2.0])
    probs = vad.speech_probs(audio)
    assert probs.shape == (-(-len(audio) // FRAME_SAMPLES),)
    t = (np.arange(len(probs)) + 0.5) * FRAME_S
    in_speech = np.zeros(len(probs), bool)
    for a, b in spans:
        in_speech |= (t >= a + 0.3) & (t <= b - 0.4)
    silent = np.ones(len(probs), bool)
    for a, b in spans:
        silent &= (t < a - 0.2) | (t > b + 0.4)
    assert np.mean(probs[in_speech] >= 0.5) > 0.8
    assert np.mean(probs[silent] < 0.5) > 0.97


def test_batched_pass_matches_frame_by_frame(vad, clips):
    audio, _ = place(clips, [c.name for c in CLIPS] * 2, [1.0] * (2 * len(CLIPS)) + [1.0])
    batched = vad.speech_probs(audio)
    stream = vad.stream()
    sequential = np.concatenate([stream.push(audio[i : i + 1600]) for i in range(0, len(audio), 1600)])
    n = len(sequential)
    assert n >= len(batched) - 1
    agree = np.mean((batched[:n] >= 0.5) == (sequential >= 0.5))
    assert agree > 0.98, agree
    assert float(np.mean(np.abs(batched[:n] - sequential))) < 0.03


def test_a_long_recording_split_between_threads_gives_the_same_probabilities(clips):
    audio, _ = place(clips, [c.name for c in CLIPS] * 4, [1.0] * (4 * len(CLIPS)) + [1.0])
    one, three = SileroVad(workers=1), SileroVad(workers=3)
    alone = one.speech_probs(audio)
    shared = three.speech_probs(audio)
    assert three._pool is not None, "the recording was long enough to be shared between the threads"
    np.testing.assert_array_equal(shared, alone)
    short = audio[: 10 * SAMPLE_RATE]  # one block: the calling thread alone
    lone = SileroVad(workers=3)
    np.testing.assert_array_equal(lone.speech_probs(short), one.speech_probs(short))
    assert lone._pool is None, "a short recording runs on the calling thread alone"
    with pytest.raises(ValueError, match="workers"):
        SileroVad(workers=0)


def test_digital_silence_is_skipped(vad):
    audio = np.zeros(SAMPLE_RATE * 600, np.float32)  # 10 minutes
    started = time.perf_counter()
    probs = vad.speech_probs(audio)
    assert time.perf_counter() - started < 2.0
    assert not probs.any()
    chunks, regions = plan_chunks(audio, probs, VadOptions())
    assert chunks == [] and regions == []


def test_regions_and_chunks_cover_each_clip(vad, clips):
    names = ["zh/jishu", "en/hello_world", "zh/pangrama", "en/counting", "zh/nihao_shijie", "en/quick_brown_fox"]
    audio, spans = place(clips, names, [1.5, 4.0, 2.5, 8.0, 3.0, 5.0, 2.0])
    options = VadOptions()
    probs = vad.speech_probs(audio)
    chunks, regions = plan_chunks(audio, probs, options)
    assert len(regions) == len(spans)
    for (a, b), (s, e) in zip(spans, regions):
        # the clips begin with ~50 ms of silence and end with ~0.3 s of it
        assert a - 0.1 <= s / SAMPLE_RATE <= a + 0.3 and b - 0.6 <= e / SAMPLE_RATE <= b + 0.2
    pieces = [p for c in chunks for p in c.pieces]
    assert all(p[0] < p[1] for p in pieces)
    assert all(x[1] <= y[0] for x, y in zip(pieces, pieces[1:])), "pieces overlap or go backwards"
    for c in chunks:
        assert c.n_samples <= options.max_segment_s * SAMPLE_RATE
    for s, e in regions:  # every speech sample is in some chunk
        assert any(p[0] <= s and e <= p[1] for p in pieces)
    # silence longer than two pads is left out of the chunks
    kept = sum(c.n_samples for c in chunks) / SAMPLE_RATE
    assert kept < len(audio) / SAMPLE_RATE - 15


def test_max_segment_packs_and_splits(vad, clips):
    names = [c.name for c in CLIPS] * 3
    audio, _ = place(clips, names, [1.0] * len(names) + [1.0])
    probs = vad.speech_probs(audio)
    for max_s in (5.0, 12.0, 30.0):
        chunks, _ = plan_chunks(audio, probs, VadOptions(max_segment_s=max_s))
        assert all(c.n_samples <= max_s * SAMPLE_RATE for c in chunks)
        assert len(chunks) >= (len(audio) / SAMPLE_RATE * 0.5) / max_s


def test_long_speech_is_split_at_quiet_points(vad, clips):
    """70 s of speech with no pause VAD would end a region on: cut between words, not in one."""
    order = ["zh/pangrama", "en/quick_brown_fox", "zh/jishu", "en/counting", "zh/nihao_shijie", "en/hello_world"]
    speech = np.concatenate([clips[n] for n in order * 4])
    audio = speech + noise(len(speech))
    options = VadOptions(min_silence_ms=3000)  # pauses inside the clips never end a region
    probs = vad.speech_probs(audio)
    chunks, regions = plan_chunks(audio, probs, options)
    assert len(regions) == 1 and regions[0][1] - regions[0][0] > 60 * SAMPLE_RATE
    assert len(chunks) >= 3 and all(c.n_samples <= 30 * SAMPLE_RATE for c in chunks)
    # chunks are contiguous (nothing dropped) and every cut is quiet
    frame = 800  # 50 ms
    energy = np.convolve(audio**2, np.ones(frame) / frame, mode="same")
    loud = np.median(energy[energy > np.percentile(energy, 30)])
    for left, right in zip(chunks, chunks[1:]):
        cut = left.end
        assert right.start == cut
        assert energy[cut] < 0.05 * loud, f"cut at {cut / SAMPLE_RATE:.2f} s is not quiet"


def test_quietest_point_prefers_silence():
    rng = np.random.default_rng(1)
    audio = rng.normal(0, 0.1, SAMPLE_RATE * 10).astype(np.float32)
    audio[int(6.2 * SAMPLE_RATE) : int(6.4 * SAMPLE_RATE)] *= 0.01
    cut = quietest_point(audio, None, 5 * SAMPLE_RATE, 9 * SAMPLE_RATE)
    assert 6.2 <= cut / SAMPLE_RATE <= 6.4


def test_hysteresis_keeps_short_pauses_inside_a_region():
    probs = np.array([0.0] * 10 + [0.9] * 20 + [0.1] * 5 + [0.9] * 20 + [0.1] * 40, np.float32)
    n = len(probs) * FRAME_SAMPLES
    (region,) = speech_regions(probs, n, VadOptions(min_silence_ms=300, min_speech_ms=0))
    assert region == (10 * FRAME_SAMPLES, 55 * FRAME_SAMPLES)
    assert len(speech_regions(probs, n, VadOptions(min_silence_ms=100, min_speech_ms=0))) == 2
    # between the thresholds counts as speech continuing
    probs2 = np.array([0.9] * 10 + [0.4] * 30 + [0.0] * 40, np.float32)
    (region2,) = speech_regions(probs2, len(probs2) * FRAME_SAMPLES, VadOptions(min_speech_ms=0))
    assert region2 == (0, 40 * FRAME_SAMPLES)
    # too short speech is dropped
    assert speech_regions(np.array([0.0, 0.9, 0.9, 0.0] + [0.0] * 30, np.float32), 34 * FRAME_SAMPLES, VadOptions()) == []


def test_chunk_time_maps_back_to_the_recording():
    chunk = SpeechChunk(((16000, 48000), (160000, 176000)))
    assert chunk.n_samples == 48000
    assert chunk.to_original_s(0.0) == pytest.approx(1.0)
    assert chunk.to_original_s(1.5) == pytest.approx(2.5)
    assert chunk.to_original_s(2.0, prefer_next=True) == pytest.approx(10.0)
    assert chunk.to_original_s(2.0, prefer_next=False) == pytest.approx(3.0)
    assert chunk.to_original_s(2.5) == pytest.approx(10.5)
    assert chunk.to_original_s(99.0) == pytest.approx(11.0)
    samples = np.arange(200000, dtype=np.float32)
    np.testing.assert_array_equal(chunk.audio(samples), np.concatenate([samples[16000:48000], samples[160000:176000]]))
    windows = fixed_windows(16000 * 65)
    assert [w.start for w in windows] == [0, 480000, 960000] and windows[-1].end == 16000 * 65
