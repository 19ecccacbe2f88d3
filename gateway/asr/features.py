"""Whisper log-mel features in numpy.

Matches ``transformers.WhisperFeatureExtractor`` (and openai-whisper's
``log_mel_spectrogram``): 16 kHz audio zero-padded to 30 s, periodic Hann
window of 400 samples, hop 160, centred frames with reflect padding, power
spectrum, Slaney mel filters, log10 clamped to 8 decades below the maximum,
then ``(x + 4) / 4``. 3000 frames per window.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

SAMPLE_RATE = 16000  # Hz
N_FFT = 400  # samples per analysis window (25 ms)
HOP_LENGTH = 160  # samples between frames (10 ms)
CHUNK_LENGTH_S = 30  # seconds per model window
N_SAMPLES = CHUNK_LENGTH_S * SAMPLE_RATE  # 480000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames per window
N_FREQS = N_FFT // 2 + 1  # 201 rfft bins
MEL_FMIN_HZ = 0.0
MEL_FMAX_HZ = SAMPLE_RATE / 2
SUPPORTED_N_MELS = (80, 128)

LOG_FLOOR = 1e-10  # power floor before log10
DYNAMIC_RANGE_DECADES = 8.0  # values below max - 8 are clamped

_PAD = N_FFT // 2  # centre padding on each side (reflect)
_FRAMES_PER_BLOCK = 256  # frames per FFT block


class FeatureError(ValueError):
    """Invalid input to the feature extractor."""


class AudioTooLongForWindowError(FeatureError):
    """Audio longer than one 30 s window; segment it first (VAD)."""

    def __init__(self, n_samples: int):
        self.n_samples = n_samples
        super().__init__(
            f"audio has {n_samples} samples ({n_samples / SAMPLE_RATE:.2f} s); "
            f"at most {N_SAMPLES} ({CHUNK_LENGTH_S} s) fit one window: segment it first"
        )


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    min_log_hz = 1000.0
    min_log_mel = 15.0
    logstep = 27.0 / np.log(6.4)
    mels = 3.0 * freq / 200.0
    log_region = freq >= min_log_hz
    mels[log_region] = min_log_mel + np.log(freq[log_region] / min_log_hz) * logstep
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    min_log_hz = 1000.0
    min_log_mel = 15.0
    logstep = np.log(6.4) / 27.0
    freq = 200.0 * mels / 3.0
    log_region = mels >= min_log_mel
    freq[log_region] = min_log_hz * np.exp(logstep * (mels[log_region] - min_log_mel))
    return freq


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int = 80) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters, float32 [n_mels, N_FREQS].

    Computed in float64 like librosa / transformers, then cast. Cached and read-only.
    """
    if n_mels not in SUPPORTED_N_MELS:
        raise FeatureError(f"n_mels must be one of {SUPPORTED_N_MELS}, got {n_mels}")
    mel_min, mel_max = _hz_to_mel_slaney(np.array([MEL_FMIN_HZ, MEL_FMAX_HZ]))
    mel_points = np.linspace(mel_min, mel_max, n_mels + 2)
    filter_hz = _mel_to_hz_slaney(mel_points)  # [n_mels + 2]
    fft_hz = np.linspace(0, SAMPLE_RATE // 2, N_FREQS)  # [N_FREQS]

    widths = np.diff(filter_hz)  # [n_mels + 1]
    slopes = filter_hz[None, :] - fft_hz[:, None]  # [N_FREQS, n_mels + 2]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    weights = np.maximum(0.0, np.minimum(down, up))  # [N_FREQS, n_mels]
    weights *= 2.0 / (filter_hz[2 : n_mels + 2] - filter_hz[:n_mels])  # Slaney norm
    filters = np.ascontiguousarray(weights.T, dtype=np.float32)
    filters.flags.writeable = False
    return filters


@functools.lru_cache(maxsize=None)
def _hann_window() -> np.ndarray:
    # periodic Hann, as torch.hann_window(N_FFT) and transformers' window_function
    window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)
    window.flags.writeable = False
    return window


def _as_mono_float32(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise FeatureError(f"expected mono audio of shape [n_samples], got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise FeatureError(f"expected float audio in [-1, 1], got dtype {audio.dtype}")
    if audio.shape[0] > N_SAMPLES:
        raise AudioTooLongForWindowError(audio.shape[0])
    return audio.astype(np.float32, copy=False)


def _mel_power(audio: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Mel power [N_FRAMES, n_mels] of one window of float32 audio (<= N_SAMPLES)."""
    n = audio.shape[0]
    n_mels = filters.shape[0]
    # Frames whose span [i*HOP - PAD, i*HOP + PAD) lies wholly in the zero padding
    # after the audio have zero power: compute only the frames that touch audio.
    n_active = min(N_FRAMES, -(-(n + _PAD) // HOP_LENGTH)) if n else 0
    mel = np.zeros((N_FRAMES, n_mels), dtype=np.float32)
    if n_active == 0:
        return mel

    # Zero-pad to the window length, then reflect-pad by N_FFT // 2 on both sides
    # (torch.stft(center=True)); only the part that active frames read is built.
    span = (n_active - 1) * HOP_LENGTH + N_FFT  # padded samples read by active frames
    padded = np.zeros(span, dtype=np.float32)
    body_len = min(span - _PAD, N_SAMPLES, n)
    padded[_PAD : _PAD + body_len] = audio[:body_len]
    head = np.zeros(_PAD + 1, dtype=np.float32)  # x[0 : PAD + 1] of the zero-padded window
    head[: min(n, _PAD + 1)] = audio[: _PAD + 1]
    padded[:_PAD] = head[:0:-1]  # x[PAD], ..., x[1]
    tail = span - _PAD - N_SAMPLES
    if tail > 0:  # x[N - 2], x[N - 3], ... of the zero-padded window
        start = N_SAMPLES - 1 - tail
        seg = np.zeros(tail, dtype=np.float32)
        avail = audio[start : N_SAMPLES - 1]
        seg[: avail.shape[0]] = avail
        padded[_PAD + N_SAMPLES :] = seg[::-1]

    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    window = _hann_window()
    # Blocks of frames keep the FFT working set in cache (about 1.5x faster than
    # one rfft over all 3000 frames).
    for start in range(0, n_active, _FRAMES_PER_BLOCK):
        stop = min(start + _FRAMES_PER_BLOCK, n_active)
        spectrum = np.fft.rfft(frames[start:stop] * window, axis=-1)  # complex64 [F, N_FREQS]
        power = spectrum.real**2 + spectrum.imag**2
        np.matmul(power, filters.T, out=mel[start:stop])
    return mel


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Log-mel features float32 [n_mels, N_FRAMES] of 16 kHz mono audio of at most 30 s.

    Raises AudioTooLongForWindowError for longer audio and FeatureError for other bad input.
    """
    filters = mel_filters(n_mels)
    audio = _as_mono_float32(audio)
    mel = _mel_power(audio, filters)
    log_spec = np.log10(np.maximum(mel, LOG_FLOOR, out=mel), out=mel)
    np.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE_DECADES, out=log_spec)
    log_spec += 4.0
    log_spec /= 4.0
    return np.ascontiguousarray(log_spec.T)


def log_mel_spectrogram_batch(audios: Sequence[np.ndarray], n_mels: int = 80) -> np.ndarray:
    """Features float32 [B, n_mels, N_FRAMES] for several clips (each normalised on its own)."""
    out = np.empty((len(audios), n_mels, N_FRAMES), dtype=np.float32)
    for i, audio in enumerate(audios):
        out[i] = log_mel_spectrogram(audio, n_mels)
    return out
