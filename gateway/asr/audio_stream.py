"""Audio that arrives in pieces (StreamingRecognize) -> 16 kHz mono float32.

:class:`PcmStream`: raw PCM at a declared rate; :class:`ContainerStream`: an encoded byte
stream demuxed by FFmpeg in a worker thread. Both resample and check frames the way
:mod:`gateway.asr.audio` does for whole files.
"""

from __future__ import annotations

import threading

import av
import numpy as np

# the shared pieces of the whole-file decoder (package-internal helpers)
from gateway.asr.audio import (
    _S16_SCALE,
    ALLOWED_DEMUXERS,
    MAX_CONTAINER_CHANNELS,
    RESAMPLE_FORMAT,
    SAMPLE_RATE,
    AudioDecodeError,
    PacketErrors,
    _bound_amplitude,
    _check_finite,
    _check_header,
    _check_sample_rate,
    _frame_channels,
    _open_error,
    _pcm_dtype,
    frames_of,
)


class _StreamResampler:
    """Incremental mono resampler: frames in, the 16 kHz samples they produced out."""

    def __init__(self, rate: int):
        self.rate = rate
        self._resampler: av.AudioResampler | None = None
        self._key: tuple | None = None

    def push(self, frame: av.AudioFrame | None) -> np.ndarray:
        parts = []
        if frame is not None:
            key = (frame.format.name, frame.layout.name, frame.sample_rate)
            if key != self._key:
                parts.extend(self._drain(None))
                self._resampler = av.AudioResampler(format=RESAMPLE_FORMAT, rate=self.rate)
                self._key = key
            parts.extend(self._drain(frame))
        else:
            parts.extend(self._drain(None))
            self._resampler = None
            self._key = None
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _drain(self, frame: av.AudioFrame | None) -> list[np.ndarray]:
        if self._resampler is None:
            return []
        out = []
        for resampled in self._resampler.resample(frame):
            planes = _frame_channels(resampled)
            out.append(planes[0] if planes.shape[0] == 1 else planes.mean(axis=0, dtype=np.float32))
        return out


