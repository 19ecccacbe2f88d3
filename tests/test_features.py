"""gateway.asr.features against transformers' WhisperFeatureExtractor (constructed locally)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from gateway.asr.audio import decode_audio
from gateway.asr.features import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    AudioTooLongForWindowError,
    FeatureError,
    log_mel_spectrogram,
    log_mel_spectrogram_batch,
    mel_filters,
)

TOLERANCE = 1e-4  # max abs difference allowed against transformers


def _clip_paths() -> list[Path]:
    import pytest_audioeval  # a namespace package: no __file__

    root = Path(next(iter(pytest_audioeval.__path__))).resolve() / "samples" / "audio"
    return sorted(root.glob("zh/*.wav")) + sorted(root.glob("en/*.wav"))


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    return {f"{p.parent.name}/{p.stem}": decode_audio(p.read_bytes()) for p in _clip_paths()}


@pytest.fixture(scope="module")
def full_window(clips) -> np.ndarray:
    """Exactly 30 s of real speech: the clips repeated."""
    speech = np.concatenate(list(clips.values()))
    return np.resize(speech, N_SAMPLES).astype(np.float32)


@pytest.fixture(scope="module", params=[80, 128])
def extractor(request):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=request.param)


def reference(extractor, audio: np.ndarray) -> np.ndarray:
    return extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]


def signals(clips, full_window) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = dict(clips)
    out["silence_1s"] = np.zeros(SAMPLE_RATE, np.float32)
    out["full_30s"] = full_window
    out["almost_30s"] = full_window[: N_SAMPLES - 123]
    out["noise_30s"] = (0.1 * rng.standard_normal(N_SAMPLES)).astype(np.float32)
    out["tiny_50_samples"] = full_window[:50]
    out["clipped_loud"] = np.clip(full_window[: 5 * SAMPLE_RATE] * 30, -1, 1)
    out["very_quiet"] = full_window[: 5 * SAMPLE_RATE] * 1e-4
    return out


def test_matches_transformers(extractor, clips, full_window):
    n_mels = extractor.feature_size
    worst = {}
    for name, audio in signals(clips, full_window).items():
        ours = log_mel_spectrogram(audio, n_mels=n_mels)
        assert ours.shape == (n_mels, N_FRAMES) and ours.dtype == np.float32
        assert ours.flags.c_contiguous
        worst[name] = float(np.abs(ours - reference(extractor, audio)).max())
    print(f"\nn_mels={n_mels} max abs diff: " + ", ".join(f"{k}={v:.1e}" for k, v in worst.items()))
    assert max(worst.values()) < TOLERANCE, worst


def test_matches_transformers_numpy_path(extractor, clips, full_window):
    """transformers' float64 numpy STFT (used when torch is absent) agrees too."""
    for audio in (clips["zh/pangrama"], full_window):
        padded = np.zeros((1, N_SAMPLES), np.float32)
        padded[0, : len(audio)] = audio
        expected = extractor._np_extract_fbank_features(padded, "cpu")[0]
        ours = log_mel_spectrogram(audio, n_mels=extractor.feature_size)
        assert np.abs(ours - expected).max() < 2e-5


def test_mel_filters_match_transformers(extractor):
    ours = mel_filters(extractor.feature_size)
    assert ours.shape == (extractor.feature_size, 201) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, extractor.mel_filters.T.astype(np.float32), rtol=1e-6, atol=1e-9)
    assert mel_filters(extractor.feature_size) is ours  # cached
    assert not ours.flags.writeable


def test_silence(extractor):
    ours = log_mel_spectrogram(np.zeros(SAMPLE_RATE, np.float32), n_mels=extractor.feature_size)
    # log10(1e-10) = -10 everywhere -> (-10 + 4) / 4
    np.testing.assert_allclose(ours, -1.5, atol=1e-6)
    empty = log_mel_spectrogram(np.zeros(0, np.float32), n_mels=extractor.feature_size)
    np.testing.assert_array_equal(empty, ours)


def test_dtype_and_layout_inputs(clips):
    audio = clips["zh/pangrama"]
    expected = log_mel_spectrogram(audio)
    np.testing.assert_allclose(log_mel_spectrogram(audio.astype(np.float64)), expected, atol=1e-6)
    strided = np.repeat(audio, 2)[::2]  # non-contiguous view
    np.testing.assert_array_equal(log_mel_spectrogram(strided), expected)


def test_too_long_raises():
    with pytest.raises(AudioTooLongForWindowError, match="30.00 s") as excinfo:
        log_mel_spectrogram(np.zeros(N_SAMPLES + 1, np.float32))
    assert excinfo.value.n_samples == N_SAMPLES + 1
    assert isinstance(excinfo.value, ValueError)
    log_mel_spectrogram(np.zeros(N_SAMPLES, np.float32))  # exactly 30 s is fine


def test_bad_input():
    with pytest.raises(FeatureError, match="mono"):
        log_mel_spectrogram(np.zeros((2, 16000), np.float32))
    with pytest.raises(FeatureError, match="float"):
        log_mel_spectrogram(np.zeros(16000, np.int16))
    with pytest.raises(FeatureError, match="n_mels"):
        log_mel_spectrogram(np.zeros(16000, np.float32), n_mels=64)


def test_batch(clips, full_window):
    audios = [clips["zh/pangrama"], full_window, np.zeros(100, np.float32)]
    batch = log_mel_spectrogram_batch(audios, n_mels=128)
    assert batch.shape == (3, 128, N_FRAMES) and batch.dtype == np.float32
    for i, audio in enumerate(audios):  # each clip normalised on its own
        np.testing.assert_array_equal(batch[i], log_mel_spectrogram(audio, n_mels=128))
    assert log_mel_spectrogram_batch([], n_mels=80).shape == (0, 80, N_FRAMES)


def _best_times(fns: dict, rounds: int = 15) -> dict[str, float]:
    """Best wall time of each function, calls interleaved so that load hits all alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def test_speed_against_transformers(full_window, clips):
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=80)
    best = _best_times(
        {
            "ours": lambda: log_mel_spectrogram(full_window),
            "transformers": lambda: reference(extractor, full_window),
            "ours_4s": lambda: log_mel_spectrogram(clips["zh/pangrama"]),
        }
    )
    ours, theirs = best["ours"], best["transformers"]
    print(
        f"\nlog_mel 30 s: ours {ours * 1e3:.2f} ms, transformers {theirs * 1e3:.2f} ms "
        f"(ratio {theirs / ours:.2f}x); 4 s clip: {best['ours_4s'] * 1e3:.2f} ms"
    )
    # a guard against gross regressions only (shared CI machines); the printed ratio is the figure
    assert ours < 4 * theirs
