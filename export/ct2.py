"""Reader for the CTranslate2 ``model.bin`` binary format.

Layout (little endian, binary versions 1-6 as written by ``ctranslate2.specs.ModelSpec``)::

    u32 binary_version
    [version >= 2] string spec_name ; u32 spec_revision
    u32 n_variables
    n_variables x:
        string name ; u8 rank ; u32 shape[rank]
        [version >= 4] u8 dtype_id ; u32 num_bytes
        [version <  4] u8 item_size ; u32 num_items
        bytes data
    [version >= 3] u32 n_aliases ; n_aliases x: string alias ; string target

where ``string`` is ``u16 length`` (including a trailing NUL) followed by the bytes.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np

SUPPORTED_BINARY_VERSION = 6

# ctranslate2::DataType enum order
_DTYPES = {
    0: ("float32", np.dtype("<f4")),
    1: ("int8", np.dtype("i1")),
    2: ("int16", np.dtype("<i2")),
    3: ("int32", np.dtype("<i4")),
    4: ("float16", np.dtype("<f2")),
    5: ("bfloat16", np.dtype("<u2")),  # raw bits, see CT2Variable.to_float32
}
_ITEMSIZE_TO_DTYPE = {4: 0, 1: 1, 2: 2}  # binary version < 4 (fp16 was not supported)


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model.bin this reader understands."""


@dataclasses.dataclass
class CT2Variable:
    name: str
    shape: tuple[int, ...]
    dtype: str
    data: np.ndarray  # shaped, dtype as stored (bfloat16 as uint16 bits)

    def to_float32(self) -> np.ndarray:
        if self.dtype == "bfloat16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return self.data.astype(np.float32)


@dataclasses.dataclass
class CT2Model:
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, CT2Variable]
    aliases: dict[str, str]

    def __getitem__(self, name: str) -> CT2Variable:
        seen = set()
        while name in self.aliases and name not in self.variables:
            if name in seen:
                raise KeyError(f"alias cycle at {name!r}")
            seen.add(name)
            name = self.aliases[name]
        return self.variables[name]

    def __contains__(self, name: str) -> bool:
        try:
            self[name]
        except KeyError:
            return False
        return True

    def get(self, name: str, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def names(self) -> list[str]:
        return list(self.variables) + list(self.aliases)


class _Cursor:
    def __init__(self, buf: memoryview, path: str):
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise CT2FormatError(
                f"{self.path}: truncated at byte {self.pos} (wanted {n} bytes, file has {len(self.buf)})"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))

    def u8(self) -> int:
        return self.unpack("<B")[0]

    def u16(self) -> int:
        return self.unpack("<H")[0]

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def string(self) -> str:
        n = self.u16()
        raw = bytes(self.take(n))
        if raw.endswith(b"\0"):
            raw = raw[:-1]
        return raw.decode("utf-8")


def parse_bytes(data: bytes | bytearray | memoryview, path: str = "<bytes>") -> CT2Model:
    cur = _Cursor(memoryview(data), path)
    version = cur.u32()
    if version < 1 or version > SUPPORTED_BINARY_VERSION:
        raise CT2FormatError(f"{path}: unsupported CTranslate2 binary version {version}")
    spec, revision = "", 1
    if version >= 2:
        spec = cur.string()
        revision = cur.u32()
    n_vars = cur.u32()
    variables: dict[str, CT2Variable] = {}
    for _ in range(n_vars):
        name = cur.string()
        rank = cur.u8()
        shape = tuple(cur.unpack(f"<{rank}I")) if rank else ()
        if version >= 4:
            dtype_id = cur.u8()
            num_bytes = cur.u32()
        else:
            item_size = cur.u8()
            if item_size not in _ITEMSIZE_TO_DTYPE:
                raise CT2FormatError(f"{path}: variable {name!r} has item size {item_size}")
            dtype_id = _ITEMSIZE_TO_DTYPE[item_size]
            num_bytes = cur.u32() * item_size
        if dtype_id not in _DTYPES:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
        dname, npdt = _DTYPES[dtype_id]
        count = int(np.prod(shape)) if shape else 1
        if count * npdt.itemsize != num_bytes:
            raise CT2FormatError(
                f"{path}: variable {name!r} shape {shape} {dname} needs {count * npdt.itemsize} bytes, "
                f"header says {num_bytes}"
            )
        arr = np.frombuffer(cur.take(num_bytes), dtype=npdt).reshape(shape)
        variables[name] = CT2Variable(name, shape, dname, arr)
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(cur.u32()):
            alias = cur.string()
            aliases[alias] = cur.string()
    if cur.pos != len(cur.buf):
        raise CT2FormatError(f"{path}: {len(cur.buf) - cur.pos} trailing bytes after the model")
    return CT2Model(version, spec, revision, variables, aliases)


def read_model(path: str | Path) -> CT2Model:
    """Parse a CTranslate2 model.bin (the arrays are read-only views of the file contents)."""
    path = Path(path)
    return parse_bytes(path.read_bytes(), str(path))
