"""Bytes -> 16 kHz mono float32 audio. The only place the gateway decodes audio.

Containers go through PyAV (FFmpeg): WAV (PCM, float, mu-law, A-law), MP3, FLAC,
OGG (Opus/Vorbis), AMR, M4A/AAC and the rest of an audio demuxer allow-list.
Raw PCM (gRPC ``RawAudio``) is converted with numpy and resampled by the same
FFmpeg resampler, so both inputs share one rate-conversion path.

Channels are downmixed by averaging them (FFmpeg's own float downmix adds
stereo channels at 0.707 each, i.e. +3 dB for identical channels). Corrupt
packets are skipped and counted; undecodable input raises AudioDecodeError.
Empty input is not an error: it decodes to an empty array.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

SAMPLE_RATE = 16000  # Hz, what the models take
MIN_SAMPLE_RATE_HZ = 1000
MAX_SAMPLE_RATE_HZ = 384000
MAX_PCM_CHANNELS = 32
PCM_FRAME_SAMPLES = 65536  # samples per channel in each frame pushed to the resampler

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

    samples: np.ndarray  # float32 [n], mono, at sample_rate
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
        return self.samples.shape[0] / self.sample_rate


class _MonoResampler:
    """Frames of any format/layout/rate -> mono float32 chunks at ``rate``.

    Each frame is converted to planar float at the target rate with its own channel
    layout, then the channels are averaged. A new FFmpeg resampler is started (and the
    previous one flushed) whenever the input format, layout or rate changes mid-stream.
    """

    def __init__(self, rate: int):
        self.rate = rate
        self._resampler: av.AudioResampler | None = None
        self._key: tuple | None = None
        self._chunks: list[np.ndarray] = []

    def push(self, frame: av.AudioFrame) -> None:
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if key != self._key:
            self._flush()
            self._resampler = av.AudioResampler(format="fltp", rate=self.rate)
            self._key = key
        self._collect(self._resampler.resample(frame))

    def finish(self) -> np.ndarray:
        self._flush()
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        samples = np.concatenate(self._chunks)
        self._chunks = []
        return samples

    def _flush(self) -> None:
        if self._resampler is not None:
            self._collect(self._resampler.resample(None))
            self._resampler = None
            self._key = None

    def _collect(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            planes = frame.to_ndarray()  # [channels, n] float32 (planar)
            if planes.shape[0] == 1:
                self._chunks.append(planes[0])
            else:
                self._chunks.append(planes.mean(axis=0, dtype=np.float32))


def _check_finite(samples: np.ndarray, what: str) -> None:
    if not np.isfinite(samples).all():
        bad = int(np.count_nonzero(~np.isfinite(samples)))
        raise AudioDecodeError(f"{what} contains {bad} NaN/Inf samples")


def _check_duration(duration_s: float, max_duration_s: float | None) -> None:
    if max_duration_s is not None and duration_s > max_duration_s:
        raise AudioTooLongError(
            f"audio is {duration_s:.1f} s long; at most {max_duration_s:.1f} s is accepted"
        )


def _check_sample_rate(rate: int, name: str = "sample_rate") -> None:
    if not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        raise AudioDecodeError(
            f"{name} {rate} Hz is outside {MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz"
        )


def load_audio(
    data: bytes,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
) -> DecodedAudio:
    """Decode any container FFmpeg reads into mono float32 at ``sample_rate``.

    Empty ``data`` gives empty samples. Raises AudioDecodeError when the bytes are not
    decodable audio, AudioTooLongError past ``max_duration_s`` (checked while decoding).
    """
    _check_sample_rate(sample_rate)
    if not data:
        return DecodedAudio(
            samples=np.zeros(0, dtype=np.float32),
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
        raise AudioDecodeError(
            f"cannot read {len(data)} bytes as an audio container ({exc.__class__.__name__}: "
            f"{getattr(exc, 'strerror', None) or exc})"
        ) from exc

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
        resampler = _MonoResampler(sample_rate)
        source_rate = 0
        source_channels = 0
        source_duration_s = 0.0
        decoded_frames = 0
        corrupt = 0
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.FFmpegError:
                # The demuxer cannot go on (truncated or garbled container): keep
                # what decoded so far.
                corrupt += 1
                break
            try:
                frames = packet.decode()
            except av.FFmpegError:
                corrupt += 1
                continue
            for frame in frames:
                if frame.sample_rate <= 0 or frame.samples <= 0:
                    continue
                if not source_rate:
                    source_rate = frame.sample_rate
                    source_channels = frame.layout.nb_channels
                source_duration_s += frame.samples / frame.sample_rate
                _check_duration(source_duration_s, max_duration_s)
                try:
                    resampler.push(frame)
                except (av.FFmpegError, ValueError):
                    corrupt += 1
                    continue
                decoded_frames += 1
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
        samples=samples,
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
) -> np.ndarray:
    """Samples only of :func:`load_audio`: mono float32 [n] at ``sample_rate``."""
    return load_audio(data, sample_rate=sample_rate, max_duration_s=max_duration_s).samples


def load_pcm(
    data: bytes,
    sample_rate: int,
    encoding: str = "s16le",
    channels: int = 1,
    *,
    target_sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
) -> DecodedAudio:
    """Raw interleaved PCM -> mono float32 at ``target_sample_rate``.

    s16le is scaled by 1/32768; f32le is taken as is and must be finite.
    """
    dtype = PCM_ENCODINGS.get(encoding)
    if dtype is None:
        raise AudioDecodeError(
            f"unknown PCM encoding {encoding!r}; expected one of {sorted(PCM_ENCODINGS)}"
        )
    _check_sample_rate(sample_rate)
    _check_sample_rate(target_sample_rate, "target_sample_rate")
    if not 1 <= channels <= MAX_PCM_CHANNELS:
        raise AudioDecodeError(f"channels {channels} is outside 1..{MAX_PCM_CHANNELS}")
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
    if channels == 1:
        mono = interleaved[:, 0].astype(np.float32)
    else:
        mono = interleaved.mean(axis=1, dtype=np.float32)
    if dtype.kind == "i":
        mono *= np.float32(_S16_SCALE)

    if sample_rate == target_sample_rate:
        samples = mono
    else:
        resampler = _MonoResampler(target_sample_rate)
        for start in range(0, n_frames, PCM_FRAME_SAMPLES):
            frame = av.AudioFrame.from_ndarray(
                mono[None, start : start + PCM_FRAME_SAMPLES], format="flt", layout="mono"
            )
            frame.sample_rate = sample_rate
            resampler.push(frame)
        samples = resampler.finish()

    return DecodedAudio(
        samples=samples,
        sample_rate=target_sample_rate,
        source_sample_rate=sample_rate,
        source_channels=channels,
        source_duration_s=source_duration_s,
        codec=encoding,
        container="raw",
    )


def pcm_to_float(
    data: bytes,
    sample_rate: int,
    encoding: str = "s16le",
    channels: int = 1,
    *,
    target_sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
) -> np.ndarray:
    """Samples only of :func:`load_pcm`: mono float32 [n] at ``target_sample_rate``."""
    return load_pcm(
        data,
        sample_rate,
        encoding,
        channels,
        target_sample_rate=target_sample_rate,
        max_duration_s=max_duration_s,
    ).samples

