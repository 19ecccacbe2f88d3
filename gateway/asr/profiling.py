"""Opt-in client-side timers of the Triton round trips (the profile table of `make bench`).

Off unless ASR_ENGINE_PROFILE_DIR names a directory; then the gateway adds up the wall time of
every encoder and decoder request as the client sees it (queueing and compute in Triton, the
gRPC round trip, serialisation) and writes the totals, cumulative, to
``<dir>/gateway-<pid>.json`` at most every half second. The server side writes the same kind of
file per model (model_repository/engine/profile.py); the bench subtracts one from the other.
"""

from __future__ import annotations

import json
import os
import threading
import time

PROFILE_ENV = "ASR_ENGINE_PROFILE_DIR"
DUMP_PERIOD_S = 0.5


class ClientProfile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._changed = False
        threading.Thread(target=self._loop, name="client-profile-dump", daemon=True).start()

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1
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
        while True:
            time.sleep(DUMP_PERIOD_S)
            if self._changed:
                self.dump()


_PROFILE: ClientProfile | None = None
_CHECKED = False


def client_profile() -> ClientProfile | None:
    """The process's ClientProfile, or None when profiling is off."""
    global _PROFILE, _CHECKED
    if not _CHECKED:
        _CHECKED = True
        directory = os.environ.get(PROFILE_ENV, "")
        if directory and os.path.isdir(directory):
            _PROFILE = ClientProfile(os.path.join(directory, f"gateway-{os.getpid()}.json"))
    return _PROFILE
