"""Hostile audio: limits read from the container header before decoding, checked again while
decoding, and a decoder crash contained in a worker process (issue 12, item 1)."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import time
from pathlib import Path

import av
import numpy as np
import pytest

from gateway.asr.audio import AudioDecodeError, AudioTooLongError, load_audio
from gateway.asr.audio_stream import ContainerStream
from gateway.service.decode_pool import (
    CRASH_MARKER_ENV, DecodeJob, DecodePool, DecoderCrashError, default_decode_workers, run_job,
)

MAX_STATUS_BYTES = 1024
FOUR_HOURS_S = 4 * 3600.0


def pcm_wav(rate: int, channels: int, n_frames: int, *, data_size: int | None = None) -> bytes:
    """A 16-bit PCM WAV of noise; ``data_size`` overrides the size its header states."""
    pcm = (np.random.default_rng(0).standard_normal(n_frames * channels) * 1000).astype("<i2").tobytes()
    size = len(pcm) if data_size is None else data_size
    align = 2 * channels
    return (
        b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * align, align, 16)
        + b"data" + struct.pack("<I", size) + pcm
    )


def flac_claiming(seconds: float, rate: int = 8000) -> bytes:
    """2 s of FLAC silence whose STREAMINFO says ``seconds`` (what a long silent file's header says)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 2 * rate), np.int16), format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    data = bytearray(buffer.getvalue())
    offset = 8 + 10  # "fLaC", block header, then min/max block and frame sizes
    fields = int.from_bytes(data[offset : offset + 8], "big")
    fields = (fields & ~((1 << 36) - 1)) | int(seconds * rate)  # the 36-bit total-samples field
    data[offset : offset + 8] = fields.to_bytes(8, "big")
    return bytes(data)


@pytest.mark.parametrize(
    "data, error, words",
    [
        (pcm_wav(1, 1, 16000), AudioDecodeError, "sample_rate 1 Hz"),  # was 6 s and 880 MB
        (pcm_wav(8000, 33, 800), AudioDecodeError, "33 channels"),
        (flac_claiming(5 * 3600), AudioTooLongError, "says the audio is 18000.0 s"),  # was 15 s and +880 MB
    ],
    ids=["wav-1Hz", "wav-33-channels", "flac-header-5h"],
)
def test_header_limits_refuse_before_decoding(data, error, words):
    with pytest.raises(error, match=words) as raised:
        load_audio(data, max_duration_s=FOUR_HOURS_S)
    assert len(str(raised.value).encode()) < MAX_STATUS_BYTES


def test_configured_channel_maximum():
    data = pcm_wav(8000, 8, 800)
    assert load_audio(data, max_channels=8).samples.shape == (1600,)
    with pytest.raises(AudioDecodeError, match="at most 4"):
        load_audio(data, max_channels=4)


def test_header_that_overstates_a_short_wav_decodes_what_is_there():
    # FFmpeg bounds a WAV's data size by the bytes present: the header check must not refuse it
    decoded = load_audio(pcm_wav(8000, 1, 8000, data_size=5 * 3600 * 8000 * 2), max_duration_s=FOUR_HOURS_S)
    assert decoded.samples.shape == (16000,)


def test_stream_decoder_refuses_a_1hz_stream():
    stream = ContainerStream("wav")
    data = pcm_wav(1, 1, 16000)
    with pytest.raises(AudioDecodeError, match="1 Hz"):
        for start in range(0, len(data), 4096):
            stream.feed(data[start : start + 4096])
        stream.finish()


@pytest.fixture(scope="module")
def crashing_pool():
    """A decode pool whose workers abort on the marker (the test-only hook)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv(CRASH_MARKER_ENV, "CRASH-THE-DECODER")
    pool = DecodePool(2)
    pool.warm_up()
    yield pool
    pool.close()
    monkeypatch.undo()


def test_pool_decodes_as_in_process(crashing_pool):
    job = DecodeJob(pcm_wav(8000, 2, 16000), keep_channels=True, max_duration_s=60.0)
    expected = run_job(job)
    got = asyncio.run(crashing_pool.decode(job))
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    with pytest.raises(AudioDecodeError, match="1 Hz"):  # a client error comes back as such
        asyncio.run(crashing_pool.decode(DecodeJob(pcm_wav(1, 1, 100), keep_channels=False, max_duration_s=60.0)))


def test_default_decode_workers_one_per_two_cores():
    # a small machine gets one decoder process (a second idle one costs memory, not speed)
    assert [default_decode_workers(cores) for cores in (1, 2, 3, 4, 8, 64)] == [1, 1, 1, 2, 2, 2]
    assert default_decode_workers() == default_decode_workers(os.cpu_count())  # the machine's count by default


def test_worker_crash_costs_one_request(crashing_pool):
    bad = DecodeJob(pcm_wav(8000, 1, 8000) + b"CRASH-THE-DECODER", keep_channels=False, max_duration_s=60.0)
    good = DecodeJob(pcm_wav(8000, 1, 8000), keep_channels=False, max_duration_s=60.0)
    crashes = crashing_pool.crashes

    async def together():
        return await asyncio.gather(crashing_pool.decode(bad), crashing_pool.decode(good), return_exceptions=True)

    bad_result, good_result = asyncio.run(together())
    assert isinstance(bad_result, DecoderCrashError)
    assert isinstance(good_result, np.ndarray) and good_result.shape == (16000,)  # retried on the new pool
    assert crashing_pool.crashes >= crashes + 2
    assert asyncio.run(crashing_pool.decode(good)).shape == (16000,)  # and the pool keeps serving


def test_float_samples_past_full_scale_are_clipped():
    """A flipped exponent bit makes a float sample 1e38: finite, but its square overflows the log-mel."""
    from gateway.asr.audio import MAX_AMPLITUDE, load_pcm
    from gateway.asr.audio_stream import PcmStream

    samples = np.zeros(1600, dtype="<f4")
    samples[100] = 3e38
    samples[200] = -1e30
    decoded = load_pcm(samples.tobytes(), 16000, "f32le").samples
    assert decoded.max() == MAX_AMPLITUDE and decoded.min() == -MAX_AMPLITUDE
    assert np.abs(PcmStream(16000, "f32le").feed(samples.tobytes())).max() == MAX_AMPLITUDE
    buffer = io.BytesIO()
    header = (b"RIFF" + struct.pack("<I", 36 + samples.nbytes) + b"WAVEfmt "
              + struct.pack("<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32) + b"data" + struct.pack("<I", samples.nbytes))
    buffer.write(header + samples.tobytes())
    assert np.abs(load_audio(buffer.getvalue()).samples).max() == MAX_AMPLITUDE


def test_cancelled_decode_leaves_no_samples_file(crashing_pool):
    """A call cancelled while its audio decodes: the worker's samples file is removed when it finishes."""
    from gateway.service.decode_pool import _SHM_DIR

    job = DecodeJob(pcm_wav(8000, 1, 8000 * 120), keep_channels=False, max_duration_s=600.0)
    before = set(_SHM_DIR.glob("asr-audio-*"))

    async def cancel_midway():
        task = asyncio.ensure_future(crashing_pool.decode(job))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.get_running_loop().run_in_executor(None, crashing_pool.warm_up)  # the worker has finished

    asyncio.run(cancel_midway())
    assert set(_SHM_DIR.glob("asr-audio-*")) == before


def test_idle_decode_workers_exit_and_the_next_call_starts_them_again():
    """Workers unused for idle_s exit (their memory goes back); a call after that is decoded by
    a new worker; a busy pool keeps its workers."""
    pool = DecodePool(1, idle_s=0.3)
    job = DecodeJob(pcm_wav(8000, 1, 16000), keep_channels=False, max_duration_s=60.0)

    def worker_pids() -> set[int]:
        return set(pool._executor._processes) if pool._executor is not None else set()

    async def scenario():
        first = await pool.decode(job)
        pids = worker_pids()
        for _ in range(3):  # calls closer together than idle_s: the same worker
            await asyncio.sleep(0.1)
            await pool.decode(job)
        assert pool.retired == 0 and worker_pids() == pids
        deadline = time.monotonic() + 10
        while pool.retired == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert pool.retired == 1 and worker_pids() == set()
        for pid in pids:  # the process exits
            while time.monotonic() < deadline and _alive(pid):
                await asyncio.sleep(0.05)
            assert not _alive(pid), f"worker {pid} still running after retiring"
        again = await pool.decode(job)
        assert np.array_equal(again, first) and worker_pids() and not worker_pids() & pids

    try:
        asyncio.run(scenario())
    finally:
        pool.close()


def _alive(pid: int) -> bool:
    """A worker is the forkserver's child, not this process's: read its state from /proc."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # exited (not yet reaped by the forkserver) counts as gone
