"""One ONNX Runtime run at a time across the models of one CPU-only Triton server (issue 13).

The encoder and decoder stubs are separate processes, each with an ORT thread pool sized to the
machine. When both run at once on a small CPU (2 cores) their threads take turns on the cores:
an operator split over two threads waits for whichever was descheduled, and an encoder window
took 0.6-0.75 s of ORT time beside the decoder (bench/results/latest.json) against 0.2 s in a
lone session (a one-off measurement outside the repository). With
this lock (an exclusive flock on a file of the server: the stubs' parent process) each run has
the cores to itself; the Python around the runs still overlaps. Never on GPU providers, where
runs do not compete for the CPU; on CPUs only when the render tunable `cpu_compute_lock` asks
(off by default: on 2 cores an encoder window did drop from 0.58 to 0.37 s, but the whole run
was slower, RTFx 26.0 vs 28.1, because the search's Python then waited for every encoder run).
"""
import fcntl
import os
import tempfile

from .config import enabled


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
