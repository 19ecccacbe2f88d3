"""Request audio decoded in supervised worker processes, so a crash inside FFmpeg costs one
request, not the gateway.

A native crash (a codec bug, like PyAV's 8-channel planar segfault) kills the process it runs
in; decoding in the gRPC process would take every open call and stream with it. Here each
decode runs in a small pool of worker processes (forkserver: children do not inherit the
gateway's threads or gRPC state). When a worker dies, every decode then in flight on the
pool fails with BrokenProcessPool; the pool is replaced and each of those decodes is tried
once more, alone in a process of its own, so the culprit cannot take a bystander's retry down
with it. An input that kills its own process too is refused (DecoderCrashError,
INVALID_ARGUMENT); the bystanders succeed.

Samples come back through a file in /dev/shm that the gateway maps and unlinks at once: the
audio is held once in the gateway (no pickled copy next to the array), and the mapping is
freed with the array.

Test-only: with ASR_DECODE_CRASH_MARKER set, a worker aborts (SIGABRT, as a segfault would
end it) on input containing that marker; unset in production.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from gateway.asr.audio import AudioDecodeError
from gateway.service.decode_worker import _SHM_DIR, CRASH_MARKER_ENV, DecodeJob, run_job  # noqa: F401 - re-exported
from gateway.service.decode_worker import worker_decode as _worker_decode
from gateway.service.metrics import DECODER_CRASHES

log = logging.getLogger("gateway")


MAX_DEFAULT_WORKERS = 2  # decoder processes by default on machines of 4 cores or more
WORKER_IDLE_S = 5.0  # decoder processes unused this long exit; the next decode starts them again


def default_decode_workers(cores: int | None = None) -> int:
    """Decoder processes for ``cores`` (default: os.cpu_count(), as render.py counts them): one
    per two cores, at least one, at most MAX_DEFAULT_WORKERS. Decoding a call takes tens of ms, so
    one process keeps up on a small machine, where a second, idle one held 66 MB RSS at the peak
    (bench/results/ab_server_encode.json, `at_peak_mb` of the runs with decode_workers=2)."""
    if cores is None:
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores // 2))


class DecoderCrashError(AudioDecodeError):
    """The input killed the decoder process twice (maps to INVALID_ARGUMENT)."""


def _map_samples(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """The worker's samples, mapped (not copied); the file is unlinked before returning."""
    try:
        n_bytes = int(np.prod(shape)) * 4
        if n_bytes == 0:
            return np.zeros(shape, dtype=np.float32)
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), n_bytes, access=mmap.ACCESS_COPY)
        return np.frombuffer(mapped, dtype=np.float32).reshape(shape)
    finally:
        os.unlink(path)


def _discard_result(future) -> None:
    """A decode whose caller went away (cancelled call): unlink the samples it wrote, if any."""
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    if isinstance(result, tuple):
        try:
            os.unlink(result[0])
        except FileNotFoundError:
            pass


async def _wait(future):
    """The worker's result; on cancellation the samples file is removed when the worker finishes."""
    try:
        return await asyncio.wrap_future(future, loop=asyncio.get_running_loop())
    except asyncio.CancelledError:
        future.add_done_callback(_discard_result)
        raise


class DecodePool:
    """``workers`` decoder processes, replaced whenever one dies."""

    def __init__(self, workers: int, idle_s: float = WORKER_IDLE_S) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, got {workers}")
        if idle_s < 0:
            raise ValueError(f"idle_s must be >= 0 (0: workers never retire), got {idle_s}")
        self.workers = workers
        self.idle_s = idle_s
        self.crashes = 0  # worker deaths seen (metrics, tests)
        self.retired = 0  # times the idle workers exited (tests)
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["gateway.service.decode_worker"])  # numpy and PyAV, not asyncio
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None  # started on first use, again after retiring
        self._generation = 0
        self._busy = 0  # decodes submitted and not finished
        self._idle_timer: asyncio.TimerHandle | None = None

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=self._context)

    def _current(self) -> tuple[ProcessPoolExecutor, int]:
        """The executor (a new one after retiring) and its generation; under the lock."""
        if self._executor is None:
            self._executor = self._new_executor()
        return self._executor, self._generation

    def warm_up(self) -> None:
        """Start the workers now (forkserver start is about a second), not on the first request."""
        with self._lock:
            executor, _ = self._current()
        futures = [executor.submit(_worker_decode, DecodeJob(b"", False, 1.0)) for _ in range(self.workers)]
        for future in futures:
            future.result()
            _discard_result(future)

    def _replace(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # another caller already replaced it
            self.crashes += 1
            DECODER_CRASHES.inc()
            broken, self._executor = self._executor, None  # the next decode starts a new one
            self._generation += 1
        if broken is not None:
            broken.shutdown(wait=False, cancel_futures=True)
        log.error("an audio decoder process died; the next decode starts a new pool")

    async def decode(self, job: DecodeJob) -> np.ndarray:
        with self._lock:
            executor, generation = self._current()
            self._busy += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        try:
            try:
                result = await _wait(executor.submit(_worker_decode, job))
            except BrokenProcessPool:
                self._replace(generation)
                result = await self._decode_alone(job)
        finally:
            with self._lock:
                self._busy -= 1
                idle = self._busy == 0
            if idle and self.idle_s:
                self._idle_timer = asyncio.get_running_loop().call_later(self.idle_s, self._retire_if_idle)
        if isinstance(result, AudioDecodeError):
            raise result
        path, shape = result
        return _map_samples(path, shape)

    def _retire_if_idle(self) -> None:
        """The workers exit when no decode came for idle_s: a worker holds 65-90 MB RSS, most of
        it while nothing is decoded (a 10-minute recording is decoded in its first second), and
        the next decode starts a new one from the forkserver (0.10-0.13 s, a one-off measurement)."""
        self._idle_timer = None
        with self._lock:
            if self._busy or self._executor is None:
                return
            idle, self._executor = self._executor, None
            self.retired += 1
        idle.shutdown(wait=False)

    async def _decode_alone(self, job: DecodeJob):
        """The retry after a crash: a process of its own, so only the culprit dies again."""
        solo = ProcessPoolExecutor(max_workers=1, mp_context=self._context)
        try:
            return await _wait(solo.submit(_worker_decode, job))
        except BrokenProcessPool:
            with self._lock:
                self.crashes += 1
            DECODER_CRASHES.inc()
            log.error("audio input crashed the decoder twice; refused")
            raise DecoderCrashError("the audio decoder crashed on this input; it cannot be decoded") from None
        finally:
            solo.shutdown(wait=False)

    def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
