"""Small helpers shared by the exporters: progress/timing, file sizes, the export stamp."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

EXPORT_DIR = Path(__file__).resolve().parent
STAMP_NAME = ".export_stamp"


class ExportError(RuntimeError):
    """Base class for export failures with a message meant for the user."""


def log(msg: str) -> None:
    print(f"[export] {msg}", flush=True)


class PhaseTimer:
    def __init__(self):
        self.phases: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        log(f"{name} ...")
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.phases.append((name, dt))
        log(f"{name} done in {dt:.1f}s")

    def summary(self) -> str:
        total = sum(dt for _, dt in self.phases)
        parts = ", ".join(f"{n} {dt:.1f}s" for n, dt in self.phases)
        return f"{parts} (total {total:.1f}s)"


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def report_sizes(out: Path, rel_paths: list[str]) -> None:
    for rel in rel_paths:
        p = out / rel
        if p.exists():
            log(f"  {rel:<34} {p.stat().st_size:>13,d} bytes  ({human_size(p.stat().st_size)})")


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def compute_stamp(options: dict, packages: list[str]) -> str:
    """Hash of the export sources, package versions and options (stable JSON)."""
    h = hashlib.sha256()
    for src in sorted(EXPORT_DIR.glob("*.py")):
        h.update(src.name.encode())
        h.update(hashlib.sha256(src.read_bytes()).digest())
    info = {
        "python": sys.version_info[:2],
        "packages": {p: package_version(p) for p in packages},
        "options": options,
    }
    h.update(json.dumps(info, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _listing(out: Path) -> dict[str, int]:
    return {
        str(p.relative_to(out)): p.stat().st_size
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith(STAMP_NAME) and not p.name.endswith(".tmp")
    }


def stamp_matches(out: Path, stamp: str, required: list[str]) -> bool:
    """True when OUT/.export_stamp holds this stamp and every file it lists is still there with
    the size it had when the export finished (and every required file exists)."""
    try:
        lines = (out / STAMP_NAME).read_text().splitlines()
        if not lines or lines[0].strip() != stamp:
            return False
        files = json.loads("\n".join(lines[1:]) or "{}")
    except (OSError, ValueError):
        return False
    for rel, size in files.items():
        p = out / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    return all((out / rel).exists() for rel in required)


def write_stamp(out: Path, stamp: str) -> None:
    """Stamp hash on the first line, then a JSON listing {relative path: size} of the outputs."""
    tmp = out / (STAMP_NAME + ".tmp")
    tmp.write_text(stamp + "\n" + json.dumps(_listing(out), indent=0) + "\n")
    os.replace(tmp, out / STAMP_NAME)


def clear_stamp(out: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (out / STAMP_NAME).unlink()