class PcmStream:
    """Raw interleaved PCM arriving in pieces -> mono float32 at ``target_sample_rate``.

    Pieces need not end on a frame boundary (the rest is kept for the next piece).
    """

    def __init__(
        self,
        sample_rate: int,
        encoding: str = "s16le",
        channels: int = 1,
        *,
        target_sample_rate: int = SAMPLE_RATE,
    ) -> None:
        self.dtype = _pcm_dtype(encoding, sample_rate, channels, target_sample_rate)
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.channels = channels
        self.target_sample_rate = target_sample_rate
        self.source_samples = 0  # frames (per channel) received so far
        self._frame_bytes = self.dtype.itemsize * channels
        self._rest = b""
        self._resampler = None if sample_rate == target_sample_rate else _StreamResampler(target_sample_rate)

    @property
    def source_duration_s(self) -> float:
        return self.source_samples / self.sample_rate

    def feed(self, data: bytes) -> np.ndarray:
        """Samples (at the target rate) that ``data`` completes; may be empty."""
        data = self._rest + data if self._rest else data
        whole = len(data) - len(data) % self._frame_bytes
        self._rest = data[whole:]
        if whole == 0:
            return np.zeros(0, dtype=np.float32)
        interleaved = np.frombuffer(data[:whole], dtype=self.dtype).reshape(-1, self.channels)
        if self.encoding == "f32le":
            _check_finite(interleaved, "f32le PCM")
        mono = interleaved[:, 0].astype(np.float32) if self.channels == 1 else interleaved.mean(axis=1, dtype=np.float32)
        if self.dtype.kind == "i":
            mono *= np.float32(_S16_SCALE)
        self.source_samples += mono.shape[0]
        _bound_amplitude(mono)
        if self._resampler is None:
            return mono
        frame = av.AudioFrame.from_ndarray(mono[None], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        return self._resampler.push(frame)

    def finish(self) -> np.ndarray:
        """The resampler's tail; a trailing partial frame is dropped."""
        self._rest = b""
        return self._resampler.push(None) if self._resampler is not None else np.zeros(0, dtype=np.float32)


class _BytePipe:
    """File-like object FFmpeg reads from while another thread writes into it."""

    def __init__(self, max_buffered_bytes: int) -> None:
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._closed = False
        self._aborted = False
        self._cond = threading.Condition()
        self.max_buffered_bytes = max_buffered_bytes
        self.bytes_read = 0

    def write(self, data: bytes) -> None:
        with self._cond:
            if self._buffered + len(data) > self.max_buffered_bytes:
                raise AudioDecodeError(
                    f"the decoder is more than {self.max_buffered_bytes} bytes behind the stream"
                )
            self._chunks.append(data)
            self._buffered += len(data)
            self._cond.notify_all()

    def close(self, abort: bool = False) -> None:
        with self._cond:
            self._closed = True
            self._aborted = self._aborted or abort
            self._cond.notify_all()

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            while not self._chunks and not self._closed:
                self._cond.wait()
            if self._aborted or not self._chunks:
                return b""
            data = b"".join(self._chunks)
            if n is None or n < 0 or n >= len(data):
                self._chunks = []
            else:
                self._chunks = [data[n:]]
                data = data[:n]
            self._buffered -= len(data)
            self.bytes_read += len(data)
            return data


class ContainerStream:
    """An encoded byte stream (OGG/Opus, MP3, WAV, AMR, ADTS AAC, FLAC, WebM, ...) arriving
    in pieces -> mono float32 at ``target_sample_rate``.

    FFmpeg demuxes and decodes in a worker thread that reads from a pipe; ``feed`` writes a
    piece and returns whatever has been decoded since the last call (decoding runs behind the
    writes by a little). ``container`` names the FFmpeg demuxer; empty means probe (which
    reads a few KB before the first samples come out). Corrupt packets are skipped.
    """

    def __init__(
        self,
        container: str = "",
        *,
        target_sample_rate: int = SAMPLE_RATE,
        max_buffered_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        container = container.strip().lower()
        if container and container not in ALLOWED_DEMUXERS.split(","):
            raise AudioDecodeError(
                f"unknown container {container!r}; expected one of {ALLOWED_DEMUXERS}"
            )
        _check_sample_rate(target_sample_rate, "target_sample_rate")
        self.container = container or None
        self.target_sample_rate = target_sample_rate
        self.codec = ""
        self.source_sample_rate = 0
        self.source_channels = 0
        self.source_duration_s = 0.0
        self._errors = PacketErrors()  # corrupt packets skipped (corrupt_packets)
        self._pipe = _BytePipe(max_buffered_bytes)
        self._out: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._error: AudioDecodeError | None = None
        self._thread = threading.Thread(target=self._run, name="audio-stream-decoder", daemon=True)
        self._thread.start()

    @property
    def corrupt_packets(self) -> int:
        return self._errors.count

    def feed(self, data: bytes) -> np.ndarray:
        self._raise_error()
        if data:
            self._pipe.write(data)
        return self._take()

    def finish(self, timeout_s: float = 30.0) -> np.ndarray:
        """End of input: waits for the decoder to drain and returns the remaining samples."""
        self._pipe.close()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.close()
            raise AudioDecodeError(f"decoding the end of the stream took more than {timeout_s:.0f} s")
        self._raise_error()
        return self._take()

    def close(self) -> None:
        """Abandon the stream (cancellation): the worker stops at its next read."""
        self._pipe.close(abort=True)

    def _take(self) -> np.ndarray:
        with self._lock:
            parts, self._out = self._out, []
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _emit(self, samples: np.ndarray) -> None:
        if samples.size:
            if not np.isfinite(np.sum(samples, dtype=np.float64)):
                raise AudioDecodeError(f"decoded {self.codec} audio contains NaN/Inf samples")
            _bound_amplitude(samples)
            with self._lock:
                self._out.append(samples)

    def _run(self) -> None:
        try:
            options = {"probesize": "32768", "analyzeduration": "0"}
            if self.container is None:
                options["format_whitelist"] = ALLOWED_DEMUXERS
            try:
                container = av.open(self._pipe, mode="r", format=self.container, container_options=options)
            except (av.FFmpegError, OSError, ValueError) as exc:
                raise _open_error(f"the stream as {self.container or 'an audio container'}", exc) from exc
            with container:
                if not container.streams.audio:
                    raise AudioDecodeError(f"no audio stream in the {container.format.name} stream")
                stream = container.streams.audio[0]
                self.codec = stream.codec_context.name if stream.codec_context else "?"
                if stream.codec_context is not None:
                    _check_header(
                        container, stream, max_duration_s=None, max_channels=MAX_CONTAINER_CHANNELS, keep_channels=False
                    )
                resampler = _StreamResampler(self.target_sample_rate)
                for frame in frames_of(container, stream, MAX_CONTAINER_CHANNELS, self._errors):
                    if not self.source_sample_rate:
                        self.source_sample_rate = frame.sample_rate
                        self.source_channels = frame.layout.nb_channels
                    self.source_duration_s += frame.samples / frame.sample_rate
                    try:
                        self._emit(resampler.push(frame))
                    except (av.FFmpegError, ValueError):
                        self._errors.count += 1
                self._emit(resampler.push(None))
        except AudioDecodeError as error:
            self._error = error
        except Exception as error:  # noqa: BLE001 - reported to the caller as a decode error
            self._error = AudioDecodeError(f"stream decoding failed: {error.__class__.__name__}: {error}")
        finally:
            self._pipe.close(abort=True)
