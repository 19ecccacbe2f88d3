"""Bytes -> 16 kHz mono float32 audio. The only place the gateway decodes audio.

Containers go through PyAV (FFmpeg): WAV (PCM, float, mu-law, A-law), MP3, FLAC,
OGG (Opus/Vorbis), AMR, M4A/AAC and the rest of an audio demuxer allow-list.
Raw PCM (gRPC ``RawAudio``) is converted with numpy and resampled by the same
FFmpeg resampler, so both inputs share one rate-conversion path.

Channels are downmixed by averaging them (FFmpeg's own float downmix adds
stereo channels at 0.707 each, i.e. +3 dB for identical channels), or kept apart
(``keep_channels``: stereo call recordings, agent on one channel and caller on the
other). Corrupt packets are skipped and counted; undecodable input raises
AudioDecodeError. Empty input is not an error: it decodes to an empty array.
Output is written into one buffer sized from the container's duration, so a long
recording is held once, not twice.

Audio that arrives in pieces (StreamingRecognize) is decoded by
:mod:`gateway.asr.audio_stream` with the same resampling and checks.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

SAMPLE_RATE = 16000  # Hz, what the models take
MIN_SAMPLE_RATE_HZ = 1000
MAX_SAMPLE_RATE_HZ = 384000
MAX_PCM_CHANNELS = 32
MAX_CONTAINER_CHANNELS = 32  # default ceiling on a container's channels (header and every frame)
PCM_FRAME_SAMPLES = 65536  # samples per channel in each frame pushed to the resampler
MAX_SEPARATE_CHANNELS = 8  # channels that can be kept apart (keep_channels=True)
MAX_PREALLOCATED_S = 4 * 3600.0  # longest duration estimate the output buffer is sized for
_MIN_BUFFER_SAMPLES = 16000
# A header's duration is an estimate for some formats (MP3 without a Xing header: bitrate x
# size); only a header clearly past the limit is refused before decoding, the exact limit
# is enforced on the decoded samples.
HEADER_DURATION_TOLERANCE = 1.02
_CHECK_BLOCK = 1 << 20

# Demuxers FFmpeg may pick for request bytes. Demuxers that open other files or URLs
# (hls, concat, dash, image2, ...) and subtitle/text formats are not on it.
ALLOWED_DEMUXERS = (
    "wav,w64,mp3,flac,ogg,amr,amrnb,amrwb,mov,mp4,m4a,3gp,3g2,mj2,aac,matroska,webm,"
    "aiff,caf,au,wv,asf,gsm,g722,g723_1,g729,voc,ac3,eac3,mpeg,mpegts,avi,flv"
)

# raw PCM encoding name -> numpy dtype (little endian)
PCM_ENCODINGS = {
    "s16le": np.dtype("<i2"),
    "f32le": np.dtype("<f4"),
}
_S16_SCALE = 1.0 / 32768.0


class AudioDecodeError(ValueError):
    """The bytes are not audio this gateway can decode."""


class AudioTooLongError(AudioDecodeError):
    """Decoded audio exceeds the configured maximum duration."""


@dataclass
class DecodedAudio:
    """Mono float32 samples at ``sample_rate`` plus what the source said about itself."""

    samples: np.ndarray  # float32 [n] mono (or [channels, n] with keep_channels), at sample_rate
    sample_rate: int  # Hz of `samples`
    source_sample_rate: int  # Hz of the input (the first decoded frame for containers)
    source_channels: int
    source_duration_s: float  # decoded input samples / input rate, before resampling
    codec: str = "pcm"  # FFmpeg decoder name, or the raw PCM encoding
    container: str = "raw"  # FFmpeg demuxer name, "raw" for PCM
    corrupt_packets: int = 0  # packets that failed to decode and were skipped

    @property
    def duration_s(self) -> float:
        """Duration of `samples` in seconds."""
        return self.samples.shape[-1] / self.sample_rate


class _SampleBuffer:
    """Growable float32 [channels, n] store written in place.

    Long recordings are the reason: collecting per-frame chunks and concatenating them at the
    end holds every sample twice (a 2-hour file is 460 MB of float32 at 16 kHz). The buffer is
    allocated once from the container's duration estimate (np.empty: pages are only committed
    as they are written) and grown by half when the estimate was short.
    """

    def __init__(self, channels: int, expected_samples: int = 0):
        self.channels = channels
        self._data = np.empty((channels, max(int(expected_samples), _MIN_BUFFER_SAMPLES)), dtype=np.float32)
        self.size = 0

    def append(self, block: np.ndarray) -> None:  # [channels, m]
        m = block.shape[1]
        if self.size + m > self._data.shape[1]:
            grown = np.empty((self.channels, max(self.size + m, self._data.shape[1] * 3 // 2)), dtype=np.float32)
            grown[:, : self.size] = self._data[:, : self.size]
            self._data = grown
        self._data[:, self.size : self.size + m] = block
        self.size += m

    def result(self) -> np.ndarray:
        """[channels, n] view of the samples written (unused capacity is never touched)."""
        return self._data[:, : self.size]


# PyAV 18.1 crashes the process (segfault) in ``to_ndarray()`` on a planar (``fltp``) frame
# of 8 or more channels: it reports one plane too many. Packed ``flt`` is one interleaved
# plane for any channel count, so every resampler here produces packed float and
# de-interleaves in numpy.
RESAMPLE_FORMAT = "flt"


def _frame_channels(frame: av.AudioFrame) -> np.ndarray:
    """A packed float32 frame -> [channels, n] (a view of the interleaved samples)."""
    interleaved = frame.to_ndarray().reshape(-1)  # [1, n * channels] for packed formats
    channels = frame.layout.nb_channels
    return interleaved.reshape(-1, channels).T


class _Resampler:
    """Frames of any format/layout/rate -> float32 at ``rate``, mono or every channel.

    Each frame is converted to float at the target rate with its own channel layout;
    then either the channels are averaged (``keep_channels=False``) or kept as they are. With
    ``keep_channels`` the channel count is fixed by the first frame; a later frame with another
    count (rare: a layout change mid-stream) is averaged and copied into every channel. A new
    FFmpeg resampler is started (and the previous one flushed) whenever the input format,
    layout or rate changes mid-stream.
    """

    def __init__(self, rate: int, *, keep_channels: bool = False, expected_samples: int = 0):
        self.rate = rate
        self.keep_channels = keep_channels
        self._expected = expected_samples
        self._resampler: av.AudioResampler | None = None
        self._key: tuple | None = None
        self._buffer: _SampleBuffer | None = None

    @property
    def channels(self) -> int:
        return self._buffer.channels if self._buffer is not None else 0

    def push(self, frame: av.AudioFrame) -> None:
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if key != self._key:
            self._flush()
            self._resampler = av.AudioResampler(format=RESAMPLE_FORMAT, rate=self.rate)
            self._key = key
        self._collect(self._resampler.resample(frame))

    def finish(self) -> np.ndarray:
        """Mono float32 [n], or [channels, n] with ``keep_channels``."""
        self._flush()
        if self._buffer is None:
            return np.zeros((1, 0) if self.keep_channels else 0, dtype=np.float32)
        samples = self._buffer.result()
        return samples if self.keep_channels else samples[0]

    def _flush(self) -> None:
        if self._resampler is not None:
            self._collect(self._resampler.resample(None))
            self._resampler = None
            self._key = None

    def _collect(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            planes = _frame_channels(frame)  # [channels, n] float32
            if self._buffer is None:
                self._buffer = _SampleBuffer(planes.shape[0] if self.keep_channels else 1, self._expected)
            if not self.keep_channels:
                if planes.shape[0] > 1:
                    planes = planes.mean(axis=0, dtype=np.float32, keepdims=True)
            elif planes.shape[0] != self._buffer.channels:
                mono = planes.mean(axis=0, dtype=np.float32, keepdims=True)
                planes = np.broadcast_to(mono, (self._buffer.channels, mono.shape[1]))
            self._buffer.append(planes)


def _expected_samples(container, stream, rate: int, max_duration_s: float | None) -> int:
    """Output samples the container says it holds (0 when unknown), capped by the limits."""
    seconds = header_duration_s(container, stream)
    cap_s = min(MAX_PREALLOCATED_S, max_duration_s) if max_duration_s else MAX_PREALLOCATED_S
    seconds = min(max(seconds, 0.0), cap_s)
    return int((seconds * 1.01 + 1.0) * rate) if seconds > 0 else 0


# Float codecs (WAV/CAF f32/f64, raw f32le) can carry finite values far past full scale: a
# bit flip in an exponent gives 1e38, whose square overflows the log-mel power to inf and the
# encoder refuses the window. Nothing real is 24 dB over full scale, so samples are clipped
# there (in place, no copy).
MAX_AMPLITUDE = 16.0


def _bound_amplitude(samples: np.ndarray) -> np.ndarray:
    if samples.size and samples.dtype.kind == "f":
        np.clip(samples, -MAX_AMPLITUDE, MAX_AMPLITUDE, out=samples)
    return samples


def _open_error(what: str, exc: Exception) -> AudioDecodeError:
    """FFmpeg could not open the input as a container: say what and why (no traceback)."""
    return AudioDecodeError(f"cannot read {what} ({exc.__class__.__name__}: {getattr(exc, 'strerror', None) or exc})")


def _check_finite(samples: np.ndarray, what: str) -> None:
    # One float64 sum (no temporary as large as the audio) catches NaN/Inf; only then count.
    if np.isfinite(np.sum(samples, dtype=np.float64)):
        return
    flat = samples.reshape(-1)
    bad = sum(
        int(np.count_nonzero(~np.isfinite(flat[i : i + _CHECK_BLOCK])))
        for i in range(0, flat.shape[0], _CHECK_BLOCK)
    )
    if bad:
        raise AudioDecodeError(f"{what} contains {bad} NaN/Inf samples")


# The decoded duration is a sum of frame lengths in floating point: a file of exactly the limit
# can add up to a hair over it (7200.0000001 s), which must not refuse it.
DURATION_ROUNDING_S = 1e-3


def _check_duration(duration_s: float, max_duration_s: float | None) -> None:
    if max_duration_s is not None and duration_s > max_duration_s + DURATION_ROUNDING_S:
        raise AudioTooLongError(
            f"audio is {duration_s:.1f} s long; at most {max_duration_s:.1f} s is accepted"
        )


def _check_channels(channels: int, keep_channels: bool) -> None:
    if keep_channels and channels > MAX_SEPARATE_CHANNELS:
        raise AudioDecodeError(
            f"audio has {channels} channels; at most {MAX_SEPARATE_CHANNELS} can be transcribed "
            "separately (downmix it instead)"
        )


def _check_sample_rate(rate: int, name: str = "sample_rate") -> None:
    if not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        raise AudioDecodeError(
            f"{name} {rate} Hz is outside {MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz"
        )


def _check_container_channels(channels: int, max_channels: int, keep_channels: bool) -> None:
    if channels > max_channels:
        raise AudioDecodeError(f"audio has {channels} channels; at most {max_channels} are accepted")
    _check_channels(channels, keep_channels)


def header_duration_s(container, stream) -> float:
    """The duration the container's header states (0 when it states none)."""
    try:
        if stream.duration and stream.time_base:
            return max(float(stream.duration * stream.time_base), 0.0)
        if container.duration:
            return max(container.duration / av.time_base, 0.0)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        pass
    return 0.0


