"""Fetch Silero VAD's ONNX model into build/vad/ (the gateway runs it with ONNX Runtime).

    python tools/setup_vad.py [--dest build/vad]

The model ships inside the PyPI package ``silero-vad`` (MIT), whose dependencies (torch,
torchaudio) the gateway does not need: the wheel is fetched with ``pip download --no-deps``
into ``build/cache/wheels`` and only ``silero_vad/data/silero_vad.onnx`` is extracted.

Idempotent: when DEST already holds the model with the expected SHA-256 nothing is downloaded.
The gateway finds the model at ``build/vad/silero_vad.onnx`` (``--vad-model`` or the
``ASR_VAD_MODEL`` environment variable override that).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import zipfile
from pathlib import Path

from wheels import fetch_wheel  # tools/wheels.py (this script runs as tools/setup_vad.py)

REPO_ROOT = Path(__file__).resolve().parent.parent
SILERO_VAD_VERSION = "6.2.3"
MODEL_MEMBER = "silero_vad/data/silero_vad.onnx"
MODEL_NAME = "silero_vad.onnx"
# sha256 of silero_vad/data/silero_vad.onnx in silero-vad 6.2.3 (checked after extraction)
MODEL_SHA256 = "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"


def log(message: str) -> None:
    print(f"[setup_vad] {message}", flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install(dest: Path, cache: Path) -> Path:
    target = dest / MODEL_NAME
    if target.is_file() and sha256(target) == MODEL_SHA256:
        log(f"{target} is up to date")
        return target
    wheel = fetch_wheel("silero-vad", SILERO_VAD_VERSION, cache, log)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(MODEL_MEMBER)
        except KeyError as error:
            raise SystemExit(f"[setup_vad] {wheel.name} has no {MODEL_MEMBER}") from error
    digest = hashlib.sha256(data).hexdigest()
    if digest != MODEL_SHA256:
        raise SystemExit(f"[setup_vad] {MODEL_MEMBER} in {wheel.name} has sha256 {digest}, expected {MODEL_SHA256}")
    tmp = target.with_suffix(".onnx.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    log(f"extracted {MODEL_MEMBER} from {wheel.name} -> {target} ({len(data)} bytes)")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO_ROOT / "build" / "vad")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / "build" / "cache" / "wheels")
    args = parser.parse_args(argv)
    install(args.dest, args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
