"""One ONNX Runtime run at a time across the models of one CPU-only Triton server (issue 13).

The encoder and decoder stubs are separate processes, each with an ORT thread pool sized to the
machine. When both run at once on a small CPU (2 cores) their threads take turns on the cores:
an operator split over two threads waits for whichever was descheduled, and an encoder window
took 0.54 s of ORT time beside the decoder (bench/results/ab_compute_lock_2026-12-01.json, no
lock) against 0.2 s in a lone session (a one-off measurement outside the repository). With
this lock (an exclusive flock on a file of the server: the stubs' parent process) each run has
the cores to itself; the Python around the runs still overlaps. Never on GPU providers, where
runs do not compete for the CPU. Render tunable `cpu_compute_lock`; None by default: on
where the CPU provider serves alone on at most LOCK_MAX_CORES cores. On 2 cores, 10-minute
recording, int8, each order once: RTFx 29.72 / 28.23 with it against 26.68 / 26.10 without, the
search stub 19.4 / 20.5 CPU seconds against 22.5 / 22.8, an encoder window 0.28 s of ORT against
0.54; 100 short calls 14.32 / 14.74 against 14.19 / 13.39 (bench/results/ab_compute_lock_2026-12-01*.json).
Before the fused encoder and the 8-bit cross-attention it was slower (26.0 against 28.1). Not
measured on more cores, where a decoder step of a few windows leaves most of them idle.
"""
import fcntl
import os
import tempfile

from .config import enabled

LOCK_MAX_CORES = 4  # the lock's default is on up to this many cores (render.py cpu_compute_lock)


class ComputeLock:
    """Exclusive across the processes that open the same file (one ORT run at a time per
    process already: each stub runs its sessions from one thread)."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self):
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def server_lock_path() -> str:
    """The lock file of this Triton server: its stubs share their parent, tritonserver."""
    return os.path.join(tempfile.gettempdir(), f"asr-compute-{os.getppid()}.lock")


_LOCKS = {}  # path -> ComputeLock: one open file per process (flock is per open file)


def compute_lock(config: dict):
    """The server's ComputeLock when the config turns it on (`compute_lock` 1), else None."""
    if not enabled(config, "compute_lock", "0"):
        return None
    path = server_lock_path()
    if path not in _LOCKS:
        _LOCKS[path] = ComputeLock(path)
    return _LOCKS[path]


class LockedSession:
    """An ORT InferenceSession whose run() holds the compute lock; everything else delegates."""

    def __init__(self, session, lock: ComputeLock):
        self._session, self._lock = session, lock

    def run(self, *args, **kwargs):
        with self._lock:
            return self._session.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)
