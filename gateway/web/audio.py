"""Uploaded audio: what kind it is (by its first bytes, not its name), and a time range of it
as 16 kHz PCM for re-recognition. Recognition itself is the gateway's (gRPC Transcribe)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AudioKind:
    name: str
    extension: str
    content_type: str


KINDS = {
    "wav": AudioKind("WAV", ".wav", "audio/wav"),
    "flac": AudioKind("FLAC", ".flac", "audio/flac"),
    "ogg": AudioKind("OGG", ".ogg", "audio/ogg"),
    "mp3": AudioKind("MP3", ".mp3", "audio/mpeg"),
    "amr": AudioKind("AMR", ".amr", "audio/amr"),
    "m4a": AudioKind("M4A", ".m4a", "audio/mp4"),
    "webm": AudioKind("WebM", ".webm", "audio/webm"),  # what MediaRecorder records in Chromium
}
ACCEPTED = "WAV、MP3、FLAC、OGG、AMR、M4A"


def sniff(head: bytes) -> AudioKind | None:
    """The container from the first bytes; None for anything that is not one of ours."""
    if len(head) < 12:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return KINDS["wav"]
    if head[:4] == b"fLaC":
        return KINDS["flac"]
    if head[:4] == b"OggS":
        return KINDS["ogg"]
    if head[:5] == b"#!AMR":
        return KINDS["amr"]
    if head[4:8] == b"ftyp":
        return KINDS["m4a"]
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return KINDS["webm"]
    if head[:3] == b"ID3" or (head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06):
        return KINDS["mp3"]
    return None


def pcm16k_range(path: Path, start_s: float, end_s: float) -> bytes:
    """Mono 16 kHz s16le PCM of [start_s, end_s) of the file (decoded with PyAV)."""
    import av
    import numpy as np

    rate = 16000
    first, last = int(max(0.0, start_s) * rate), int(max(0.0, end_s) * rate)
    chunks, done = [], 0
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                data = out.to_ndarray().reshape(-1)
                chunks.append(data)
                done += data.size
            if done >= last:
                break
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    return audio[first:last].astype("<i2").tobytes()


def playable_copy(data: bytes, kind: AudioKind) -> tuple[bytes, AudioKind]:
    """What the ticket page's player gets: browsers cannot seek in MediaRecorder's WebM (it has no
    duration or cues) and cannot play AMR, so those are stored as OGG/Opus (WebM: the same packets,
    remuxed; AMR: re-encoded). Everything else, or a file PyAV cannot convert, is kept as it came."""
    import io

    import av

    if kind.name not in ("WebM", "AMR"):
        return data, kind
    try:
        out_buffer = io.BytesIO()
        with av.open(io.BytesIO(data)) as source, av.open(out_buffer, "w", format="ogg") as target:
            audio_in = source.streams.audio[0]
            if kind.name == "WebM" and audio_in.codec_context.name == "opus":
                audio_out = target.add_stream_from_template(audio_in)
                for packet in source.demux(audio_in):
                    if packet.dts is None:
                        continue
                    packet.stream = audio_out
                    target.mux(packet)
            else:
                audio_out = target.add_stream("libopus", rate=48000)
                audio_out.layout = "mono"
                resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
                for frame in source.decode(audio_in):
                    for converted in resampler.resample(frame):
                        for packet in audio_out.encode(converted):
                            target.mux(packet)
                for packet in audio_out.encode(None):
                    target.mux(packet)
        converted = out_buffer.getvalue()
        return (converted, KINDS["ogg"]) if converted else (data, kind)
    except (av.error.FFmpegError, IndexError, ValueError):
        return data, kind
