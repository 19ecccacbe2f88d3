"""Opt-in timers of the models (the profile table of `make bench`).

Off unless the environment variable ASR_ENGINE_PROFILE_DIR names a directory (Triton passes its
environment to the backend stubs): then each model instance adds up named wall-clock times and
counts and writes them, cumulative, to ``<dir>/<model>-<pid>.json`` at most every DUMP_PERIOD_S
(from a daemon thread) and when the model is finalized. Nothing is timed when it is off
(``profiler()`` returns None and callers skip their timers).
"""
import json
import os
import threading
import time

PROFILE_ENV = "ASR_ENGINE_PROFILE_DIR"
DUMP_PERIOD_S = 0.5


class Profile:
    def __init__(self, path: str):
        self.path = path
        self.totals = {}   # name -> seconds
        self.counts = {}   # name -> count
        self._changed = False
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="profile-dump", daemon=True).start()

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + count
        self._changed = True

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n
        self._changed = True

    def dump(self) -> None:
        self._changed = False
        data = {"pid": os.getpid(), "time": time.time(), "seconds": dict(self.totals), "counts": dict(self.counts)}
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError:
            pass

    def _loop(self) -> None:
        while not self._stop.wait(DUMP_PERIOD_S):
            if self._changed:
                self.dump()

    def close(self) -> None:
        self._stop.set()
        self.dump()


def profiler(model: str):
    """A Profile writing <ASR_ENGINE_PROFILE_DIR>/<model>-<pid>.json, or None when profiling is off."""
    directory = os.environ.get(PROFILE_ENV, "")
    if not directory or not os.path.isdir(directory):
        return None
    return Profile(os.path.join(directory, f"{model}-{os.getpid()}.json"))
