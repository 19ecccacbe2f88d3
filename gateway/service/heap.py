"""The C heap of the gateway's processes (glibc; a no-op elsewhere).

Kept free of the project's other imports: the audio decoder processes (decode_worker.py) use it
too, and the forkserver preloads only what they need.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)
# glibc makes one malloc arena per thread up to 8 per core, each keeping its own freed memory. The
# gateway's peak on 100 calls at concurrency 4 (bench.speed --workloads calls, int8): 296 / 307 MB
# without a cap, 245-257 MB in most runs with 2 (docs/performance.md, tenth pass)
DEFAULT_MALLOC_ARENAS = 2

_libc = None  # libc once looked up; False where there is none


def _lib():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim, _libc.mallopt  # noqa: B018 - both or neither
        except (OSError, AttributeError):
            _libc = False
    return _libc


def release_free_heap() -> None:
    """What was freed goes back to the system (glibc malloc_trim): a worker that decoded a few
    minutes of FLAC otherwise keeps about 12 MB more between jobs, and the gateway process tens
    of MB after a long recording. (Triton's stubs do the same in model_repository/engine/heap.py;
    the gateway's image ships without that package.)"""
    libc = _lib()
    if libc:
        libc.malloc_trim(0)


def cap_malloc_arenas(arenas: int) -> bool:
    """At most ``arenas`` malloc arenas from now on (0: glibc's default); call before the
    process starts its threads. True when glibc took it."""
    libc = _lib()
    return bool(libc) and arenas > 0 and libc.mallopt(M_ARENA_MAX, int(arenas)) == 1
