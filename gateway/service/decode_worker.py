"""What runs in an audio decoder process (gateway/service/decode_pool.py): the job, the decode,
the samples written to /dev/shm.

Kept apart from the pool, which imports asyncio and the metrics (prometheus_client): the
forkserver preloads this module alone and every worker is forked from it, so each decoder
process holds numpy, PyAV and this, about 20 MB less than with the pool's imports.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.asr.audio import MAX_CONTAINER_CHANNELS, AudioDecodeError, decode_audio, pcm_to_float
from gateway.service.heap import release_free_heap

CRASH_MARKER_ENV = "ASR_DECODE_CRASH_MARKER"
_SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


@dataclass(frozen=True)
class DecodeJob:
    """What one request asks decoded: container bytes, or raw PCM with its declared format."""

    data: bytes
    keep_channels: bool
    max_duration_s: float
    max_channels: int = MAX_CONTAINER_CHANNELS
    pcm_sample_rate: int = 0  # > 0: raw PCM
    pcm_encoding: str = "s16le"
    pcm_channels: int = 1


def run_job(job: DecodeJob) -> np.ndarray:
    """The decode itself (in the worker, or in-process when the pool is off)."""
    if job.pcm_sample_rate:
        return pcm_to_float(
            job.data, job.pcm_sample_rate, encoding=job.pcm_encoding, channels=job.pcm_channels,
            max_duration_s=job.max_duration_s, keep_channels=job.keep_channels,
        )
    return decode_audio(
        job.data, max_duration_s=job.max_duration_s, keep_channels=job.keep_channels, max_channels=job.max_channels
    )


def worker_decode(job: DecodeJob) -> tuple[str, tuple[int, ...]] | AudioDecodeError:
    try:
        return _decode_to_shm(job)
    finally:
        release_free_heap()


def _decode_to_shm(job: DecodeJob) -> tuple[str, tuple[int, ...]] | AudioDecodeError:
    marker = os.environ.get(CRASH_MARKER_ENV)
    if marker and marker.encode() in job.data:
        os.abort()  # test hook: dies as a native crash would
    try:
        samples = np.ascontiguousarray(run_job(job), dtype=np.float32)
    except AudioDecodeError as error:
        return error  # a plain ValueError subclass: pickles back as the client's message
    fd, path = tempfile.mkstemp(prefix="asr-audio-", dir=_SHM_DIR)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(memoryview(samples).cast("B"))
    except BaseException:
        os.unlink(path)
        raise
    return path, samples.shape
