"""Many-channel recordings must decode, not crash the process.

PyAV 18.1 segfaults in ``to_ndarray()`` on planar float frames of 8 or more channels; one
such WAV sent to Transcribe took the gateway (and with it the local stack) down. Each case
runs in a child process so a regression fails this test instead of killing the session.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gateway.asr.audio import MAX_SEPARATE_CHANNELS, SAMPLE_RATE

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SOURCE_RATE_HZ = 8000
DURATION_S = 1.5


def multichannel_wav(channels: int) -> tuple[bytes, np.ndarray]:
    """A PCM WAV whose channel k is a tone of 200 + 100 k Hz; returns (bytes, [channels, n] float)."""
    t = np.arange(int(SOURCE_RATE_HZ * DURATION_S)) / SOURCE_RATE_HZ
    tones = np.stack([0.5 * np.sin(2 * np.pi * (200 + 100 * k) * t) for k in range(channels)])
    pcm = np.round(tones.T * 32767).astype("<i2").tobytes()
    block_align = 2 * channels
    header = (
        b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, SOURCE_RATE_HZ, SOURCE_RATE_HZ * block_align, block_align, 16)
        + b"data" + struct.pack("<I", len(pcm))
    )
    return header + pcm, tones.astype(np.float32)


DECODE_IN_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from gateway.asr.audio import load_audio
    from gateway.asr.audio_stream import ContainerStream
    data = open(sys.argv[1], "rb").read()
    keep = sys.argv[2] == "separate"
    if sys.argv[2] == "stream":
        stream = ContainerStream()
        parts = [stream.feed(data[i : i + 4096]) for i in range(0, len(data), 4096)]
        parts.append(stream.finish())
        samples = np.concatenate(parts)[None]
    else:
        decoded = load_audio(data, keep_channels=keep)
        samples = np.atleast_2d(decoded.samples)
    rms = np.sqrt(np.mean(samples.astype(np.float64) ** 2, axis=1))
    print(json.dumps({"shape": list(samples.shape), "rms": rms.tolist()}))
    """
)


def decode_in_child(path: Path, mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", DECODE_IN_CHILD, str(path), mode],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"decoding {mode} exited {result.returncode}: {result.stderr[-2000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("channels", [8, 9, 16, 32])
@pytest.mark.parametrize("mode", ["mixed", "stream"])
def test_many_channels_are_mixed_down(tmp_path, channels, mode):
    data, tones = multichannel_wav(channels)
    path = tmp_path / f"{channels}ch.wav"
    path.write_bytes(data)
    out = decode_in_child(path, mode)
    expected_n = int(DURATION_S * SAMPLE_RATE)
    assert out["shape"][0] == 1
    assert abs(out["shape"][1] - expected_n) <= SAMPLE_RATE // 50
    # the mean of the channels: RMS of a sum of distinct tones of amplitude 0.5 / channels
    expected_rms = np.sqrt(np.mean(tones.mean(axis=0) ** 2))
    assert out["rms"][0] == pytest.approx(expected_rms, rel=0.05)


def test_eight_channels_kept_apart(tmp_path):
    data, tones = multichannel_wav(MAX_SEPARATE_CHANNELS)
    path = tmp_path / "separate.wav"
    path.write_bytes(data)
    out = decode_in_child(path, "separate")
    assert out["shape"][0] == MAX_SEPARATE_CHANNELS
    # every channel is its own tone of amplitude 0.5: RMS 0.5 / sqrt(2), not a mixture
    assert out["rms"] == pytest.approx([0.5 / np.sqrt(2)] * MAX_SEPARATE_CHANNELS, rel=0.03)
