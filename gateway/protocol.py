"""Generated gRPC stubs for protos/asr/v1/asr.proto.

The stubs are build outputs (never committed). `make proto` generates them; importing
this module regenerates them when they are missing or older than the .proto, so a
fresh checkout works as soon as grpcio-tools is installed.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = PROJECT_ROOT / "protos"
PROTO_FILES = ("asr/v1/asr.proto",)
GENERATED_DIR = Path(__file__).resolve().parent / "_generated"


class ProtoGenerationError(RuntimeError):
    """grpc_tools.protoc failed on the project's .proto files."""


def _is_stale() -> bool:
    for rel in PROTO_FILES:
        source = PROTO_ROOT / rel
        generated = GENERATED_DIR / rel.replace(".proto", "_pb2_grpc.py")
        if not generated.exists() or generated.stat().st_mtime < source.stat().st_mtime:
            return True
    return False


def generate(force: bool = False) -> Path:
    """Compile the .proto files into gateway/_generated (idempotent)."""
    if not force and not _is_stale():
        return GENERATED_DIR
    from grpc_tools import protoc  # build-time dependency, imported only when needed

    GENERATED_DIR.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    for rel in PROTO_FILES:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={GENERATED_DIR}",
            f"--pyi_out={GENERATED_DIR}",
            f"--grpc_python_out={GENERATED_DIR}",
            str(PROTO_ROOT / rel),
        ]
        if protoc.main(args) != 0:
            raise ProtoGenerationError(f"protoc failed on {PROTO_ROOT / rel}")
    # Namespace packages need no __init__.py; regenerate timestamps for staleness checks.
    for rel in PROTO_FILES:
        (GENERATED_DIR / rel.replace(".proto", "_pb2_grpc.py")).touch()
    return GENERATED_DIR


def _load():
    generate()
    if str(GENERATED_DIR) not in sys.path:
        sys.path.insert(0, str(GENERATED_DIR))
    pb2 = importlib.import_module("asr.v1.asr_pb2")
    pb2_grpc = importlib.import_module("asr.v1.asr_pb2_grpc")
    return pb2, pb2_grpc


asr_pb2, asr_pb2_grpc = _load()

__all__ = ["asr_pb2", "asr_pb2_grpc", "generate"]

if __name__ == "__main__":
    print(f"generated stubs in {generate(force=True)}")
