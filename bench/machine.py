"""What a benchmark records about the machine: peak RSS summed over process trees (ours:
gateway, tritonserver and every backend stub; the peer: its process), load averages, CPU flags."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path


class MemorySampler:
    """Peak of the RSS summed over process trees (roots and all their descendants), and peak of
    the PSS summed the same way.

    RSS counts a page shared by several processes (libpython, numpy, ONNX Runtime, the forked
    decode workers' copy-on-write pages) once in each of them, so a sum over many processes
    overstates what they hold together; PSS charges each process its share of such a page, and
    the sum is the physical memory of the group. One process (the peer) has RSS = PSS but for
    pages shared with processes outside the tree."""

    def __init__(self, roots: list[int], period_s: float = 0.2) -> None:
        import psutil

        self._psutil = psutil
        self.roots = roots
        self.period_s = period_s
        self.peak_total = 0
        self.peak_total_pss = 0
        self.peak_by_process: dict[str, int] = {}
        self.at_peak: dict[str, int] = {}
        self._cpu_by_pid: dict[int, tuple[str, float]] = {}  # pid -> (label, CPU seconds at its last sample)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _label(self, proc) -> str:
        try:
            cmd = proc.cmdline()
        except Exception:  # noqa: BLE001
            return f"pid {proc.pid}"
        text = " ".join(cmd)
        if "triton_python_backend_stub" in text:
            model = next((Path(c).parent.parent.name for c in cmd if c.endswith("model.py")), "?")
            return f"stub:{model}"
        if "tritonserver" in text:
            return "tritonserver"
        if "gateway.service.server" in text:
            return "gateway"
        if "bench.speed" in text and "--peer-run" in text:
            return "faster-whisper"
        return f"{Path(cmd[0]).name if cmd else '?'}:{proc.pid}"

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each kind of process in the trees (the
        decode workers, ``python:<pid>``, summed as ``python``); diff two of these for a workload.
        A process that has exited keeps what it had used at its last sample (the gateway's idle
        decode workers exit: without it a workload's diff could come out negative)."""
        self._update_cpu(self._processes())
        out: dict[str, float] = {}
        for label, seconds in self._cpu_by_pid.values():
            out[label] = out.get(label, 0.0) + seconds
        return out

    def _update_cpu(self, procs: list) -> None:
        for p in procs:
            try:
                times = p.cpu_times()
            except self._psutil.Error:
                continue
            known = self._cpu_by_pid.get(p.pid)
            label = known[0] if known else self._label(p)
            label = "python" if label.startswith("python:") else label
            self._cpu_by_pid[p.pid] = (label, times.user + times.system)

    def _processes(self) -> list:
        procs, seen = [], set()
        for pid in self.roots:
            try:
                root = self._psutil.Process(pid)
                tree = [root] + root.children(recursive=True)
            except self._psutil.Error:
                continue
            for p in tree:
                if p.pid not in seen:
                    seen.add(p.pid)
                    procs.append(p)
        return procs

    def sample(self) -> None:
        total, total_pss, now = 0, 0, {}
        procs = self._processes()
        self._update_cpu(procs)  # (one walk of the trees for both)
        for p in procs:
            rss, pss = _rss_pss(p.pid)
            if rss is None:
                try:
                    rss = pss = p.memory_info().rss
                except self._psutil.Error:
                    continue
            total_pss += pss
            label = self._label(p)
            if label in now:
                label = f"{label}#{p.pid}"
            now[label] = rss
            total += rss
            self.peak_by_process[label] = max(self.peak_by_process.get(label, 0), rss)
        if total > self.peak_total:
            self.peak_total, self.at_peak = total, now
        self.peak_total_pss = max(self.peak_total_pss, total_pss)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def summary(self) -> dict:
        mb = 1 << 20
        return {"peak_total_mb": round(self.peak_total / mb, 1),
                "peak_total_pss_mb": round(self.peak_total_pss / mb, 1),
                "at_peak_mb": {k: round(v / mb, 1) for k, v in sorted(self.at_peak.items())},
                "peak_by_process_mb": {k: round(v / mb, 1) for k, v in sorted(self.peak_by_process.items())}}


def _rss_pss(pid: int):
    """(RSS, PSS) in bytes from one read of /proc/<pid>/smaps_rollup (so the two are of the same
    instant), or (None, None) where it cannot be read."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    fields[key] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError):
        return None, None
    if len(fields) != 2:
        return None, None
    return fields["Rss"], fields["Pss"]


def load() -> dict:
    one, five, fifteen = os.getloadavg()
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        uptime = ""
    return {"load_1_5_15": [round(one, 2), round(five, 2), round(fifteen, 2)], "uptime": uptime}


def machine() -> dict:
    info = {"cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
        info["avx512_vnni"] = "avx512_vnni" in flags
        info["avx2"] = " avx2" in flags
    except OSError:
        pass
    return info
