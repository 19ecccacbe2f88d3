"""Voice activity detection with Silero VAD (ONNX Runtime) and segmentation into <= 30 s chunks.

Silero VAD (``tools/setup_vad.py`` puts ``silero_vad.onnx`` into ``build/vad/``) gives one
speech probability per 32 ms frame (512 samples at 16 kHz, plus the 64 samples before the
frame as context; a recurrent state carries over between frames).

Offline (:meth:`SileroVad.speech_probs`): a long recording is cut into blocks of
``BLOCK_FRAMES`` frames that run side by side as one batch (one ONNX Runtime call per frame
step for all blocks); each block first runs ``WARMUP_FRAMES`` frames of the audio before it
to settle the state, so the probabilities match a frame-by-frame pass closely. Blocks of
digital silence are not run at all.

Online (:class:`VadStream`): the same model frame by frame for StreamingRecognize.

:func:`plan_chunks` turns probabilities into what the recogniser decodes:

1. speech regions by hysteresis (``threshold`` to enter speech, ``neg_threshold`` to leave
   it for at least ``min_silence_ms``), regions shorter than ``min_speech_ms`` dropped;
2. each region padded by ``speech_pad_ms`` on both sides (pads of neighbours never overlap);
3. a padded region longer than ``max_segment_s`` is split at the quietest point (lowest
   frame energy, speech probability as tie-break) in the second half of each 30 s stretch,
   i.e. between words whenever there is a gap between words at all;
4. neighbouring pieces are packed into one chunk while the chunk's audio stays within
   ``max_segment_s``: the chunk's audio is the pieces joined end to end (silence longer than
   two pads is left out, as faster-whisper does), and :class:`SpeechChunk` maps chunk time
   back to the original recording.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000  # Hz; the model also takes 8 kHz, the gateway always feeds 16 kHz
FRAME_SAMPLES = 512  # samples per VAD frame at 16 kHz (32 ms)
CONTEXT_SAMPLES = 64  # samples of the previous frame prepended to each frame
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
STATE_SHAPE = (2, 128)  # recurrent state per batch row: [2, B, 128]
BLOCK_FRAMES = 256  # frames per block of the batched offline pass (8.2 s)
WARMUP_FRAMES = 16  # frames of preceding audio each block runs first (0.5 s)
MAX_BATCH_BLOCKS = 64  # blocks per ONNX Runtime call
# Threads that run a long recording's blocks side by side, each its share of the blocks on the one
# session (ONNX Runtime releases the GIL). A step costs in proportion to its blocks (one batch of
# 74 blocks or two of 64 + 10: both 1.3 s on the 10-minute bench recording, 2 cores; a second ORT
# thread per run was slower, 1.7 s: one-off measurements); `python -m bench.vad_workers`: 1.40 s
# on one thread, 0.70 s on two (bench/results/vad_workers.json); tests/test_vad.py asserts that
# the probabilities are identical.
VAD_WORKERS = 2
MIN_BLOCKS_PER_WORKER = 4  # (33 s of audio) below this a recording runs on the calling thread alone
SILENCE_PEAK = 1e-4  # blocks whose peak amplitude stays below this (-80 dBFS) are not run
MAX_SEGMENT_S = 30.0  # one Whisper window
ENERGY_HOP_SAMPLES = 160  # 10 ms hops for the "quietest point" search
ENERGY_WINDOW_HOPS = 5  # 50 ms energy window

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_PATH = PROJECT_ROOT / "build" / "vad" / "silero_vad.onnx"
MODEL_PATH_ENV = "ASR_VAD_MODEL"


class VadModelError(RuntimeError):
    """The Silero VAD model is missing or cannot be loaded."""


class VadOptionsError(ValueError):
    """Invalid VAD options."""


@dataclass(frozen=True)
class VadOptions:
    """Speech detection and segmentation settings (faster-whisper's ``VadOptions`` in spirit).

    threshold: speech probability at or above which a frame is speech.
    neg_threshold: probability below which speech is left (None: ``max(threshold - 0.15, 0.01)``).
    min_speech_ms: speech regions shorter than this are dropped.
    min_silence_ms: silence that ends a speech region (shorter pauses stay inside it).
    speech_pad_ms: audio kept on each side of a speech region.
    max_segment_s: longest chunk sent to the recogniser (at most 30 s, one Whisper window).
    """

    threshold: float = 0.5
    neg_threshold: float | None = None
    min_speech_ms: int = 250
    min_silence_ms: int = 500
    speech_pad_ms: int = 300
    max_segment_s: float = MAX_SEGMENT_S

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise VadOptionsError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 < self.neg_threshold <= self.threshold:
            raise VadOptionsError(
                f"neg_threshold must be in (0, threshold={self.threshold}], got {self.neg_threshold}"
            )
        for name in ("min_speech_ms", "min_silence_ms", "speech_pad_ms"):
            value = getattr(self, name)
            if not 0 <= value <= 10_000:
                raise VadOptionsError(f"{name} must be in 0..10000, got {value}")
        if not 1.0 <= self.max_segment_s <= MAX_SEGMENT_S:
            raise VadOptionsError(f"max_segment_s must be in 1..{MAX_SEGMENT_S:g}, got {self.max_segment_s}")
        if 2 * self.speech_pad_ms / 1000 >= self.max_segment_s / 2:
            raise VadOptionsError(
                f"speech_pad_ms {self.speech_pad_ms} is too large for max_segment_s {self.max_segment_s}"
            )

    @property
    def exit_threshold(self) -> float:
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)


@dataclass(frozen=True)
class SpeechChunk:
    """What one recogniser call decodes: pieces of the recording joined end to end.

    pieces: (start, end) sample ranges of the original audio, increasing, not overlapping.
    """

    pieces: tuple[tuple[int, int], ...]

    @property
    def start(self) -> int:
        return self.pieces[0][0]

    @property
    def end(self) -> int:
        return self.pieces[-1][1]

    @property
    def n_samples(self) -> int:
        return sum(e - s for s, e in self.pieces)

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE

    def audio(self, samples: np.ndarray) -> np.ndarray:
        if len(self.pieces) == 1:
            s, e = self.pieces[0]
            return samples[s:e]
        return np.concatenate([samples[s:e] for s, e in self.pieces])

    def frame_values(self, per_frame: np.ndarray) -> np.ndarray:
        """Per-frame values of the recording (frames of FRAME_SAMPLES) resampled onto the chunk's
        own frame grid: chunk frame j takes the value of the recording frame under its middle."""
        n = -(-self.n_samples // FRAME_SAMPLES)
        centres = np.arange(n, dtype=np.int64) * FRAME_SAMPLES + FRAME_SAMPLES // 2
        lengths = np.array([e - s for s, e in self.pieces], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        starts = np.array([s for s, _ in self.pieces], dtype=np.int64)
        piece = np.clip(np.searchsorted(offsets, centres, side="right") - 1, 0, len(self.pieces) - 1)
        original = np.minimum(starts[piece] + centres - offsets[piece], self.end - 1)
        return per_frame[np.clip(original // FRAME_SAMPLES, 0, per_frame.shape[0] - 1)]

    def joins_s(self) -> tuple[float, ...]:
        """Chunk times (s) where one piece ends and the next begins."""
        lengths = np.cumsum([e - s for s, e in self.pieces])[:-1]
        return tuple(float(x) / SAMPLE_RATE for x in lengths)

    def to_original_s(self, t: float, *, prefer_next: bool = True) -> float:
        """Chunk time (s) -> time in the original recording.

        A time exactly at a join maps to the start of the next piece (``prefer_next``, for
        starts) or to the end of the previous one (for ends). Times past the end clamp to it.
        """
        offset = max(0.0, t) * SAMPLE_RATE
        for i, (s, e) in enumerate(self.pieces):
            length = e - s
            last = i == len(self.pieces) - 1
            if offset < length or (offset == length and not prefer_next) or last:
                return (s + min(offset, length)) / SAMPLE_RATE
            offset -= length
        return self.end / SAMPLE_RATE


# --------------------------------------------------------------------------- model
class SileroVad:
    """Silero VAD's ONNX model in ONNX Runtime; thread-safe (one session, no shared state)."""

    def __init__(self, model_path: Path | str | None = None, *, intra_op_threads: int = 1,
                 workers: int = VAD_WORKERS) -> None:
        import onnxruntime as ort

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool = None  # ThreadPoolExecutor of workers - 1 threads, made on the first long recording
        self._pool_lock = threading.Lock()

        path = Path(model_path or os.environ.get(MODEL_PATH_ENV) or DEFAULT_MODEL_PATH)
        if not path.is_file():
            raise VadModelError(f"Silero VAD model {path} not found; run `python tools/setup_vad.py`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - any load failure is a model problem
            raise VadModelError(f"cannot load Silero VAD model {path}: {error}") from error
        names = {i.name for i in self._session.get_inputs()}
        if not {"input", "state", "sr"} <= names:
            raise VadModelError(f"{path} is not a Silero VAD v5+ model (inputs {sorted(names)})")
        self.model_path = path
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def run(self, frames: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step: frames [B, 64 + 512] (context + frame), state [2, B, 128] -> (probs [B], state)."""
        probs, state = self._session.run(
            None, {"input": np.ascontiguousarray(frames, dtype=np.float32), "state": state, "sr": self._sr}
        )
        return probs[:, 0], state

    def speech_probs(self, audio: np.ndarray, cancel: threading.Event | None = None) -> np.ndarray:
        """Speech probability per 512-sample frame of 16 kHz mono ``audio`` (batched blocks)."""
        audio = np.asarray(audio, dtype=np.float32)
        n_frames = -(-audio.shape[0] // FRAME_SAMPLES)
        probs = np.zeros(n_frames, dtype=np.float32)
        if n_frames == 0:
            return probs
        blocks = []
        for first in range(0, n_frames, BLOCK_FRAMES):
            last = min(first + BLOCK_FRAMES, n_frames)
            lo = max(0, (first - WARMUP_FRAMES) * FRAME_SAMPLES - CONTEXT_SAMPLES)
            if np.abs(audio[lo : last * FRAME_SAMPLES]).max(initial=0.0) < SILENCE_PEAK:
                continue  # digital silence: probability 0
            blocks.append((first, last))
        shares = max(1, min(self.workers, len(blocks) // MIN_BLOCKS_PER_WORKER))
        # interleaved shares: every share has blocks of the same length (the last block is short)
        parts = [blocks[i::shares] for i in range(shares)]
        others = [self._executor().submit(self._run_share, audio, part, probs, cancel) for part in parts[1:]]
        try:
            self._run_share(audio, parts[0], probs, cancel)
        finally:
            for future in others:
                future.result()
        return probs

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(1, self.workers - 1), thread_name_prefix="vad")
            return self._pool

    def _run_share(self, audio: np.ndarray, blocks: list[tuple[int, int]], probs: np.ndarray,
                   cancel: threading.Event | None) -> None:
        """Run these blocks (a share of one recording's) into ``probs``, MAX_BATCH_BLOCKS at a time."""
        for i in range(0, len(blocks), MAX_BATCH_BLOCKS):
            if cancel is not None and cancel.is_set():
                break
            self._run_blocks(audio, blocks[i : i + MAX_BATCH_BLOCKS], probs)

    def _run_blocks(self, audio: np.ndarray, blocks: list[tuple[int, int]], probs: np.ndarray) -> None:
        warm = [min(WARMUP_FRAMES, first) for first, _ in blocks]
        steps = max(w + (last - first) for w, (first, last) in zip(warm, blocks))
        width = CONTEXT_SAMPLES + steps * FRAME_SAMPLES
        batch = np.zeros((len(blocks), width), dtype=np.float32)
        for row, ((first, last), w) in enumerate(zip(blocks, warm)):
            begin = (first - w) * FRAME_SAMPLES - CONTEXT_SAMPLES  # context of the first frame
            src = audio[max(begin, 0) : last * FRAME_SAMPLES]
            offset = max(0, -begin)
            batch[row, offset : offset + src.shape[0]] = src
        state = np.zeros((STATE_SHAPE[0], len(blocks), STATE_SHAPE[1]), dtype=np.float32)
        out = np.zeros((len(blocks), steps), dtype=np.float32)
        for step in range(steps):
            a = step * FRAME_SAMPLES
            out[:, step], state = self.run(batch[:, a : a + CONTEXT_SAMPLES + FRAME_SAMPLES], state)
        for row, ((first, last), w) in enumerate(zip(blocks, warm)):
            probs[first:last] = out[row, w : w + (last - first)]

    def stream(self) -> VadStream:
        return VadStream(self)


class VadStream:
    """Frame-by-frame Silero VAD over audio that arrives in pieces (one stream, one state)."""

    def __init__(self, vad: SileroVad) -> None:
        self._vad = vad
        self._state = np.zeros((STATE_SHAPE[0], 1, STATE_SHAPE[1]), dtype=np.float32)
        self._pending = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)  # context + unprocessed samples
        self.frames_done = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Probabilities of the whole frames that ``samples`` completes (frame i covers samples
        [i * 512, (i + 1) * 512) of the stream)."""
        if samples.size:
            self._pending = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        n = (self._pending.shape[0] - CONTEXT_SAMPLES) // FRAME_SAMPLES
        probs = np.zeros(n, dtype=np.float32)
        for i in range(n):
            a = i * FRAME_SAMPLES
            p, self._state = self._vad.run(self._pending[None, a : a + CONTEXT_SAMPLES + FRAME_SAMPLES], self._state)
            probs[i] = p[0]
        if n:
            self._pending = self._pending[n * FRAME_SAMPLES :].copy()
            self.frames_done += n
        return probs


# --------------------------------------------------------------------------- segmentation
def speech_regions(probs: np.ndarray, n_samples: int, options: VadOptions) -> list[tuple[int, int]]:
    """Unpadded speech regions (start, end) in samples, by hysteresis over frame probabilities."""
    min_silence_frames = max(1, round(options.min_silence_ms / 1000 / FRAME_S))
    min_speech_samples = options.min_speech_ms / 1000 * SAMPLE_RATE
    enter, leave = options.threshold, options.exit_threshold
    regions = []
    start = None
    silence_from = None
    for i, p in enumerate(probs.tolist()):
        if start is None:
            if p >= enter:
                start, silence_from = i, None
            continue
        if p >= enter:
            silence_from = None
        elif p < leave:
            if silence_from is None:
                silence_from = i
            elif i - silence_from + 1 >= min_silence_frames:
                regions.append((start, silence_from))
                start, silence_from = None, None
    if start is not None:
        regions.append((start, silence_from if silence_from is not None else len(probs)))
    out = []
    for a, b in regions:
        s, e = a * FRAME_SAMPLES, min(b * FRAME_SAMPLES, n_samples)
        if e - s >= min_speech_samples and e > s:
            out.append((s, e))
    return out


def speech_mask(regions: list[tuple[int, int]], n_frames: int) -> np.ndarray:
    """Per-frame bool: inside a speech region."""
    mask = np.zeros(n_frames, dtype=bool)
    for s, e in regions:
        mask[s // FRAME_SAMPLES : -(-e // FRAME_SAMPLES)] = True
    return mask


def _pad(regions: list[tuple[int, int]], pad: int, n_samples: int) -> list[tuple[int, int]]:
    """Regions widened by ``pad`` on each side; regions whose pads meet become one piece."""
    merged: list[list[int]] = []
    for s, e in regions:
        lo, hi = max(0, s - pad), min(n_samples, e + pad)
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(s, e) for s, e in merged]


def quietest_point(audio: np.ndarray, probs: np.ndarray | None, lo: int, hi: int) -> int:
    """Sample in [lo, hi) where the audio is quietest (10 ms hops, 50 ms energy window), the
    VAD probability breaking ties; the latest of equally quiet points wins (longer chunks)."""
    lo = max(0, lo)
    hi = min(audio.shape[0], hi)
    if hi - lo < 2 * ENERGY_HOP_SAMPLES:
        return max(lo, hi - 1)
    n = (hi - lo) // ENERGY_HOP_SAMPLES
    frames = audio[lo : lo + n * ENERGY_HOP_SAMPLES].reshape(n, ENERGY_HOP_SAMPLES)
    energy = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / ENERGY_HOP_SAMPLES
    kernel = np.ones(ENERGY_WINDOW_HOPS) / ENERGY_WINDOW_HOPS
    smooth = np.convolve(energy, kernel, mode="same")
    cost = 10 * np.log10(smooth + 1e-10)
    if probs is not None and probs.size:
        centres = (lo + (np.arange(n) + 0.5) * ENERGY_HOP_SAMPLES).astype(np.int64) // FRAME_SAMPLES
        cost = cost + 3.0 * probs[np.clip(centres, 0, probs.shape[0] - 1)]  # 3 dB per unit of probability
    best = n - 1 - int(np.argmin(cost[::-1]))
    return lo + best * ENERGY_HOP_SAMPLES + ENERGY_HOP_SAMPLES // 2


def _split_long(piece: tuple[int, int], audio: np.ndarray, probs: np.ndarray, max_len: int) -> list[tuple[int, int]]:
    s, e = piece
    out = []
    while e - s > max_len:
        cut = quietest_point(audio, probs, s + max_len // 2, s + max_len)
        cut = min(max(cut, s + 1), s + max_len)
        out.append((s, cut))
        s = cut
    out.append((s, e))
    return out


def plan_chunks(audio: np.ndarray, probs: np.ndarray, options: VadOptions) -> tuple[list[SpeechChunk], list[tuple[int, int]]]:
    """Chunks of at most ``max_segment_s`` covering the speech of ``audio`` (see module doc),
    and the unpadded speech regions they came from."""
    n_samples = audio.shape[0]
    regions = speech_regions(probs, n_samples, options)
    pad = int(options.speech_pad_ms / 1000 * SAMPLE_RATE)
    max_len = int(options.max_segment_s * SAMPLE_RATE)
    pieces = []
    for piece in _pad(regions, pad, n_samples):
        pieces.extend(_split_long(piece, audio, probs, max_len))
    chunks: list[list[tuple[int, int]]] = []
    length = 0
    for s, e in pieces:
        if chunks and length + (e - s) <= max_len:
            last = chunks[-1][-1]
            if s == last[1]:  # a piece split off a long region continues the previous one
                chunks[-1][-1] = (last[0], e)
            else:
                chunks[-1].append((s, e))
            length += e - s
        else:
            chunks.append([(s, e)])
            length = e - s
    return [SpeechChunk(tuple(c)) for c in chunks], regions


def fixed_windows(n_samples: int, window_s: float = MAX_SEGMENT_S) -> list[SpeechChunk]:
    """Consecutive windows covering every sample (VAD disabled)."""
    size = int(window_s * SAMPLE_RATE)
    return [SpeechChunk(((s, min(s + size, n_samples)),)) for s in range(0, n_samples, size)]