class PacketErrors:
    """Packets that did not decode, and frames the resampler refused: skipped, counted."""

    def __init__(self) -> None:
        self.count = 0


def frames_of(container, stream, max_channels: int, errors: PacketErrors) -> Iterator[av.AudioFrame]:
    """The audio frames of ``stream`` (whole files and streams alike), each checked (_check_frame).
    A packet that does not decode is skipped; where the demuxer cannot go on (truncated or garbled
    container) the frames end, keeping what decoded so far. Both count in ``errors``."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError:
            errors.count += 1
            return
        try:
            frames = packet.decode()
        except av.FFmpegError:
            errors.count += 1
            continue
        for frame in frames:
            if frame.sample_rate > 0 and frame.samples > 0:
                _check_frame(frame, max_channels)
                yield frame


def _check_header(container, stream, *, max_duration_s: float | None, max_channels: int, keep_channels: bool) -> None:
    """Refuse from the header alone what decoding would refuse later, before a sample is decoded.

    The costly inputs are small files that claim a lot: a 32 KB WAV at 1 Hz resamples to
    hundreds of MB, a 3 MB FLAC of silence says 5 hours. Rate and channels are checked
    again on every decoded frame (a header can lie), the duration on the decoded samples.
    """
    context = stream.codec_context
    rate = int(getattr(context, "sample_rate", 0) or 0)
    if rate:
        _check_sample_rate(rate)
    channels = int(getattr(context, "channels", 0) or 0)
    if channels:
        _check_container_channels(channels, max_channels, keep_channels)
    if max_duration_s is not None:
        stated = header_duration_s(container, stream)
        if stated > max_duration_s * HEADER_DURATION_TOLERANCE:
            raise AudioTooLongError(
                f"the container says the audio is {stated:.1f} s long; at most {max_duration_s:.1f} s is accepted"
            )


def _check_frame(frame, max_channels: int) -> None:
    """Every decoded frame: a rate or channel count the header hid is refused, not resampled."""
    _check_sample_rate(frame.sample_rate)
    if frame.layout.nb_channels > max_channels:
        raise AudioDecodeError(f"audio has {frame.layout.nb_channels} channels; at most {max_channels} are accepted")


def _pcm_dtype(encoding: str, sample_rate: int, channels: int, target_sample_rate: int) -> np.dtype:
    """The sample dtype of raw PCM after checking its declared format (AudioDecodeError if bad)."""
    dtype = PCM_ENCODINGS.get(encoding)
    if dtype is None:
        raise AudioDecodeError(f"unknown PCM encoding {encoding!r}; expected one of {sorted(PCM_ENCODINGS)}")
    _check_sample_rate(sample_rate)
    _check_sample_rate(target_sample_rate, "target_sample_rate")
    if not 1 <= channels <= MAX_PCM_CHANNELS:
        raise AudioDecodeError(f"channels {channels} is outside 1..{MAX_PCM_CHANNELS}")
    return dtype


def load_audio(
    data: bytes,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
    keep_channels: bool = False,
    max_channels: int = MAX_CONTAINER_CHANNELS,
) -> DecodedAudio:
    """Decode any container FFmpeg reads into float32 at ``sample_rate``.

    Mono (channels averaged) by default; ``keep_channels`` gives [channels, n] (at most
    MAX_SEPARATE_CHANNELS), e.g. agent and caller of a stereo call recording.
    Empty ``data`` gives empty samples. Raises AudioDecodeError when the bytes are not
    decodable audio, AudioTooLongError past ``max_duration_s``. Sample rate, channels (at most
    ``max_channels``) and the stated duration are checked from the header before decoding,
    and again on every frame while decoding, so memory is bounded by the limits whatever the
    header says.
    """
    _check_sample_rate(sample_rate)
    if not data:
        return DecodedAudio(
            samples=np.zeros((1, 0) if keep_channels else 0, dtype=np.float32),
            sample_rate=sample_rate,
            source_sample_rate=sample_rate,
            source_channels=1,
            source_duration_s=0.0,
            codec="none",
            container="none",
        )
    try:
        container = av.open(
            io.BytesIO(data), mode="r", options={"format_whitelist": ALLOWED_DEMUXERS}
        )
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _open_error(f"{len(data)} bytes as an audio container", exc) from exc

    with container:
        container_name = container.format.name
        if not container.streams.audio:
            raise AudioDecodeError(
                f"no audio stream in {container_name} input ({len(data)} bytes)"
            )
        stream = container.streams.audio[0]
        if stream.codec_context is None:
            raise AudioDecodeError(f"no decoder for the audio stream in {container_name} input")
        codec = stream.codec_context.name
        _check_header(container, stream, max_duration_s=max_duration_s, max_channels=max_channels, keep_channels=keep_channels)
        resampler = _Resampler(
            sample_rate,
            keep_channels=keep_channels,
            expected_samples=_expected_samples(container, stream, sample_rate, max_duration_s),
        )
        source_rate = 0
        source_channels = 0
        source_duration_s = 0.0
        decoded_frames = 0
        errors = PacketErrors()
        for frame in frames_of(container, stream, max_channels, errors):
            if not source_rate:
                source_rate = frame.sample_rate
                source_channels = frame.layout.nb_channels
                _check_channels(source_channels, keep_channels)
            source_duration_s += frame.samples / frame.sample_rate
            _check_duration(source_duration_s, max_duration_s)
            try:
                resampler.push(frame)
            except (av.FFmpegError, ValueError):
                errors.count += 1
                continue
            decoded_frames += 1
        corrupt = errors.count
        try:
            samples = resampler.finish()
        except (av.FFmpegError, ValueError) as exc:
            raise AudioDecodeError(f"resampling {codec} audio failed: {exc}") from exc

    if decoded_frames == 0 and corrupt > 0:
        raise AudioDecodeError(
            f"no decodable {codec} audio in {container_name} input "
            f"({corrupt} corrupt packets)"
        )
    _check_finite(samples, f"decoded {codec} audio")
    return DecodedAudio(
        samples=_bound_amplitude(samples),
        sample_rate=sample_rate,
        source_sample_rate=source_rate or stream.rate or sample_rate,
        source_channels=source_channels or stream.channels or 1,
        source_duration_s=source_duration_s,
        codec=codec,
        container=container_name,
        corrupt_packets=corrupt,
    )


def decode_audio(
    data: bytes,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
    keep_channels: bool = False,
    max_channels: int = MAX_CONTAINER_CHANNELS,
) -> np.ndarray:
    """Samples only of :func:`load_audio`: float32 [n] (or [channels, n]) at ``sample_rate``."""
    return load_audio(
        data, sample_rate=sample_rate, max_duration_s=max_duration_s, keep_channels=keep_channels,
        max_channels=max_channels,
    ).samples


def load_pcm(
    data: bytes,
    sample_rate: int,
    encoding: str = "s16le",
    channels: int = 1,
    *,
    target_sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
    keep_channels: bool = False,
) -> DecodedAudio:
    """Raw interleaved PCM -> float32 at ``target_sample_rate``: mono (channels averaged),
    or [channels, n] with ``keep_channels``.

    s16le is scaled by 1/32768; f32le is taken as is and must be finite.
    """
    dtype = _pcm_dtype(encoding, sample_rate, channels, target_sample_rate)
    _check_channels(channels, keep_channels)
    frame_bytes = dtype.itemsize * channels
    if len(data) % frame_bytes:
        raise AudioDecodeError(
            f"{len(data)} bytes of {encoding} PCM is not a whole number of "
            f"{channels}-channel frames ({frame_bytes} bytes each)"
        )
    n_frames = len(data) // frame_bytes
    source_duration_s = n_frames / sample_rate
    _check_duration(source_duration_s, max_duration_s)

    interleaved = np.frombuffer(data, dtype=dtype).reshape(n_frames, channels)
    if encoding == "f32le":
        _check_finite(interleaved, "f32le PCM")
    if keep_channels:
        planes = [interleaved[:, c].astype(np.float32) for c in range(channels)]
    elif channels == 1:
        planes = [interleaved[:, 0].astype(np.float32)]
    else:
        planes = [interleaved.mean(axis=1, dtype=np.float32)]
    del interleaved
    if dtype.kind == "i":
        for plane in planes:
            plane *= np.float32(_S16_SCALE)

    if sample_rate != target_sample_rate:
        planes = [_resample_mono(plane, sample_rate, target_sample_rate) for plane in planes]
    samples = np.stack(planes) if keep_channels else planes[0]

    return DecodedAudio(
        samples=_bound_amplitude(samples),
        sample_rate=target_sample_rate,
        source_sample_rate=sample_rate,
        source_channels=channels,
        source_duration_s=source_duration_s,
        codec=encoding,
        container="raw",
    )


def _resample_mono(mono: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    expected = int(len(mono) * target_rate / rate) + target_rate
    resampler = _Resampler(target_rate, expected_samples=expected)
    for start in range(0, len(mono), PCM_FRAME_SAMPLES):
        frame = av.AudioFrame.from_ndarray(
            mono[None, start : start + PCM_FRAME_SAMPLES], format="flt", layout="mono"
        )
        frame.sample_rate = rate
        resampler.push(frame)
    return resampler.finish()


def pcm_to_float(
    data: bytes,
    sample_rate: int,
    encoding: str = "s16le",
    channels: int = 1,
    *,
    target_sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
    keep_channels: bool = False,
) -> np.ndarray:
    """Samples only of :func:`load_pcm`: float32 [n] (or [channels, n]) at ``target_sample_rate``."""
    return load_pcm(
        data,
        sample_rate,
        encoding,
        channels,
        target_sample_rate=target_sample_rate,
        max_duration_s=max_duration_s,
        keep_channels=keep_channels,
    ).samples
